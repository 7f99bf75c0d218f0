"""TLS to the backend: ftpfix as an FTPS client of a legacy server that
speaks FTPS itself, or that sits across a network nobody should read.

The backend's control connection is secured before the session's core sees
anything, so the core relays the greeting and everything after it as on a
plain backend, and the client never learns that the backend speaks TLS (its
own AUTH, PBSZ, PROT and CCC are ftpfix's business, never forwarded):

- ``explicit``: read the greeting, send AUTH TLS, expect 234, handshake
  (RFC 4217 section 4);
- ``implicit``: handshake first, then read the greeting inside TLS (the
  port-990 convention, vsftpd's ``implicit_ssl``);
- then PBSZ 0 and PROT P (RFC 4217 sections 8 and 9), once, before any
  login: every backend data connection is protected, whatever the client's
  own PROT level says about its side.

Data connections resume the control connection's TLS session
(``data_session``). vsftpd refuses any other with ``require_ssl_reuse=YES``,
its Debian default, and that is where ProFTPD's mod_proxy breaks. With TLS
1.3 the server sends its session tickets *after* the handshake, so the
session is taken from the control stream at each data connection, after
the PBSZ and PROT replies have been read (and the tickets with them).

The greeting read here is handed to the core first (``Prefixed``), as if it
had just arrived.
"""

from __future__ import annotations

import ssl

import trio
from structlog.typing import FilteringBoundLogger

from ..config import Backend, BackendTls, Config
from ..protocol.errors import BackendError
from ..protocol.grammar import CRLF, ReplyFramer, reply
from .tls import HANDSHAKE_TIMEOUT, failure_reason

#: Bytes of the replies ftpfix reads itself (greeting, 234, PBSZ, PROT):
#: a greeting with a long banner fits many times over.
MAX_NEGOTIATION = 64 * 1024

#: Bytes read at once while negotiating.
READ_SIZE = 4096


class BackendTlsFailed(Exception):
    """TLS to the backend could not be set up. The message is for the log;
    ``reply`` is what the client gets (a 421 that says why)."""

    def __init__(self, message: str, reply: bytes) -> None:
        super().__init__(message)
        self.reply = reply


def _refused(why: str) -> bytes:
    return reply(f"421 Service not available: TLS to the FTP server failed ({why}).")


_contexts: dict[int, tuple[Backend, ssl.SSLContext]] = {}


def backend_context(backend: Backend) -> ssl.SSLContext:
    """The client context for ``backend``, built once per configuration
    (loading the system's CA store costs milliseconds a session would pay;
    a reload builds a new ``Backend``, so a replaced CA file is read again).

    Verification is on unless ``tls_verify`` is false: the certificate must
    chain to ``tls_ca`` (or the system's store) and name ``[backend]
    address``, a host name or an IP address.
    """
    cached = _contexts.get(id(backend))
    if cached is not None and cached[0] is backend:
        return cached[1]
    context = ssl.create_default_context(cafile=backend.tls_ca or None)
    if not backend.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if len(_contexts) > 4:
        _contexts.clear()  # old generations; sessions that hold them keep their own reference
    _contexts[id(backend)] = (backend, context)
    return context


