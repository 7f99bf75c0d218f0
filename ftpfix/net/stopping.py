"""The server's stop, heard by every session without a task per session.

A ``trio.Event`` would do, but each session would need a task parked on its
``wait()`` (with its channel clone, about 3 KiB of a 30 KiB budget for an
idle session). Instead a session's dispatch loop registers a wake-up while
it waits for its next input; ``set()`` calls each one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio


class Stopping:
    """Set once, on SIGTERM: idle sessions end at once, busy ones when idle.

    It reads like a ``trio.Event`` (``is_set``, ``wait``, ``set``), so the
    readiness probe and the connection edge use it as one.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self._wakers: set[Callable[[], None]] = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def set(self) -> None:
        self._event.set()
        for wake in list(self._wakers):
            wake()

    @contextmanager
    def waking(self, wake: Callable[[], None]) -> Iterator[None]:
        """Call ``wake()`` on ``set()`` while inside this block."""
        self._wakers.add(wake)
        try:
            yield
        finally:
            self._wakers.discard(wake)
