"""The passive port pool: which public ports are leased, as pure bookkeeping.

Binding is the shell's job; the pool only decides which port to try next. It
hands ports out round-robin rather than lowest-first, so a port just released
rests while its old connection's TIME_WAIT state and any late packets fade,
and a client that guesses "the next port" has a whole range to guess from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


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


class PortPool:
    """Leases ports from a range, never one that is already leased."""

    def __init__(self, ports: PortRange) -> None:
        self.ports = ports
        self._leased: set[int] = set()
        self._next = ports.first

    @property
    def leased(self) -> int:
        return len(self._leased)

    def candidates(self) -> Iterator[int]:
        """Free ports, in the order to try them, each leased as it is yielded.

        The shell tries to bind each one; when a bind fails (another process
        has the port) it releases it and takes the next. The iterator ends when
        every port has been offered once.
        """
        for _ in range(len(self.ports)):
            port = self._next
            self._next = port + 1 if port < self.ports.last else self.ports.first
            if port in self._leased:
                continue
            self._leased.add(port)
            yield port

    def release(self, port: int) -> None:
        self._leased.discard(port)
