"""Real MTAs on loopback for integration tests: private Postfix and Exim instances.

Plain subprocess and files, no trio. Everything here needs root and the software that
`.ci/install` puts in place (Postfix 3.7 from the package, Exim 4.96 as a bare binary).
The facts behind the configuration are in TEST-ENV.md; the surprising ones are repeated
next to the code that depends on them.

- `Postfix`: a private instance (`postfix -c DIR`) listening on 127.0.0.1:PORT, optionally
  behind the PROXY protocol, delivering `*@dest.test` into the Maildir `DIR/mail/box/`.
- `EximClient`: a sending Exim that routes every address to 127.0.0.1:PORT and (by default)
  uses early pipelining (PIPECONNECT) once it has cached the server's EHLO reply.
- `EximServer`: an Exim daemon that accepts everything and discards it (the reference
  implementation of the server side of early pipelining), or keeps it in a Maildir
  (`store=True`); any address, TLS, SIZE, banner, connect ACL; `reload()` by SIGHUP.
- `deliveries()` / `exim_flags()`: parse Exim's `=>` log lines (`L`, `L*`, `K`, `X=`, `TFO*`);
  `receptions()` its `<=` lines (`L`, `L-`, `L.`, `L*`).
- `postfix_statuses()`: Postfix's `status=` lines (sent, deferred, bounced, deliverable).

Both MTAs can run in a network namespace (`netns=`, tests/netns.py): Postfix as a sender
(`relayhost=`), Exim as the MX on 127.0.0.3:25 or [::1]:25 -- outbound mode's test bed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.netns import run_command

if TYPE_CHECKING:
    from tests.netns import Namespace

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
SENDMAIL = "/usr/sbin/sendmail"  # Postfix's (the Exim binary is only /usr/sbin/exim4)
EXIM = "/usr/sbin/exim4"
SWAKS = "/usr/bin/swaks"

EXIM_USER = "Debian-exim"
NOBODY_UID = 65534  # the virtual(8) delivery agent writes the Maildir as this uid
NOBODY_GID = 65534

# Serialises edits of alternate_config_directories in the default main.cf between
# concurrently starting instances (also across pytest-xdist workers).
_ALT_LOCK = Path("/tmp/pipeconnect-proxy-postfix-alt.lock")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def missing_software() -> list[str]:
    """What the real-MTA tests need but this machine lacks (empty list: all there)."""
    missing = [p for p in (POSTFIX, EXIM, SWAKS) if not os.access(p, os.X_OK)]
    if not Path("/etc/postfix/main.cf").is_file():
        missing.append("/etc/postfix/main.cf")
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        missing.append(f"user {EXIM_USER}")
    if os.geteuid() != 0:
        missing.append("root privileges")
    return missing


# --------------------------------------------------------------------------- helpers


def _proc_net_address(host: str) -> tuple[str, str]:
    """`host` as /proc/net/tcp{,6} spell it (each 32-bit word in host byte order), and the
    table's name."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(family, host)
    words = "".join(
        "{:08X}".format(int.from_bytes(packed[i : i + 4], "little"))
        for i in range(0, len(packed), 4)
    )
    return words, "tcp6" if family == socket.AF_INET6 else "tcp"


def _is_listening(port: int, host: str = "127.0.0.1", proc_net: Path | None = None) -> bool:
    """True if some socket listens on host:port (IPv4 or IPv6), read from /proc: no
    connection made, so nothing shows up in the MTA's log. `proc_net` is the /proc/PID/net
    of a process in another network namespace (default: this process's own)."""
    addr, table = _proc_net_address(host)
    want = f"{addr}:{port:04X}"
    any_addr = f"{'0' * len(addr)}:{port:04X}"
    try:
        lines = ((proc_net or Path("/proc/net")) / table).read_text().splitlines()[1:]
    except OSError:
        if proc_net is not None:
            return False
        return _can_connect(port, host)
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and fields[1] in (want, any_addr):
            return True
    return False


def _can_connect(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers to kill(pid, 0).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, ppid, comm) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        head, _, tail = raw.rpartition(")")
        comm = head.split("(", 1)[1] if "(" in head else ""
        fields = tail.split()
        if len(fields) >= 2:
            yield int(entry.name), int(fields[1]), comm


def _children(pid: int, comm: str | None = None) -> list[int]:
    return [p for p, pp, c in _processes() if pp == pid and (comm is None or c == comm)]


def _descendants(pid: int) -> list[int]:
    procs = list(_processes())
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp, _ in procs if pp == parent and p not in found]
        found += kids
        frontier += kids
    return found


def _reap(pids: list[int], timeout: float) -> None:
    """Wait up to `timeout` for `pids` to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + timeout
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for p in pids:
        if _pid_alive(p):
            _kill(p)


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _make_traversable(path: Path) -> None:
    """Let unprivileged daemon users (postfix, nobody, Debian-exim) reach `path`: add the
    search bit for others on it and on every ancestor (pytest makes its tmp dirs 0700)."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH | stat.S_IXGRP)


