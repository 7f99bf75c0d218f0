"""Data ports: listening sockets that several mappings may wait on at once.

A mapping (one 227, 229 or PORT that ftpfix relays) does not own a socket; it
holds a ``Claim`` on a ``DataPort``, the listener on one host and port. With
``[passive] share_ports`` several claims wait on one passive port, each for
its own client: the pool (``ports.PortPool``) lets claims share a port only
when the addresses they accept are disjoint, so every connection that
arrives belongs to at most one of them. ``DataPort._hand_over`` is the one
place where an accepted data connection is matched to a mapping by its peer
address; a connection nobody expects is a stranger and is reset at once,
and the port keeps waiting for the real clients (port stealing, RFC 2577
section 5).

Who accepts. There is no task per port: that task would belong to no
session and could outlive them all. Instead the claims waiting on a port
take turns: one of them (the acceptor) waits on the socket and hands every
connection to its claim; when the acceptor leaves (its own connection came,
its transfer was cancelled or timed out) it passes the turn to another
waiting claim. trio lets only one task wait on a socket at a time, which
this respects by construction.

Resource handling: a claim leaves its port when it has its connection or
when its transfer ends (``withdraw``); the port's socket is closed when its
last claim leaves, and a connection handed to a claim that left before
taking it is reset and closed. The lease goes back to the pool only on
``release``: a passive port stays leased to its client until its transfer
ends, as without sharing.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio
from structlog.typing import FilteringBoundLogger

from ..ports import Lease, Network, PeerTable, PortPool
from .addresses import normalize_host
from .dial import LISTEN_BACKLOG, family
from .metrics import METRICS
from .proxied import receive_data_header
from .relay import reset_on_close

#: Connections a passive port queues. A shared port serves many clients, who
#: may all connect in the same instant; beyond this the kernel drops SYNs and
#: the client retries, which costs it a second, not its transfer.
SHARED_LISTEN_BACKLOG = 128

#: Refused strangers a claim remembers for its log line.
STRANGERS_LOGGED = 4

#: Connections from outside ``accept_data_from`` a TLS-bound claim holds until
#: its TLS session decides (``Transfer._accept_peer_or_held``); more are
#: refused at once, so nobody can pile up descriptors on a data port.
MAX_HELD = 2


class DataPort:
    """One listening socket and the claims waiting on it."""

    def __init__(
        self, sock: socket.socket, host: str, port: int, log: FilteringBoundLogger, ports: DataPorts | None = None
    ) -> None:
        self.socket = sock
        self.host = host
        self.port = port
        #: Balancers whose connections start with a PROXY header: those of
        #: every claim that joined (only a reload makes them differ).
        self.proxies: tuple[Network, ...] = ()
        self.claims: PeerTable[Claim] = PeerTable()
        self._log = log
        self._ports = ports  # the registry to leave once closed; None for a private port
        self._acceptor: Claim | None = None

    @property
    def closed(self) -> bool:
        return self.socket.fileno() == -1

    async def accept(self, claim: Claim) -> socket.socket:
        """Wait until ``claim``'s peer connects; return the connection.

        Error handling: raises trio.ClosedResourceError once the claim has
        left the port, and OSError (see ``dial.RESOURCE_ERRORS``) if accept()
        runs out of descriptors.
        """
        while True:
            if claim.connection is not None:
                sock, claim.connection = claim.connection, None
                return sock
            if claim.withdrawn or self.closed:
                raise trio.ClosedResourceError("the data port was closed")
            if self._acceptor is None:
                self._acceptor = claim
                try:
                    await self._accept_for(claim)
                finally:
                    self._acceptor = None
                    self._pass_turn()
            else:
                claim.woken = trio.Event()
                await claim.woken.wait()

    async def _accept_for(self, claim: Claim) -> None:
        """Accept and hand over connections until ``claim`` has its own."""
        listener = self.socket
        while claim.connection is None and not claim.withdrawn:
            if listener.fileno() == -1:
                raise trio.ClosedResourceError("the data port was closed")
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                continue  # the peer gave up between the wake-up and accept()
            except OSError as error:
                if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if error.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the data port was closed") from None
                raise
            host = str(peer[0])
            if (
                self.proxies
                and (address := _address(host)) is not None
                and any(address in network for network in self.proxies)
            ):
                # A trusted balancer forwarded it: its PROXY header names the
                # real peer, which the match judges. Read here, by the acceptor:
                # a balancer sends it at once (HAProxy), and one that trickles
                # it holds this port's other mappings for PROXY_HEADER_TIMEOUT.
                sock.setblocking(False)
                try:
                    real = await receive_data_header(sock, host, self._log)
                except BaseException:
                    sock.close()
                    raise
                if real is None:
                    METRICS.refusals.labels("proxy_header").inc()
                    reset_on_close(sock)
                    sock.close()
                    continue
                host = real
            self._hand_over(sock, host)

    def _hand_over(self, sock: socket.socket, host: str) -> None:
        """Give the connection from ``host`` to the claim that expects it, or refuse it.

        The one place where a data connection is matched to its mapping.
        """
        address = _address(host)
        claim = self.claims.find(address) if address is not None else None
        if claim is None:
            self._hold_or_refuse(sock, host)
            return
        sock.setblocking(False)
        claim.connection = sock
        # One data connection per mapping: a second one from the same
        # address is a stranger from now on.
        self.leave(claim)
        claim.wake()

    def _hold_or_refuse(self, sock: socket.socket, host: str) -> None:
        """A connection no claim expects: held for a claim whose TLS session
        binding may yet admit it (a client behind carrier-grade NAT), else refused.

        On a shared port the first such claim with room holds it; if it is
        another client's, its handshake fails that session's check and it is
        reset, as a thief's would be.
        """
        for claim in self.claims.values():
            if claim.holds and len(claim.held) < MAX_HELD:
                self._log.info(
                    "data connection from outside accept_data_from held: it must resume this session's TLS session",
                    peer=host,
                    port=self.port,
                )
                if len(claim.strangers) < STRANGERS_LOGGED:
                    claim.strangers.append(host)
                sock.setblocking(False)
                claim.held.append(sock)
                claim.more_held.set()
                return
        self._refuse(sock, host)

    def _refuse(self, sock: socket.socket, host: str) -> None:
        self._log.warning("data connection from a stranger refused", peer=str(host), port=self.port)
        METRICS.refusals.labels("stranger").inc()
        for claim in self.claims.values():
            if len(claim.strangers) < STRANGERS_LOGGED:
                claim.strangers.append(str(host))
        reset_on_close(sock)
        sock.close()

    def _pass_turn(self) -> None:
        """The acceptor left: wake one waiting claim to accept in its place."""
        for claim in self.claims.values():
            if claim.woken is not None and not claim.woken.is_set():
                claim.woken.set()
                return

    def leave(self, claim: Claim) -> None:
        """``claim`` waits here no more; the socket closes with the last claim."""
        self.claims.remove(claim.peers, claim)
        if self._acceptor is None:
            self._pass_turn()
        if not self.claims:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        # Wake a task waiting on the socket first (trio requires it).
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        if self._ports is not None:
            self._ports.forget(self)


class Claim:
    """One mapping's wait on a data port: the peers it accepts, its lease, and
    its connection once that came.

    ``strangers`` are the refused addresses seen while it waited, for its log.
    """

    def __init__(self, port: DataPort, peers: Network, lease: Lease | None, pool: PortPool | None) -> None:
        self.data_port = port
        self.port = port.port
        self.peers = peers
        self.strangers: list[str] = []
        self.connection: socket.socket | None = None
        self.woken: trio.Event | None = None
        self.withdrawn = False
        #: True if a stranger may be held for this claim until its TLS
        #: session decides (set by its transfer), and those held.
        self.holds = False
        self.held: list[socket.socket] = []
        self.more_held = trio.Event()
        self._lease = lease
        self._pool = pool

    async def accept(self) -> socket.socket:
        return await self.data_port.accept(self)

    async def take_held(self) -> socket.socket:
        """The first stranger held for this claim, once there is one."""
        while not self.held:
            if self.withdrawn:
                raise trio.ClosedResourceError("the data port was closed")
            await self.more_held.wait()
            self.more_held = trio.Event()
        return self.held.pop(0)

    def drop_held(self) -> None:
        """Reset every stranger still held."""
        for sock in self.held:
            reset_on_close(sock)
            sock.close()
        self.held.clear()

    def wake(self) -> None:
        if self.woken is not None:
            self.woken.set()

    def withdraw(self) -> None:
        """Stop waiting (idempotent); a connection handed over but not taken is reset."""
        if self.withdrawn:
            return
        self.withdrawn = True
        self.data_port.leave(self)
        self.wake()
        self.more_held.set()
        self.drop_held()
        if self.connection is not None:
            reset_on_close(self.connection)
            self.connection.close()
            self.connection = None

    def release(self) -> None:
        """Withdraw, and give the lease back to the pool (idempotent)."""
        self.withdraw()
        if self._lease is not None and self._pool is not None:
            self._pool.release(self._lease)
            self._lease = None


class DataPorts:
    """The passive data ports of one pool, by (host, port): the shell half of ``PortPool``."""

    def __init__(self, pool: PortPool, log: FilteringBoundLogger) -> None:
        self.pool = pool
        self._log = log
        self._ports: dict[tuple[str, int], DataPort] = {}

    @property
    def listening(self) -> int:
        """Sockets open now, for tests and the leak checks."""
        return len(self._ports)

    def claim(self, host: str, peers: Network, *, share: bool, proxies: tuple[Network, ...] = ()) -> Claim | None:
        """A claim on a passive port of ``host`` for ``peers``, or None if no port is free for them.

        Error handling: a port that another process holds (EADDRINUSE) is given
        back and the next one tried, so a stray listener in the range costs one
        port, not the service. Any other error (an address that is not local,
        no descriptor left) gives the lease back and is raised.
        """
        for lease in self.pool.candidates(peers, share=share):
            port = self._ports.get((host, lease.port))
            if port is None:
                try:
                    sock = _listen(host, lease.port, SHARED_LISTEN_BACKLOG if share else LISTEN_BACKLOG)
                except OSError as error:
                    self.pool.release(lease)
                    if error.errno in (errno.EADDRINUSE, errno.EACCES):
                        continue
                    raise
                port = DataPort(sock, host, lease.port, self._log, self)
                self._ports[(host, lease.port)] = port
            claim = Claim(port, peers, lease, self.pool)
            port.claims.add(peers, claim)
            port.proxies += tuple(network for network in proxies if network not in port.proxies)
            return claim
        return None

    def forget(self, port: DataPort) -> None:
        if self._ports.get((port.host, port.port)) is port:
            del self._ports[(port.host, port.port)]


def private_claim(sock: socket.socket, peers: Network, log: FilteringBoundLogger) -> Claim:
    """A claim on a listener of its own, outside any pool (active mode's backend listener)."""
    host, number = sock.getsockname()[:2]
    port = DataPort(sock, host, number, log)
    claim = Claim(port, peers, None, None)
    port.claims.add(peers, claim)
    return claim


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: the port of a transfer that just ended sits in
        # TIME_WAIT, and without it the next lease of that port would fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as the peer checks compare it (IPv4-mapped unwrapped), or None if it is no address."""
    try:
        return ipaddress.ip_address(normalize_host(host))
    except ValueError:
        return None
