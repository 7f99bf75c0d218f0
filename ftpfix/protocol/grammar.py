"""The parts of FTP's grammar that ftpfix reads or writes.

Commands (RFC 959 section 5.3.1) are a verb, optionally a space and an
argument. Replies (RFC 959 section 4.2) are a three-digit code and text, and a
multi-line reply starts with ``ddd-`` and ends at the first line that starts
with the same ``ddd `` code. Lines in between may themselves begin with digits:
RFC 959's own example has a continuation line that starts with ``234``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address

from .errors import BackendError

CRLF = b"\r\n"


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """Split a command line into its upper-cased verb and its argument.

    RFC 959 lets the verb be in any case, so ``p@sw`` names the same command as
    ``P@SW``. The argument keeps its bytes exactly.
    """
    verb, _, argument = line.partition(b" ")
    return verb.upper(), argument


@dataclass(frozen=True, slots=True)
class ReplyLine:
    """One line of a reply, as the reply framing sees it."""

    code: int
    raw: bytes
    first: bool
    last: bool


_REPLY_START = re.compile(rb"([1-5][0-9][0-9])([ -]|$)")


class ReplyFramer:
    """Tracks where each reply starts and ends in a stream of reply lines."""

    def __init__(self) -> None:
        self._open_code: bytes | None = None

    def classify(self, line: bytes) -> ReplyLine:
        """Place ``line`` in the reply it belongs to.

        Raises BackendError for a line that cannot start a reply: anything
        but a code from 100 to 599 followed by a space, a hyphen or nothing.
        """
        if self._open_code is not None:
            code = self._open_code
            last = line[:3] == code and line[3:4] == b" "
            if last:
                self._open_code = None
            return ReplyLine(int(code), line, first=False, last=last)
        match = _REPLY_START.match(line)
        if match is None:
            raise BackendError(
                f"backend sent a line that is not a reply: {line[:80]!r}",
                reply=b"421 Service not available: the server sent a malformed reply." + CRLF,
            )
        code, mark = match.group(1), match.group(2)
        if mark == b"-":
            self._open_code = code
            return ReplyLine(int(code), line, first=True, last=False)
        return ReplyLine(int(code), line, first=True, last=True)


# RFC 1123 section 4.1.2.6: "The format of the 227 reply to a PASV command is
# not well standardized. [...] User-FTP programs [should] scan the reply for
# the first digit of the host and port numbers." So: six comma-separated decimal
# numbers anywhere in the text, with or without parentheses, after "=" or not.
# Optional blanks around the commas are tolerated; leading zeros are decimal.
_SIX_NUMBERS = re.compile(rb"(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)")


class AddressError(ValueError):
    """A 227 reply that names no usable address."""


def parse_227(text: bytes) -> tuple[IPv4Address, int]:
    """The host and port a 227 reply announces.

    ``text`` is the whole reply, all of its lines, code included: some servers
    put the numbers on a continuation line. The code itself is skipped so that
    it can never be read as a number.

    Raises AddressError when no six numbers are found or any is over 255.
    """
    body = text[3:] if text[:3].isdigit() else text
    match = _SIX_NUMBERS.search(body)
    if match is None:
        raise AddressError("no h1,h2,h3,h4,p1,p2 in the 227 reply")
    numbers = [int(group) for group in match.groups()]
    if any(n > 255 for n in numbers):
        raise AddressError(f"a number over 255 in the 227 reply: {numbers}")
    host = IPv4Address(bytes(numbers[:4]))
    port = numbers[4] * 256 + numbers[5]
    if port == 0:
        raise AddressError("port 0 in the 227 reply")
    return host, port


def format_227(host: IPv4Address, port: int) -> bytes:
    """The one canonical 227 line ftpfix sends, as RFC 959 section 4.2.2 spells it."""
    numbers = (*host.packed, port >> 8, port & 0xFF)
    return b"227 Entering Passive Mode (%b)." % b",".join(b"%d" % n for n in numbers) + CRLF


def format_229(port: int) -> bytes:
    """The 229 reply of RFC 2428 section 3, with the recommended "|" delimiter."""
    return b"229 Entering Extended Passive Mode (|||%d|)" % port + CRLF


# RFC 854: IAC (255) starts a Telnet command. Two-byte commands such as IP
# (244) and DM (242) are what clients put before ABOR; WILL, WONT, DO and
# DONT (251-254) take an option byte; IAC IAC is a literal 255.
_TELNET_COMMAND = re.compile(rb"\xff[\xfb-\xfe][\x00-\xff]|\xff[\xf0-\xfa]")


def telnet_text(line: bytes) -> bytes:
    """``line`` with Telnet commands removed, for reading the verb only."""
    if b"\xff" not in line:
        return line
    return _TELNET_COMMAND.sub(b"", line).replace(b"\xff\xff", b"\xff")