def _tail_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _replace_file(path: Path, text: str) -> None:
    """Write `path` as a new file renamed over the old one (root's, 0644 as before).
    Postfix daemons read main.cf whenever one starts (after a reload, for a delivery):
    rewritten in place, it was read empty, and the daemon ran on built-in defaults."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_for(
    what: str, predicate: Callable[[], bool], timeout: float, diagnostics: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{diagnostics()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- Postfix


@contextlib.contextmanager
def _alt_lock() -> Iterator[None]:
    with _ALT_LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alternate_dirs() -> list[str]:
    value = run_command([POSTCONF, "-h", "alternate_config_directories"]).strip()
    return [d for d in re.split(r"[\s,]+", value) if d]


def _set_alternate_dirs(dirs: list[str]) -> None:
    run_command([POSTCONF, "-e", f"alternate_config_directories = {' '.join(dirs)}"])
    _backdate(Path("/etc/postfix/main.cf"))


def _backdate(path: Path) -> None:
    """Postfix waits (in 300 ms steps) until a configuration file it reads is more than
    a second old, lest it read a half-written file: backdate the files we just wrote.
    That defeats the guard, so only for files replaced whole (`_replace_file`)."""
    t = time.time() - 10
    os.utime(path, (t, t))


def _register_alternate_dir(d: Path) -> None:
    """`postfix -c DIR` is refused unless the default main.cf lists DIR in
    alternate_config_directories. Append (other instances may be running)."""
    with _alt_lock():
        dirs = _alternate_dirs()
        if str(d) not in dirs:
            _set_alternate_dirs([*dirs, str(d)])


def _unregister_alternate_dir(d: Path) -> None:
    with _alt_lock():
        dirs = _alternate_dirs()
        if str(d) in dirs:
            _set_alternate_dirs([x for x in dirs if x != str(d)])


# The standard service list of Postfix 3.7's master.cf, chroot off everywhere (a chroot
# would need copies of /etc files in the queue directory), SMTP on 127.0.0.1:PORT only.
_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
local      unix  - n n -    - local
virtual    unix  - n n -    - virtual
lmtp       unix  - - n -    - lmtp
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


# master(8) logs this on SIGHUP, then re-reads main.cf and master.cf before it serves
# anything else (it is single-threaded).
_RELOADED = "]: reload -- version "


def maildir_files(maildir: Path) -> list[Path]:
    """The messages delivered to a Maildir (its `new/`), oldest first."""
    new = maildir / "new"
    if not new.is_dir():
        return []
    return sorted((p for p in new.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)


class Postfix:
    """A private Postfix instance in `tmpdir`, SMTP on 127.0.0.1:`port`.

    Layout: `etc/` (main.cf, master.cf: `postfix -c tmpdir/etc`), `queue/`, `data/`,
    `maillog`, `mail/box/{new,cur,tmp}`.

    Mail for any address `@dest.test` is delivered to the Maildir `tmpdir/mail/box/`;
    everything else is refused (relay) or bounced internally. The log is `tmpdir/maillog`.
    `extra` entries are written last into main.cf and override the defaults.

    As a SENDER (`relayhost="[127.0.0.3]:25"`, brackets: no MX lookup; or `"[::1]:25"`,
    which also sets `inet_protocols = all`): everything not `@mta.test` goes out through
    the smtp(8) client to the relay host (`default_transport = smtp`); `@mta.test` (bounce
    and delay notices to the test's senders) lands in the Maildir instead, so a notice
    never travels to the MX. Submit with `submit()`; judge with `statuses()`,
    `wait_sent()`, `wait_status()`. smtp client settings (`smtp_tls_security_level`,
    `smtp_tls_CAfile`, `smtp_connection_cache_on_demand`, queue timers...) go in `extra`.
    There is no DNS: `disable_dns_lookups = yes`, `smtp_host_lookup = native`.

    `netns`: run the instance in that network namespace (tests/netns.py): `postfix
    start|stop|reload|flush` run under its `exec_prefix`, so the master and all its
    daemons live there. Submission (`sendmail`, postdrop) needs no network.
    """

    def __init__(
        self,
        tmpdir: Path,
        port: int,
        *,
        proxy_protocol: bool = True,
        forbid_unauth_pipelining: bool = True,
        xclient: bool = False,
        extra: dict[str, str] | None = None,
        relayhost: str | None = None,
        netns: Namespace | None = None,
    ) -> None:
        self.dir = Path(tmpdir).resolve()
        self.port = port
        self.relayhost = relayhost
        self.netns = netns
        self.proxy_protocol = proxy_protocol
        self.forbid_unauth_pipelining = forbid_unauth_pipelining
        self.xclient = xclient
        self.extra = dict(extra or {})
        # The config directory tree must be all root's (postfix-script warns otherwise),
        # so the queue, data and mail directories live beside it, not in it.
        self.config_dir = self.dir / "etc"
        self.maillog_path = self.dir / "maillog"
        self.maildir = self.dir / "mail" / "box"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.running = False

    def __repr__(self) -> str:
        where = f" in {self.netns.name}" if self.netns is not None else ""
        relay = f" -> {self.relayhost}" if self.relayhost else ""
        return f"<Postfix 127.0.0.1:{self.port}{relay}{where} in {self.dir}>"

    @property
    def exec_prefix(self) -> list[str]:
        return list(self.netns.exec_prefix) if self.netns is not None else []

    def _proc_net(self) -> Path | None:
        return self.netns.proc_net if self.netns is not None else None

    # -- configuration

    def main_cf(self) -> dict[str, str]:
        d = str(self.dir)
        cf = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": "/etc/postfix",
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # There is no syslog: log to a file, which must lie under a listed prefix.
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": d,
            "myhostname": "mta.test",
            "mydomain": "mta.test",
            "myorigin": "mta.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            # No working DNS here: a reverse lookup per connection would only add delays.
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            "disable_dns_lookups": "yes",
            "biff": "no",
            "append_dot_mydomain": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": "",
            "default_transport": "error:no outbound mail from the test MTA",
            "relay_transport": "error:no outbound mail from the test MTA",
            "virtual_mailbox_domains": "dest.test",
            "virtual_mailbox_base": str(self.dir / "mail"),
            "virtual_mailbox_maps": "static:box/",  # trailing slash: Maildir
            "virtual_uid_maps": f"static:{NOBODY_UID}",
            "virtual_gid_maps": f"static:{NOBODY_GID}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "smtpd_client_restrictions": "",
            "smtpd_helo_restrictions": "",
            "smtpd_sender_restrictions": "",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtpd_forbid_unauth_pipelining": "yes" if self.forbid_unauth_pipelining else "no",
        }
        if self.proxy_protocol:
            cf["smtpd_upstream_proxy_protocol"] = "haproxy"
        if self.xclient:
            cf["smtpd_authorized_xclient_hosts"] = "127.0.0.0/8"
        if self.relayhost:
            cf.update(
                {
                    "relayhost": self.relayhost,
                    "default_transport": "smtp",
                    "relay_transport": "smtp",
                    # Notices to the test's senders stay here (see the class docstring).
                    "virtual_mailbox_domains": "mta.test",
                }
            )
            if self.relayhost.startswith("[") and ":" in self.relayhost.split("]")[0]:
                cf["inet_protocols"] = "all"
        cf.update(self.extra)
        return cf

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        _make_traversable(self.dir)
        self.config_dir.mkdir(exist_ok=True)
        lines = [f"{k} = {v}".rstrip() for k, v in self.main_cf().items()]
        _replace_file(self.config_dir / "main.cf", "\n".join(lines) + "\n")
        _replace_file(self.config_dir / "master.cf", _MASTER_CF.format(port=self.port))
        _backdate(self.config_dir / "main.cf")
        _backdate(self.config_dir / "master.cf")
        for sub in (self.queue_dir, self.data_dir, self.dir / "mail"):
            sub.mkdir(exist_ok=True)
        self.queue_dir.chmod(0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        self.data_dir.chmod(0o700)
        os.chown(self.dir / "mail", NOBODY_UID, NOBODY_GID)
        (self.dir / "mail").chmod(0o700)

    # -- life cycle

    def _postfix(self, *args: str, check: bool = True) -> str:
        # Errors before logging is up go to the terminal only: give it a pseudo-terminal.
        cmd = " ".join([POSTFIX, "-c", str(self.config_dir), *args])
        return run_command([*self.exec_prefix, "script", "-qec", cmd, "/dev/null"], check=check)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 20) -> Postfix:
        self.write_config()
        _register_alternate_dir(self.config_dir)
        try:
            self._postfix("start")
        except RuntimeError as e:
            log = self.maillog()
            self.stop()
            raise RuntimeError(f"{self!r} did not start: {e}\n--- maillog:\n{log}") from e
        self.running = True
        try:
            _wait_for(
                f"{self!r} to listen",
                lambda: _is_listening(self.port, proc_net=self._proc_net()),
                timeout,
                lambda: "--- maillog:\n" + self.maillog(),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def reload(self, timeout: float = 10) -> None:
        """Write the configuration and `postfix reload`; return once the master has taken
        it. `postfix reload` only sends SIGHUP: a test going on at once could meet the old
        settings, or rewrite the files while the master reads them."""
        self.write_config()
        before = self.maillog().count(_RELOADED)
        self._postfix("reload")
        _wait_for(
            f"{self!r} to reload",
            lambda: self.maillog().count(_RELOADED) > before,
            timeout,
            lambda: "--- maillog:\n" + self.maillog(),
        )

    def stop(self, timeout: float = 10) -> None:
        """Stop the instance (idempotent); kill what is left after `timeout` seconds."""
        pid = self.master_pid()
        if self.running or (pid is not None and _pid_alive(pid)):
            family = _descendants(pid) if pid is not None else []
            self._postfix("stop", check=False)
            if pid is not None:
                _reap([pid], timeout)
                _reap(family + _descendants(pid), 2)
        self.running = False
        _unregister_alternate_dir(self.config_dir)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def smtpd_kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Kill this instance's smtpd processes (fault injection); best effort.
        Returns the pids signalled."""
        pid = self.master_pid()
        if pid is None:
            return []
        pids = _children(pid, "smtpd")
        for p in pids:
            _kill(p, sig)
        return pids

    # -- observation

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """Wait until the regex `pattern` matches (re.search, MULTILINE) the maillog."""
        rx = re.compile(pattern, re.MULTILINE)
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = rx.search(self.maillog())
            if m:
                found.append(m)
            return m is not None

        _wait_for(
            f"/{pattern}/ in {self.maillog_path}",
            check,
            timeout,
            lambda: "--- maillog:\n" + self.maillog(),
        )
        return found[0]

    def message_files(self) -> list[Path]:
        return maildir_files(self.maildir)

    def messages(self) -> list[bytes]:
        """Delivered messages (Maildir `new/`, oldest first), as stored: LF line endings,
        with Postfix's Return-Path/Delivered-To/Received headers on top."""
        return [p.read_bytes() for p in self.message_files()]

    def wait_messages(self, n: int, timeout: float = 20) -> list[bytes]:
        """Wait until at least `n` messages have been delivered; return all of them."""
        _wait_for(
            f"{n} message(s) in {self.maildir}",
            lambda: len(self.message_files()) >= n,
            timeout,
            lambda: f"have {len(self.message_files())}\n--- maillog:\n{self.maillog()}",
        )
        return self.messages()

    # -- as a sender

    def submit(self, sender: str, rcpts: str | Sequence[str], message: bytes) -> None:
        """Queue `message` (headers, blank line, body; LF line endings) with Postfix's own
        `sendmail -C CONFIG -i -f SENDER -- RCPT...` (postdrop: no network needed). `-i`: a
        line holding only "." is message text. Returns once it is in the maildrop queue;
        delivery is asynchronous (`wait_sent`, `statuses`)."""
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        cmd = [SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender, "--", *rcpt_list]
        proc = subprocess.run(cmd, input=message, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out}")

    def log_mark(self) -> int:
        """The maillog's current size: pass as `since` to look at what came after."""
        return _size(self.maillog_path)

    def maillog_since(self, since: int = 0) -> str:
        return _tail_since(self.maillog_path, since)

    def statuses(self, since: int = 0, kinds: str | None = None) -> list[PostfixStatus]:
        """The delivery agents' `status=` lines since `since` (a `log_mark()`), optionally
        only those whose status is among `kinds` ("sent deferred bounced deliverable
        undeliverable expired")."""
        wanted = set(kinds.split()) if kinds else None
        return [
            st
            for st in postfix_statuses(self.maillog_since(since))
            if wanted is None or st.status in wanted
        ]

    def wait_status(
        self, kinds: str, n: int = 1, *, since: int = 0, timeout: float = 20
    ) -> list[PostfixStatus]:
        """Wait until at least `n` status lines with a status in `kinds` have been logged
        since `since`; return those."""
        _wait_for(
            f"{n} status={kinds!r} line(s) in {self.maillog_path}",
            lambda: len(self.statuses(since, kinds)) >= n,
            timeout,
            lambda: f"--- maillog since mark:\n{self.maillog_since(since)}",
        )
        return self.statuses(since, kinds)

    def wait_sent(self, n: int = 1, *, since: int = 0, timeout: float = 20) -> list[PostfixStatus]:
        """Wait for `n` `status=sent` lines since `since`; fail early (with the log) if a
        bounce shows up meanwhile."""

        def done() -> bool:
            bounced = self.statuses(since, "bounced")
            if bounced:
                raise AssertionError(
                    f"{self!r} bounced a message while waiting for {n} sent:\n"
                    + "\n".join(b.line for b in bounced)
                    + f"\n--- maillog since mark:\n{self.maillog_since(since)}"
                )
            return len(self.statuses(since, "sent")) >= n

        _wait_for(
            f"{n} status=sent line(s) in {self.maillog_path}",
            done,
            timeout,
            lambda: f"--- maillog since mark:\n{self.maillog_since(since)}",
        )
        return self.statuses(since, "sent")

    def queue_id(self, message_id: str, *, since: int = 0, timeout: float = 20) -> str:
        """The queue ID cleanup(8) gave the message with Message-ID `message_id` (without
        the angle brackets)."""
        m = self.wait_log_since(rf"(\w+): message-id=<{re.escape(message_id)}>", since, timeout)
        return m[1]

    def wait_log_since(self, pattern: str, since: int = 0, timeout: float = 10) -> re.Match[str]:
        """`wait_log`, looking only at what was logged after `since` (a `log_mark()`)."""
        rx = re.compile(pattern, re.MULTILINE)
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = rx.search(self.maillog_since(since))
            if m:
                found.append(m)
            return m is not None

        _wait_for(
            f"/{pattern}/ in {self.maillog_path}",
            check,
            timeout,
            lambda: "--- maillog since mark:\n" + self.maillog_since(since),
        )
        return found[0]

    def _queue_tool(self, tool: str, *args: str, check: bool = True) -> str:
        return run_command(
            [*self.exec_prefix, tool, "-c", str(self.config_dir), *args], check=check
        )

    def flush(self) -> None:
        """`postqueue -f`: attempt every queued message now."""
        self._queue_tool(POSTQUEUE, "-f")

    def queue_listing(self) -> str:
        """`postqueue -p` ("Mail queue is empty" when it is)."""
        return self._queue_tool(POSTQUEUE, "-p", check=False)

    def queue_empty(self) -> bool:
        return "Mail queue is empty" in self.queue_listing()

    def delete_queue(self) -> None:
        """`postsuper -d ALL`: drop every queued message (no bounce)."""
        self._queue_tool(POSTSUPER, "-d", "ALL", check=False)

    def hold_queue(self) -> None:
        """`postsuper -h ALL`: put every queued message on hold (no more attempts)."""
        self._queue_tool(POSTSUPER, "-h", "ALL", check=False)


# `postfix/smtp[123]: 4Xy...: to=<a@b>, relay=h[1.2.3.4]:25, delay=..., dsn=2.0.0,
# status=sent (250 OK ...)`; also from `verify`-mode probes (status=deliverable).
_STATUS = re.compile(
    r"postfix/(?P<agent>[\w/-]+)\[\d+\]: (?P<id>\w+): to=<(?P<to>[^>]*)>,"
    r"(?:.*? relay=(?P<relay>[^,]+),)?.*? dsn=(?P<dsn>[\d.]+), status=(?P<status>\w+)"
    r"(?: \((?P<reason>.*)\))?$"
)


@dataclass(frozen=True)
class PostfixStatus:
    """One `status=` line of a Postfix maillog (a delivery attempt's outcome)."""

    line: str
    agent: str  # smtp, virtual, error, bounce...
    queue_id: str
    to: str
    relay: str
    dsn: str
    status: str  # sent, deferred, bounced, expired, deliverable, undeliverable
    reason: str  # the text in parentheses: the server's reply or Postfix's explanation


def postfix_statuses(log: str) -> list[PostfixStatus]:
    """Every `status=` line of a Postfix maillog, in order."""
    result = []
    for line in log.splitlines():
        m = _STATUS.search(line)
        if m:
            result.append(
                PostfixStatus(
                    line,
                    m["agent"],
                    m["id"],
                    m["to"],
                    m["relay"] or "",
                    m["dsn"],
                    m["status"],
                    m["reason"] or "",
                )
            )
    return result


def swaks(
    port: int,
    *args: str,
    to: str = "rcpt@dest.test",
    sender: str = "sender@example.org",
    proxy_source: str | None = None,
    proxy_version: int = 2,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run swaks against 127.0.0.1:`port` (returns the completed process, never raises on
    its exit status). With `proxy_source` it first sends a PROXY header (v1 or v2) claiming
    that client address. Extra swaks options go in `args`."""
    cmd = [SWAKS, "--server", f"127.0.0.1:{port}", "--to", to, "--from", sender]
    if proxy_source is not None:
        v6 = ":" in proxy_source
        family = (
            ("TCP6" if v6 else "TCP4") if proxy_version == 1 else ("AF_INET6" if v6 else "AF_INET")
        )
        cmd += [
            "--proxy-version", str(proxy_version),
            "--proxy-family", family,
            "--proxy-source", proxy_source,
            "--proxy-source-port", "40000",
            "--proxy-dest", "::1" if v6 else "127.0.0.1",
            "--proxy-dest-port", str(port),
        ]  # fmt: skip
    cmd += args
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------- Exim


def _exim_dirs(base: Path) -> tuple[Path, Path]:
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    _make_traversable(base)
    user = pwd.getpwnam(EXIM_USER)
    spool, log = base / "spool", base / "log"
    for d in (spool, log):
        d.mkdir(exist_ok=True)
        os.chown(d, user.pw_uid, user.pw_gid)
        d.chmod(0o750)
    return spool, log


def _exim_common(spool: Path, log: Path, hostname: str, *, tls_advertise_hosts: str = "") -> str:
    # Exim refuses a main option set twice: whatever a caller may change is a parameter.
    return f"""\
primary_hostname = {hostname}
qualify_domain = {hostname}
exim_user = {EXIM_USER}
exim_group = {EXIM_USER}
spool_directory = {spool}
log_file_path = {log}/%slog
keep_environment =
notifier_socket =
host_lookup =
rfc1413_hosts =
rfc1413_query_timeout = 0s
tls_advertise_hosts = {tls_advertise_hosts}
"""


class EximClient:
    """A sending Exim whose every address goes to 127.0.0.1:`target_port`.

    It connects from `interface` (127.0.0.2 by default, so the MTA sees a distinguishable
    client). With `pipe_connect` it uses early pipelining once its hints database (in the
    spool's `db/`, kept for the life of this object's directory) holds an EHLO reply with
    PIPECONNECT and PIPELINING. `extra_transport` lines are appended to the smtp transport
    (for example `hosts_try_fastopen = *` or `hosts_try_chunking = :`). Bounces to
    `@client.test` are discarded locally (they show as `=> :blackhole:` in the log).
    """

    def __init__(
        self,
        tmpdir: Path,
        target_port: int,
        *,
        interface: str = "127.0.0.2",
        pipe_connect: bool = True,
        avoid_tls: bool = True,
        extra_transport: str = "",
        extra_main: str = "",
    ) -> None:
        self.dir = Path(tmpdir).resolve()
        self.target_port = target_port
        self.interface = interface
        self.pipe_connect = pipe_connect
        self.avoid_tls = avoid_tls
        self.extra_transport = extra_transport
        self.extra_main = extra_main
        self.spool, self.logdir = _exim_dirs(self.dir)
        self.conf = self.dir / "exim.conf"
        self.mainlog_path = self.logdir / "mainlog"
        self._count = 0
        self.write_config()

    def __repr__(self) -> str:
        return f"<EximClient -> 127.0.0.1:{self.target_port} in {self.dir}>"

    def write_config(self) -> None:
        transport = [
            "  driver = smtp",
            f"  port = {self.target_port}",
            "  allow_localhost",
            f"  interface = {self.interface}",
        ]
        if self.pipe_connect:
            transport.append("  hosts_pipe_connect = *")
        if self.avoid_tls:
            transport.append("  hosts_avoid_tls = *")
        transport += ["  " + ln.strip() for ln in self.extra_transport.splitlines() if ln.strip()]
        text = (
            _exim_common(self.spool, self.logdir, "client.test")
            + "log_selector = +pipelining +deliver_time +millisec +received_recipients"
            " +tls_resumption +smtp_connection +outgoing_port +outgoing_interface\n"
            + "domainlist local_domains = client.test\n"
            + self.extra_main
            + "\n\nbegin routers\n\n"
            + "local_sink:\n  driver = redirect\n  domains = +local_domains\n"
            + "  data = :blackhole:\n\n"
            + "outbound:\n  driver = manualroute\n"
            + f"  route_list = * 127.0.0.1::{self.target_port}\n"
            + "  self = send\n  transport = remote_smtp\n\n"
            + "begin transports\n\nremote_smtp:\n"
            + "\n".join(transport)
            + "\n\nbegin retry\n\n* * F,2h,15m; G,16h,1h,1.5; F,4d,6h\n"
        )
        _replace_file(self.conf, text)

    def set_target_port(self, port: int) -> None:
        self.target_port = port
        self.write_config()

    def mainlog(self) -> str:
        return _tail_since(self.mainlog_path, 0)

    def paniclog(self) -> str:
        return _tail_since(self.logdir / "paniclog", 0)

    def _exim(self, args: list[str], stdin: bytes | None, timeout: float) -> str:
        # Another pytest run starting meanwhile resets pytest-of-root to 0700.
        _make_traversable(self.dir)
        before = _size(self.mainlog_path)
        with subprocess.Popen(
            [EXIM, "-C", str(self.conf), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its delivery subprocesses can be killed with it
        ) as proc:
            try:
                stdout, stderr = proc.communicate(stdin or b"", timeout=timeout)
            except subprocess.TimeoutExpired:
                family = _descendants(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _reap(family, 0)
                proc.communicate()
                raise TimeoutError(
                    f"exim {' '.join(args)} still running after {timeout}s (killed)\n"
                    f"--- mainlog since start:\n{_tail_since(self.mainlog_path, before)}"
                ) from None
        new = _tail_since(self.mainlog_path, before)
        if proc.returncode != 0 and not new:
            out = (stdout + stderr).decode("utf-8", "replace")
            raise RuntimeError(
                f"exim {' '.join(args)} exited {proc.returncode}:\n{out}\n"
                f"--- paniclog:\n{self.paniclog()}"
            )
        return new

    def send(self, sender: str, rcpt: str | list[str], body: bytes, timeout: float = 60) -> str:
        """Submit one message and deliver it in the foreground (`-odf -oi`); return the
        mainlog lines this produced (`<=`, `=>`/`==`/`**`, `Completed`).

        `body` is either a bare body or a whole message (a header block, a blank line,
        the body). From, To, Subject, Date and Message-ID headers are added when absent;
        the Message-ID is `<pcp-N.PID@client.test>`. Lines may end in LF or CRLF (Exim
        turns CRLF into LF on local input); a line holding only "." does not end it.

        If earlier messages to the same server are still queued (deferred), Exim may
        deliver them down the same connection afterwards (a `-Mc` child that `-odf` waits
        for); their log lines are then part of the result. `extra_transport=
        "connection_max_messages = 1"` prevents that. On `timeout` the whole process
        group is killed and TimeoutError raised.
        """
        rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
        self._count += 1
        message = build_message(
            body, sender=sender, rcpts=rcpts, msgid=f"<pcp-{self._count}.{os.getpid()}@client.test>"
        )
        return self._exim(["-odf", "-oi", "-f", sender, "--", *rcpts], message, timeout)

    def retry(self, timeout: float = 60) -> str:
        """Force a delivery attempt of everything queued (`-qff`); return new log lines."""
        return self._exim(["-qff"], None, timeout)

    def queue(self) -> str:
        """The output of `exim -bp` (empty when the queue is empty)."""
        return run_command([EXIM, "-C", str(self.conf), "-bp"], check=False)


_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")


def build_message(body: bytes, *, sender: str, rcpts: list[str], msgid: str) -> bytes:
    """`body` as a message: keep its headers if it has some, add the missing usual ones."""
    head, body_part = b"", body
    lines = body.split(b"\n")
    if lines and _HEADER_LINE.match(lines[0]):
        for i, line in enumerate(lines):
            if line in (b"", b"\r"):
                head = b"\n".join(lines[:i]) + b"\n"
                body_part = b"\n".join(lines[i + 1 :])
                break
            if not (_HEADER_LINE.match(line) or line[:1] in (b" ", b"\t")):
                break  # not a header block after all: treat everything as body
        else:
            head, body_part = b"\n".join(lines).rstrip(b"\n") + b"\n", b""
    present = {
        ln.split(b":", 1)[0].strip().lower() for ln in head.split(b"\n") if _HEADER_LINE.match(ln)
    }
    added = []
    defaults = [
        (b"from", f"From: <{sender}>"),
        (b"to", "To: " + ", ".join(f"<{r}>" for r in rcpts)),
        (b"subject", "Subject: pipeconnect-proxy test"),
        (b"date", "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())),
        (b"message-id", f"Message-ID: {msgid}"),
    ]
    for name, header in defaults:
        if name not in present:
            added.append(header.encode() + b"\n")
    return b"".join(added) + head + b"\n" + body_part


class EximServer:
    """An Exim daemon on 127.0.0.1:`port` that accepts every message and discards it.

    Received messages show as `<=` lines in `mainlog()` (`receptions()` parses them).
    `pipe_connect_advertise` offers PIPECONNECT to everyone; `pipelining=False` offers no
    PIPELINING (and Exim then answers pipelined input with `554 SMTP synchronization
    error`); `proxy_hosts` is `hosts_proxy` (those hosts must send a PROXY header).
    `extra_main` goes into the main section.

    For outbound-mode tests (an MX that a sending Postfix reaches):

    - `address`: the interface to listen on (`local_interfaces`), e.g. "127.0.0.3" or
      "::1"; `netns`: run the daemon in that network namespace (tests/netns.py).
    - `store=True`: keep the messages in the Maildir `DIR/mail/new/` (an appendfile
      transport, run as Debian-exim) instead of discarding them: `stored_messages()`,
      `wait_stored(n)`. Exim adds its own `Received:` header on top; the body is as sent.
    - `tls`: a dict with `certificate` and `key` PEM paths (tests/certs.py
      `write_tls_files`): STARTTLS offered to every host. The files must be readable by
      Debian-exim.
    - `message_size_limit`: e.g. "2K" (Exim's default is 50M); the EHLO reply says `SIZE n`.
    - `smtp_banner`: the greeting's text; Exim always sends it with code 220 (there is no
      option for another code).
    - `connect_acl`: the ACL run at connection time (`acl_smtp_connect`), one statement a
      line, e.g. "defer" or "defer message = try later" or "deny". Exim cannot be told to
      send a 4xx *banner*; a connect ACL that defers is how it says "not now" at connect.
      What Exim 4.96 does (checked): it sends no banner but, in its place,
      `defer` -> `451 Temporary local problem - please try later` (not a 421), then closes;
      mainlog `H=[127.0.0.1]:PORT temporarily rejected connection in "connect" ACL`;
      `defer message = try later` -> `451 try later`, logged `... in "connect" ACL: try
      later`; `deny` -> `550 Administrative prohibition`, logged `H=[...]:PORT rejected
      connection in "connect" ACL`. A client that already talked (early pipelining) gets
      the reply and then a TCP reset (Exim closes with the commands unread). Postfix,
      directly: `dsn=4.0.0, status=deferred (host 127.0.0.3[127.0.0.3] refused to talk to
      me: 451 Temporary local problem - please try later)`.
    - `primary_hostname`: the name in the banner and the EHLO reply (default server.test).
      Postfix meeting its own myhostname there logs "greeted me with my own hostname" and
      "replied to HELO/EHLO with my own hostname", then bounces: `dsn=5.4.6,
      status=bounced (mail for [127.0.0.3]:25 loops back to myself)`.

    Exim's answer to early talk when it does not offer PIPECONNECT (to this host): no
    banner, `554 SMTP synchronization error`, and the log line `SMTP protocol
    synchronization error (input sent without waiting for greeting): rejected connection
    from H=[127.0.0.1]:PORT input="EHLO ..."`. With `message_size_limit` below a MAIL's
    SIZE=: `552 Message size exceeds maximum permitted` (log `rejected MAIL FROM:<...>
    H=(...) [...]:PORT: message too big: size=5000 max=1024`); Postfix, seeing the real
    SIZE, bounces itself: `dsn=5.3.4 ... message size N exceeds size limit M of server`.

    Run with `-C`, Exim drops root when it re-executes itself on SIGHUP ("exim user lost
    privilege for using -C option", also in the paniclog: the file is not in its
    TRUSTED_CONFIG_LIST); deliveries run as Debian-exim anyway. For port 25 in a
    namespace, `start()` lets unprivileged users bind low ports there.
    - `log_selector_extra`: more log_selector items.

    Change any of these attributes and call `reload()`: the config is rewritten and the
    daemon gets SIGHUP (Exim re-executes itself, same pid, and logs "daemon started"
    again); it returns when the new daemon listens.
    """

    def __init__(
        self,
        tmpdir: Path,
        port: int,
        *,
        pipe_connect_advertise: bool = True,
        pipelining: bool = True,
        proxy_hosts: str | None = None,
        extra_main: str = "",
        address: str = "127.0.0.1",
        netns: Namespace | None = None,
        store: bool = False,
        tls: dict[str, str] | None = None,
        message_size_limit: str | None = None,
        smtp_banner: str | None = None,
        connect_acl: str | None = None,
        primary_hostname: str = "server.test",
        log_selector_extra: str = "",
    ) -> None:
        self.dir = Path(tmpdir).resolve()
        self.port = port
        self.pipe_connect_advertise = pipe_connect_advertise
        self.pipelining = pipelining
        self.proxy_hosts = proxy_hosts
        self.extra_main = extra_main
        self.address = address
        self.netns = netns
        self.store = store
        self.tls = tls
        self.message_size_limit = message_size_limit
        self.smtp_banner = smtp_banner
        self.connect_acl = connect_acl
        self.primary_hostname = primary_hostname
        self.log_selector_extra = log_selector_extra
        self.spool, self.logdir = _exim_dirs(self.dir)
        self.maildir = self.dir / "mail"
        self.conf = self.dir / "exim.conf"
        self.mainlog_path = self.logdir / "mainlog"
        self.output_path = self.dir / "daemon.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    def __repr__(self) -> str:
        where = f" in {self.netns.name}" if self.netns is not None else ""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"<EximServer {host}:{self.port}{where} in {self.dir}>"

    def _proc_net(self) -> Path | None:
        return self.netns.proc_net if self.netns is not None else None

    def write_config(self) -> None:
        main = [
            # "<;": the list separator is ";", so an IPv6 address needs no doubled colons.
            f"local_interfaces = <; {self.address}",
            # A failed bind (after a reload) is an error at once, not 9 tries 30 s apart.
            "daemon_startup_retries = 1",
            "daemon_startup_sleep = 1s",
            "acl_smtp_rcpt = accept",
            "log_selector = +pipelining +millisec +received_recipients +smtp_connection"
            " +smtp_protocol_error +smtp_syntax_error +incoming_port +proxy"
            + (f" {self.log_selector_extra}" if self.log_selector_extra else ""),
        ]
        if self.pipe_connect_advertise:
            main.append("pipelining_connect_advertise_hosts = *")
        else:
            main.append("pipelining_connect_advertise_hosts = :")
        if not self.pipelining:
            main.append("pipelining_advertise_hosts = :")
        if self.proxy_hosts is not None:
            main.append(f"hosts_proxy = {self.proxy_hosts}")
        if self.tls is not None:
            main += [
                f"tls_certificate = {self.tls['certificate']}",
                f"tls_privatekey = {self.tls['key']}",
            ]
        if self.message_size_limit is not None:
            main.append(f"message_size_limit = {self.message_size_limit}")
        if self.smtp_banner is not None:
            main.append(f"smtp_banner = {self.smtp_banner}")
        if self.connect_acl is not None:
            main.append("acl_smtp_connect = acl_check_connect")
        text = (
            _exim_common(
                self.spool,
                self.logdir,
                self.primary_hostname,
                tls_advertise_hosts="*" if self.tls is not None else "",
            )
            + "\n".join(main)
            + "\n"
            + self.extra_main
        )
        if self.connect_acl is not None:
            text += "\n\nbegin acl\n\nacl_check_connect:\n"
            text += "".join(f"  {ln.strip()}\n" for ln in self.connect_acl.splitlines())
        if self.store:
            user = pwd.getpwnam(EXIM_USER)
            self.maildir.mkdir(exist_ok=True)
            os.chown(self.maildir, user.pw_uid, user.pw_gid)
            text += (
                "\n\nbegin routers\n\n"
                + "store:\n  driver = accept\n  transport = store\n"
                + "\nbegin transports\n\n"
                + "store:\n  driver = appendfile\n"
                + f"  directory = {self.maildir}\n"
                + "  maildir_format\n  create_directory\n"
                + f"  user = {EXIM_USER}\n  group = {EXIM_USER}\n  mode = 0644\n"
            )
        else:
            text += "\n\nbegin routers\n\ndiscard:\n  driver = redirect\n  data = :blackhole:\n"
        _replace_file(self.conf, text)

    def _listening(self) -> bool:
        return _is_listening(self.port, self.address, self._proc_net())

    def start(self, timeout: float = 10) -> EximServer:
        self.write_config()
        cmd = [EXIM, "-C", str(self.conf), "-bdf", "-oX", str(self.port)]
        if self.netns is not None and self.port < 1024:
            # With -C, Exim runs as Debian-exim after its SIGHUP re-exec ("exim user lost
            # privilege for using -C option": the file is not in its TRUSTED_CONFIG_LIST,
            # /etc/exim4/trusted_configs) and then fails to bind port 25 ("Permission
            # denied"): let any user bind low ports in the test's namespace.
            self.netns.allow_unprivileged_low_ports()
        if self.netns is not None:
            cmd = self.netns.command(cmd)  # `ip netns exec` execs: the pid is Exim's
        mark = self.log_mark()
        with self.output_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaps forked children too
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self!r} exited {self.proc.returncode}\n{self._diag()}")
            return self._listening() and _EXIM_STARTED in self.mainlog_since(mark)

        try:
            _wait_for(f"{self!r} to listen", ready, timeout, self._diag)
        except BaseException:
            self.stop()
            raise
        return self

    def reload(self, timeout: float = 10) -> None:
        """Rewrite the configuration from the attributes and SIGHUP the daemon; return
        once the re-executed daemon has logged "daemon started" again and listens.

        Exim on SIGHUP logs `pid N: SIGHUP received: re-exec daemon`, closes its listening
        sockets and execs itself with the same arguments (same pid): there is a moment in
        which nothing listens (a connection is refused)."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running\n{self._diag()}")
        self.write_config()
        # Exim checks the config is readable by its own user; refuse a broken one before
        # the daemon does (a bad config on re-exec leaves no daemon at all).
        run_command([EXIM, "-C", str(self.conf), "-bV"])  # raises with Exim's complaint
        before = self.mainlog().count(_EXIM_STARTED)
        self.proc.send_signal(signal.SIGHUP)
        sent = [time.monotonic()]

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self!r} exited {self.proc.returncode}\n{self._diag()}")
            restarted = self.mainlog().count(_EXIM_STARTED) > before
            if not restarted and time.monotonic() - sent[0] > 1:
                # Exim ignores SIGHUP until its daemon loop is set up (just after it
                # listens, or just after a re-exec): say it again.
                self.proc.send_signal(signal.SIGHUP)
                sent[0] = time.monotonic()
            return restarted and self._listening()

        _wait_for(f"{self!r} to re-exec after SIGHUP", ready, timeout, self._diag)

    def _diag(self) -> str:
        return (
            f"--- output:\n{_tail_since(self.output_path, 0)}"
            f"--- paniclog:\n{_tail_since(self.logdir / 'paniclog', 0)}"
            f"--- mainlog:\n{self.mainlog()}"
        )

    def stop(self, timeout: float = 5) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        family = _descendants(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Connection handlers and deliveries forked by the daemon.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _reap(family, 2)

    def __enter__(self) -> EximServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def mainlog(self) -> str:
        return _tail_since(self.mainlog_path, 0)

    def log_mark(self) -> int:
        """The mainlog's current size: pass as `since` to look at what came after."""
        return _size(self.mainlog_path)

    def mainlog_since(self, since: int = 0) -> str:
        return _tail_since(self.mainlog_path, since)

    def receptions(self, since: int = 0) -> list[EximReception]:
        """The `<=` lines logged since `since` (a `log_mark()`)."""
        return receptions(self.mainlog_since(since))

    def wait_receptions(
        self, n: int, *, since: int = 0, timeout: float = 20
    ) -> list[EximReception]:
        """Wait for `n` `<=` lines since `since`; return them."""
        _wait_for(
            f"{n} '<=' line(s) in {self.mainlog_path}",
            lambda: len(self.receptions(since)) >= n,
            timeout,
            lambda: f"--- mainlog since mark:\n{self.mainlog_since(since)}",
        )
        return self.receptions(since)

    def wait_log(self, pattern: str, timeout: float = 10, since: int = 0) -> re.Match[str]:
        """Wait until the regex `pattern` matches (re.search, MULTILINE) the mainlog (what
        was logged after `since`, a `log_mark()`)."""
        rx = re.compile(pattern, re.MULTILINE)
        found: list[re.Match[str]] = []

        def check() -> bool:
            m = rx.search(self.mainlog_since(since))
            if m:
                found.append(m)
            return m is not None

        _wait_for(f"/{pattern}/ in {self.mainlog_path}", check, timeout, self._diag)
        return found[0]

    # -- stored messages (store=True)

    def stored_files(self) -> list[Path]:
        return maildir_files(self.maildir)

    def stored_messages(self) -> list[bytes]:
        """The messages delivered to the Maildir, oldest first, as stored (LF endings,
        Exim's Received: header on top)."""
        return [p.read_bytes() for p in self.stored_files()]

    def wait_stored(self, n: int, timeout: float = 20) -> list[bytes]:
        """Wait until at least `n` messages are in the Maildir; return all of them."""
        _wait_for(
            f"{n} message(s) in {self.maildir}/new",
            lambda: len(self.stored_files()) >= n,
            timeout,
            lambda: f"have {len(self.stored_files())}\n{self._diag()}",
        )
        return self.stored_messages()


# --------------------------------------------------------------------------- Exim logs

# The daemon's start line, logged again after each SIGHUP re-exec:
# `exim 4.96 daemon started: pid=123, no queue runs, listening for SMTP on [127.0.0.3]:25`
_EXIM_STARTED = " daemon started: pid="

# `=>` first delivery, `->` further address in the same delivery, `==` deferred,
# `**` failed, `*>` suppressed by -N.
_DELIVERY = re.compile(
    r"^\S+ \S+ (?:\S+ )?(?P<id>[-0-9A-Za-z]{16,23}) (?P<kind>=>|->|==|\*\*|\*>) "
)
_TOKEN = re.compile(r'\S+?="(?:[^"\\]|\\.)*"|\S+')


@dataclass(frozen=True)
class EximDelivery:
    """One delivery line of an Exim mainlog.

    `fields` holds the `NAME=value` items (`R`, `T`, `H`, `X`, `C`, `QT`, `DT`...; quotes
    removed); `flags` the bare items after the host: `L` (pipelining), `L*` (early
    pipelining), `K` (CHUNKING), `TFO` / `TFO*` (fast open, with data), `*` (the host
    was not the first tried)."""

    line: str
    message_id: str
    kind: str
    address: str
    fields: dict[str, str]
    flags: frozenset[str]

    @property
    def pipelined(self) -> bool:
        return "L" in self.flags or "L*" in self.flags

    @property
    def early_pipelined(self) -> bool:
        return "L*" in self.flags

    @property
    def chunking(self) -> bool:
        return "K" in self.flags

    @property
    def tls(self) -> bool:
        return "X" in self.fields

    @property
    def fast_open(self) -> bool:
        return any(f.startswith("TFO") for f in self.flags)


def deliveries(log: str, kinds: str = "=>") -> list[EximDelivery]:
    """Delivery lines of `log` whose kind is among `kinds` (e.g. "=>", "=> == **")."""
    wanted = set(kinds.split())
    result = []
    for line in log.splitlines():
        m = _DELIVERY.match(line)
        if not m or m["kind"] not in wanted:
            continue
        tokens = _TOKEN.findall(line[m.end() :])
        fields: dict[str, str] = {}
        flags: set[str] = set()
        address = tokens[0] if tokens else ""
        for tok in tokens[1:]:
            name, eq, value = tok.partition("=")
            if eq and re.fullmatch(r"[A-Za-z]+", name):
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                fields.setdefault(name, value)
            elif re.fullmatch(r"L\*?|K|TFO\*?|\*", tok):
                flags.add(tok)
        result.append(EximDelivery(line, m["id"], m["kind"], address, fields, frozenset(flags)))
    return result


# `<=` a message received: `ID <= sender H=(helo) [ip]:port I=[ip]:port P=esmtp L. S=123
# id=msgid for rcpt...` (the `for` part with +received_recipients).
_RECEPTION = re.compile(r"^\S+ \S+ (?:\S+ )?(?P<id>[-0-9A-Za-z]{16,23}) <= ")


@dataclass(frozen=True)
class EximReception:
    """One `<=` line of an Exim mainlog (log_selector +pipelining).

    The pipelining flag is built (receive.c) as `L` when PIPELINING was advertised, then `*`
    if the client talked before the banner (early pipelining used) or `.` if PIPECONNECT
    was advertised and not used, then `-` if the client did not pipeline (Exim never found
    the next command already waiting): `L`, `L-`, `L.`, `L.-`, `L*`, `L*-`. It is per
    connection: every message of a session carries its session's flag. `K` is CHUNKING
    used, `TFO` TCP Fast Open. `fields`: `H`, `I`, `P`, `S`, `X` (TLS cipher), `id` (the
    Message-ID)... `rcpts`: the `for` list."""

    line: str
    message_id: str
    sender: str
    fields: dict[str, str]
    flags: frozenset[str]
    rcpts: tuple[str, ...]

    @property
    def pipelining_flag(self) -> str:
        """`L`, `L-`, `L.`, `L.-`, `L*`, `L*-`, or "" (no PIPELINING advertised)."""
        return next((f for f in self.flags if f.startswith("L")), "")

    @property
    def early_pipelined(self) -> bool:
        return self.pipelining_flag.startswith("L*")

    @property
    def pipe_connect_offered(self) -> bool:
        return self.pipelining_flag[1:2] in (".", "*")

    @property
    def pipelined(self) -> bool:
        """The client pipelined (no trailing `-`)."""
        return bool(self.pipelining_flag) and not self.pipelining_flag.endswith("-")

    @property
    def tls(self) -> bool:
        return "X" in self.fields

    @property
    def header_id(self) -> str:
        """The Message-ID header (`id=`), without angle brackets."""
        return self.fields.get("id", "").strip("<>")


def receptions(log: str) -> list[EximReception]:
    """The `<=` lines of `log`, parsed."""
    result = []
    for line in log.splitlines():
        m = _RECEPTION.match(line)
        if not m:
            continue
        tokens = _TOKEN.findall(line[m.end() :])
        sender = tokens[0] if tokens else ""
        fields: dict[str, str] = {}
        flags: set[str] = set()
        rcpts: tuple[str, ...] = ()
        for i, tok in enumerate(tokens[1:], start=1):
            if tok == "for":
                rcpts = tuple(tokens[i + 1 :])
                break
            name, eq, value = tok.partition("=")
            if eq and re.fullmatch(r"[A-Za-z]+", name):
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                fields.setdefault(name, value)
            elif re.fullmatch(r"L[.*]?-?|K|TFO\*?", tok):
                flags.add(tok)
        result.append(EximReception(line, m["id"], sender, fields, frozenset(flags), rcpts))
    return result


def exim_flags(log: str) -> list[str]:
    """The flags (`L`, `L*`, `K`, `TFO`, `TFO*`, `*`) of the last `=>` line in `log`, plus
    `X` if it used TLS. Raises AssertionError (showing the log) when there is no `=>`."""
    found = deliveries(log)
    if not found:
        raise AssertionError(f"no '=>' delivery line in:\n{log}")
    last = found[-1]
    return sorted(last.flags | ({"X"} if last.tls else set()))


__all__ = [
    "EXIM",
    "POSTFIX",
    "SWAKS",
    "EximClient",
    "EximDelivery",
    "EximReception",
    "EximServer",
    "Postfix",
    "PostfixStatus",
    "build_message",
    "deliveries",
    "exim_flags",
    "free_port",
    "maildir_files",
    "missing_software",
    "postfix_statuses",
    "receptions",
    "swaks",
]
