"""One data connection, from listener to last byte, and everything that ends it.

Passive and active mode are the same thing seen from opposite ends:

- passive: ftpfix listens on a public port leased from the pool, the client
  connects, and ftpfix dials the port the backend advertised;
- active: ftpfix listens on an ephemeral port where the backend can reach it,
  the backend connects, and ftpfix dials the port the client named in PORT or
  EPRT.

One ``Transfer`` lives per 227, 229 or PORT that ftpfix relays, and owns all
of it: the listener and its port lease, the accept (only the expected peer),
the dial, the relay, the hold of the final reply until the last byte is
delivered (``outcome``), the ABOR (``abort``), and the data connection that
is never made (``unmade``). The session's dispatcher
only calls its methods; its task (``run``) lives in the session's nursery, so
it can never outlive the session.

ABOR, as the shell does it (the core's half is in ``protocol/verbs.py``):
``abort`` resets both ends of the data connection at once. Every server then
ends the transfer the same way, a write or read that fails, and answers it
with its own 426 within milliseconds, with no ABOR to misread or answer out
of order. A backend still waiting for its data connection (the client never
connected) is dialed and reset, so it too answers now rather than at its own
timeout.

A data connection that is never made (nobody connects in time, only other
addresses do, or the backend refuses) must not leave the client waiting:
``unmade`` says so, the dispatcher tells the core (``DataFailed``), and a
backend that waits for its own data connection is knocked the same way, so
it answers now and the client gets its 425 within the accept timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from structlog.typing import FilteringBoundLogger

from ..config import AcceptDataFrom
from .addresses import normalize_host
from .backend_tls import BackendTlsFailed
from .dataports import Claim
from .dial import RESOURCE_ERRORS, connect
from .metrics import METRICS
from .relay import RelayStats, TokenBucket, relay, relay_tls, reset_on_close
from .tls import HANDSHAKE_TIMEOUT, SessionContext
from .tlsdata import TlsConnection, accept_data_tls, relay_tls_plain

#: Seconds ftpfix spends dialing a backend that waits for a data connection
#: that will never come (see ``Transfer.abort`` and ``unmade``).
KNOCK_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The seconds a transfer waits for each thing."""

    accept: float  # for its peer to connect to the listener
    connect: float  # to reach the other end
    stall: float  # with no byte moving either way


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a transfer ended, for the reply to its command.

    ``failure`` says why it did not deliver everything (None if it did), and
    ``connected`` whether a data connection was made at all (425 or 426).
    """

    failure: str | None
    connected: bool


#: Seconds past the control handshake's second that a data handshake waits
#: beyond it, so that the wall clock has surely moved on.
SETTLE_MARGIN = 0.005


async def _settle(context: ssl.SSLContext) -> None:
    """Wait until a data connection's full TLS 1.2 handshake could not pass
    for the control connection's (``tls.SessionContext``)."""
    if not isinstance(context, SessionContext):
        return
    # A sleep can end a little early on the wall clock; look again.
    while (delay := context.settle()) > 0:
        await trio.sleep(delay + SETTLE_MARGIN)


