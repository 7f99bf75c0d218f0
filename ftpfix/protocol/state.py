"""What the core waits for, as named states, and the moves allowed between them.

In the manner of h11's ``_state.py``: one enum, one table. ``Session._move``
refuses any move the table does not list, so a bug in the core or the shell
shows up as an error at the wrong move, not as a session that hangs later.
"""

from __future__ import annotations

import enum


class Waiting(enum.Enum):
    """What the core waits for from the shell before it reads on."""

    NOTHING = "nothing"
    QUIET = "quiet"  # AwaitQuiet: the deferred exclusive command waits
    PASSIVE = "passive"  # OpenPassive: replies are not read
    ACTIVE = "active"  # OpenActive: commands are not read
    TRANSFER = "transfer"  # FinishTransfer: replies are not read
    TLS = "tls"  # StartTLS: nothing is read until the handshake is done
    CLOSED = "closed"  # Close: the session is over


#: The moves the core may make between states; any other is a bug.
TRANSITIONS: dict[Waiting, frozenset[Waiting]] = {
    Waiting.NOTHING: frozenset(
        {Waiting.QUIET, Waiting.PASSIVE, Waiting.ACTIVE, Waiting.TRANSFER, Waiting.TLS, Waiting.CLOSED}
    ),
    Waiting.TLS: frozenset({Waiting.NOTHING, Waiting.CLOSED}),
    Waiting.QUIET: frozenset({Waiting.NOTHING, Waiting.CLOSED}),
    Waiting.PASSIVE: frozenset({Waiting.NOTHING, Waiting.CLOSED}),
    Waiting.ACTIVE: frozenset({Waiting.NOTHING, Waiting.CLOSED}),
    Waiting.TRANSFER: frozenset({Waiting.NOTHING, Waiting.CLOSED}),
    Waiting.CLOSED: frozenset(),
}
