"""TLS for trio on pyOpenSSL: `OpenSSLStream` and the context builders.

trio ships `trio.SSLStream` over the stdlib `ssl` module only; this module is the same idea
over `OpenSSL.SSL.Connection(ctx, None)` in memory-BIO mode, so that the proxy can use what
pyOpenSSL offers and stdlib `ssl` does not do well (in-memory certificate loading, SNI with
context switching, OCSP stapling, session-ticket control). The semantics follow
`trio.SSLStream` (see trio/_ssl.py, whose design this re-implements):

* one handshake, explicit (`do_handshake`) or implicit on the first send/receive; a task
  that asks while another task runs it waits for that one;
* `send_all` and `receive_some` may run concurrently in two tasks; two concurrent senders
  (or two concurrent receivers) get `trio.BusyResourceError`;
* every interaction with the `Connection` happens without yielding, followed by exactly
  one await that makes progress (send what OpenSSL produced, else receive what it wants),
  under separate inner send and receive locks;
* a cancellation or transport failure in the middle of sending, or anywhere in the
  handshake, leaves the stream broken (`trio.BrokenResourceError` from then on): the TLS
  state no longer matches what went over the wire;
* OpenSSL errors become `trio.BrokenResourceError` (the `OpenSSL.SSL.Error` is the
  `__cause__`); use after `aclose` is `trio.ClosedResourceError`; errors raised by the
  transport stream itself pass through unchanged;
* `receive_some` returns b"" at a clean end (the peer's close_notify), and keeps doing so;
  a transport EOF without close_notify (a "ragged" EOF, a truncation attack in general) is
  `trio.BrokenResourceError` unless `ragged_eof_ok=True`, in which case it is b"" too;
* `aclose` sends close_notify (if a handshake completed) and closes the transport without
  waiting for the peer's close_notify.

For STARTTLS the caller builds this stream over its existing transport after reading the
plaintext STARTTLS command line and sending the 220 reply; plaintext the caller has
already read past that line is the caller's to discard (CVE-2011-0411): this stream only
ever sees bytes read from the transport after it was created.
"""

from __future__ import annotations

import enum
import ipaddress
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Final, NoReturn, TypeVar

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL

from .config import MOZILLA_INTERMEDIATE_CIPHERS

__all__ = [
    "MOZILLA_INTERMEDIATE_CIPHERS",
    "TLS_VERSIONS",
    "OpenSSLStream",
    "TLSConfigError",
    "client_context",
    "server_context",
]

T = TypeVar("T")

TLS_VERSIONS: Final = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# A TLS record carries at most 16 KiB of plaintext; pyOpenSSL turns on
# SSL_MODE_ENABLE_PARTIAL_WRITE, so one SSL_write may take less than it was given anyway.
_SEND_SLICE: Final = 16384
# Plaintext encrypted per transport send_all: bounds the ciphertext buffered at once.
_MAX_WRITE_ROUND: Final = 16 * _SEND_SLICE
_STARTING_RECEIVE_SIZE: Final = 16384
_BIO_READ_SIZE: Final = 65536
_SESSION_ID_CONTEXT: Final = b"pipeconnect-proxy"

_PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


class TLSConfigError(Exception):
    """A certificate, key or TLS setting could not be used; the message names the file."""


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise `trio.BusyResourceError` if two tasks are inside at once (no waiting)."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True
        try:
            yield
        finally:
            self._held = False


