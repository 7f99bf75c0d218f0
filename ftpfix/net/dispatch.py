"""The dispatcher of one session: everything that happens goes to the core as
an event, and what the core asks for is done, in order.

Two reader tasks (one per control connection) and the transfers' outcomes
post to one unbuffered channel, and one loop takes them off it; that loop
waits no longer than the session's nearest deadline, and the shutdown wakes
it. An idle session is thus three tasks: the loop and its two readers. Only that loop touches the core and writes to the
control connections, so commands run strictly in the order the core emitted
them, and a reply that ftpfix makes up can never overtake one the backend
sent before it. The outcome of a command (a passive port opened, a transfer
delivered) goes back to the core as the next event, never as a call in the
middle of a command list, in the manner of mitmproxy's
``OpenConnectionCompleted``.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import trio
from structlog.typing import FilteringBoundLogger

from ..config import AcceptDataFrom, BackendTls, Config
from ..protocol import (
    AbortTransfer,
    ActiveFailed,
    ActiveOpened,
    AwaitQuiet,
    BackendQuiet,
    CancelTransfer,
    Close,
    Command,
    ConnectionClosed,
    Count,
    DataFailed,
    DataReceived,
    Event,
    FinishTransfer,
    Note,
    OpenActive,
    OpenPassive,
    PassiveFailed,
    PassiveOpened,
    Policy,
    ProtocolError,
    ReadOn,
    SendTo,
    Session,
    SettleTransfer,
    Side,
    StartTLS,
    TlsStarted,
    TransferDone,
    TransferReplied,
    TransferSettled,
    TransferStarted,
)
from ..protocol.grammar import SHUTTING_DOWN
from ..protocol.grammar import reply as reply_line
from .addresses import Endpoints, advertised_address
from .backend_tls import data_session
from .dataports import DataPorts, private_claim
from .deadlines import Deadlines, Expired
from .dial import open_active_listener
from .metrics import METRICS
from .public import PublicAddress
from .relay import TokenBucket
from .stopping import Stopping
from .streams import ControlStream
from .tls import HandshakeFailed, accept_tls, acknowledge_now, describe, server_context
from .transfer import Timeouts, Transfer
from .transferlog import log_transfer

#: Bytes read from a control connection at once. Replies are short; a STAT
#: listing is the only large thing that crosses the control channel.
CONTROL_READ_SIZE = 16 * 1024

#: Most backend bytes gathered into one event (see ``_read_rest``).
SERVER_DRAIN = 256 * 1024

#: Data connections one session may hold at once: the one being set up and
#: one whose transfer is still ending. A new PASV or PORT first retires
#: those whose transfer is over, so a client cannot collect ports by keeping
#: old data connections open.
MAX_TRANSFERS = 2

#: Seconds the backend must stay silent before PASV, EPSV, PORT or EPRT goes
#: out after a multi-line reply (see ``AwaitQuiet``). A server writes one
#: reply in a burst; on loopback or a LAN the rest of it arrives in well
#: under a millisecond. Paid only after multi-line replies (FEAT, STAT).
QUIET_PERIOD = 0.05

#: Seconds between checks for a hang-up on a side ftpfix is not reading.
HANG_UP_CHECK = 1.0

#: Seconds a client that closed its end without a QUIT still gets for the
#: replies it is owed; one with a transfer outstanding is gone at once (the
#: core's rule). After a QUIT, the client waits for its replies, the
#: transfer's included, and the usual deadlines apply.
HALF_CLOSE_GRACE = 2.0

#: How close reasons and log lines name each side.
SIDE_NAMES = {Side.CLIENT: "client", Side.SERVER: "backend"}


@dataclass(frozen=True, slots=True)
class _Drain:
    """ftpfix is shutting down: end the session once nothing is in flight."""


@dataclass(frozen=True, slots=True)
class _Unmade:
    """``transfer``'s data connection will never be made; the core hears of
    it only if no newer mapping has replaced it meanwhile."""

    transfer: Transfer


_Input = Event | Expired | _Drain | _Unmade


@dataclass(slots=True)
class SessionTotals:
    """Bytes a session moved, for its closing log line."""

    upload: int = 0
    download: int = 0
    transfers: int = 0

    def add(self, transfer: Transfer) -> None:
        self.upload += transfer.stats.upload
        self.download += transfer.stats.download


_policies: dict[int, tuple[Config, Policy]] = {}


def policy_of(config: Config) -> Policy:
    """The parts of ``config`` that the core needs, built once per config."""
    cached = _policies.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    _policies.clear()  # one config at a time; a reload replaces it
    policy = _build_policy(config)
    _policies[id(config)] = (config, policy)
    return policy


def _build_policy(config: Config) -> Policy:
    passive_ports = config.backend.passive_ports
    return Policy(
        aliases=config.commands.aliases,
        max_line=config.limits.max_line,
        epsv=config.passive.epsv,
        active=config.active.mode,
        fix_address=config.active.fix_address,
        deny_anonymous=config.access.deny_anonymous,
        backend_port=config.backend.port,
        backend_passive_ports=range(passive_ports.first, passive_ports.last + 1) if passive_ports else None,
        tls=config.tls.mode,
        backend_tls=config.backend.tls != BackendTls.OFF,
        passive_ports=range(config.passive.ports.first, config.passive.ports.last + 1),
    )


class ControlChannel:
    """The shell around one ``Session``: its streams, transfers and nursery.

    Resource handling: every task and socket the session opens belongs to the
    nursery in ``run``, so when ``run`` returns, nothing of the session is left.
    A side is read only while the core wants more (TCP backpressure).
    """

    def __init__(
        self,
        config: Config,
        ports: DataPorts,
        public: PublicAddress,
        client: trio.abc.Stream,
        backend: trio.abc.Stream,
        endpoints: Endpoints,
        log: FilteringBoundLogger,
        shutdown: Stopping | None = None,
        *,
        greeted: bool = False,
        accepted: float | None = None,
        implicit_tls: tuple[ssl.SSLContext, tuple[str, str]] | None = None,
        backend_tls: trio.SSLStream[trio.abc.Stream] | None = None,
    ) -> None:
        """``implicit_tls`` is the context and the (version, cipher) of a
        client that came in on the implicit FTPS port, its handshake done.
        ``backend_tls`` is the backend's control connection when ftpfix
        speaks TLS to it (``backend_tls.py``): its data connections resume
        that session."""
        self.config = config
        self.ports = ports
        self.public = public
        self.streams = {Side.CLIENT: ControlStream(client), Side.SERVER: ControlStream(backend)}
        self.endpoints = endpoints
        self.log = log
        self.shutdown = shutdown
        client_address = ipaddress.ip_address(endpoints.client)
        #: Who may make this session's passive data connections.
        self._peers = config.passive.accept_data_from.network(endpoints.client)
        #: Balancers whose passive data connections start with a PROXY header
        #: naming the real peer ([listen] trusted_proxies, with proxy_protocol on).
        self._proxies = config.listen.trusted_proxies if config.listen.proxy_protocol else ()
        self.core = Session(
            policy_of(config), client=client_address, greeted=greeted, implicit_tls=implicit_tls is not None
        )
        self.internal = any(client_address in network for network in config.passive.internal_networks)
        self.totals = SessionTotals()
        self.close_reason = "unknown"
        # login_timeout runs from ``accepted``, when the client connected
        # (before a PROXY header and the backend's dial), if known.
        self.deadlines = Deadlines(config.limits, accepted)
        self._transfer: Transfer | None = None  # the newest: the one commands use
        self._transfers: list[Transfer] = []  # every one still running
        self._nursery: trio.Nursery | None = None
        self._inputs: trio.MemorySendChannel[_Input] | None = None
        self._draining = False
        self._waiting: trio.CancelScope | None = None  # while _next_input waits
        self._readers: dict[Side, tuple[trio.CancelScope, trio.Event]] = {}
        #: The TLS context of this session, once the client sent AUTH TLS
        #: (``tls.py``: one per session binds data connections to it).
        self.tls_context: ssl.SSLContext | None = None
        #: The negotiated TLS version and cipher, for the summary line.
        self.tls_summary: tuple[str, str] | None = None
        if implicit_tls is not None:
            self.tls_context, self.tls_summary = implicit_tls
        self._backend_data_tls = (
            partial(data_session, config=config, control=backend_tls) if backend_tls is not None else None
        )
        self._last_backend_data = trio.current_time()
        self._transfer_started = self._last_backend_data  # when the last transfer command went out
        # Set while the core wants more from a side; read before each receive.
        self._wanted = {side: trio.Event() for side in Side}
        for event in self._wanted.values():
            event.set()
        limits = config.limits
        now = trio.current_time()
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
            send, receive = trio.open_memory_channel[_Input](0)
            self._inputs = send
            async with send, receive:
                for side in Side:
                    self._start_reader(side)
                with self.shutdown.waking(self._wake) if self.shutdown is not None else nullcontext():
                    while True:
                        item = await self._next_input(receive)
                        try:
                            if not await self._dispatch(item):
                                break
                        except ProtocolError as caught:
                            error = caught
                            break
                # Cancel before the channel closes, so a reader blocked in
                # send() is cancelled rather than told the channel broke.
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _next_input(self, receive: trio.MemoryReceiveChannel[_Input]) -> _Input:
        """The next input: a passed deadline or the shutdown first, else
        what the readers and transfers post, waited for no longer than the
        nearest deadline.

        Only this loop makes a deadline nearer (a command line started, the
        client left); elsewhere they only move later (a transfer ended), so
        waking at a stale deadline and looking again is all it takes.
        """
        while True:
            if self.shutdown is not None and self.shutdown.is_set() and not self._draining:
                return _Drain()
            deadline, expired = self.deadlines.nearest(self.core.logged_in, self._transfers)
            if expired is not None and deadline <= trio.current_time():
                return expired
            with trio.move_on_at(deadline) as self._waiting:
                return await receive.receive()

    def _wake(self) -> None:
        """The shutdown began: stop waiting, so ``_next_input`` sees it."""
        if self._waiting is not None:
            self._waiting.cancel()

    async def _dispatch(self, item: _Input) -> bool:
        """Feed one input to the core and run what it asks; False once the session must end."""
        match item:
            case Expired(reply=reply, reason=reason):
                self.log.info("session timed out", reason=reason)
                self.close_reason = reason
                if reply:
                    await self._send(Side.CLIENT, reply)
                return False
            case _Drain():
                self._draining = True
            case _Unmade(transfer=transfer):
                if transfer is not self._transfer:
                    return True  # a newer mapping replaced it: nothing is waiting for it
                failure = transfer.failure or "the data connection failed"
                if not await self._feed(DataFailed(failure)):
                    return False
            case _:
                if not await self._feed(item):
                    return False
        for side in Side:
            if self.core.wants_data(side):
                self._wanted[side].set()
            elif self._wanted[side].is_set():
                self._wanted[side] = trio.Event()
        if self._draining and self.core.idle:
            self.close_reason = "ftpfix is shutting down"
            await self._send(Side.CLIENT, SHUTTING_DOWN)
            return False
        return True

    async def _feed(self, event: Event) -> bool:
        """Give ``event`` to the core and execute its commands, then the
        events those commands produced, then buffered lines in batches."""
        events = [event]
        while events:
            followups: list[Event] = []
            if not await self._execute(self.core.receive(events.pop(0)), followups):
                return False
            events += followups
            if not events and self.core.can_advance:
                # Buffered lines, one bounded batch at a time: each batch's
                # replies are written before the next is read.
                events.append(ReadOn())
        if isinstance(event, DataReceived) and event.side is Side.CLIENT:
            self.deadlines.client_spoke(self.core.partial_command)
        elif event == ConnectionClosed(Side.CLIENT) and not self.core.quitting:
            self.deadlines.client_left(HALF_CLOSE_GRACE)
        return True

    async def _execute(self, commands: list[Command], followups: list[Event]) -> bool:
        """Run the core's commands in order; False once the session must end.

        A command whose outcome the core needs (a port opened or not) adds
        that outcome to ``followups``, to be fed back as the next event.
        """
        for command in commands:
            match command:
                case SendTo(side=side, data=data, urgent=urgent):
                    await self._send(side, data, urgent)
                case OpenPassive():
                    followups.append(self._open_passive(command))
                case OpenActive():
                    followups.append(self._open_active(command))
                case TransferStarted(download=download, protected=protected):
                    self._transfer_started = trio.current_time()
                    transfer = self._transfer
                    if transfer is not None and transfer.expect(download=download, protected=protected):
                        assert self._nursery is not None
                        self._nursery.start_soon(transfer.knock)
                case AbortTransfer():
                    if self._transfer is not None:
                        self._transfer.abort()
                case FinishTransfer():
                    self._finish_transfer()
                case CancelTransfer():
                    if self._transfer is not None:
                        self._transfer.cancel("the server ended the transfer")
                case StartTLS(side=Side.CLIENT, reply=reply):
                    started = await self._start_tls(reply)
                    if started is None:
                        return False
                    followups.append(started)
                case AwaitQuiet():
                    self._spawn(self._post_when, self._backend_quiet, BackendQuiet)
                case SettleTransfer():
                    self._spawn(self._post_when, partial(self._transfer_settled, self._transfer), TransferSettled)
                case Note(event=event, level=level, fields=fields):
                    getattr(self.log, level)(event, **fields)
                case Count(what=what):
                    METRICS.count(what)
                case TransferReplied():
                    self._log_transfer(command)
                case Close(reason=reason):
                    self.close_reason = reason
                    return False
                case _:
                    raise TypeError(f"unknown command from the core: {command!r}")
        return True

    # -- tasks that post one input --------------------------------------

    def _spawn(self, *args: object) -> None:
        assert self._nursery is not None and self._inputs is not None
        self._nursery.start_soon(*args, self._inputs.clone())  # type: ignore[arg-type]

    async def _post_when(
        self, wait: Callable[[], object], result: Callable[[], _Input], send: trio.MemorySendChannel[_Input]
    ) -> None:
        """Wait for ``wait()``, then post ``result()``."""
        async with send:
            await wait()  # type: ignore[misc]
            await send.send(result())

    async def _backend_quiet(self) -> None:
        while (silent := trio.current_time() - self._last_backend_data) < QUIET_PERIOD:
            await trio.sleep(QUIET_PERIOD - silent)

    async def _transfer_settled(self, transfer: Transfer | None) -> None:
        """Wait until the aborted transfer is over and the backend has said what it will about it."""
        if transfer is not None:
            await transfer.settled()
        await trio.sleep(QUIET_PERIOD)
        await self._backend_quiet()

    async def _report_outcome(self, transfer: Transfer | None, send: trio.MemorySendChannel[_Input]) -> None:
        async with send:
            if transfer is None:
                await send.send(TransferDone())
                return
            outcome = await transfer.outcome()
            if outcome.failure is not None:
                self.log.info("transfer failed", port=transfer.port, failure=outcome.failure)
            await send.send(TransferDone(outcome.failure, connected=outcome.connected))

    # -- reading and writing ----------------------------------------------

    def _start_reader(self, side: Side) -> None:
        """Start reading ``side``, in a scope ``_stop_reader`` can cancel."""
        assert self._nursery is not None and self._inputs is not None
        scope, done = trio.CancelScope(), trio.Event()
        self._readers[side] = (scope, done)
        self._nursery.start_soon(self._read, side, self._inputs.clone(), scope, done)

    async def _stop_reader(self, side: Side) -> None:
        """Stop reading ``side`` and wait until the reader has let go of the stream."""
        scope, done = self._readers[side]
        scope.cancel()
        await done.wait()

    async def _read(
        self, side: Side, send: trio.MemorySendChannel[_Input], scope: trio.CancelScope, done: trio.Event
    ) -> None:
        try:
            with scope:
                await self._read_until_end(side, send)
        finally:
            done.set()

    async def _read_until_end(self, side: Side, send: trio.MemorySendChannel[_Input]) -> None:
        stream = self.streams[side]
        async with send:
            try:
                while True:
                    while not self.core.wants_data(side):
                        # Not reading: a peer that hangs up meanwhile would go
                        # unnoticed until idle_timeout, so look now and then.
                        with trio.move_on_after(HANG_UP_CHECK):
                            await self._wanted[side].wait()
                        if stream.hung_up():
                            self._end(f"{SIDE_NAMES[side]} hung up")
                            return
                    data = await stream.receive_some(CONTROL_READ_SIZE)
                    ended = not data
                    if side is Side.SERVER and data:
                        self._last_backend_data = trio.current_time()
                        data, ended = await self._read_rest(stream, data)
                    if data:
                        await send.send(DataReceived(side, data))
                    if ended:
                        await send.send(ConnectionClosed(side))
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # A reset: there is no peer left to answer.
                self._end(f"{SIDE_NAMES[side]} reset the connection")

    async def _read_rest(self, stream: ControlStream, data: bytes) -> tuple[bytes, bool]:
        """``data`` and whatever else the backend has already sent; True at its end.

        The core must see a reply together with what follows it, as far as
        it has arrived: a 227 followed by more bytes is forged (rule 3 of the
        session), and a read boundary must not hide that.
        """
        while len(data) < SERVER_DRAIN and stream.readable_now():
            more = await stream.receive_some(CONTROL_READ_SIZE)
            if not more:
                return data, True
            data += more
        return data, False

    async def _send(self, side: Side, data: bytes, urgent: bool = False) -> None:
        """Write to ``side``; a peer that takes nothing for ``idle_timeout`` ends the session.

        Everything else (deadlines included) waits while this loop writes, so
        a peer that stops reading must not be able to hold it forever.
        """
        stream = self.streams[side]
        try:
            # A CancelScope, not move_on_after: this runs for every reply, and
            # the context-manager wrapper costs as much as the scope itself.
            with trio.CancelScope(deadline=trio.current_time() + self.config.limits.idle_timeout) as writing:
                await (stream.send_urgent(data) if urgent else stream.send_all(data))
            if writing.cancelled_caught:
                self._end(f"{SIDE_NAMES[side]} stopped reading")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._end(f"{SIDE_NAMES[side]} connection lost")
            await trio.lowlevel.checkpoint()

    async def _start_tls(self, reply: bytes) -> TlsStarted | None:
        """Send the 234 and make the client's control connection TLS; None if that failed.

        The client's reader stops before the 234 leaves (see ``StartTLS``),
        and starts again on the TLS stream once the handshake is done.
        """
        await self._stop_reader(Side.CLIENT)
        try:
            self.tls_context = server_context(self.config.tls)
        except (OSError, ssl.SSLError) as error:
            self.log.error("cannot load the TLS certificate", error=str(error))
            await self._send(Side.CLIENT, reply_line("431 TLS is not available now, try again later."))
            self.close_reason = "TLS certificate unavailable"
            return None
        await self._send(Side.CLIENT, reply)
        try:
            stream = await accept_tls(self.streams[Side.CLIENT].stream, self.tls_context)
        except HandshakeFailed as error:
            self.log.warning("TLS handshake failed", side="client", error=str(error))
            self.close_reason = f"TLS handshake failed: {error}"
            return None
        acknowledge_now(self.streams[Side.CLIENT].socket)
        self.streams[Side.CLIENT] = ControlStream(stream)
        self.tls_summary = describe(stream)
        self._start_reader(Side.CLIENT)
        return TlsStarted(*self.tls_summary)

    def _end(self, reason: str) -> None:
        self.close_reason = reason
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # -- transfers ------------------------------------------------------

    def _log_transfer(self, replied: TransferReplied) -> None:
        """The transfer log line and metrics; the figures are the newest data
        connection's, which is the transfer's (a new PASV or PORT waits until
        the transfer command is answered)."""
        transfer = self._transfer if replied.relayed else None
        mode = "passthrough" if transfer is None else "active" if transfer.active else "passive"
        if transfer is not None and transfer.protected:
            mode += "_tls"
        stats = transfer.stats if transfer is not None else None
        log_transfer(
            self.log,
            replied,
            client=self.endpoints.client,
            user=self.core.user,
            seconds=trio.current_time() - self._transfer_started,
            upload=stats.upload if stats else 0,
            download=stats.download if stats else 0,
            mode=mode,
        )

    def _finish_transfer(self) -> None:
        """Report the transfer's outcome once it has delivered everything."""
        transfer = self._transfer
        if transfer is not None:
            transfer.finish()
        self._spawn(self._report_outcome, transfer)

    def _make_room(self) -> bool:
        """Retire transfers a new one replaces; False if the session holds too many."""
        for transfer in self._transfers:
            if transfer.spare:
                transfer.retire()
        return sum(transfer.running for transfer in self._transfers) < MAX_TRANSFERS

    def _timeouts(self, active: bool) -> Timeouts:
        config = self.config
        return Timeouts(
            accept=config.limits.data_connect_timeout,
            connect=config.active.connect_timeout if active else config.backend.connect_timeout,
            stall=config.limits.idle_timeout,
        )

    def _start(self, transfer: Transfer) -> None:
        self._transfer = transfer
        self._transfers.append(transfer)
        self.totals.transfers += 1
        self._spawn(self._run_transfer, transfer)

    async def _run_transfer(self, transfer: Transfer, send: trio.MemorySendChannel[_Input]) -> None:
        """Run one transfer; its own failure boundary (STYLE 11). A data
        connection that was never made is reported (``_Unmade``)."""
        METRICS.data_connections_open.inc()
        try:
            async with send:
                await transfer.run(partial(send.send, _Unmade(transfer)))
        except Exception:
            transfer.cancel("ftpfix failed")
            self.log.exception("data connection crashed: this is a bug in ftpfix", port=transfer.port)
        finally:
            self._transfers.remove(transfer)
            self.deadlines.transfer_ended(transfer.connected)
            self.totals.add(transfer)
            METRICS.data_connections_open.dec()
            METRICS.data_bytes.labels("upload").inc(transfer.stats.upload)
            METRICS.data_bytes.labels("download").inc(transfer.stats.download)
            if transfer.stats.error:
                self.log.info("data connection ended abruptly", port=transfer.port, error=transfer.stats.error)

    def _open_passive(self, command: OpenPassive) -> Event:
        address = advertised_address(self.endpoints, self.internal, self.public)
        if address is None and not command.extended:
            self.log.warning("no public address to advertise", setting=self.public.setting)
            return PassiveFailed("the public address is not known yet")
        if not self._make_room():
            self.log.warning("too many data connections in one session", limit=MAX_TRANSFERS)
            return PassiveFailed("too many data connections at once")
        listen_host = self.config.passive.listen_address or self.endpoints.local
        passive = self.config.passive
        share = passive.share_ports
        try:
            claim = self.ports.claim(listen_host, self._peers, share=share, proxies=self._proxies)
        except OSError as error:
            self.log.warning("cannot open a passive port", address=listen_host, error=error.strerror or str(error))
            return PassiveFailed("ftpfix cannot listen for it now")
        if claim is None:
            METRICS.pool_exhausted.inc()
            pool = self.ports.pool
            if share and pool.leased == len(pool.ports):
                # Every port is busy with this client's address (or network)
                # already, or held alone: another client could still get one.
                self.log.warning(
                    "passive port pool exhausted for this client",
                    ports=str(pool.ports),
                    leases=pool.leases,
                    accepted=str(self._peers),
                )
                return PassiveFailed("no free passive port for your address, try again later")
            self.log.warning("passive port pool exhausted", ports=str(pool.ports), leased=pool.leased)
            return PassiveFailed("no free passive port, try again later")
        port = claim.port
        backend = self.endpoints.backend
        self._start(
            Transfer(
                claim=claim,
                target=(backend, command.backend_port),
                timeouts=self._timeouts(active=False),
                log=self.log,
                upload_limit=self._upload_limit,
                download_limit=self._download_limit,
                tls=self.tls_context,
                require_session_reuse=self.config.tls.require_session_reuse,
                backend_tls=self._backend_data_tls,
            )
        )
        self.log.info(
            "passive mapping",
            public=f"{address or self.endpoints.local}:{port}",
            backend=f"{backend}:{command.backend_port}",
            advertised=f"{command.advertised_host or backend}:{command.backend_port}",
        )
        return PassiveOpened(address, port)

    def _open_active(self, command: OpenActive) -> Event:
        if not self._make_room():
            self.log.warning("too many data connections in one session", limit=MAX_TRANSFERS)
            return ActiveFailed("too many data connections at once")
        listen_host = self.endpoints.backend_local
        try:
            port, listener = open_active_listener(listen_host)
        except OSError as error:
            self.log.warning("cannot listen for the backend's active connection", error=error.strerror or str(error))
            return ActiveFailed("ftpfix cannot listen for the server now")
        self._start(
            Transfer(
                claim=private_claim(listener, AcceptDataFrom.SAME_ADDRESS.network(self.endpoints.backend), self.log),
                target=(command.host, command.port),
                timeouts=self._timeouts(active=True),
                log=self.log,
                active=True,
                source_port=self.config.active.source_port,
                upload_limit=self._upload_limit,
                download_limit=self._download_limit,
                tls=self.tls_context,
                require_session_reuse=self.config.tls.require_session_reuse,
                backend_tls=self._backend_data_tls,
            )
        )
        self.log.info("active mapping", client=f"{command.host}:{command.port}", listening=f"{listen_host}:{port}")
        return ActiveOpened(ipaddress.ip_address(listen_host), port)
