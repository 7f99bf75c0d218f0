"""Login events: one log line for each login the backend accepts or refuses.

The backend sees every session coming from ftpfix's own address, so its log
(and a fail2ban watching it) cannot tell one client from another. ftpfix
knows both the client and the backend's verdict, so it writes the line
instead: ``login`` for a 230, ``login failed`` (a warning) for a refusal, each
with the user name and, bound by the shell, the client's address
(``deploy/fail2ban/`` counts those per address).

The user name is the client's to choose, and it lands in a line that a ban
is decided on. ``loggable`` makes it harmless there: bounded, with every
character that is not printable escaped, so it can neither end the line nor
paint the terminal. The password is never part of an event.
"""

from __future__ import annotations

from .commands import Level, Note

#: Longest user name written to the log, in characters after escaping. Real
#: names are far shorter (useradd allows 32); a longer one is cut and marked.
MAX_LOGGED_USER = 64

#: How a cut name ends, so it never passes for the whole name.
CUT = "..."

#: Commands whose final reply decides a login (RFC 959 section 5.4: USER may
#: be answered 230 at once, PASS may ask for ACCT with 332).
LOGIN_VERBS = frozenset({b"USER", b"PASS", b"ACCT"})

#: The commands that carry credentials: a refusal of one is a failed login.
CREDENTIAL_VERBS = frozenset({b"PASS", b"ACCT"})

#: RFC 959 section 4.2: "Not logged in".
NOT_LOGGED_IN = 530

#: RFC 959 section 4.2: "Bad sequence of commands". It says nothing about the
#: credentials: ProFTPD gives it to a PASS after USER was answered 230, and
#: every server to a PASS with no USER before it.
BAD_SEQUENCE = 503


def loggable(text: bytes, limit: int = MAX_LOGGED_USER) -> str:
    """``text`` (client bytes) as a string that is safe to put in a log line.

    UTF-8 is kept; bytes that are not UTF-8 become ``\\xNN``, and so does every
    character that is not printable (controls, ANSI escapes, line and
    paragraph separators, bidirectional overrides); a backslash is doubled,
    so an escape in the output always stands for a byte the client sent. The
    result is at most ``limit`` characters, plus ``CUT`` when it was cut.
    """
    pieces: list[str] = []
    size = 0
    for char in text.decode("utf-8", "surrogateescape"):
        if char == "\\":
            piece = "\\\\"
        elif "\udc80" <= char <= "\udcff":  # an undecodable byte
            piece = f"\\x{ord(char) - 0xDC00:02x}"
        elif char.isprintable():
            piece = char
        elif ord(char) <= 0xFF:
            piece = f"\\x{ord(char):02x}"
        else:
            piece = f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"
        if size + len(piece) > limit:
            return "".join(pieces) + CUT
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def login_outcome(verb: bytes, code: int, user: str | None) -> Note | None:
    """The login event a final reply with ``code`` to ``verb`` makes, if any.

    ``user`` is the name the backend pairs the command with: the last USER
    sent before it (already ``loggable``).
    """
    if verb not in LOGIN_VERBS:
        return None
    name = user if user is not None else ""
    if code == 230:
        return Note("login", fields={"user": name})
    # A 530 to USER: vsftpd refuses names on its userlist right there.
    refused = code == NOT_LOGGED_IN if verb == b"USER" else 400 <= code < 600 and code != BAD_SEQUENCE
    if refused:
        return login_failed(name, code)
    return None


def login_failed(user: str, code: int, **fields: str) -> Note:
    """The one warning line of a failed login (``deploy/fail2ban/`` matches it)."""
    return Note("login failed", level=Level.WARNING, fields={"user": user, "code": code, **fields})
