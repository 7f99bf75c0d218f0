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
import select
import socket
from dataclasses import dataclass

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from ..config import Config
from ..ports import PortPool
from ..protocol import (
    AbortTransfer,
    AwaitQuiet,
    CancelTransfer,
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

#: Data mappings one session may hold at once: the one being set up and one
#: whose transfer is still ending. A new PASV or PORT first retires mappings
#: whose transfer is over, so a client cannot collect ports by keeping old
#: data connections open.
MAX_MAPPINGS = 2

#: Seconds the backend must stay silent before PASV, EPSV, PORT or EPRT goes
#: out after a multi-line reply (see ``AwaitQuiet``). A server writes one
#: reply in a burst; on loopback or a LAN the rest of it arrives in well
#: under a millisecond. Paid only after multi-line replies (FEAT, STAT).
QUIET_PERIOD = 0.05

SHUTDOWN_REPLY = b"421 Service shutting down, closing control connection.\r\n"

#: Most backend bytes gathered into one event (see ``_read_rest``).
SERVER_DRAIN = 256 * 1024

_session_ids = itertools.count(1)


#: Seconds between checks for a hang-up on a side ftpfix is not reading.
HANG_UP_CHECK = 1.0

#: Seconds between looks at whether a running transfer has delivered, after
#: which the session's idle clock runs again.
TRANSFER_CHECK = 1.0


def _hung_up(fd: int) -> bool:
    """True if the peer of ``fd`` closed or reset, even with unread bytes left."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _readable_now(fd: int) -> bool:
    """True if ``fd`` has bytes (or its end) to read without waiting."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The addresses of a session's two control connections, read once.

    Passive ports listen on the address the client dialed (``local``), active
    listeners on the one ftpfix reaches the backend from (``backend_local``).
    """

    client: str
    local: str
    backend: str
    backend_local: str


@dataclass(frozen=True, slots=True)
class _Received:
    """Bytes from ``side``; empty at its end of file."""

    side: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class _Expired:
    """A session deadline passed: send ``reply`` and end the session."""

    reply: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class _TransferDone:
    """The data relay of the transfer whose final 2xx the core holds has ended."""

    mapping: DataMapping | None


@dataclass(frozen=True, slots=True)
class _Quiet:
    """The backend has sent nothing for ``QUIET_PERIOD`` seconds."""


@dataclass(frozen=True, slots=True)
class _Drain:
    """ftpfix is shutting down: end the session once nothing is in flight."""


_Event = _Received | _Expired | _TransferDone | _Quiet | _Drain


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

    Every input (bytes from a side, a deadline, the end of a transfer, a
    shutdown) arrives as an event on one unbuffered channel, and one loop
    feeds them to the core and executes its commands, so they run strictly
    in order.

    Resource handling: every task and socket the session opens belongs to the
    nursery in ``run``, so when ``run`` returns, nothing of the session is left.
    The client is read only while the core wants more (TCP backpressure).
    """

    def __init__(
        self,
        config: Config,
        pool: PortPool,
        public: PublicAddress,
        client: trio.SocketStream,
        backend: trio.SocketStream,
        endpoints: Endpoints,
        log: FilteringBoundLogger,
        shutdown: trio.Event | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.public = public
        self.streams = {Side.CLIENT: client, Side.SERVER: backend}
        self.endpoints = endpoints
        self.log = log
        self.shutdown = shutdown
        passive_ports = config.backend.passive_ports
        policy = Policy(
            aliases=config.commands.aliases,
            max_line=config.limits.max_line,
            epsv=config.passive.epsv,
            active=config.active.mode,
            fix_address=config.active.fix_address,
            deny_anonymous=config.access.deny_anonymous,
            backend_port=config.backend.port,
            backend_passive_ports=range(passive_ports.first, passive_ports.last + 1) if passive_ports else None,
        )
        client_address = ipaddress.ip_address(endpoints.client)
        self.core = Session(policy, client=client_address)
        self.internal = any(client_address in network for network in config.passive.internal_networks)
        self.totals = SessionTotals()
        self.close_reason = "unknown"
        self._mapping: DataMapping | None = None  # the newest: the one transfers use
        self._mappings: list[DataMapping] = []  # every one still running
        self._nursery: trio.Nursery | None = None
        self._events: trio.MemorySendChannel[_Event] | None = None
        self._draining = False
        now = trio.current_time()
        self._started = now
        self._last_activity = now
        self._last_backend_data = now
        self._partial_since: float | None = None
        self._rearm = trio.Event()
        # Set while the core wants more from a side; read before each receive.
        self._wanted = {side: trio.Event() for side in Side}
        for event in self._wanted.values():
            event.set()
        limits = config.limits
        self._upload_limit = TokenBucket(limits.upload_rate, now) if limits.upload_rate else None
        self._download_limit = TokenBucket(limits.download_rate, now) if limits.download_rate else None

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
            self._events = send
            async with send, receive:
                for side in Side:
                    nursery.start_soon(self._read, side, send.clone())
                nursery.start_soon(self._watch, send.clone())
                if self.shutdown is not None:
                    nursery.start_soon(self._watch_shutdown, self.shutdown, send.clone())
                async for event in receive:
                    try:
                        if not await self._dispatch(event):
                            break
                    except ProtocolError as caught:
                        error = caught
                        break
                # Cancel before the channel closes, so a reader blocked in
                # send() is cancelled rather than told the channel broke.
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _dispatch(self, event: _Event) -> bool:
        """Feed one event to the core and run what it asks; False once the session must end."""
        match event:
            case _Expired(reply=reply, reason=reason):
                self.log.info("session timed out", reason=reason)
                self.close_reason = reason
                await self._send(Side.CLIENT, reply)
                return False
            case _Drain():
                self._draining = True
                commands: list[Command] = []
            case _Quiet():
                commands = self.core.quiet_confirmed()
            case _TransferDone(mapping=mapping):
                if mapping is None or mapping.failure is None:
                    commands = self.core.transfer_finished()
                else:
                    self.log.info("transfer failed", port=mapping.port, failure=mapping.failure)
                    commands = self.core.transfer_finished(mapping.failure, connected=mapping.connected)
            case _Received(side=side, data=data):
                commands = self.core.receive_data(side, data) if data else self.core.connection_closed(side)
                if side is Side.CLIENT:
                    self._last_activity = trio.current_time()
                    if not self.core.partial_command:
                        self._partial_since = None
                    elif self._partial_since is None:
                        self._partial_since = self._last_activity
                        self._rearm.set()  # a nearer deadline for the watchdog
        if not await self._execute(commands):
            return False
        while self.core.can_advance:
            # Buffered lines, one bounded batch at a time: each batch's
            # replies are written before the next is read.
            if not await self._execute(self.core.advance()):
                return False
        for side in Side:
            if self.core.wants_data(side):
                self._wanted[side].set()
            elif self._wanted[side].is_set():
                self._wanted[side] = trio.Event()
        if self._draining and self.core.idle:
            self.close_reason = "ftpfix is shutting down"
            await self._send(Side.CLIENT, SHUTDOWN_REPLY)
            return False
        return True

    async def _watch(self, send: trio.MemorySendChannel[_Event]) -> None:
        """Post an _Expired when the login, idle or line deadline passes.

        It sleeps until the nearest deadline, or until the dispatcher says a
        nearer one appeared, and looks again: an idle session costs one
        timer, not a poll loop. A data connection counts as activity only
        while bytes move; the relay ends one that stalls.
        """
        limits = self.config.limits
        async with send:
            while True:
                now = trio.current_time()
                idle_reply = f"421 Idle timeout ({limits.idle_timeout:g} s), closing control connection."
                deadlines: list[tuple[float, str | None, str]] = []
                if any(mapping.connected and not mapping.delivered.is_set() for mapping in self._mappings):
                    # While a transfer delivers, the relay's own stall
                    # deadline rules: it ends with 426, not the session with
                    # 421. Look again soon: delivery ends without a word here.
                    deadlines.append((now + TRANSFER_CHECK, None, "transfer check"))
                else:
                    # Once delivered, the idle clock runs from the last byte:
                    # a backend that never sends its final reply cannot hold
                    # the session, nor a client that keeps its data socket.
                    moved = [mapping.stats.last_progress for mapping in self._mappings if mapping.connected]
                    deadlines.append((max([self._last_activity, *moved]) + limits.idle_timeout, idle_reply, "idle timeout"))
                if not self.core.logged_in:
                    deadlines.append((self._started + limits.login_timeout, f"421 Login timeout ({limits.login_timeout:g} s), closing control connection.", "login timeout"))
                if self._partial_since is not None:
                    deadlines.append((self._partial_since + limits.line_timeout, f"421 Command line not completed within {limits.line_timeout:g} s.", "line timeout"))
                deadline, reply, reason = min(deadlines, key=lambda entry: entry[0])
                if deadline <= now and reply is not None:
                    await send.send(_Expired(reply.encode("ascii") + b"\r\n", reason))
                    return
                with trio.move_on_at(deadline):
                    await self._rearm.wait()
                self._rearm = trio.Event()

    async def _watch_shutdown(self, shutdown: trio.Event, send: trio.MemorySendChannel[_Event]) -> None:
        async with send:
            await shutdown.wait()
            await send.send(_Drain())

    async def _read(self, side: Side, send: trio.MemorySendChannel[_Event]) -> None:
        stream = self.streams[side]
        async with send:
            try:
                while True:
                    while not self.core.wants_data(side):
                        # Not reading: a peer that hangs up meanwhile would go
                        # unnoticed until idle_timeout, so look now and then.
                        with trio.move_on_after(HANG_UP_CHECK):
                            await self._wanted[side].wait()
                        if _hung_up(stream.socket.fileno()):
                            self._end(f"{side.value} hung up")
                            return
                    data = await stream.receive_some(CONTROL_READ_SIZE)
                    if side is Side.SERVER:
                        self._last_backend_data = trio.current_time()
                        data, ended = await self._read_rest(stream, data)
                        if ended:
                            await send.send(_Received(side, data))
                            data = b""
                    await send.send(_Received(side, data))
                    if not data:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # A reset, not an orderly close: nobody is left to answer.
                self._end(f"{side.value} connection reset")

    async def _read_rest(self, stream: trio.SocketStream, data: bytes) -> tuple[bytes, bool]:
        """``data`` and whatever else the backend socket already holds; True at its end.

        The core must see a reply together with what follows it, as far as
        it has arrived: a 227 followed by more bytes is forged (the rule in
        ``Session._on_passive_reply``), and a read boundary must not hide that.
        """
        sock = stream.socket
        while data and len(data) < SERVER_DRAIN and _readable_now(sock.fileno()):
            more = await stream.receive_some(CONTROL_READ_SIZE)
            if not more:
                return data, True
            data += more
        return data, False

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
                    self._finish_transfer()
                case CancelTransfer():
                    mapping = self._mapping
                    if mapping is not None:
                        mapping.answered.set()
                        if not mapping.aborted:
                            mapping.cancel(self.pool, "the server ended the transfer")
                case AwaitQuiet():
                    assert self._nursery is not None and self._events is not None
                    self._nursery.start_soon(self._report_quiet, self._events.clone())
                case Note(event=event, level=level, fields=fields):
                    getattr(self.log, level)(event, **fields)
                case Close(reason=reason):
                    self.close_reason = reason
                    return False
                case _:
                    raise TypeError(f"unknown command from the core: {command!r}")
        return True

    def _finish_transfer(self) -> None:
        """Report the transfer's outcome once its relay has delivered everything."""
        mapping = self._mapping
        if mapping is not None:
            mapping.answered.set()
            if not mapping.accepted.is_set() and not mapping.active:
                # Nobody connected to the public port, so ftpfix never dialed
                # the backend: whatever its 2xx says, no data went anywhere.
                mapping.cancel(self.pool, "no data connection was made")
        assert self._nursery is not None and self._events is not None
        self._nursery.start_soon(self._report_transfer, mapping, self._events.clone())

    async def _report_transfer(self, mapping: DataMapping | None, send: trio.MemorySendChannel[_Event]) -> None:
        async with send:
            if mapping is not None:
                await mapping.delivered.wait()
            await send.send(_TransferDone(mapping))

    async def _report_quiet(self, send: trio.MemorySendChannel[_Event]) -> None:
        async with send:
            while (silent := trio.current_time() - self._last_backend_data) < QUIET_PERIOD:
                await trio.sleep(QUIET_PERIOD - silent)
            await send.send(_Quiet())

    async def _send(self, side: Side, data: bytes, urgent: bool = False) -> None:
        """Write to ``side``; a peer that takes nothing for ``idle_timeout`` ends the session.

        Everything else (deadlines included) waits while this loop writes, so
        a peer that stops reading must not be able to hold it forever.
        """
        stream = self.streams[side]
        try:
            with trio.move_on_after(self.config.limits.idle_timeout) as writing:
                if urgent:
                    # trio's streams have no flags; the socket's send has. One
                    # byte always goes whole.
                    await stream.socket.send(data, socket.MSG_OOB)
                else:
                    await stream.send_all(data)
            if writing.cancelled_caught:
                self._end(f"{side.value} stopped reading")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._end(f"{side.value} connection lost")
            await trio.lowlevel.checkpoint()

    def _end(self, reason: str) -> None:
        self.close_reason = reason
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def _make_room(self) -> bool:
        """Retire mappings a new one replaces; False if the session holds too many.

        A mapping nobody connected to, and one whose transfer the backend has
        already answered (a client keeping its end of a finished transfer
        open), give way to the new one, and their ports go back to the pool.
        """
        for mapping in self._mappings:
            if not mapping.accepted.is_set() or mapping.answered.is_set():
                mapping.cancel(self.pool, "replaced by a new data connection")
        live = [mapping for mapping in self._mappings if not mapping.cancel_scope.cancel_called]
        return len(live) < MAX_MAPPINGS

    def _start_mapping(self, mapping: DataMapping) -> None:
        self._mapping = mapping
        self._mappings.append(mapping)
        self.totals.mappings += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_mapping, mapping)

    def _advertised_address(self) -> ipaddress.IPv4Address | None:
        local = ipaddress.ip_address(self.endpoints.local)
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
        if not self._make_room():
            self.log.warning("too many data connections in one session", limit=MAX_MAPPINGS)
            return self.core.passive_failed("too many data connections at once")
        listen_host = self.config.passive.listen_address or self.endpoints.local
        try:
            opened = open_passive_listener(self.pool, listen_host)
        except OSError as error:
            self.log.warning("cannot open a passive port", address=listen_host, error=error.strerror or str(error))
            return self.core.passive_failed("ftpfix cannot listen for it now")
        if opened is None:
            self.log.warning("passive port pool exhausted", ports=str(self.config.passive.ports), leased=self.pool.leased)
            return self.core.passive_failed("no free passive port, try again later")
        port, listener = opened
        backend = self.endpoints.backend
        self._start_mapping(
            DataMapping(
                port=port,
                peer_host=self.endpoints.client,
                target=(backend, command.backend_port),
                listener=listener,
                upload_limit=self._upload_limit,
                download_limit=self._download_limit,
            )
        )
        self.log.info(
            "passive mapping",
            public=f"{address or self.endpoints.local}:{port}",
            backend=f"{backend}:{command.backend_port}",
            advertised=f"{command.advertised_host or backend}:{command.backend_port}",
        )
        return self.core.passive_opened(address, port)

    def _open_active(self, command: OpenActive) -> list[Command]:
        if not self._make_room():
            self.log.warning("too many data connections in one session", limit=MAX_MAPPINGS)
            return self.core.active_failed("too many data connections at once")
        listen_host = self.endpoints.backend_local
        try:
            port, listener = open_active_listener(listen_host)
        except OSError as error:
            self.log.warning("cannot listen for the backend's active connection", error=error.strerror or str(error))
            return self.core.active_failed("ftpfix cannot listen for the server now")
        mapping = DataMapping(
            port=port,
            peer_host=self.endpoints.backend,
            target=(command.host, command.port),
            listener=listener,
            active=True,
            pooled=False,
            source_port=self.config.active.source_port,
            upload_limit=self._upload_limit,
            download_limit=self._download_limit,
        )
        self._start_mapping(mapping)
        self.log.info("active mapping", client=f"{command.host}:{command.port}", listening=f"{listen_host}:{port}")
        return self.core.active_opened(ipaddress.ip_address(listen_host), port)

    async def _serve_mapping(self, mapping: DataMapping) -> None:
        """Run one mapping; its own failure boundary (STYLE 11)."""
        try:
            await serve_mapping(
                mapping,
                self.pool,
                accept_timeout=self.config.limits.data_connect_timeout,
                connect_timeout=self.config.active.connect_timeout if mapping.active else self.config.backend.connect_timeout,
                stall_timeout=self.config.limits.idle_timeout,
                log=self.log,
            )
        except Exception:
            mapping.fail("ftpfix failed")
            self.log.exception("data connection crashed: this is a bug in ftpfix", port=mapping.port)
        finally:
            mapping.release(self.pool)
            mapping.delivered.set()
            mapping.finished.set()
            self._mappings.remove(mapping)
            if mapping.connected:
                # The session's idle clock starts again when its transfer ends.
                self._last_activity = trio.current_time()
            self._rearm.set()
            self.totals.add(mapping)
            if mapping.stats.error:
                self.log.info("data connection ended abruptly", port=mapping.port, error=mapping.stats.error)


async def handle_client(
    stream: trio.SocketStream,
    client: tuple[str, int],
    config: Config,
    pool: PortPool,
    public: PublicAddress,
    shutdown: trio.Event | None = None,
) -> None:
    """Serve one client connection from accept to close.

    ``client`` is the peer's address and port, read once at accept.

    Error handling: this is the shell's edge. Lost connections end the session
    quietly; a ProtocolError sends its reply to the client; anything else is a
    bug, logged with its traceback, and never takes the server down.
    """
    session_id = next(_session_ids)
    structlog.contextvars.bind_contextvars(session=session_id, client=f"{client[0]}:{client[1]}")
    log: FilteringBoundLogger = structlog.get_logger("ftpfix.session")
    started = trio.current_time()
    log.info("session opened")
    channel: ControlChannel | None = None
    ended = False  # the session ran to its own end, not cut off
    try:
        # ftplib's abort() sends IAC DM as TCP urgent data: read it inline, in
        # order, instead of losing it to the out-of-band byte (RFC 1123 4.1.3.1).
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        local = normalize_host(stream.socket.getsockname()[0])
        backend = await _connect_backend(stream, config, log)
        if backend is None:
            return
        async with backend:
            endpoints = Endpoints(
                client=client[0],
                local=local,
                backend=normalize_host(backend.socket.getpeername()[0]),
                backend_local=normalize_host(backend.socket.getsockname()[0]),
            )
            channel = ControlChannel(config, pool, public, stream, backend, endpoints, log, shutdown)
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
        if shutdown is not None and shutdown.is_set() and not ended:
            # Cut off by the end of the shutdown grace: say so, briefly.
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                try:
                    await stream.send_all(SHUTDOWN_REPLY)
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
