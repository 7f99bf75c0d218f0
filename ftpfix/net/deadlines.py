"""A session's clocks: the login, idle and command-line deadlines, as one timer.

The dispatcher waits for its next input no longer than ``nearest()``, and
looks again when it wakes: an idle session costs one timer, not a poll loop
and not a task. When a deadline has passed, ``nearest()`` names it with an
``Expired``, and the dispatcher sends its reply and ends the session.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import trio

from ..config import Limits
from ..protocol.grammar import reply
from .transfer import Transfer

#: Seconds between looks at whether a running transfer has delivered, after
#: which the session's idle clock runs again.
TRANSFER_CHECK = 1.0


@dataclass(frozen=True, slots=True)
class Expired:
    """A session deadline passed: send ``reply`` (if any) and end the session."""

    reply: bytes
    reason: str


class Deadlines:
    """The clocks of one session; the dispatcher tells it what happened."""

    def __init__(self, limits: Limits, started: float | None = None) -> None:
        """``started``: when the client connected (trio time), from which
        ``login_timeout`` runs; now if not given."""
        self.limits = limits
        now = trio.current_time()
        self._started = now if started is None else started
        self._last_activity = now
        self._partial_since: float | None = None
        self._left_at: float | None = None  # the client closed its end by then

    def client_spoke(self, partial: bool) -> None:
        """The client sent bytes; ``partial`` if a command line is unfinished."""
        self._last_activity = trio.current_time()
        if not partial:
            self._partial_since = None
        elif self._partial_since is None:
            self._partial_since = self._last_activity

    def client_left(self, grace: float) -> None:
        """The client closed its end: the session ends ``grace`` seconds from now at the latest."""
        self._left_at = trio.current_time() + grace

    def transfer_ended(self, connected: bool) -> None:
        """A transfer ended: the idle clock starts again if it moved data."""
        if connected:
            self._last_activity = trio.current_time()

    def nearest(self, logged_in: bool, transfers: Iterable[Transfer]) -> tuple[float, Expired | None]:
        """The nearest deadline, and what passing it means (None: only look again then)."""
        limits = self.limits
        now = trio.current_time()
        transfers = list(transfers)
        deadlines: list[tuple[float, Expired | None]] = []
        if any(transfer.moving for transfer in transfers):
            # While a transfer delivers, the relay's own stall deadline rules:
            # it ends with 426, not the session with 421. Look again soon:
            # delivery ends without a word here.
            deadlines.append((now + TRANSFER_CHECK, None))
        else:
            # Once delivered, the idle clock runs from the last byte: a
            # backend that never sends its final reply cannot hold the
            # session, nor a client that keeps its data socket.
            moved = [transfer.stats.last_progress for transfer in transfers if transfer.connected]
            idle = Expired(
                reply(f"421 Idle timeout ({limits.idle_timeout:g} s), closing control connection."), "idle timeout"
            )
            deadlines.append((max([self._last_activity, *moved]) + limits.idle_timeout, idle))
        if not logged_in:
            text = f"421 Login timeout ({limits.login_timeout:g} s), closing control connection."
            deadlines.append((self._started + limits.login_timeout, Expired(reply(text), "login timeout")))
        if self._partial_since is not None:
            text = f"421 Command line not completed within {limits.line_timeout:g} s."
            deadlines.append((self._partial_since + limits.line_timeout, Expired(reply(text), "line timeout")))
        if self._left_at is not None:
            # No reply: there is nobody to read it.
            deadlines.append((self._left_at, Expired(b"", "client hung up")))
        return min(deadlines, key=lambda entry: entry[0])
