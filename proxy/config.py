"""TOML configuration -> frozen, typed settings.

Every error is a ``ConfigError`` whose text starts with the dotted key it is about
(``upstream.client_identity: must be one of ...``), so an operator can fix the file without
reading code; a file is checked whole and all its errors come in one ``ConfigErrors``, so one
edit can fix them all. Unknown keys are errors rather than warnings: a misspelt key silently
falling back to its default is exactly the mistake that goes unnoticed until traffic suffers.

The result is immutable (frozen dataclasses, tuples, ``HostList``) so a reload can build a new
snapshot and swap one reference while running sessions keep the one they started with.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from .errors import ConfigError, ConfigErrors
from .hosts import HostEntry, HostList
from .smtp import EARLY_PIPELINING_KEYWORDS

__all__ = [
    "BARE_NEWLINE_POLICIES",
    "CLIENT_IDENTITIES",
    "DEFAULT_CACHE_PATH",
    "EARLY_INPUT_POLICIES",
    "LOG_FORMATS",
    "MOZILLA_INTERMEDIATE_CIPHERS",
    "OUTBOUND_TLS_MODES",
    "TLS_MIN_VERSIONS",
    "UPSTREAM_TLS_MODES",
    "Address",
    "BareNewline",
    "ClientIdentity",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "EarlyInputPolicy",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "LogFormat",
    "MetricsConfig",
    "OutboundConfig",
    "OutboundTLS",
    "PipeConnectConfig",
    "ServerConfig",
    "TLSConfig",
    "TLSVersion",
    "TimeoutsConfig",
    "UpstreamConfig",
    "UpstreamTLS",
    "load_config",
    "parse_address",
    "parse_config",
]

ClientIdentity = Literal["proxy-v1", "proxy-v2", "xclient", "none"]
EarlyInputPolicy = Literal["defer", "reject", "forward", "accept"]
BareNewline = Literal["reject", "normalize"]
LogFormat = Literal["text", "json"]
UpstreamTLS = Literal["none", "starttls"]
OutboundTLS = Literal["passthrough"]
TLSVersion = Literal["TLSv1.2", "TLSv1.3"]

CLIENT_IDENTITIES: tuple[ClientIdentity, ...] = ("proxy-v1", "proxy-v2", "xclient", "none")
EARLY_INPUT_POLICIES: tuple[EarlyInputPolicy, ...] = ("defer", "reject", "forward", "accept")
BARE_NEWLINE_POLICIES: tuple[BareNewline, ...] = ("reject", "normalize")
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
UPSTREAM_TLS_MODES: tuple[UpstreamTLS, ...] = ("none", "starttls")
OUTBOUND_TLS_MODES: tuple[OutboundTLS, ...] = ("passthrough",)
TLS_MIN_VERSIONS: tuple[TLSVersion, ...] = ("TLSv1.2", "TLSv1.3")  # tls.TLS_VERSIONS' names

# Mozilla "intermediate" (server side TLS guidelines v5.7) TLS 1.2 cipher list: the default of
# tls.ciphers. TLS 1.3 suites are OpenSSL's defaults, which are exactly Mozilla's TLS 1.3 list.
MOZILLA_INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


class Address(NamedTuple):
    """A ``host:port`` endpoint. ``host`` is stored without IPv6 brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# Immutable defaults, named so dataclass fields can share them safely.
_UPSTREAM_DEFAULT = Address("127.0.0.1", 2525)
_METRICS_DEFAULT = Address("127.0.0.1", 9464)
_ALL_HOSTS = HostList((HostEntry(None),))  # ["*"]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    plain: tuple[Address, ...] = ()
    tls_on_connect: tuple[Address, ...] = ()
    # TCP Fast Open: a client's first commands (or TLS ClientHello) may ride in the SYN.
    # Linux needs the server bit of net.ipv4.tcp_fastopen (value 3) in the network namespace.
    tcp_fastopen: bool = True
    tcp_fastopen_queue: int = 256  # pending SYN-data connections (the kernel's TFO qlen)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    address: Address = _UPSTREAM_DEFAULT
    client_identity: ClientIdentity = "proxy-v2"
    connect_timeout: float = 10.0
    # "starttls": for MTAs that must see TLS themselves (not on a loopback sidecar).
    tls: UpstreamTLS = "none"
    tls_verify: bool = True  # the MTA's chain against tls_ca (or the system store)
    tls_ca: str = ""
    tls_server_name: str = ""  # SNI and the name checked; default: none for an IP address
    ehlo_name: str = ""  # the proxy's own EHLO before STARTTLS; default: this host's name


