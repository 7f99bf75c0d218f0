"""Who gets in: session counts in all and per client address, the access
lists, and the descriptor budget that keeps a flood from exhausting the process."""

from __future__ import annotations

import ipaddress
import os
import resource
from collections import Counter

from ..config import Config
from .dispatch import MAX_TRANSFERS

#: Descriptors one session may hold at its worst: its two control
#: connections, and per data mapping a listener, two data sockets and two
#: splice pipes (four descriptors).
FDS_PER_SESSION = 2 + MAX_TRANSFERS * 7

#: Sessions let in on an estimate before the open descriptors are counted
#: again (``Admission``).
MEASURE_EVERY = 100

#: Descriptors kept free for everything else: listeners, logs, a health check,
#: the public address lookup.
FD_RESERVE = 16


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as servers do; return it.

    Each session needs up to ``FDS_PER_SESSION`` descriptors, and the soft
    limit is often 1024 while the hard one is far higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_descriptors() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Admission:
    """Counts sessions, in all and per client address, and turns away the excess.

    ``descriptors`` is the process's descriptor limit. As long as every
    session fits at its worst case (``FDS_PER_SESSION``) beside what was open
    at start, nothing is measured. Past that, each new session is let in only
    if the descriptors open leave room for one more at its worst case and
    the reserve, so a flood is refused with 421 before anything runs out
    (EMFILE), while idle sessions (two descriptors each) are not turned away
    for transfers they are not making.

    Counting the open descriptors means listing ``/proc/self/fd``, which
    costs time in proportion to what is open: done at every connection, ten
    thousand sessions took minutes to set up, most of it in the kernel. So
    the count is estimated, and measured again only when the estimate says
    the room is running out: the last measurement, plus every session let in
    since at its worst case, looked at afresh at least every
    ``MEASURE_EVERY`` sessions. Sessions already in may open data connections
    between two looks; a count at every connection could not foresee that
    either, and ``FD_RESERVE`` and the transfer's own 425 cover it.
    """

    def __init__(self, descriptors: int | None = None, in_use: int = 0) -> None:
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.descriptors = descriptors
        budget = None if descriptors is None else descriptors - in_use - FD_RESERVE
        #: Sessions that fit at their worst case; beyond, admission measures.
        self.max_by_descriptors = None if budget is None else max(budget // FDS_PER_SESSION, 0)
        self._measured: int | None = None  # descriptors open at the last look
        self._admitted_since = 0  # sessions let in since then

    def _out_of_descriptors(self) -> bool:
        if self.descriptors is None or self.max_by_descriptors is None or self.total < self.max_by_descriptors:
            return False
        room = self.descriptors - FDS_PER_SESSION - FD_RESERVE
        if (
            self._measured is not None
            and self._admitted_since < MEASURE_EVERY
            and self._measured + self._admitted_since * FDS_PER_SESSION <= room
        ):
            return False
        self._measured, self._admitted_since = open_descriptors(), 0
        return self._measured > room

    def admit(self, host: str, config: Config) -> bytes | None:
        """Count the session in, or return the 421 that refuses it."""
        limits = config.limits
        if not config.access.permits(ipaddress.ip_address(host)):
            return b"421 Access denied for your address.\r\n"
        if self.total >= limits.max_sessions:
            return b"421 Too many users (%d at most), try again later.\r\n" % limits.max_sessions
        if self._out_of_descriptors():
            return b"421 Too many users for this server's resources, try again later.\r\n"
        if self.per_address[host] >= limits.max_sessions_per_ip:
            return b"421 Too many connections from your address (%d at most).\r\n" % limits.max_sessions_per_ip
        self.total += 1
        self.per_address[host] += 1
        self._admitted_since += 1
        return None

    def leave(self, host: str) -> None:
        self.total -= 1
        self.per_address[host] -= 1
        if not self.per_address[host]:
            del self.per_address[host]
