"""What the shell tells the core: everything that happens, as plain values.

The core has one entry point, ``Session.receive(event)``, in the manner of
mitmproxy's ``proxy/events.py``: bytes that arrived, a connection that ended,
and the outcome of a command the core gave earlier (``OpenPassive`` is
answered by ``PassiveOpened`` or ``PassiveFailed``, and so on). The shell
never calls into the core while it executes a command list; it feeds the
outcome back as the next event.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .commands import Side


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes from ``side``'s control connection (never empty)."""

    side: Side
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """``side`` closed its control connection (end of file)."""

    side: Side


@dataclass(frozen=True, slots=True)
class PassiveOpened:
    """Answer to ``OpenPassive``: ftpfix listens on ``host:port`` for the client.

    ``host`` may be None only for an extended (EPSV) request, whose 229
    carries no address.
    """

    host: IPv4Address | None
    port: int


@dataclass(frozen=True, slots=True)
class PassiveFailed:
    """Answer to ``OpenPassive``: no public port could be opened, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class ActiveOpened:
    """Answer to ``OpenActive``: ftpfix listens on ``host:port`` for the backend."""

    host: IPv4Address | IPv6Address
    port: int


@dataclass(frozen=True, slots=True)
class ActiveFailed:
    """Answer to ``OpenActive``: ftpfix cannot listen for the backend, and why."""

    reason: str


@dataclass(frozen=True, slots=True)
class TransferDone:
    """Answer to ``FinishTransfer``: the data relay has delivered all it will.

    ``failure`` says why it did not deliver everything (a reset, a stall, an
    abort), and ``connected`` whether a data connection was made at all.
    """

    failure: str | None = None
    connected: bool = True


@dataclass(frozen=True, slots=True)
class DataFailed:
    """The data connection of the newest mapping will never be made: nobody
    connected in time, only other addresses did, or the other end refused.

    The transfer command it was for, already sent or still to come, gets a
    425 with ``reason``; the backend, if it waits, is made to give up (the
    shell dials its port and resets), so the session stays usable.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class BackendQuiet:
    """Answer to ``AwaitQuiet``: the backend has sent nothing for a while."""


@dataclass(frozen=True, slots=True)
class TransferSettled:
    """Answer to ``SettleTransfer``: the transfer's data connection is closed
    and the backend has been quiet since."""


@dataclass(frozen=True, slots=True)
class TlsStarted:
    """Answer to ``StartTLS``: the handshake is done; ``version`` and
    ``cipher`` are what was negotiated, for the log."""

    version: str
    cipher: str


@dataclass(frozen=True, slots=True)
class ReadOn:
    """The shell has written the last batch of replies: read on from what is buffered.

    The core answers at most ``MAX_PENDING`` buffered lines per event, so a
    flood is answered in batches, each written (and pushed back by the
    client's TCP window) before the next is read. The shell sends ``ReadOn``
    while ``Session.can_advance`` is True.
    """


Event = (
    DataReceived
    | ConnectionClosed
    | PassiveOpened
    | PassiveFailed
    | ActiveOpened
    | ActiveFailed
    | TransferDone
    | DataFailed
    | BackendQuiet
    | TransferSettled
    | TlsStarted
    | ReadOn
)