@dataclass(frozen=True, slots=True)
class PipeConnectConfig:
    advertise_hosts: HostList = _ALL_HOSTS
    keywords: tuple[str, ...] = EARLY_PIPELINING_KEYWORDS
    unadvertised_early_input: EarlyInputPolicy = "defer"
    max_early_bytes: int = 65536


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_command_line: int = 512
    # No longer used: message lines are the MTA's to judge (Postfix takes 2048 and wraps
    # longer ones). Still accepted so that older files load; serve warns when it is set.
    max_text_line: int | None = None
    max_reply_line: int = 4096
    max_pipelined_commands: int = 100
    max_sessions: int = 1000
    max_sessions_per_client: int = 50
    # normalize loses no mail that a modern MTA takes (Postfix 3.9's default too) and is
    # smuggling-safe; reject refuses such a message after its end of data.
    bare_newline: BareNewline = "normalize"


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Seconds. Defaults are RFC 5321 section 4.5.3.2's."""

    banner: float = 300.0
    command: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_term: float = 600.0
    reply: float = 300.0
    early_drain: float = 2.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    certificate: str = ""
    key: str = ""
    min_version: TLSVersion = "TLSv1.2"  # the lowest version a client may negotiate
    ciphers: str = MOZILLA_INTERMEDIATE_CIPHERS  # OpenSSL cipher string, TLS 1.2 only
    # Stateless session tickets; off, TLS 1.2 resumes by session id, 1.3 by stateful ticket.
    session_tickets: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: Address | None = _METRICS_DEFAULT  # None: no metrics endpoint


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # SIGTERM: stop accepting, let open sessions finish for this long, then 421 the rest.
    # Below Kubernetes' default 30 s terminationGracePeriodSeconds.
    shutdown_grace: float = 20.0
    # Processes sharing each listening port (SO_REUSEPORT; proxy.workers). 1: no children.
    workers: int = 1


_OUTBOUND_LISTEN_DEFAULT = (Address("127.0.0.1", 10025),)
DEFAULT_CACHE_PATH = "/var/lib/pipeconnect-proxy/outbound.sqlite"


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    """Outbound mode: the MTA's own port-25 connections, redirected to ``listen`` by a NAT
    rule, get early pipelining towards the MXes that offer it (proxy/outbound.py)."""

    enabled: bool = False
    listen: tuple[Address, ...] = _OUTBOUND_LISTEN_DEFAULT
    hosts: HostList = _ALL_HOSTS  # destinations to talk early to; the rest is relayed
    cache: str = DEFAULT_CACHE_PATH
    cache_ttl: float = 7 * 24 * 3600.0  # Exim's retry_data_expire
    # The MTA's STARTTLS goes to the MX end to end; the only mode (the proxy never
    # terminates the MTA's TLS with a certificate of its own).
    tls: OutboundTLS = "passthrough"
    tcp_fastopen: bool = False  # the held commands ride in the SYN to the MX
    socket_mark: int = 0  # SO_MARK on the proxy's own connections (a "mark ... return" rule)
    bind_source: bool = True  # connect from the MTA's own source address


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig = ListenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    pipe_connect: PipeConnectConfig = PipeConnectConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    tls: TLSConfig = TLSConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    server: ServerConfig = ServerConfig()
    outbound: OutboundConfig = OutboundConfig()

    @classmethod
    def default(cls) -> Config:
        """All defaults, no listeners: for programmatic use (the demo fills in ports)."""
        return cls()