class Transfer:
    """A listener that relays one data connection to ``target``.

    Only addresses in ``peers`` may connect (the client's own address, or its
    network with ``[passive] accept_data_from``). ``active`` says which end
    the accepted connection is: the client (passive mode) or the backend
    (active mode). ``pooled`` says whether ``port`` came from the port pool.
    """

    def __init__(
        self,
        *,
        claim: Claim,
        target: tuple[str, int],
        timeouts: Timeouts,
        log: FilteringBoundLogger,
        active: bool = False,
        source_port: int | None = None,
        upload_limit: TokenBucket | None = None,
        download_limit: TokenBucket | None = None,
        tls: ssl.SSLContext | None = None,
        require_session_reuse: bool = True,
        backend_tls: Callable[[trio.SocketStream], Awaitable[trio.SSLStream[trio.SocketStream]]] | None = None,
    ) -> None:
        self.port = claim.port
        self.peers = claim.peers
        self.target = target
        self.active = active
        self.stats = RelayStats()
        #: True once both ends are joined.
        self.connected = False
        #: Why the transfer did not deliver everything, once it did not.
        self.failure: str | None = None
        self._claim = claim
        self._timeouts = timeouts
        self._log = log
        self._source_port = source_port
        self._limits = (upload_limit, download_limit)
        self._tls = tls
        self._require_session_reuse = require_session_reuse
        self._backend_tls = backend_tls  # secures the backend's side, resuming its control session
        self._scope = trio.CancelScope()
        self._accepted = trio.Event()
        self._delivered = trio.Event()
        self._finished = trio.Event()
        self._settled = trio.Event()  # run() has returned, knock included
        self._answered = False  # the backend has answered the transfer command
        self._aborted = False
        self._expected = False  # the transfer command went to the backend
        self._told = trio.Event()  # ... and ``expect`` said how to relay
        self._protected = False  # TLS on the client's side (PROT P at the transfer command)
        self._dialed = False  # the other end of the data connection answered
        self._download = False  # the transfer command sends data to the client
        self._tentative = False  # the accepted peer is a held stranger: its TLS session decides
        # A stranger may be held for this transfer where sessions are bound
        # (``_binds_sessions``): the data port asks the claim.
        claim.holds = self._binds_sessions

    # -- what the dispatcher asks ---------------------------------------

    @property
    def running(self) -> bool:
        """True until the transfer has ended or was told to end."""
        return not self._finished.is_set() and not self._scope.cancel_called

    @property
    def moving(self) -> bool:
        """True while a joined data connection has not delivered yet: the
        relay's stall deadline rules, not the session's idle clock."""
        return self.connected and not self._delivered.is_set()

    @property
    def spare(self) -> bool:
        """True if a newer data connection may replace this one: nobody
        connected, or the backend has answered its transfer already."""
        return not self._accepted.is_set() or self._answered

    @property
    def protected(self) -> bool:
        """True if the client's side of the data connection is TLS (PROT P at the transfer command)."""
        return self._protected

    @property
    def unmade(self) -> bool:
        """True once the data connection will never be made, for a reason
        the core does not know yet: nobody (or only strangers) connected in
        time, the other end refused, or ftpfix ran out of descriptors."""
        return self._finished.is_set() and not self.connected and not self._answered and not self._aborted

    def expect(self, *, download: bool, protected: bool = False) -> bool:
        """A transfer command went to the backend; ``download`` says which way
        the data flows, and ``protected`` whether the client's side is TLS
        (the PROT level now, RFC 4217 section 9). The relay starts only then.

        True if the transfer had already ended unmade: the backend will wait
        for a data connection nobody makes, so the caller must run ``knock``.
        """
        self._download = download
        self._protected = protected
        self._expected = True
        self._told.set()
        if self._settled.is_set() and self.unmade and not self.active:
            self._settled = trio.Event()  # settled again once knocked
            return True
        return False

    async def knock(self) -> None:
        """Make a backend that waits for this transfer's data connection give up now."""
        try:
            await self._knock_and_reset()
        finally:
            self._settled.set()

    def finish(self) -> None:
        """The backend answered the transfer command with a 2xx; ``outcome`` follows."""
        self._answered = True
        if not self._accepted.is_set() and not self.active:
            # Nobody connected to the public port, so ftpfix never dialed
            # the backend: whatever its 2xx says, no data went anywhere.
            self.cancel("no data connection was made")

    async def outcome(self) -> Outcome:
        """Wait until everything the transfer will deliver is delivered.

        A download has delivered once the backend's last byte and its end
        (FIN) went to the client; the reply to the transfer command may
        follow then, whatever the client does with its socket.
        """
        await self._delivered.wait()
        return Outcome(self.failure, self.connected)

    async def settled(self) -> None:
        """Wait until the transfer has ended and done all it will (the knock of an ABOR included)."""
        await self._settled.wait()

    def cancel(self, reason: str) -> None:
        """End the transfer now (the backend refused or failed it, or a newer
        one replaces it): its task is cancelled and its port freed."""
        self._answered = True
        self._fail(reason)
        self._scope.cancel()
        self._release()

    def abort(self) -> None:
        """The client sent ABOR: break the data connection now (see the module)."""
        self._aborted = True
        self._fail("aborted")
        self._scope.cancel()
        self._release()

    def retire(self) -> None:
        """Give way to a newer data connection: its port goes back to the pool."""
        self.cancel("replaced by a new data connection")

    # -- the task ---------------------------------------------------------

    async def run(self, unmade: Callable[[], Awaitable[object]]) -> None:
        """Accept the expected peer, dial the other end, relay; then clean up.

        If the data connection was never made, ``unmade()`` is awaited before
        the backend is knocked: whoever pairs the backend's replies must know
        that the ones the knock causes are about a failure.

        Only ``peer_host`` may connect: any other peer is closed at once and
        the listener keeps waiting, so a stranger who races for the port (port
        stealing, RFC 2577 section 5) gets nothing and the real peer still
        gets its transfer.

        Resource handling: the listener, both data sockets and the port lease
        are released in a ``finally``, whether the transfer ends, fails, times
        out or is cancelled.

        Error handling: every way this can go wrong (the peer never connects,
        the other end refuses, a reset, a stall, no descriptor left) is
        recorded in ``failure``, and a failed data connection is reset, never
        closed cleanly: a backend that got a FIN for a broken upload would
        store the fragment and answer 226. Nothing is raised.
        """
        try:
            await self._run()
            if self.unmade:
                await unmade()
            if self._expected and not self.active and not self._dialed and not self._answered:
                # Aborted, or nobody connected: the backend still waits for
                # its data connection.
                await self._knock_and_reset()
        finally:
            self._settled.set()

    async def _run(self) -> None:
        accepted = dialed = None
        try:
            with self._scope:
                accepted = await self._accept()
                if accepted is None:
                    return
                dialed = await self._dial()
                if dialed is None:
                    return
                self._dialed = True
                client, backend = (dialed, accepted) if self.active else (accepted, dialed)
                upload, download = self._limits
                # Nothing moves before the transfer command (a server sends
                # nothing before it either), and only the PROT level then
                # says whether the client's side is TLS: relaying by the
                # level the port was opened with moved files in the clear
                # after PROT C, PASV, PROT P (red team).
                await self._told.wait()
                if self._protected and self._backend_tls is None:
                    # The backend has its data connection already (it may
                    # answer 150 only then, and the client may handshake
                    # only after the 150); the client's TLS comes now. The
                    # common FTPS case has a path of its own (tlsdata.py).
                    secured = await self._secure_data(client)
                    if secured is None:
                        return
                    self.connected = True
                    await relay_tls_plain(
                        secured,
                        backend,
                        self.stats,
                        upload,
                        download,
                        stall_timeout=self._timeouts.stall,
                        delivered=self._delivered,
                    )
                elif not self._protected and self._backend_tls is None:
                    self.connected = True
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._end_after_download, backend)
                        await relay(
                            client,
                            backend,
                            self.stats,
                            upload,
                            download,
                            stall_timeout=self._timeouts.stall,
                            delivered=self._delivered,
                        )
                        nursery.cancel_scope.cancel()
                else:
                    # The backend's TLS first: a server may answer 150 only
                    # once its data connection is secured, and the client
                    # may handshake only after the 150.
                    backend_side = await self._secure_backend(backend)
                    if backend_side is None:
                        return
                    client_side = await self._secure(client) if self._protected else _stream(client)
                    if client_side is None:
                        return
                    self.connected = True
                    await relay_tls(
                        client_side,
                        backend_side,
                        self.stats,
                        upload,
                        download,
                        stall_timeout=self._timeouts.stall,
                        delivered=self._delivered,
                        download=self._download,
                    )
                if self.stats.error is not None:
                    self._fail(self.stats.error)
        except OSError as error:
            if error.errno not in RESOURCE_ERRORS:
                raise
            self._log.warning("data connection failed: out of resources", port=self.port, error=error.strerror)
            self._fail("ftpfix is out of resources, try again later")
        finally:
            self._claim.drop_held()  # strangers that never proved anything
            for sock in (accepted, dialed):
                if sock is not None:
                    if self.failure is not None:
                        reset_on_close(sock)
                    sock.close()
            self._release()
            self._delivered.set()
            self._finished.set()

    async def _end_after_download(self, backend: socket.socket) -> None:
        """Once a download has delivered its last byte and end to the client,
        end the other direction towards the backend too (shutdown, a FIN).

        ProFTPD closes a data connection with a lingering close: it waits up to
        ten seconds for its peer's FIN before it sends 226. A client that keeps
        its socket open until it reads the 226 would wait that long, through
        ftpfix or not; through ftpfix it need not. Only for a download: during
        an upload the backend's end of stream never means the client's.
        """
        await self._delivered.wait()
        if self._download and self.failure is None:
            with contextlib.suppress(OSError):
                backend.shutdown(socket.SHUT_WR)

    async def _accept(self) -> socket.socket | None:
        with trio.move_on_after(self._timeouts.accept) as waiting:
            try:
                accepted = await self._accept_peer_or_held()
            except trio.ClosedResourceError:
                self._fail("the data port was closed")
                return None
        if waiting.cancelled_caught:
            self._fail(self._no_peer())
            return None
        # One data connection per transfer: stop listening at once. A passive
        # port stays leased until the transfer ends.
        self._claim.withdraw()
        self._accepted.set()
        return accepted

    def _no_peer(self) -> str:
        """Log why nobody connected in time; return it as the client is told it."""
        who = "backend" if self.active else "client"
        seconds = f"{self._timeouts.accept:g} s"
        if not self._claim.strangers:
            self._log.info(f"data port released: the {who} never connected", port=self.port, waited=seconds)
            return f"nobody connected within {seconds}"
        self._log.warning(
            f"data port released: only other addresses connected, never the {who}",
            port=self.port,
            refused=self._claim.strangers,
            accepted=str(self.peers),
            hint=self._hint(),
        )
        accepted = self.peers.network_address if self.peers.num_addresses == 1 else self.peers
        return f"the data connection came from outside {accepted}"

    def _hint(self) -> str | None:
        """What the refused addresses suggest: the client's other address, or a stranger."""
        if self.active:
            return None
        near = AcceptDataFrom.SAME_NETWORK.network(str(self.peers.network_address))
        addresses = [address for stranger in self._claim.strangers if (address := _address(stranger)) is not None]
        if self.peers.num_addresses == 1 and any(address in near for address in addresses):
            return (
                f"an address in the client's network {near}: the client's other address behind carrier-grade "
                'NAT? [passive] accept_data_from = "same-network" accepts it'
            )
        return f"a stranger, outside {self.peers}: port stealing (RFC 2577 section 5)?"

    @property
    def _binds_sessions(self) -> bool:
        """True if a protected data connection must resume this control
        session's TLS session: then that binding, stronger than any address
        check, may admit a data connection from outside ``peers``."""
        return self._tls is not None and self._require_session_reuse and not self.active

    async def _accept_peer_or_held(self) -> socket.socket:
        """The first connection from ``peers``; or, once the transfer command
        went out protected and none came, the first held stranger.

        A stranger is held, not refused, where sessions are bound
        (``_binds_sessions``; issue 10 left this to TLS): a client behind
        carrier-grade NAT may open its data connection from another address
        than its control connection. Whether it may stay is decided by its
        handshake (``_secure`` requires it to resume this control session's
        TLS session), which can only come after the backend's 150, so after
        the accept. A thief's connection fails that check and is reset; an
        unprotected transfer (PROT C) never takes a held stranger, so the
        address check stands as before for it.
        """
        if not self._binds_sessions:
            return await self._claim.accept()
        chosen: list[socket.socket] = []
        async with trio.open_nursery() as nursery:

            async def welcome() -> None:
                chosen.append(await self._claim.accept())
                nursery.cancel_scope.cancel()

            async def held() -> None:
                await self._told.wait()
                if not self._protected:
                    return  # the address check alone decides, as without TLS
                chosen.append(await self._claim.take_held())
                self._tentative = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(welcome)
            nursery.start_soon(held)
        return chosen[0]

    async def _dial(self) -> socket.socket | None:
        try:
            return await connect(self.target, self._timeouts.connect, self._source_port)
        except (OSError, trio.TooSlowError) as error:
            if isinstance(error, OSError) and error.errno in RESOURCE_ERRORS:
                raise
            who = "client" if self.active else "server"
            target = f"{self.target[0]}:{self.target[1]}"
            self._log.warning(f"{who} refused the data connection", target=target, error=str(error) or "timed out")
            self._fail(f"cannot connect to the {who}")
            return None

    async def _secure_backend(self, backend: socket.socket) -> socket.socket | trio.SSLStream[trio.SocketStream] | None:
        """The backend's data connection, TLS done if ftpfix speaks TLS to the
        backend (``backend_tls.data_session``); None, with ``failure`` set, if
        that failed."""
        if self._backend_tls is None:
            return backend
        try:
            return await self._backend_tls(_stream(backend))
        except BackendTlsFailed as error:
            self._log.warning("backend TLS failed", side="backend data", port=self.port, error=str(error))
            self._fail("the TLS handshake with the server's data connection failed")
            return None

    async def _secure(self, client: socket.socket) -> trio.SSLStream[trio.SocketStream] | None:
        """The client's data connection with TLS done, ftpfix as the TLS server
        (RFC 4217: the FTP server is the TLS server on data connections,
        whichever end dialed), and resuming this control session's TLS session unless that
        is not required. None, with ``failure`` set, if not: the transfer
        command then gets a 425 that says why.
        """
        if self._tls is None:
            # PROT P is refused before AUTH, so this is a bug; fail closed.
            self._fail("TLS is not set up for this session")
            return None
        stream = trio.SSLStream(_stream(client), self._tls, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await _settle(self._tls)
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as error:
            why = "timed out" if isinstance(error, trio.TooSlowError) else str(error.__cause__ or error)
            self._log.warning("TLS handshake failed", side="client data", port=self.port, error=why)
            self._fail("the TLS handshake on the data connection failed")
            return None
        return stream if self._bound(stream) else None

    def _bound(self, tls: ssl.SSLObject | trio.SSLStream[trio.SocketStream]) -> bool:
        """Whether a protected data connection may go on: it resumed this
        control session's TLS session, or need not. False, with ``failure``
        set and the refusal logged, if not."""
        context = self._tls
        # Each control session has a context of its own (tls.py); with TLS
        # 1.2, SessionContext also tells its session from one a refused data
        # connection's handshake was given.
        session_reused = context.resumes_control(tls) if isinstance(context, SessionContext) else tls.session_reused
        if self._tentative and session_reused:
            self._log.info(
                "data connection from outside accept_data_from accepted: it resumed this session's TLS session",
                port=self.port,
            )
        if (self._require_session_reuse or self._tentative) and not session_reused:
            self._log.warning(
                "data connection refused: it did not resume the control session's TLS session",
                port=self.port,
                **({"from_outside": str(self.peers)} if self._tentative else {}),
            )
            if self._tentative:
                METRICS.refusals.labels("stranger").inc()
            if isinstance(context, SessionContext):
                context.refused(tls)
            self._fail("the data connection must resume the TLS session of its control connection")
            return False
        return True

    async def _secure_data(self, client: socket.socket) -> TlsConnection | None:
        """As ``_secure``, for a backend side that is plain: the handshake
        driven by hand (``tlsdata.accept_data_tls``), for ``relay_tls_plain``.
        """
        if self._tls is None:
            # PROT P is refused before AUTH, so this is a bug; fail closed.
            self._fail("TLS is not set up for this session")
            return None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await _settle(self._tls)
                secured = await accept_data_tls(client, self._tls)
        except (OSError, trio.TooSlowError) as error:
            why = "timed out" if isinstance(error, trio.TooSlowError) else _tls_error(error)
            self._log.warning("TLS handshake failed", side="client data", port=self.port, error=why)
            self._fail("the TLS handshake on the data connection failed")
            return None
        return secured if self._bound(secured.tls) else None

    async def _knock_and_reset(self) -> None:
        """The backend waits for a data connection that will never come (an
        ABOR cancelled it, or the client never connected): dial its port and
        reset, so it ends the transfer now (425 or 426) instead of at its own
        timeout."""
        try:
            sock = await connect(self.target, KNOCK_TIMEOUT)
        except (OSError, trio.TooSlowError):
            return
        reset_on_close(sock)
        sock.close()

    # -- bookkeeping ------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Record the first reason the transfer did not deliver everything."""
        if self.failure is None and not self._finished.is_set():
            self.failure = reason

    def _release(self) -> None:
        """Stop waiting and give the port back, once.

        Idempotent, so the session can free a replaced transfer's port at once
        while its task's ``finally`` runs later and must not release the port
        again: by then a newer transfer may hold it.
        """
        self._claim.release()


def _stream(sock: socket.socket) -> trio.SocketStream:
    """``sock`` as a trio stream; closing either closes the same descriptor."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as the peer checks compare it (IPv4-mapped unwrapped), or None if it is no address."""
    try:
        return ipaddress.ip_address(normalize_host(host))
    except ValueError:
        return None


def _tls_error(error: OSError) -> str:
    """A failed handshake, said the way trio.SSLStream said it (the log's words)."""
    if isinstance(error, ssl.SSLEOFError):
        return "the client closed the connection during the TLS handshake"
    if isinstance(error, ssl.SSLError):
        return str(error)
    return error.strerror or str(error)
