"""One proxied session: drive the core with the control connections' bytes and
execute what it asks for.

Two reader tasks, one per side, hand what they read to a single dispatch loop
through an unbuffered channel. Only that loop touches the core and writes to
the control connections, so commands run strictly in the order the core
emitted them, and a reply that ftpfix makes up can never overtake one the
backend sent before it. The unbuffered channel is also the flow control: a
side is not read while the loop is busy writing to a slow peer.
"""

from __future__ import annotations

import itertools
import socket
from dataclasses import dataclass

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from ..config import Config
from ..ports import PortPool
from ..protocol import (
    Close,
    Command,
    FinishTransfer,
    FtpfixError,
    Note,
    OpenPassive,
    Policy,
    ProtocolError,
    SendTo,
    Session,
    Side,
)
from .data import PassiveMapping, normalize_host, open_passive_listener, serve_mapping

#: Bytes read from a control connection at once. Replies are short; a STAT
#: listing is the only large thing that crosses the control channel.
CONTROL_READ_SIZE = 16 * 1024

_session_ids = itertools.count(1)


@dataclass(slots=True)
class SessionTotals:
    """Bytes a session moved, for its closing log line."""

    upload: int = 0
    download: int = 0
    mappings: int = 0

    def add(self, mapping: PassiveMapping) -> None:
        self.upload += mapping.stats.upload
        self.download += mapping.stats.download