# --- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate one TOML file. File-level errors are keyed by the file name.

    Raises ``ConfigErrors`` with every error found (see ``parse_config``)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _errors([ConfigError(name, f"cannot read: {exc.strerror or exc}")], name) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _errors([ConfigError(name, f"not valid UTF-8: {exc}")], name) from None
    except tomllib.TOMLDecodeError as exc:
        raise _errors([ConfigError(name, f"TOML syntax error: {exc}")], name) from None
    return parse_config(data, name)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate already-parsed TOML, reporting every error at once, not only the first.

    Raises ``ConfigErrors`` (``source`` recorded as ``exc.source``). Order: the file's, i.e.
    tables and keys as they first appear (array items by index); then required keys of tables
    the file lacks; then the rules that involve several keys, each skipped while a key it reads
    is itself bad (its default would make the rule's verdict meaningless).
    """
    problems = _Problems()
    config = _parse(data, source, problems)
    if problems.errors:
        raise _errors(problems.errors, source)
    return config


def _errors(errors: list[ConfigError], source: str) -> ConfigErrors:
    exc = ConfigErrors(errors)
    exc.source = source
    return exc


class _Problems:
    """Errors found so far, and the keys they left at their defaults (which rules skip)."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.bad: set[str] = set()

    def add(self, exc: ConfigError, key: str) -> None:
        self.errors.extend(exc.errors)
        self.bad.add(key)

    def usable(self, *keys: str) -> bool:
        """Whether every dotted key (``tls.key``) came from the file intact or is a default."""
        return not any(k in self.bad or k.partition(".")[0] in self.bad for k in keys)


def _parse(data: Mapping[str, Any], source: str, problems: _Problems) -> Config:
    if not isinstance(data, Mapping):
        problems.add(ConfigError(source, f"must be a table, not {_tname(data)}"), source)
        return Config()
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        spec = _SECTIONS.get(name)
        if spec is None:
            problems.add(_unknown(name, "", _SECTIONS), name)
        elif not isinstance(raw, dict):
            problems.add(ConfigError(name, f"must be a table, not {_tname(raw)}"), name)
        else:
            sections[name] = _section(spec, raw, name, problems)
    for name, (_, _, required) in _SECTIONS.items():
        if name not in data:
            for key in required:
                problems.add(ConfigError(f"{name}.{key}", "is required"), f"{name}.{key}")
    config = Config(**sections)
    problems.errors.extend(_check(config, problems.usable))
    return config


def _section(spec: _Section, raw: Mapping[str, Any], name: str, problems: _Problems) -> Any:
    cls, parsers, required = spec
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        parser = parsers.get(key)
        if parser is None:
            problems.add(_unknown(key, f"{name}.", parsers), f"{name}.{key}")
            continue
        try:
            kwargs[key] = parser(value, f"{name}.{key}")
        except ConfigError as exc:
            problems.add(exc, f"{name}.{key}")
    for key in required:
        if key not in raw:
            problems.add(ConfigError(f"{name}.{key}", "is required"), f"{name}.{key}")
    return cls(**kwargs)


_NEED_LISTENER = (
    "at least one listener is required (plain, tls_on_connect, or outbound.listen with"
    " outbound.enabled)"
)


def _check(config: Config, usable: Callable[..., bool]) -> Iterator[ConfigError]:
    """Rules that involve more than one key."""
    listen = config.listen
    if (
        usable("listen.plain", "listen.tls_on_connect")
        and not listen.plain
        and not listen.tls_on_connect
        and not (config.outbound.enabled and config.outbound.listen)
    ):
        yield ConfigError("listen", _NEED_LISTENER)
    # Port 0 (any free port) never conflicts; otherwise one address, one role.
    seen: dict[Address, str] = {}
    bound: list[tuple[str, Address]] = []
    if usable("listen.plain"):
        bound += [(f"listen.plain[{i}]", a) for i, a in enumerate(listen.plain)]
    if usable("listen.tls_on_connect"):
        bound += [(f"listen.tls_on_connect[{i}]", a) for i, a in enumerate(listen.tls_on_connect)]
    if config.outbound.enabled and usable("outbound.listen"):
        bound += [(f"outbound.listen[{i}]", a) for i, a in enumerate(config.outbound.listen)]
    if config.metrics.listen is not None and usable("metrics.listen"):
        bound.append(("metrics.listen", config.metrics.listen))
    for key, address in bound:
        if address.port == 0:
            continue
        if address in seen:
            yield ConfigError(key, f"'{address}' is already used by {seen[address]}")
        else:
            seen[address] = key
    if config.outbound.enabled and not config.outbound.listen and usable("outbound.listen"):
        yield ConfigError("outbound.listen", "must not be empty when outbound.enabled is true")
    tls = config.tls
    if usable("tls.certificate", "tls.key"):
        if tls.certificate and not tls.key:
            yield ConfigError("tls.key", "is required when tls.certificate is set")
        elif tls.key and not tls.certificate:
            yield ConfigError("tls.certificate", "is required when tls.key is set")
        elif listen.tls_on_connect and not tls.certificate and usable("listen.tls_on_connect"):
            yield ConfigError("listen.tls_on_connect", "needs tls.certificate and tls.key")


# --- generic section handling ------------------------------------------------------------------

_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)
_Parser = Callable[[Any, str], Any]
_Section = tuple[type[Any], dict[str, _Parser], tuple[str, ...]]


