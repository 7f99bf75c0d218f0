"""The parts of FTP's grammar that ftpfix reads or writes.

Commands (RFC 959 section 5.3.1) are a verb, optionally a space and an
argument. Replies (RFC 959 section 4.2) are a three-digit code and text, and a
multi-line reply starts with ``ddd-`` and ends at the first line that starts
with the same ``ddd `` code. Lines in between may themselves begin with digits:
RFC 959's own example has a continuation line that starts with ``234``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .errors import BackendError

CRLF = b"\r\n"


#: What may separate a verb from its argument. RFC 959 says one space, but
#: servers split on more: ProFTPD on any white space, so ``USER\tanonymous``
#: is a login as anonymous there. ftpfix recognises every separator a server
#: might, and re-serialises the line with one space.
SEPARATORS = b" \t\x0b\x0c"

_COMMAND = re.compile(rb"([^ \t\x0b\x0c]*)(?:[ \t\x0b\x0c](.*))?", re.DOTALL)
# RFC 854: IAC (255) starts a Telnet command. Two-byte commands such as IP
# (244) and DM (242) are what clients put before ABOR; WILL, WONT, DO and
# DONT (251-254) take an option byte; IAC IAC is a literal 255.
_LETTERS = re.compile(rb"[A-Za-z]{1,16}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_LEADING_TELNET = re.compile(rb"\A(?:\xff[\xfb-\xfe][\x00-\xff]|\xff[\xf0-\xfa])+", re.DOTALL)


class CommandRejected(ValueError):
    """A command line ftpfix answers itself and never forwards; ``reply`` says why."""

    def __init__(self, message: str, *, reply: bytes) -> None:
        super().__init__(message)
        self.reply = reply


def parse_command(line: bytes, aliases: Mapping[bytes, bytes]) -> tuple[bytes, bytes]:
    """The upper-cased verb and the argument of a command line, or CommandRejected.

    Telnet commands (RFC 854) before the verb are dropped: clients put IAC IP
    IAC DM before ABOR. A verb is letters (RFC 959 section 5.3.1), or one of
    ``aliases`` (``P@SW``, the SMC Barricade's mangled PASV), which the caller
    maps to the verb it stands for. The argument keeps its bytes exactly, invalid UTF-8
    included, but no control byte and no Telnet command (an IAC that is not
    doubled): those are where servers disagree (pure-ftpd silently drops a
    line with a control byte, vsftpd turns NUL into LF in its replies, ProFTPD
    interprets Telnet commands and vsftpd does not), and a line the backend
    reads differently from ftpfix desynchronises which reply answers which
    command.
    """
    match = _COMMAND.fullmatch(_LEADING_TELNET.sub(b"", line))
    assert match is not None  # the pattern matches any byte string
    verb, argument = match.group(1).upper(), match.group(2) or b""
    if not verb:
        text = (
            "500 Empty command line."
            if not line.strip(SEPARATORS)
            else "500 Syntax error: a command starts with its verb."
        )
        raise CommandRejected("no verb", reply=text.encode("ascii") + CRLF)
    if verb not in aliases and not _LETTERS.fullmatch(verb):
        raise CommandRejected("verb is not letters", reply=b"500 Syntax error, command unrecognized." + CRLF)
    if _CONTROL.search(argument) or b"\xff" in argument.replace(b"\xff\xff", b""):
        raise CommandRejected(
            "control byte in the argument",
            reply=b"501 Syntax error in parameters: control characters are not allowed." + CRLF,
        )
    return verb, argument


def format_command(verb: bytes, argument: bytes = b"") -> bytes:
    """The one canonical line ftpfix sends the backend for a parsed command."""
    return verb + (b" " + argument if argument else b"") + CRLF


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

    @property
    def inside(self) -> bool:
        """True between the first and the last line of a multi-line reply."""
        return self._open_code is not None

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
                reply=reply("421 Service not available: the server sent a malformed reply."),
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
# Each number is at most three digits (leading zeros allowed): more is no
# address, and Python refuses to convert a string of over 4300 digits.
_NUMBER = rb"(?<!\d)(\d{1,3})(?!\d)"
_SIX_NUMBERS = re.compile(rb"\s*,\s*".join([_NUMBER] * 6))


class AddressError(ValueError):
    """A 227 reply that names no usable address."""


def parse_227(text: bytes) -> tuple[IPv4Address, int]:
    """The host and port a 227 reply announces.

    ``text`` is the whole reply, all of its lines, code included: some servers
    put the numbers on a continuation line. The code itself is skipped so that
    it can never be read as a number.

    Raises AddressError when no six numbers are found, or more than one set,
    or any number is over 255.
    """
    body = text[3:] if text[:3].isdigit() else text
    matches = list(_SIX_NUMBERS.finditer(body))
    if not matches:
        raise AddressError("no h1,h2,h3,h4,p1,p2 in the 227 reply")
    if len(matches) > 1:
        # A real 227 names one address. Two means text the server echoed
        # (a file name) became part of it: trust neither.
        raise AddressError("more than one address in the 227 reply")
    host, port = _decode_six(matches[0].groups(), "the 227 reply")
    if port == 0:
        raise AddressError("port 0 in the 227 reply")
    return host, port


def _decode_six(numbers: tuple[bytes, ...] | list[bytes], where: str) -> tuple[IPv4Address, int]:
    """h1,h2,h3,h4,p1,p2 (RFC 959 section 4.1.2) as an address and a port."""
    values = [int(number) for number in numbers]
    if any(value > 255 for value in values):
        raise AddressError(f"a number over 255 in {where}")
    return IPv4Address(bytes(values[:4])), values[4] * 256 + values[5]


def _encode_six(host: IPv4Address, port: int) -> bytes:
    """An address and a port as h1,h2,h3,h4,p1,p2, the inverse of ``_decode_six``."""
    return b",".join(b"%d" % number for number in (*host.packed, port >> 8, port & 0xFF))


def format_227(host: IPv4Address, port: int) -> bytes:
    """The one canonical 227 line ftpfix sends, as RFC 959 section 4.2.2 spells it."""
    return b"227 Entering Passive Mode (%b)." % _encode_six(host, port) + CRLF


def format_229(port: int) -> bytes:
    """The 229 reply of RFC 2428 section 3, with the recommended "|" delimiter."""
    return b"229 Entering Extended Passive Mode (|||%d|)" % port + CRLF


# RFC 2428 section 3: the 229 reply is "(<d><d><d><tcp-port><d>)", where the
# delimiter <d> is any ASCII character from 33 to 126, the same all four
# times. Like the 227, it may sit anywhere in the text.
_EPSV_REPLY = re.compile(rb"\(([\x21-\x7e])\1\1(\d{1,5})\1\)")


def parse_229(text: bytes) -> int:
    """The port a 229 reply announces. Raises AddressError if it names none."""
    match = _EPSV_REPLY.search(text[3:] if text[:3].isdigit() else text)
    if match is None:
        raise AddressError("no (|||port|) in the 229 reply")
    port = int(match.group(2))
    if not 0 < port <= 65535:
        raise AddressError(f"port {port} in the 229 reply")
    return port


class UnsupportedNetwork(ValueError):
    """An EPRT for a network protocol other than IPv4 (1) or IPv6 (2)."""


def parse_port(argument: bytes) -> tuple[IPv4Address, int]:
    """The host and port of a PORT argument, "h1,h2,h3,h4,p1,p2" (RFC 959 section 4.1.2).

    Raises AddressError if it is not six numbers from 0 to 255.
    """
    parts = [part.strip() for part in argument.strip().split(b",")]
    if len(parts) != 6 or not all(part.isdigit() and len(part) <= 3 for part in parts):
        raise AddressError("PORT takes six comma-separated numbers")
    return _decode_six(parts, "PORT")


def parse_eprt(argument: bytes) -> tuple[IPv4Address | IPv6Address, int]:
    """The address and port of an EPRT argument, "<d><af><d><addr><d><port><d>" (RFC 2428 section 2).

    Raises UnsupportedNetwork for an address family other than 1 or 2, and
    AddressError for anything else malformed.
    """
    argument = argument.strip()
    if len(argument) < 7 or not 33 <= argument[0] <= 126:
        raise AddressError("EPRT takes <d><af><d><address><d><port><d>")
    delimiter = argument[:1]
    fields = argument.split(delimiter)
    if len(fields) != 5 or fields[0] or fields[4]:
        raise AddressError("EPRT takes <d><af><d><address><d><port><d>")
    family, address, port = fields[1], fields[2], fields[3]
    if family not in (b"1", b"2"):
        raise UnsupportedNetwork(f"network protocol {family!r}")
    try:
        host = (IPv4Address if family == b"1" else IPv6Address)(address.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise AddressError(f"not an address for protocol {family.decode('latin-1')}") from None
    if not port.isdigit() or len(port) > 5 or not 0 < int(port) <= 65535:
        raise AddressError("not a TCP port")
    return host, int(port)


def format_port(host: IPv4Address | IPv6Address, port: int) -> bytes:
    """The command that asks the backend to connect to ``host:port``.

    PORT for IPv4, which every legacy server knows; EPRT only for IPv6.
    """
    if isinstance(host, IPv4Address):
        return b"PORT " + _encode_six(host, port) + CRLF
    return b"EPRT |2|%b|%d|" % (str(host).encode("ascii"), port) + CRLF


#: FEAT lines (RFC 2389) for what ftpfix cannot relay: TLS on the control
#: channel (RFC 4217) would hide every 227 from it, and the long forms of
#: RFC 1639 carry addresses it does not rewrite.
HIDDEN_FEATURES = (b"AUTH", b"PBSZ", b"PROT", b"CCC", b"LPSV", b"LPRT", b"ADAT", b"MIC", b"CONF", b"ENC")
#: What ftpfix itself provides, whatever the backend knows.
PROVIDED_FEATURES = (b"EPRT", b"EPSV")


#: What ftpfix provides when it terminates TLS itself (RFC 4217 section 6).
TLS_FEATURES = (b"AUTH TLS", b"PBSZ", b"PROT")


def rewrite_feat(lines: list[bytes], *, tls: bool = False) -> tuple[list[bytes], bool]:
    """A 211 FEAT reply that lists what ftpfix provides, and whether the backend knows EPSV.

    ``lines`` are the reply's lines without endings; the first and last keep
    their codes. Feature lines start with a space (RFC 2389 section 3.2).
    The backend's own security features are always hidden (the backend's
    TLS is not the client's); with ``tls``, ftpfix's are listed instead.
    """
    features = [line for line in lines[1:-1] if line.startswith(b" ")]
    names = {line.strip().split(b" ", 1)[0].upper() for line in features}
    kept = [line for line in features if line.strip().split(b" ", 1)[0].upper() not in HIDDEN_FEATURES]
    added = [b" " + name for name in PROVIDED_FEATURES if name not in names]
    if tls:
        added += [b" " + feature for feature in TLS_FEATURES]
    return [lines[0], *kept, *added, lines[-1]], b"EPSV" in names


# -- the replies ftpfix makes up ---------------------------------------------


def reply(text: str) -> bytes:
    """One reply line as sent: ``text`` (code first) and CRLF."""
    return text.encode("ascii", "replace") + CRLF


def cant_open(reason: str) -> bytes:
    """425: no data connection was made (RFC 959 section 4.2)."""
    return reply(f"425 Can't open data connection: {reason}.")


def transfer_aborted(reason: str) -> bytes:
    """426: a data connection was made, but did not carry everything."""
    return reply(f"426 Connection closed; transfer aborted: {reason}.")


#: ftpfix's answer to an ABOR, sent after the aborted transfer's own reply.
ABORT_DONE = reply("226 Abort successful.")

#: ftpfix's answer to an ABOR with no transfer to abort.
NOTHING_TO_ABORT = reply("225 No transfer to abort.")

#: The reply that ends a session whose backend said something out of turn.
OUT_OF_TURN = reply("421 Service not available: the server sent a reply to no command.")

#: The reply that ends a session whose backend sent an over-long reply.
OVERLONG_REPLY = reply("421 Service not available: the server sent an over-long reply.")

#: The reply to commands still unanswered when the backend hangs up.
BACKEND_GONE = reply("421 Service not available, the server closed the connection.")

#: The reply when ftpfix cannot reach the backend at all.
BACKEND_UNREACHABLE = reply("421 Service not available, the FTP server cannot be reached.")

#: The reply to a client whose session ends because ftpfix stops.
SHUTTING_DOWN = reply("421 Service shutting down, closing control connection.")