class ControlChannel:
    """The shell around one ``Session``: its streams, mappings and nursery.

    Resource handling: every task and socket the session opens belongs to the
    nursery in ``run``, so when ``run`` returns, nothing of the session is left.
    """

    def __init__(
        self,
        config: Config,
        pool: PortPool,
        client: trio.SocketStream,
        backend: trio.SocketStream,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.pool = pool
        self.streams = {Side.CLIENT: client, Side.SERVER: backend}
        self.log = log
        self.core = Session(Policy(aliases=config.commands.aliases, max_line=config.limits.max_line))
        self.client_host = normalize_host(client.socket.getpeername()[0])
        self.backend_host = normalize_host(backend.socket.getpeername()[0])
        self.totals = SessionTotals()
        self.close_reason = "unknown"
        self._mapping: PassiveMapping | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Relay until either side closes or the core asks to close."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            send, receive = trio.open_memory_channel[tuple[Side, bytes]](0)
            async with send, receive:
                for side in Side:
                    nursery.start_soon(self._read, side, send.clone())
                async for side, data in receive:
                    if data:
                        commands = self.core.receive_data(side, data)
                    else:
                        commands = self.core.connection_closed(side)
                    if not await self._execute(commands):
                        break
                # Cancel before the channel closes, so a reader blocked in
                # send() is cancelled rather than told the channel broke.
                nursery.cancel_scope.cancel()

    async def _read(self, side: Side, send: trio.MemorySendChannel[tuple[Side, bytes]]) -> None:
        async with send:
            try:
                while data := await self.streams[side].receive_some(CONTROL_READ_SIZE):
                    await send.send((side, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # A reset, not an orderly close: nobody is left to answer.
                self.close_reason = f"{side.value} connection reset"
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return
            await send.send((side, b""))

    async def _execute(self, commands: list[Command]) -> bool:
        """Run the core's commands in order; False once the session must end."""
        queue = list(reversed(commands))
        while queue:
            command = queue.pop()
            match command:
                case SendTo(side=side, data=data):
                    await self._send(side, data)
                case OpenPassive():
                    queue.extend(reversed(await self._open_passive(command)))
                case FinishTransfer():
                    mapping = self._mapping
                    if mapping is not None and mapping.accepted.is_set():
                        await mapping.finished.wait()
                case Note(event=event, level=level, fields=fields):
                    getattr(self.log, level)(event, **fields)
                case Close(reason=reason):
                    self.close_reason = reason
                    return False
                case _:
                    raise TypeError(f"unknown command from the core: {command!r}")
        return True

    async def _send(self, side: Side, data: bytes) -> None:
        try:
            await self.streams[side].send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = f"{side.value} connection lost"
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()

    async def _open_passive(self, command: OpenPassive) -> list[Command]:
        # One pending mapping per session: a new PASV replaces one the client
        # never used, and frees its port at once.
        previous = self._mapping
        if previous is not None and not previous.accepted.is_set():
            previous.cancel(self.pool)
        opened = open_passive_listener(self.pool, self.config.passive_listen_address)
        if opened is None:
            self.log.warning("passive port pool exhausted", ports=str(self.config.passive.ports), leased=self.pool.leased)
            return self.core.passive_failed("no free passive port, try again later")
        port, listener = opened
        mapping = PassiveMapping(
            public_port=port,
            backend=(self.backend_host, command.backend_port),
            client_host=self.client_host,
            listener=listener,
        )
        self._mapping = mapping
        self.totals.mappings += 1
        self.log.info(
            "passive mapping",
            public=f"{self.config.passive.public_address}:{port}",
            backend=f"{self.backend_host}:{command.backend_port}",
            advertised=f"{command.advertised_host}:{command.backend_port}",
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_mapping, mapping)
        return self.core.passive_opened(self.config.passive.public_address, port)

    async def _serve_mapping(self, mapping: PassiveMapping) -> None:
        try:
            await serve_mapping(
                mapping,
                self.pool,
                accept_timeout=self.config.passive.accept_timeout,
                connect_timeout=self.config.backend.connect_timeout,
                log=self.log,
            )
        finally:
            self.totals.add(mapping)
            if mapping.stats.error:
                self.log.info("data connection ended abruptly", public_port=mapping.public_port, error=mapping.stats.error)


async def handle_client(stream: trio.SocketStream, config: Config, pool: PortPool) -> None:
    """Serve one client connection from accept to close.

    Error handling: this is the shell's edge. Lost connections end the session
    quietly; a ProtocolError sends its reply to the client; anything else is a
    bug, logged with its traceback, and never takes the server down.
    """
    session_id = next(_session_ids)
    peer = stream.socket.getpeername()
    client = f"{normalize_host(peer[0])}:{peer[1]}"
    structlog.contextvars.bind_contextvars(session=session_id, client=client)
    log: FilteringBoundLogger = structlog.get_logger("ftpfix.session")
    started = trio.current_time()
    # ftplib's abort() sends IAC DM as TCP urgent data: read it inline, in
    # order, instead of losing it to the out-of-band byte (RFC 1123 4.1.3.1).
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    log.info("session opened")
    channel: ControlChannel | None = None
    try:
        backend = await _connect_backend(stream, config, log)
        if backend is None:
            return
        async with backend:
            channel = ControlChannel(config, pool, stream, backend, log)
            try:
                await channel.run()
            except ProtocolError as error:
                log.warning("protocol error", error=str(error))
                channel.close_reason = str(error)
                with trio.move_on_after(1):
                    await stream.send_all(error.reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        log.info("connection lost", error=str(error))
    except FtpfixError as error:
        log.error("session failed", error=str(error))
    except Exception:
        log.exception("session crashed: this is a bug in ftpfix")
    finally:
        await trio.aclose_forcefully(stream)
        fields = {}
        if channel is not None:
            fields = {
                "user": channel.core.user,
                "bytes_up": channel.totals.upload,
                "bytes_down": channel.totals.download,
                "mappings": channel.totals.mappings,
                "reason": channel.close_reason,
            }
        log.info("session closed", duration=round(trio.current_time() - started, 3), **fields)
        structlog.contextvars.clear_contextvars()


async def _connect_backend(
    client: trio.SocketStream, config: Config, log: FilteringBoundLogger
) -> trio.SocketStream | None:
    backend = config.backend
    try:
        with trio.fail_after(backend.connect_timeout):
            stream = await trio.open_tcp_stream(backend.address, backend.port)
    except (OSError, trio.TooSlowError) as error:
        log.warning("backend unreachable", backend=f"{backend.address}:{backend.port}", error=str(error) or "timed out")
        with trio.move_on_after(1):
            await client.send_all(b"421 Service not available, the FTP server cannot be reached.\r\n")
        return None
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream
