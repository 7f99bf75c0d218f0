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

import ipaddress
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from ..config import Config
from ..ports import PortPool
from ..protocol import (
    AbortTransfer,
    Close,
    Command,
    FinishTransfer,
    FtpfixError,
    Note,
    OpenActive,
    OpenPassive,
    Policy,
    ProtocolError,
    SendTo,
    Session,
    Side,
)
from .data import DataMapping, normalize_host, open_active_listener, open_passive_listener, serve_mapping
from .public import PublicAddress
from .relay import TokenBucket

#: Bytes read from a control connection at once. Replies are short; a STAT
#: listing is the only large thing that crosses the control channel.
CONTROL_READ_SIZE = 16 * 1024

_session_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class _Expired:
    """A session deadline passed: send ``reply`` and end the session."""

    reply: bytes
    reason: str


_Event = tuple[Side, bytes] | _Expired


@dataclass(slots=True)
class SessionTotals:
    """Bytes a session moved, for its closing log line."""

    upload: int = 0
    download: int = 0
    mappings: int = 0

    def add(self, mapping: DataMapping) -> None:
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
        public: PublicAddress,
        client: trio.SocketStream,
        backend: trio.SocketStream,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.pool = pool
        self.public = public
        self.streams = {Side.CLIENT: client, Side.SERVER: backend}
        self.log = log
        self.client_host = normalize_host(client.socket.getpeername()[0])
        # The address the client dialed, and the one ftpfix reaches the
        # backend from: passive ports listen on the first, active on the second.
        self.local_host = normalize_host(client.socket.getsockname()[0])
        self.backend_host = normalize_host(backend.socket.getpeername()[0])
        self.backend_local_host = normalize_host(backend.socket.getsockname()[0])
        policy = Policy(
            aliases=config.commands.aliases,
            max_line=config.limits.max_line,
            epsv=config.passive.epsv,
            active=config.active.mode,
            fix_address=config.active.fix_address,
            deny_anonymous=config.access.deny_anonymous,
        )
        self.core = Session(policy, client=ipaddress.ip_address(self.client_host))
        self.internal = any(ipaddress.ip_address(self.client_host) in network for network in config.passive.internal_networks)
        self.totals = SessionTotals()
        self.close_reason = "unknown"
        self._mapping: DataMapping | None = None
        self._nursery: trio.Nursery | None = None
        now = trio.current_time()
        self._started = now
        self._last_activity = now
        self._partial_since: float | None = None
        self._rearm = trio.Event()
        limits = config.limits
        self._upload_limit = TokenBucket(limits.upload_rate, now) if limits.upload_rate else None
        self._download_limit = TokenBucket(limits.download_rate, now) if limits.download_rate else None
        # Set while the final reply to a transfer waits for the data relay.
        self._finishing: trio.CancelScope | None = None

    async def run(self) -> None:
        """Relay until either side closes, a deadline passes, or the core asks to close.

        Error handling: a ProtocolError from the core is raised from here, once
        every task of the session has stopped, unwrapped (trio would otherwise
        wrap it in an ExceptionGroup).
        """
        error: ProtocolError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            send, receive = trio.open_memory_channel[_Event](0)
            async with send, receive:
                for side in Side:
                    nursery.start_soon(self._read, side, send.clone())
                nursery.start_soon(self._watch, send.clone())
                async for event in receive:
                    if isinstance(event, _Expired):
                        self.log.info("session timed out", reason=event.reason)
                        self.close_reason = event.reason
                        await self._send(Side.CLIENT, event.reply)
                        break
                    side, data = event
                    try:
                        if data:
                            commands = self.core.receive_data(side, data)
                        else:
                            commands = self.core.connection_closed(side)
                    except ProtocolError as caught:
                        error = caught
                        break
                    if side is Side.CLIENT:
                        self._last_activity = trio.current_time()
                        partial = self.core.partial_command
                        if not partial:
                            self._partial_since = None
                        elif self._partial_since is None:
                            self._partial_since = self._last_activity
                            self._rearm.set()  # a nearer deadline for the watchdog
                    if not await self._execute(commands):
                        break
                # Cancel before the channel closes, so a reader blocked in
                # send() is cancelled rather than told the channel broke.
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _watch(self, send: trio.MemorySendChannel[_Event]) -> None:
        """Post an _Expired when the login, idle or line deadline passes.

        It sleeps until the nearest deadline, or until the dispatcher says a
        nearer one appeared, and looks again: an idle session costs one
        timer, not a poll loop.
        """
        limits = self.config.limits
        async with send:
            while True:
                now = trio.current_time()
                mapping = self._mapping
                if mapping is not None and mapping.accepted.is_set() and not mapping.finished.is_set():
                    self._last_activity = now  # a transfer in progress is activity
                deadlines = [(self._last_activity + limits.idle_timeout, f"421 Idle timeout ({limits.idle_timeout:g} s), closing control connection.", "idle timeout")]
                if not self.core.logged_in:
                    deadlines.append((self._started + limits.login_timeout, f"421 Login timeout ({limits.login_timeout:g} s), closing control connection.", "login timeout"))
                if self._partial_since is not None:
                    deadlines.append((self._partial_since + limits.line_timeout, f"421 Command line not completed within {limits.line_timeout:g} s.", "line timeout"))
                deadline, reply, reason = min(deadlines)
                if deadline <= now:
                    await send.send(_Expired(reply.encode("ascii") + b"\r\n", reason))
                    return
                with trio.move_on_at(deadline):
                    await self._rearm.wait()
                self._rearm = trio.Event()

    async def _read(self, side: Side, send: trio.MemorySendChannel[_Event]) -> None:
        async with send:
            try:
                while data := await self.streams[side].receive_some(CONTROL_READ_SIZE):
                    if side is Side.CLIENT and self._finishing is not None:
                        # The client speaks before it has all the data: it is
                        # aborting, and waiting for the relay would deadlock.
                        self._finishing.cancel()
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
                case SendTo(side=side, data=data, urgent=urgent):
                    await self._send(side, data, urgent)
                case OpenPassive():
                    queue.extend(reversed(self._open_passive(command)))
                case OpenActive():
                    queue.extend(reversed(self._open_active(command)))
                case AbortTransfer():
                    if self._mapping is not None:
                        self._mapping.abort(self.pool)
                case FinishTransfer():
                    mapping = self._mapping
                    if mapping is not None:
                        mapping.backend_answered.set()
                    if mapping is not None and mapping.accepted.is_set():
                        with trio.CancelScope() as self._finishing:
                            await mapping.finished.wait()
                        self._finishing = None
                case Note(event=event, level=level, fields=fields):
                    getattr(self.log, level)(event, **fields)
                case Close(reason=reason):
                    self.close_reason = reason
                    return False
                case _:
                    raise TypeError(f"unknown command from the core: {command!r}")
        return True

    async def _send(self, side: Side, data: bytes, urgent: bool = False) -> None:
        stream = self.streams[side]
        try:
            if urgent:
                # trio's streams have no flags; the socket's send has. One
                # byte always goes whole.
                await stream.socket.send(data, socket.MSG_OOB)
            else:
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close_reason = f"{side.value} connection lost"
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()

    def _drop_pending_mapping(self) -> None:
        # One pending mapping per session: a new PASV or PORT replaces one the
        # peer never used, and frees its port before a new one is leased.
        previous = self._mapping
        if previous is not None and not previous.accepted.is_set():
            previous.cancel(self.pool)

    def _start_mapping(self, mapping: DataMapping) -> None:
        self._mapping = mapping
        self.totals.mappings += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_mapping, mapping)

    def _advertised_address(self) -> ipaddress.IPv4Address | None:
        local = ipaddress.ip_address(self.local_host)
        if self.internal:
            # Split horizon: a LAN client that dialed the private address
            # must be sent back to it, not out to the router.
            return local if isinstance(local, ipaddress.IPv4Address) else None
        return self.public.for_connection(local)

    def _open_passive(self, command: OpenPassive) -> list[Command]:
        address = self._advertised_address()
        if address is None and not command.extended:
            self.log.warning("no public address to advertise", setting=self.public.setting)
            return self.core.passive_failed("the public address is not known yet")
        self._drop_pending_mapping()
        opened = open_passive_listener(self.pool, self.config.passive.listen_address or self.local_host)
        if opened is None:
            self.log.warning("passive port pool exhausted", ports=str(self.config.passive.ports), leased=self.pool.leased)
            return self.core.passive_failed("no free passive port, try again later")
        port, listener = opened
        self._start_mapping(
            DataMapping(
                port=port,
                peer_host=self.client_host,
                target=(self.backend_host, command.backend_port),
                listener=listener,
                upload_limit=self._upload_limit,
                download_limit=self._download_limit,
            )
        )
        self.log.info(
            "passive mapping",
            public=f"{address or self.local_host}:{port}",
            backend=f"{self.backend_host}:{command.backend_port}",
            advertised=f"{command.advertised_host or self.backend_host}:{command.backend_port}",
        )
        return self.core.passive_opened(address, port)

    def _open_active(self, command: OpenActive) -> list[Command]:
        self._drop_pending_mapping()
        try:
            port, listener = open_active_listener(self.backend_local_host)
        except OSError as error:
            self.log.warning("cannot listen for the backend's active connection", error=str(error))
            return self.core.active_failed("cannot listen for the server")
        mapping = DataMapping(
            port=port,
            peer_host=self.backend_host,
            target=(command.host, command.port),
            listener=listener,
            active=True,
            pooled=False,
            source_port=self.config.active.source_port,
            upload_limit=self._upload_limit,
            download_limit=self._download_limit,
        )
        self._start_mapping(mapping)
        self.log.info("active mapping", client=f"{command.host}:{command.port}", listening=f"{self.backend_local_host}:{port}")
        return self.core.active_opened(ipaddress.ip_address(self.backend_local_host), port)

    async def _serve_mapping(self, mapping: DataMapping) -> None:
        try:
            await serve_mapping(
                mapping,
                self.pool,
                accept_timeout=self.config.limits.data_connect_timeout,
                connect_timeout=self.config.active.connect_timeout if mapping.active else self.config.backend.connect_timeout,
                log=self.log,
            )
        finally:
            self.totals.add(mapping)
            if mapping.stats.error:
                self.log.info("data connection ended abruptly", port=mapping.port, error=mapping.stats.error)


async def handle_client(
    stream: trio.SocketStream,
    config: Config,
    pool: PortPool,
    public: PublicAddress,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
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
    ended = False  # the session ran to its own end, not cut off
    try:
        backend = await _connect_backend(stream, config, log)
        if backend is None:
            return
        async with backend:
            channel = ControlChannel(config, pool, public, stream, backend, log)
            try:
                await channel.run()
                ended = True
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
        if stopping() and not ended:
            # Cut off by the end of the shutdown grace: say so, briefly.
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                try:
                    await stream.send_all(b"421 Service shutting down, closing control connection.\r\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
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