class OpenSSLStream(trio.abc.Stream):
    """A `trio.abc.Stream` that speaks TLS over `transport_stream` with pyOpenSSL.

    Args:
      transport_stream: the stream carrying the TLS records (e.g. a `trio.SocketStream`).
      context: an `OpenSSL.SSL.Context`, complete (see `server_context`/`client_context`);
          creating the connection freezes it.
      server_side: act as the TLS server (True) or client (False).
      server_hostname: client side only: sent as SNI and, when the context verifies the
          peer, checked against the certificate (DNS name or IP address).
      ragged_eof_ok: treat a transport EOF without close_notify as a clean end (b"")
          instead of `trio.BrokenResourceError`. close_notify is sent on `aclose` either way.
      session: client side only: an `OpenSSL.SSL.Session` from an earlier connection (see
          `session`) to offer for resumption.

    Not a `trio.abc.HalfCloseableStream`: TLS has no half-close here, see `send_eof`.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        ragged_eof_ok: bool = False,
        session: SSL.Session | None = None,
    ) -> None:
        if server_side and (server_hostname is not None or session is not None):
            raise ValueError("server_hostname and session are for the client side only")
        self.transport_stream: trio.abc.Stream = transport_stream
        self._server_side = server_side
        self._ragged_eof_ok = ragged_eof_ok
        self._conn = SSL.Connection(context, None)
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            if server_hostname is not None:
                _set_peer_name(self._conn, server_hostname)
            if session is not None:
                self._conn.set_session(session)

        self._state = _State.OK
        self._handshake_started = False
        self._handshake_done = False
        self._handshake_finished = trio.Event()  # set when the handshake ends, either way
        # Server-side TLS 1.3: the session tickets OpenSSL writes at the end of the
        # handshake, held back until our first send (as trio does; OpenSSL issue 7948).
        self._delayed_outgoing: bytes | None = None
        self._transport_eof = False
        self._eof_received = False  # receive_some has returned b"" for good

        self._inner_send_lock = trio.StrictFIFOLock()
        self._inner_recv_lock = trio.Lock()
        self._inner_recv_count = 0
        self._send_conflict = _ConflictDetector(
            "another task is currently sending data on this OpenSSLStream"
        )
        self._recv_conflict = _ConflictDetector(
            "another task is currently receiving data on this OpenSSLStream"
        )
        self._estimated_receive_size = _STARTING_RECEIVE_SIZE

    # ---- information ---------------------------------------------------------------

    @property
    def server_side(self) -> bool:
        return self._server_side

    @property
    def ragged_eof_ok(self) -> bool:
        return self._ragged_eof_ok

    @property
    def connection(self) -> SSL.Connection:
        """The underlying `OpenSSL.SSL.Connection` (peer certificate, SNI name, ...).

        Only read from it; driving it (read/write/handshake) would corrupt this stream.
        """
        return self._conn

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    @property
    def negotiated_version(self) -> str | None:
        """E.g. "TLSv1.3"; None until the handshake has completed."""
        if not self._handshake_done:
            return None
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str | None:
        """OpenSSL's name of the negotiated cipher; None until the handshake has completed."""
        if not self._handshake_done:
            return None
        return self._conn.get_cipher_name()

    @property
    def session_reused(self) -> bool:
        """Whether the completed handshake resumed an earlier session (False before)."""
        return self._handshake_done and _session_reused(self._conn)

    @property
    def session(self) -> SSL.Session | None:
        """The current session, to pass as `session=` to a later client connection.

        With TLS 1.3 the server sends its tickets after the handshake, so a client has a
        resumable session only once it has received some data after the handshake.
        """
        return self._conn.get_session()

    # ---- internals -----------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this OpenSSLStream is broken")
        raise trio.ClosedResourceError("this OpenSSLStream was closed")

    def _mark_broken(self) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN

    def _drain_outgoing(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._conn.bio_read(_BIO_READ_SIZE)
            except SSL.WantReadError:  # the memory BIO is empty
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _is_eof_error(self, exc: BaseException | None) -> bool:
        # pyOpenSSL reports OpenSSL's "unexpected EOF while reading" as SysCallError; we fed
        # that EOF into the BIO ourselves, so we know it really was the transport's EOF.
        return self._transport_eof and isinstance(exc, SSL.SysCallError)

    def _read(self, max_bytes: int) -> bytes:
        try:
            return self._conn.recv(max_bytes)
        except SSL.ZeroReturnError:  # the peer's close_notify
            return b""

    def _write(self, view: memoryview) -> int:
        """Encrypt up to `_MAX_WRITE_ROUND` bytes of `view` into the outgoing BIO.

        One SSL_write per 16 KiB slice (one record each; pyOpenSSL enables partial writes,
        so each call may also take less). Returns how much was taken; raises WantRead/
        WantWrite only if nothing was, so that a retry never encrypts the same bytes twice.
        """
        total = 0
        limit = min(len(view), _MAX_WRITE_ROUND)
        while total < limit:
            try:
                total += self._conn.send(view[total : min(total + _SEND_SLICE, limit)])
            except (SSL.WantReadError, SSL.WantWriteError):
                if total:
                    return total
                raise
        return total

    async def _send_alert(self) -> None:
        """Best effort: send the alert OpenSSL wrote on a fatal error, so the peer learns why.

        An error sending it is ignored (the stream is broken already); a cancellation is not.
        """
        alert = self._drain_outgoing()
        if not alert:
            return
        async with self._inner_send_lock:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.transport_stream.send_all(alert)

    async def _retry(
        self,
        fn: Callable[[], T],
        *,
        ignore_want_read: bool = False,
        is_handshake: bool = False,
    ) -> T | None:
        """Call `fn` on the Connection until it succeeds, moving bytes as OpenSSL asks.

        Each round: call `fn` without yielding, then do exactly one thing that makes
        progress: send what OpenSSL wrote to the outgoing BIO (sending first keeps the
        bytes of concurrent callers in the order OpenSSL produced them; the FIFO lock keeps
        the queue), else receive what it wants to read (unless another task received
        while we waited for the receive lock: then just try again).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        finished = False
        ret: T | None = None
        while not finished:
            want_read = False
            want_write = False
            try:
                ret = fn()
            except SSL.WantReadError:
                want_read = True
            except SSL.WantWriteError:
                # A memory BIO grows without bound, so OpenSSL should never ask; if it
                # does, flushing the outgoing BIO below is what it waits for.
                want_write = True
            except SSL.Error as exc:
                self._mark_broken()
                await self._send_alert()
                raise trio.BrokenResourceError(f"TLS error: {exc!r}") from exc
            else:
                finished = True
            if ignore_want_read:
                want_read = False
                want_write = False
                finished = True
            to_send = self._drain_outgoing()

            if (
                is_handshake
                and finished
                and self._server_side
                and self._conn.get_protocol_version_name() == "TLSv1.3"
            ):
                # The handshake is complete and what is left are the session tickets; the
                # client may not be reading right now, so they go with our first send.
                self._delayed_outgoing = to_send
                to_send = b""

            if to_send:
                async with self._inner_send_lock:  # strict FIFO: order on the wire kept
                    yielded = True
                    try:
                        if self._delayed_outgoing is not None:
                            to_send = self._delayed_outgoing + to_send
                            self._delayed_outgoing = None
                        await self.transport_stream.send_all(to_send)
                    except BaseException:
                        # Some unknown part of a record went out: the stream is doomed.
                        self._mark_broken()
                        raise
            elif want_read:
                recv_count = self._inner_recv_count
                async with self._inner_recv_lock:
                    yielded = True
                    if recv_count == self._inner_recv_count:
                        data = await self.transport_stream.receive_some()
                        if not data:
                            self._transport_eof = True
                            self._conn.bio_shutdown()
                        else:
                            self._estimated_receive_size = max(
                                self._estimated_receive_size, len(data)
                            )
                            self._conn.bio_write(data)
                        self._inner_recv_count += 1
            elif want_write:
                self._mark_broken()
                raise trio.BrokenResourceError("OpenSSL wants to write but produced nothing")
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return ret

    async def _ensure_handshake(self, *, checkpoint: bool) -> None:
        if not self._handshake_started:
            self._handshake_started = True
            try:
                await self._retry(self._conn.do_handshake, is_handshake=True)
            except BaseException:
                self._mark_broken()
                raise
            else:
                self._handshake_done = True
            finally:
                self._handshake_finished.set()
        elif self._handshake_done and not checkpoint:
            return
        else:
            await self._handshake_finished.wait()
            self._check_status()  # the handshake failed in the task that ran it

    # ---- the Stream API ------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the TLS handshake if it has not happened yet.

        Runs it once; if another task is running it, waits for that one. Afterwards it
        only checkpoints. If cancelled, the stream is broken.
        """
        self._check_status()
        await self._ensure_handshake(checkpoint=True)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` and send it; see `trio.abc.SendStream.send_all`.

        A cancellation in the middle leaves the stream broken (part of a record may have
        gone out).
        """
        with self._send_conflict.held():
            self._check_status()
            await self._ensure_handshake(checkpoint=False)
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            offset = 0
            while offset < len(view):
                written = await self._retry(partial(self._write, view[offset:]))
                assert written is not None
                offset += written

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive and decrypt some data; see `trio.abc.ReceiveStream.receive_some`.

        b"" means the peer closed cleanly (close_notify, or with `ragged_eof_ok` also a bare
        transport EOF) and is returned again on every later call.
        """
        with self._recv_conflict.held():
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            if self._eof_received and self._state is not _State.CLOSED:
                await trio.lowlevel.checkpoint()
                return b""
            self._check_status()
            try:
                await self._ensure_handshake(checkpoint=False)
            except trio.BrokenResourceError as exc:
                if self._ragged_eof_ok and self._is_eof_error(exc.__cause__):
                    self._eof_received = True
                    await trio.lowlevel.checkpoint()
                    return b""
                raise
            if max_bytes is None:
                max_bytes = max(self._estimated_receive_size, self._conn.pending())
            try:
                received = await self._retry(partial(self._read, max_bytes))
            except trio.BrokenResourceError as exc:
                if self._ragged_eof_ok and self._is_eof_error(exc.__cause__):
                    self._eof_received = True
                    await trio.lowlevel.checkpoint()
                    return b""
                raise
            assert received is not None
            if not received:
                self._eof_received = True
            return received

    async def wait_send_all_might_not_block(self) -> None:
        """See `trio.abc.SendStream.wait_send_all_might_not_block`."""
        with self._send_conflict.held():
            self._check_status()
            async with self._inner_send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> NoReturn:
        """TLS has no half-close here (like `trio.SSLStream`): always raises.

        `trio.ClosedResourceError`/`trio.BrokenResourceError` if the stream is closed or
        broken, else `NotImplementedError`; use `aclose()`.
        """
        self._check_status()
        raise NotImplementedError("OpenSSLStream cannot half-close; use aclose()")

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's) and close the transport.

        Unlike `trio.SSLStream` this never starts a handshake just to close: if none has
        completed, there is no TLS session to end and the transport is simply closed (a
        handshake running in another task then fails with `trio.ClosedResourceError`). A
        broken stream closes its transport without TLS. Cancelled, it still closes
        (forcefully). Closing again is a no-op.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._state is _State.BROKEN or not self._handshake_done:
            self._state = _State.CLOSED
            await self.transport_stream.aclose()
            return
        try:
            # The peer may have gone already; both sides closing at once is fine too.
            with suppress(trio.BrokenResourceError):
                await self._retry(self._conn.shutdown, ignore_want_read=True)
        except BaseException:
            self._state = _State.CLOSED
            await trio.aclose_forcefully(self.transport_stream)
            raise
        self._state = _State.CLOSED
        await self.transport_stream.aclose()


# ---- pieces pyOpenSSL has no public API for -------------------------------------------
#
# SSL_session_reused and X509_VERIFY_PARAM_set1_host/_ip are not wrapped by
# OpenSSL.SSL; the bindings are those pyOpenSSL itself uses (cryptography's). Kept to these
# two helpers; a missing binding fails closed (no resumption reported / hostname refused).


def _binding_lib() -> object:
    from OpenSSL import _util

    return _util.lib


def _session_reused(conn: SSL.Connection) -> bool:
    fn = getattr(_binding_lib(), "SSL_session_reused", None)
    ssl_ptr = getattr(conn, "_ssl", None)
    if fn is None or ssl_ptr is None:
        return False
    return bool(fn(ssl_ptr))


def _set_peer_name(conn: SSL.Connection, hostname: str) -> None:
    """SNI (for names) and the name or address the peer's certificate must match."""
    lib = _binding_lib()
    get_param = getattr(lib, "SSL_get0_param", None)
    ssl_ptr = getattr(conn, "_ssl", None)
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(hostname)
    except ValueError:
        ip = None
    setter = getattr(
        lib, "X509_VERIFY_PARAM_set1_ip" if ip else "X509_VERIFY_PARAM_set1_host", None
    )
    if get_param is None or setter is None or ssl_ptr is None:
        raise TLSConfigError("this OpenSSL binding cannot verify peer names")
    param = get_param(ssl_ptr)
    if ip is not None:  # no SNI for an address (RFC 6066 section 3)
        ok = setter(param, ip.packed, len(ip.packed))
    else:
        name = hostname.rstrip(".").encode("idna")
        conn.set_tlsext_host_name(name)
        ok = setter(param, name, len(name))
    if ok != 1:
        raise TLSConfigError(f"cannot use {hostname!r} as the peer name")


# ---- contexts ------------------------------------------------------------------------------


def _proto_version(name: str, setting: str) -> int:
    try:
        return TLS_VERSIONS[name]
    except KeyError:
        allowed = ", ".join(TLS_VERSIONS)
        raise TLSConfigError(f"{setting} {name!r} is not one of {allowed}") from None


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: cannot read: {exc.strerror or exc}") from exc


def _load_chain(cert_path: str) -> list[x509.Certificate]:
    data = _read_file(cert_path, "certificate file")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(
            f"certificate file {cert_path}: no PEM certificate could be read ({exc})"
        ) from exc
    if not chain:  # pragma: no cover - cryptography raises instead
        raise TLSConfigError(f"certificate file {cert_path}: no PEM certificate found")
    return chain


def _load_key(key_path: str) -> _PrivateKey:
    data = _read_file(key_path, "key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted
        raise TLSConfigError(f"key file {key_path}: {exc}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(f"key file {key_path}: no PEM private key could be read") from exc
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | dsa.DSAPrivateKey,
    ):
        raise TLSConfigError(f"key file {key_path}: unsupported key type {type(key).__name__}")
    return key


def _no_renegotiation_options() -> int:
    return int(getattr(SSL, "OP_NO_RENEGOTIATION", 0))


def server_context(
    cert_path: str,
    key_path: str,
    *,
    min_version: str = "TLSv1.2",
    max_version: str | None = None,
    ciphers: str = MOZILLA_INTERMEDIATE_CIPHERS,
    session_tickets: bool = True,
) -> SSL.Context:
    """A complete server `OpenSSL.SSL.Context` for `OpenSSLStream(..., server_side=True)`.

    `cert_path`: PEM file, leaf certificate first, then intermediates. `key_path`: PEM
    private key, unencrypted. Both are read here (a reload calls this again and swaps the
    result in). `ciphers` is the OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are
    OpenSSL's defaults). `session_tickets=False` turns off stateless tickets
    (SSL_OP_NO_TICKET); the server-side session cache still allows resumption by session
    id (TLS 1.2) or stateful ticket (TLS 1.3). Renegotiation and compression are off.

    Nothing may be changed after the first connection is made from the context
    (pyOpenSSL 26.2+ refuses), so everything is set here. Raises `TLSConfigError` naming
    the file or setting on any problem.
    """
    min_v = _proto_version(min_version, "min_version")
    max_v = _proto_version(max_version, "max_version") if max_version is not None else 0
    chain = _load_chain(cert_path)
    key = _load_key(key_path)

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(min_v)
    ctx.set_max_proto_version(max_v)
    options = SSL.OP_NO_COMPRESSION | _no_renegotiation_options()
    if not session_tickets:
        options |= SSL.OP_NO_TICKET
    ctx.set_options(options)
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as exc:
        raise TLSConfigError(f"ciphers {ciphers!r}: no usable cipher ({exc})") from exc
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
    except SSL.Error as exc:
        raise TLSConfigError(f"certificate file {cert_path}: unusable ({exc})") from exc
    try:
        ctx.use_privatekey(key)
    except SSL.Error as exc:
        raise TLSConfigError(
            f"key file {key_path}: unusable or does not match the certificate in {cert_path}"
            f" ({exc})"
        ) from exc
    try:
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise TLSConfigError(
            f"key file {key_path}: does not match the certificate in {cert_path}"
        ) from exc
    return ctx


def client_context(
    cafile: str | None,
    *,
    verify: bool = True,
    min_version: str = "TLSv1.2",
    max_version: str | None = None,
) -> SSL.Context:
    """A complete client `OpenSSL.SSL.Context` (tests, upstream STARTTLS).

    With `verify` (the default) the peer's chain must verify against `cafile` (PEM), or
    against the system's default trust store if `cafile` is None; pass `server_hostname`
    to `OpenSSLStream` to also check the name. `verify=False` accepts any certificate
    (e.g. an MTA on loopback with a self-signed one).
    """
    min_v = _proto_version(min_version, "min_version")
    max_v = _proto_version(max_version, "max_version") if max_version is not None else 0
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(min_v)
    ctx.set_max_proto_version(max_v)
    ctx.set_options(SSL.OP_NO_COMPRESSION | _no_renegotiation_options())
    if verify:
        ctx.set_verify(SSL.VERIFY_PEER)
        if cafile is not None:
            _read_file(cafile, "CA file")  # a clear error for a missing/unreadable file
            try:
                ctx.load_verify_locations(cafile)
            except SSL.Error as exc:
                raise TLSConfigError(f"CA file {cafile}: unusable ({exc})") from exc
        else:
            ctx.set_default_verify_paths()
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx
