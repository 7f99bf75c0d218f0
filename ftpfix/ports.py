"""The passive port pool: which public ports are leased, and to whom, as pure bookkeeping.

Binding is the shell's job; the pool only decides which port to try next. It
hands ports out round-robin rather than lowest-first, so a port just released
rests while its old connection's TIME_WAIT state and any late packets fade,
and a client that guesses "the next port" has a whole range to guess from.

Shared ports (``[passive] share_ports``). A lease names the addresses that may
connect to it (``peers``: the client's address, or its network with
``accept_data_from = "same-network"``). Several leases may hold one port at
once as long as their peer sets are disjoint: the listener on that port then
hands each accepted connection to the one lease whose peers contain its
source address, and that lease is never ambiguous. So a client never holds
two pending mappings on one port (its peer sets overlap with themselves), and
with 20 ports, 20 × (distinct client addresses) mappings can wait at once.
An exclusive lease (``share_ports = false``) holds its port alone.

Free ports go first, then shared ones: sharing only starts once every port
of the range is in use, so a range that is large enough behaves exactly as
without sharing.

Replicas (``[passive] slice = "i/n"``). Replica *i* of *n* leases only the
*i*-th of *n* contiguous chunks of the range (``Slice.of``), so each
passive port belongs to exactly one replica and a load balancer can forward
it there.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of TCP ports, written "first-last" in the config."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.last <= 65535:
            raise ValueError(f"not a port range: {self.first}-{self.last}")

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last + 1))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Slice:
    """Replica ``index`` of ``count`` (1-based: "1/3" is the first third).

    Contiguous chunks: a range of L ports gives each slice L // n ports, and
    the first L % n slices one more, so sizes differ by at most one and the
    slices cover the range exactly, in order, without overlap.
    """

    index: int
    count: int
    #: The host name the index came from ("ordinal/n"), for ``ftpfix check``.
    host: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"slice {self.index}/{self.count} does not exist: the first is 1/{self.count}")

    def of(self, ports: PortRange) -> PortRange:
        """This slice's ports of ``ports``; ValueError if the range has fewer ports than slices."""
        if self.count > len(ports):
            raise ValueError(f"{ports} has {len(ports)} ports, too few for {self.count} slices of one port or more")
        size, extra = divmod(len(ports), self.count)
        before = (self.index - 1) * size + min(self.index - 1, extra)
        first = ports.first + before
        return PortRange(first, first + size + (self.index <= extra) - 1)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


T = TypeVar("T")


class PeerTable(Generic[T]):
    """Disjoint networks, each with a value, looked up by address or by overlap.

    Lookups are by prefix length: for each length present, the address's (or
    network's) supernet of that length is looked up in a dict, so a table of
    thousands of single addresses costs one dict lookup, not a scan.
    """

    def __init__(self) -> None:
        self._by_length: dict[int, dict[Network, T]] = {}

    def __len__(self) -> int:
        return sum(len(table) for table in self._by_length.values())

    def __bool__(self) -> bool:
        return bool(self._by_length)

    def values(self) -> list[T]:
        return [value for table in self._by_length.values() for value in table.values()]

    def find(self, address: Address) -> T | None:
        """The value of the network that holds ``address``, if any."""
        for length, table in self._by_length.items():
            if length > address.max_prefixlen:
                continue
            network = ipaddress.ip_network((address, length), strict=False)
            if (value := table.get(network)) is not None:
                return value
        return None

    def overlaps(self, network: Network) -> bool:
        """True if ``network`` shares an address with a network in the table."""
        for length, table in self._by_length.items():
            if length > network.max_prefixlen:
                continue  # another address family
            if length <= network.prefixlen:
                if network.supernet(new_prefix=length) in table:
                    return True
            elif any(held.version == network.version and held.subnet_of(network) for held in table):  # type: ignore[arg-type]
                return True
        return False

    def add(self, network: Network, value: T) -> None:
        """Add ``network``; ValueError if it overlaps one already held."""
        if self.overlaps(network):
            raise ValueError(f"{network} overlaps a network already in the table")
        self._by_length.setdefault(network.prefixlen, {})[network] = value

    def remove(self, network: Network, value: T) -> bool:
        """Remove ``network`` if it is held with ``value``; True if it was."""
        table = self._by_length.get(network.prefixlen)
        if table is None or table.get(network) is not value:
            return False
        del table[network]
        if not table:
            del self._by_length[network.prefixlen]
        return True


@dataclass(frozen=True, eq=False, slots=True)
class Lease:
    """One mapping's hold on ``port``: ``peers`` may connect to it, or anyone if ``exclusive``."""

    port: int
    peers: Network
    exclusive: bool


class PortPool:
    """Leases ports from a range; shared leases of one port never overlap."""

    def __init__(self, ports: PortRange) -> None:
        self.ports = ports
        self._holders: dict[int, PeerTable[Lease]] = {}
        self._exclusive: dict[int, Lease] = {}
        self._leases = 0
        self._next = ports.first

    @property
    def leased(self) -> int:
        """Ports with at least one lease."""
        return len(self._holders) + len(self._exclusive)

    @property
    def leases(self) -> int:
        """Leases held, several per port when shared."""
        return self._leases

    def holders(self, port: int) -> int:
        """How many leases hold ``port``."""
        if port in self._exclusive:
            return 1
        return len(self._holders.get(port, ()))

    def candidates(self, peers: Network | None = None, *, share: bool = False) -> Iterator[Lease]:
        """Leases to try, in order, each taken as it is yielded.

        Free ports first, round-robin; then, if ``share``, ports held by
        leases whose peers do not overlap ``peers``. The shell tries to bind
        (or join the listener of) each one; when that fails it releases the
        lease and takes the next. The iterator ends when every port has been
        offered once.
        """
        peers = peers if peers is not None else ipaddress.ip_network("0.0.0.0/0")
        start, size = self._next, len(self.ports)
        order = [self.ports.first + (start - self.ports.first + i) % size for i in range(size)]
        for port in order:
            if port in self._exclusive or port in self._holders:
                continue
            self._next = port + 1 if port < self.ports.last else self.ports.first
            yield self._take(Lease(port, peers, exclusive=not share))
        if not share:
            return
        for port in order:
            holders = self._holders.get(port)
            if port in self._exclusive or holders is None or holders.overlaps(peers):
                continue
            yield self._take(Lease(port, peers, exclusive=False))

    def _take(self, lease: Lease) -> Lease:
        if lease.exclusive:
            self._exclusive[lease.port] = lease
        else:
            self._holders.setdefault(lease.port, PeerTable()).add(lease.peers, lease)
        self._leases += 1
        return lease

    def release(self, lease: Lease) -> None:
        """Give ``lease`` back; releasing it twice does nothing."""
        if lease.exclusive:
            if self._exclusive.get(lease.port) is lease:
                del self._exclusive[lease.port]
                self._leases -= 1
            return
        holders = self._holders.get(lease.port)
        if holders is not None and holders.remove(lease.peers, lease):
            self._leases -= 1
            if not holders:
                del self._holders[lease.port]