class _Replies:
    """Whole replies read off a stream, for the few ftpfix reads itself."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""
        self.framer = ReplyFramer()

    async def read(self) -> tuple[int, bytes]:
        """The next whole reply: its code and its bytes."""
        text = b""
        while True:
            while b"\n" not in self.buffer:
                if len(self.buffer) + len(text) > MAX_NEGOTIATION:
                    why = "the server's reply is too long"
                    raise BackendTlsFailed(why, _refused(why))
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    raise BackendTlsFailed(
                        "the backend closed the connection", _refused("the server closed the connection")
                    )
                self.buffer += data
            line, _, self.buffer = self.buffer.partition(b"\n")
            try:
                framed = self.framer.classify(line.rstrip(b"\r"))
            except BackendError as error:
                raise BackendTlsFailed(str(error), _refused("the server sent a malformed reply")) from None
            text += line + b"\n"
            if framed.last:
                return framed.code, text


async def _expect(replies: _Replies, command: bytes, wanted: int) -> None:
    await replies.stream.send_all(command + CRLF)
    code, text = await replies.read()
    if code != wanted:
        said = text.decode("ascii", "replace").strip().splitlines()[-1]
        raise BackendTlsFailed(
            f"the backend refused {command.decode()}: {said}",
            _refused(f"the server refused {command.split()[0].decode()}: {said[:80]}"),
        )


async def _handshake(stream: trio.abc.Stream, config: Config) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, backend_context(config.backend), server_hostname=config.backend.address)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as error:
        cause = error.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or failure_reason(error)
            raise BackendTlsFailed(
                f"the backend's certificate failed verification: {why}",
                _refused(f"its certificate failed verification: {why}"),
            ) from None
        why = failure_reason(error)
        raise BackendTlsFailed(f"TLS handshake with the backend failed: {why}", _refused(why)) from None
    return tls


async def secure_backend(
    stream: trio.SocketStream, config: Config, log: FilteringBoundLogger
) -> tuple[trio.SSLStream[trio.abc.Stream], bytes]:
    """``stream`` with TLS on, PBSZ 0 and PROT P done, and the greeting that
    was read on the way, to hand to the core.

    Error handling: raises BackendTlsFailed, whose ``reply`` the client gets,
    if the backend refuses TLS, fails the handshake or its certificate, or
    does not answer within ``[backend] connect_timeout`` plus the handshake
    timeout. The caller closes ``stream``.
    """
    implicit = config.backend.tls == BackendTls.IMPLICIT
    try:
        with trio.fail_after(config.backend.connect_timeout + HANDSHAKE_TIMEOUT):
            if implicit:
                tls = await _handshake(stream, config)
                replies = _Replies(tls)
                code, greeting = await replies.read()
            else:
                replies = _Replies(stream)
                code, greeting = await replies.read()
                while code == 120:  # RFC 959 4.2: "ready in nnn minutes", 220 follows
                    more_code, more = await replies.read()
                    code, greeting = more_code, greeting + more
            if code != 220:
                # Too many users, shutting down...: the backend's own words
                # say it best, and there is nothing to secure.
                raise BackendTlsFailed(f"the backend greeted with {code}", greeting)
            if not implicit:
                await _expect(replies, b"AUTH TLS", 234)
                if replies.buffer:
                    # Bytes after the 234 and before the handshake are plain
                    # text that would be read as if it came through TLS.
                    raise BackendTlsFailed(
                        "the backend sent plain text after 234", _refused("the server sent plain text after 234")
                    )
                tls = await _handshake(stream, config)
                replies = _Replies(tls)
            await _expect(replies, b"PBSZ 0", 200)
            await _expect(replies, b"PROT P", 200)
    except trio.TooSlowError:
        raise BackendTlsFailed("the backend did not finish setting up TLS in time", _refused("timed out")) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        why = failure_reason(error)
        raise BackendTlsFailed(f"the backend's connection broke: {why}", _refused(why)) from None
    version, cipher = tls.version() or "?", (tls.cipher() or ("?",))[0]
    log.info("backend tls started", version=version, cipher=cipher, reused_tickets=tls.session is not None)
    return tls, greeting + replies.buffer


async def data_session(
    sock: trio.SocketStream, config: Config, control: trio.SSLStream[trio.abc.Stream]
) -> trio.SSLStream[trio.SocketStream]:
    """A backend data connection with TLS done, ftpfix as the TLS client
    (RFC 4217: the server is the TLS server, whichever end dialed), resuming
    ``control``'s session.

    Error handling: raises BackendTlsFailed as ``secure_backend``; the
    transfer then fails with its reason.
    """
    tls = trio.SSLStream(sock, backend_context(config.backend), server_hostname=config.backend.address)
    session = control.session
    if session is not None:
        tls.session = session
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as error:
        why = failure_reason(error)
        raise BackendTlsFailed(f"TLS handshake on the backend's data connection failed: {why}", b"") from None
    return tls


class Prefixed(trio.abc.Stream):
    """``stream``, with ``prefix`` read first: the greeting ``secure_backend``
    read before the core could."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    @property
    def waiting(self) -> bool:
        """True while the prefix has not been read."""
        return bool(self._prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.transport_stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
