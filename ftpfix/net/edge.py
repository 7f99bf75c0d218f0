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

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from ..config import Config
from ..ports import PortPool
from ..protocol import FtpfixError, ProtocolError
from ..protocol.grammar import BACKEND_UNREACHABLE, SHUTTING_DOWN
from .addresses import Endpoints, is_address, normalize_host
from .dial import connect
from .dispatch import ControlChannel
from .metrics import METRICS, session_end
from .proxied import Arrival, PrefixedStream, backend_header
from .public import PublicAddress
from .stopping import Stopping
from .streams import say_last

_session_ids = itertools.count(1)


async def handle_client(
    stream: trio.SocketStream,
    client: tuple[str, int],
    config: Config,
    pool: PortPool,
    public: PublicAddress,
    shutdown: Stopping | None = None,
    arrival: Arrival | None = None,
) -> None:
    """Serve one client connection from accept to close.

    ``client`` is the client's address and port: the peer's, read once at
    accept, or the one a trusted balancer's PROXY header named (``arrival``,
    which also says what came after the header and whether ftpfix greeted).
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
    end = "other"  # the ftpfix_sessions_ended_total reason, unless the channel says better
    ended = False  # the session ran to its own end, not cut off
    try:
        # ftplib's abort() sends IAC DM as TCP urgent data: read it inline, in
        # order, instead of losing it to the out-of-band byte (RFC 1123 4.1.3.1).
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        local_address = stream.socket.getsockname()
        local = normalize_host(local_address[0])
        dialed = arrival.dialed or (local, local_address[1])
        header = backend_header(config.backend.proxy_protocol, client, dialed)
        backend = await _connect_backend(stream, config, log, header)
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
            client_stream: trio.abc.Stream = PrefixedStream(stream, arrival.rest) if arrival.rest else stream
            channel = ControlChannel(
                config, pool, public, client_stream, backend, endpoints, log, shutdown, greeted=arrival.greeted
            )
            try:
                await channel.run()
                ended = True
            except ProtocolError as error:
                log.warning("protocol error", error=str(error))
                channel.close_reason = str(error)
                await say_last(stream, error.reply)
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
            await say_last(stream, SHUTTING_DOWN, timeout=0.5)
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
            if channel.tls_summary is not None:
                fields["tls_version"], fields["tls_cipher"] = channel.tls_summary
        if channel is not None and end == "other":
            end = session_end(channel.close_reason)
        if shutdown is not None and shutdown.is_set() and not ended:
            end = "shutdown"
        METRICS.sessions_ended.labels(end).inc()
        log.info("session closed", duration=round(trio.current_time() - started, 3), **fields)
        structlog.contextvars.clear_contextvars()


async def _connect_backend(
    client: trio.SocketStream, config: Config, log: FilteringBoundLogger, header: bytes = b""
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