def _tname(value: object) -> str:
    """The TOML name of a value's type, for messages."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    names.update({list: "array", dict: "table"})
    return names.get(type(value), type(value).__name__)


def _unknown(name: str, prefix: str, known: Mapping[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return ConfigError(f"{prefix}{name}", f"unknown key ({hint})")


def _each(parse: Callable[[Any, str], _T], value: Any, key: str) -> tuple[_T, ...]:
    """Parse every item of an array (keyed ``key[i]``), reporting every bad item at once."""
    items: list[_T] = []
    errors: list[ConfigError] = []
    for i, item in enumerate(_list(value, key)):
        try:
            items.append(parse(item, f"{key}[{i}]"))
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    return tuple(items)


# --- value parsers -----------------------------------------------------------------------------


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {_tname(value)}")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be an array, not {_tname(value)}")
    return value


def _choice(choices: tuple[_S, ...]) -> Callable[[Any, str], _S]:
    def parse(value: Any, key: str) -> _S:
        for choice in choices:
            if value == choice and isinstance(value, str):
                return choice
        raise ConfigError(key, f"must be one of {', '.join(choices)}")

    return parse


def _integer(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, key: str) -> int:
        # bool is an int subclass; `max_sessions = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, not {_tname(value)}")
        if value < minimum:
            need = "positive" if minimum == 1 else f">= {minimum}"
            raise ConfigError(key, f"must be {need}, not {value}")
        return value

    return parse


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {_tname(value)}")
    return value


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number of seconds, not {_tname(value)}")
    # TOML has inf and nan; every wait must end (docs/invariants.md, "Every wait and every
    # write ends"), so neither is allowed.
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a positive, finite number of seconds, not {value}")
    return float(value)


_HOSTNAME = re.compile(
    r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?", re.ASCII
)
_IPV4ISH = re.compile(r"[0-9.]+", re.ASCII)


def parse_address(value: Any, key: str, *, min_port: int = 0) -> Address:
    """``host:port`` (IPv6 in brackets) as an ``Address``; anything else is a ``ConfigError``
    naming ``key`` (``probe`` parses its target with it too)."""
    text = _string(value, key)
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ConfigError(key, f"{text!r} is not host:port (IPv6: [addr]:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ipv6(host):
            raise ConfigError(key, f"{text!r}: {host!r} is not an IPv6 address")
    elif ":" in host:
        raise ConfigError(key, f"{text!r}: an IPv6 address needs brackets, e.g. [::1]:25")
    elif _IPV4ISH.fullmatch(host):
        # Looks numeric: must be a real dotted quad, not a "hostname" like 10.0.0.300.
        if not _is_ipv4(host):
            raise ConfigError(key, f"{text!r}: {host!r} is not an IPv4 address")
    elif not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise ConfigError(key, f"{text!r}: {host!r} is not a valid host name")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(key, f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not min_port <= port <= 65535:
        raise ConfigError(key, f"{text!r}: port must be in {min_port}..65535")
    return Address(host, port)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return "%" not in text  # a zone id cannot be given to bind/connect portably


def _listeners(value: Any, key: str) -> tuple[Address, ...]:
    # Port 0 is allowed for listeners: "any free port", which tests and demos rely on.
    return _each(parse_address, value, key)


def _upstream_address(value: Any, key: str) -> Address:
    return parse_address(value, key, min_port=1)


def _metrics_listen(value: Any, key: str) -> Address | None:
    return None if _string(value, key) == "" else parse_address(value, key)


def _hosts(value: Any, key: str) -> HostList:
    return HostList(_each(_host, value, key))


def _host(value: Any, key: str) -> HostEntry:
    try:
        (entry,) = HostList.parse([_string(value, key)], key).entries
    except ConfigError as exc:  # HostList.parse named it key[0]: this item parsed alone
        raise ConfigError(key, exc.message) from None
    return entry


_CIPHER_STRING = re.compile(r"[A-Za-z0-9!+@=_.,: -]+", re.ASCII)


def _ciphers(value: Any, key: str) -> str:
    text = _string(value, key)
    if not _CIPHER_STRING.fullmatch(text):
        raise ConfigError(
            key, f"{text!r} is not an OpenSSL cipher string (e.g. 'ECDHE+AESGCM:ECDHE+CHACHA20')"
        )
    # Only a file that sets the key pays for loading OpenSSL here; the proxy needs it anyway,
    # and only OpenSSL can tell whether the string leaves any cipher.
    from OpenSSL import SSL

    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(text.encode("ascii"))
    except SSL.Error:
        raise ConfigError(
            key, f"{text!r}: OpenSSL knows no TLS 1.2 cipher by that (see `openssl ciphers`)"
        ) from None
    return text


_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*", re.ASCII)


def _keywords(value: Any, key: str) -> tuple[str, ...]:
    seen: set[str] = set()

    def keyword(item: Any, item_key: str) -> str:
        word = _string(item, item_key)
        if not _KEYWORD.fullmatch(word):
            raise ConfigError(item_key, f"{word!r} is not an EHLO keyword ([A-Za-z0-9_-])")
        if word.upper() in seen:  # EHLO keywords are case-insensitive
            raise ConfigError(item_key, f"{word!r} is listed twice")
        seen.add(word.upper())
        return word

    words = _each(keyword, value, key)
    if not words:
        raise ConfigError(key, "must not be empty")
    return words


_SECTIONS: dict[str, _Section] = {
    "listen": (
        ListenConfig,
        {
            "plain": _listeners,
            "tls_on_connect": _listeners,
            "tcp_fastopen": _boolean,
            "tcp_fastopen_queue": _integer(1),
        },
        (),
    ),
    "upstream": (
        UpstreamConfig,
        {
            "address": _upstream_address,
            "client_identity": _choice(CLIENT_IDENTITIES),
            "connect_timeout": _seconds,
            "tls": _choice(UPSTREAM_TLS_MODES),
            "tls_verify": _boolean,
            "tls_ca": _string,
            "tls_server_name": _string,
            "ehlo_name": _string,
        },
        ("address",),
    ),
    "pipe_connect": (
        PipeConnectConfig,
        {
            "advertise_hosts": _hosts,
            "keywords": _keywords,
            "unadvertised_early_input": _choice(EARLY_INPUT_POLICIES),
            "max_early_bytes": _integer(1),
        },
        (),
    ),
    "limits": (
        LimitsConfig,
        {
            # RFC 5321 4.5.3.1.4-6: 512 (command), 1000 (text), 512 (reply) octets incl. CRLF
            # are minimums an implementation must accept, so smaller limits are refused.
            "max_command_line": _integer(512),
            "max_text_line": _integer(1000),
            "max_reply_line": _integer(512),
            "max_pipelined_commands": _integer(1),
            "max_sessions": _integer(1),
            "max_sessions_per_client": _integer(1),
            "bare_newline": _choice(BARE_NEWLINE_POLICIES),
        },
        (),
    ),
    "timeouts": (TimeoutsConfig, {f.name: _seconds for f in fields(TimeoutsConfig)}, ()),
    "tls": (
        TLSConfig,
        {
            "certificate": _string,
            "key": _string,
            "min_version": _choice(TLS_MIN_VERSIONS),
            "ciphers": _ciphers,
            "session_tickets": _boolean,
        },
        (),
    ),
    "metrics": (MetricsConfig, {"listen": _metrics_listen}, ()),
    "log": (LogConfig, {"format": _choice(LOG_FORMATS)}, ()),
    "server": (
        ServerConfig,
        {"shutdown_grace": _seconds, "workers": _integer(1)},
        (),
    ),
    "outbound": (
        OutboundConfig,
        {
            "enabled": _boolean,
            "listen": _listeners,
            "hosts": _hosts,
            "cache": _string,
            "cache_ttl": _seconds,
            "tls": _choice(OUTBOUND_TLS_MODES),
            "tcp_fastopen": _boolean,
            "socket_mark": _integer(0),
            "bind_source": _boolean,
        },
        (),
    ),
}
