"""Line framing for the FTP control channel.

RFC 959 section 4.1 ends every command and reply line with CRLF, but real
peers also send a bare LF (old Unix clients, scripts piping into netcat). A
line therefore ends at LF, and one CR before it is dropped. Lines stay bytes:
a path may hold any byte but CR and LF, including NUL and invalid UTF-8, and
ftpfix must relay it unchanged, so nothing here ever decodes.

A peer that never sends LF must not make the buffer grow without bound. Past
``max_length`` bytes the partial line is thrown away and a single ``TOO_LONG``
marker is returned in its place; everything up to the next LF is discarded.
"""

from __future__ import annotations

import enum


class Overflow(enum.Enum):
    """Returned by ``LineBuffer.next_line`` in place of an over-long line."""

    TOO_LONG = "too long"


TOO_LONG = Overflow.TOO_LONG


class LineBuffer:
    """Accumulates bytes and hands back complete lines, without their ending."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._scan_from = 0
        self._discarding = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes held and not yet read as lines."""
        return len(self._buffer)

    def head(self, size: int) -> bytes:
        """The first ``size`` bytes held, for a log line."""
        return bytes(self._buffer[:size])

    @property
    def partial(self) -> int:
        """Bytes held after the last complete line: a line still being sent."""
        return len(self._buffer) - (self._buffer.rfind(b"\n") + 1)

    def complete_lines(self) -> list[bytes]:
        """The complete lines held, unread (CR dropped, as ``next_line`` would)."""
        end = self._buffer.rfind(b"\n")
        if end < 0 or self._discarding:
            return []
        return [line.removesuffix(b"\r") for line in bytes(self._buffer[:end]).split(b"\n")]

    @property
    def has_line(self) -> bool:
        """True if a complete line waits to be read."""
        return b"\n" in self._buffer

    def next_line(self) -> bytes | Overflow | None:
        """The next complete line, ``TOO_LONG`` for an over-long one, or None."""
        while True:
            end = self._buffer.find(b"\n", self._scan_from)
            if end < 0:
                self._scan_from = len(self._buffer)
                if self._scan_from > self.max_length:
                    del self._buffer[:]
                    self._scan_from = 0
                    if not self._discarding:
                        self._discarding = True
                        return TOO_LONG
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scan_from = 0
            if self._discarding:
                # The tail of a line already reported as too long.
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_length:
                return TOO_LONG
            return line
