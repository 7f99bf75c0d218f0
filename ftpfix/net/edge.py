"""The session edge: one client connection from accept to close.

It dials the backend, hands both connections to the dispatcher
(``dispatch.py``), and writes the session's summary line when it ends,
whatever ended it. It is the failure boundary of the session: lost
connections end it quietly, a ProtocolError sends its reply to the client,
and anything else is a bug, logged with its traceback, that never takes the
server down.
"""

from __future__ import annotations

import itertools
import socket
import ssl

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from ..config import BackendTls, Config
from ..protocol import FtpfixError, ProtocolError, Side
from ..protocol.grammar import BACKEND_UNREACHABLE, SHUTTING_DOWN
from .addresses import Endpoints, is_address, normalize_host
from .backend_tls import BackendTlsFailed, Prefixed, secure_backend
from .dataports import DataPorts
from .dial import connect
from .dispatch import ControlChannel
from .metrics import METRICS, session_end
from .proxied import Arrival, PrefixedStream, backend_header
from .public import PublicAddress
from .stopping import Stopping
from .streams import say_last
from .tls import HandshakeFailed, accept_tls, describe, send_close_notify, server_context

_session_ids = itertools.count(1)


async def handle_client(
    stream: trio.SocketStream,
    client: tuple[str, int],
    config: Config,
    ports: DataPorts,
    public: PublicAddress,
    shutdown: Stopping | None = None,
    arrival: Arrival | None = None,
    *,
    implicit: bool = False,
) -> None:
    """Serve one client connection from accept to close.

    ``client`` is the client's address and port: the peer's, read once at
    accept, or the one a trusted balancer's PROXY header named (``arrival``,
    which also says what came after the header and whether ftpfix greeted).
    ``implicit``: it came in on the implicit FTPS port, so TLS comes first,
    before the greeting (the port-990 convention; RFC 4217 itself only
    describes AUTH TLS), and data connections are protected from the start.
    """
    session_id = next(_session_ids)
    arrival = arrival if arrival is not None else Arrival(client=client)
    bound = {"session": session_id, "client": f"{client[0]}:{client[1]}"}
    if arrival.via is not None:
        bound["proxy"] = arrival.via
    structlog.contextvars.bind_contextvars(**bound)
    log: FilteringBoundLogger = structlog.get_logger("ftpfix.session")
    started = trio.current_time()
    log.info("session opened")
    channel: ControlChannel | None = None
    control: trio.abc.Stream = stream  # the client's stream, TLS once it is
    implicit_tls: tuple[ssl.SSLContext, tuple[str, str]] | None = None
    backend_tls: trio.SSLStream[trio.abc.Stream] | None = None
    backend_tls_version: str | None = None  # read while the stream is up: after its close it is gone
    end = "other"  # the ftpfix_sessions_ended_total reason, unless the channel says better
    ended = False  # the session ran to its own end, not cut off
    try:
        # ftplib's abort() sends IAC DM as TCP urgent data: read it inline, in
        # order, instead of losing it to the out-of-band byte (RFC 1123 4.1.3.1).
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        local_address = stream.socket.getsockname()
        local = normalize_host(local_address[0])
        if arrival.rest:
            # What followed a PROXY header: the client's first bytes (its
            # ClientHello, on the implicit port).
            control = PrefixedStream(stream, arrival.rest)
        if implicit:
            secured = await _accept_implicit(control, config, log)
            if secured is None:
                end = "tls_handshake"
                return
            control, implicit_tls = secured
        dialed = arrival.dialed or (local, local_address[1])
        header = backend_header(config.backend.proxy_protocol, client, dialed)
        backend = await _connect_backend(control, config, log, header)
        if backend is None:
            end = "backend_down"
            return
        async with backend:
            endpoints = Endpoints(
                client=client[0],
                local=local,
                backend=normalize_host(backend.socket.getpeername()[0]),
                backend_local=normalize_host(backend.socket.getsockname()[0]),
                dialed=arrival.dialed[0] if arrival.dialed is not None else None,
            )
            backend_side: trio.abc.Stream = backend
            if config.backend.tls != BackendTls.OFF:
                try:
                    backend_tls, greeting = await secure_backend(backend, config, log)
                except BackendTlsFailed as error:
                    log.warning(
                        "backend TLS failed",
                        backend=f"{config.backend.address}:{config.backend.port}",
                        tls=str(config.backend.tls),
                        error=str(error),
                    )
                    await say_last(control, error.reply)
                    end = "backend_down"
                    return
                backend_side = Prefixed(backend_tls, greeting)
                backend_tls_version = backend_tls.version()
            channel = ControlChannel(
                config,
                ports,
                public,
                control,
                backend_side,
                endpoints,
                log,
                shutdown,
                greeted=arrival.greeted,
                accepted=arrival.accepted if arrival.accepted is not None else started,
                implicit_tls=implicit_tls,
                backend_tls=backend_tls,
            )
            try:
                await channel.run()
                ended = True
            except ProtocolError as error:
                log.warning("protocol error", error=str(error))
                channel.close_reason = str(error)
                await say_last(channel.streams[Side.CLIENT].stream, error.reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        log.info("connection lost", error=str(error))
        end = "client_hung_up"
    except FtpfixError as error:
        log.error("session failed", error=str(error))
        end = "error"
    except Exception:
        log.exception("session crashed: this is a bug in ftpfix")
        end = "error"
    finally:
        if shutdown is not None and shutdown.is_set() and not ended:
            # Cut off by the end of the shutdown grace: say so, briefly.
            await say_last(channel.streams[Side.CLIENT].stream if channel else control, SHUTTING_DOWN, timeout=0.5)
        await send_close_notify(channel.streams[Side.CLIENT].stream if channel else control)
        await trio.aclose_forcefully(stream)
        fields = {}
        if channel is not None:
            fields = {
                "user": channel.core.user,
                "bytes_up": channel.totals.upload,
                "bytes_down": channel.totals.download,
                "mappings": channel.totals.transfers,
                "reason": channel.close_reason,
            }
            if implicit:
                fields["implicit_tls"] = True
            if channel.tls_summary is not None:
                fields["tls_version"], fields["tls_cipher"] = channel.tls_summary
            if backend_tls_version is not None:
                fields["backend_tls_version"] = backend_tls_version
        if channel is not None and end == "other":
            end = session_end(channel.close_reason)
        if shutdown is not None and shutdown.is_set() and not ended:
            end = "shutdown"
        METRICS.sessions_ended.labels(end).inc()
        log.info("session closed", duration=round(trio.current_time() - started, 3), **fields)
        structlog.contextvars.clear_contextvars()


async def _accept_implicit(
    stream: trio.SocketStream, config: Config, log: FilteringBoundLogger
) -> tuple[trio.SSLStream[trio.abc.Stream], tuple[ssl.SSLContext, tuple[str, str]]] | None:
    """The implicit FTPS client's stream with its handshake done, and the
    session's TLS context (``tls.py``: one per session binds the data
    connections to it); None after logging why not.

    A client that sends something else than a ClientHello (a plain FTP
    client on port 990, a scanner), stalls, or leaves mid-handshake is only
    logged: there is no channel to tell it anything on.
    """
    try:
        context = server_context(config.tls)
    except (OSError, ssl.SSLError) as error:
        log.error("cannot load the TLS certificate", error=str(error))
        return None
    try:
        tls = await accept_tls(stream, context)
    except HandshakeFailed as error:
        log.warning("TLS handshake failed", side="client", implicit=True, error=str(error))
        return None
    summary = describe(tls)
    log.info("tls started", implicit=True, version=summary[0], cipher=summary[1])
    return tls, (context, summary)


async def _connect_backend(
    client: trio.abc.Stream, config: Config, log: FilteringBoundLogger, header: bytes = b""
) -> trio.SocketStream | None:
    """The backend's control connection, or None after telling the client why not.

    ``header`` (a PROXY protocol header, ``[backend] proxy_protocol``) goes
    out before anything else on it.
    """
    backend = config.backend
    dialed = trio.current_time()
    try:
        with trio.fail_after(backend.connect_timeout):
            stream = await _dial(backend.address, backend.port, backend.connect_timeout)
            if header:
                try:
                    await stream.send_all(header)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        METRICS.backend_connect_seconds.observe(trio.current_time() - dialed)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as error:
        METRICS.backend_connect_failures.inc()
        log.warning("backend unreachable", backend=f"{backend.address}:{backend.port}", error=str(error) or "timed out")
        await say_last(client, BACKEND_UNREACHABLE)
        return None
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


async def _dial(host: str, port: int, timeout: float) -> trio.SocketStream:
    """A stream to ``host:port``. An address is dialed directly, which costs a
    fraction of trio's happy-eyeballs machinery; a name goes through it."""
    if not is_address(host):
        return await trio.open_tcp_stream(host, port)
    sock = await connect((host, port), timeout)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
