"""What the core asks the shell to do.

These are plain values with no behaviour (compare mitmproxy's ``proxy/commands.py``).
The shell executes them in order, in one ``match``, and fails loudly on anything
it does not know.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Side(enum.Enum):
    """The two peers of a proxied control connection."""

    CLIENT = "client"
    SERVER = "server"


class Level(enum.StrEnum):
    """A log level, named as structlog's bound loggers name their methods."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SendTo:
    """Write ``data`` to ``side``'s control connection.

    With ``urgent``, the last byte goes as TCP urgent data (MSG_OOB): the
    "synch" of RFC 959 section 4.1.3 that makes a busy server look at its
    control connection during a transfer.
    """

    side: Side
    data: bytes
    urgent: bool = False


@dataclass(frozen=True, slots=True)
class OpenPassive:
    """The backend answered PASV: open a public data port that relays to it.

    ``backend_port`` is the port the backend advertised. ``advertised_host`` is
    the address it named, kept only for the log: the shell always dials the
    backend's control address, so a backend (or anything that can inject a 227)
    cannot make ftpfix connect elsewhere (RFC 2577, section 3).

    The core reads no replies until the shell answers with the event
    ``PassiveOpened`` or ``PassiveFailed``. ``extended`` says the client asked with EPSV,
    so its 229 will carry no address.
    """

    advertised_host: str
    backend_port: int
    extended: bool = False


@dataclass(frozen=True, slots=True)
class OpenActive:
    """The client asked for an active data connection to ``host:port``.

    The target has passed the bounce checks (RFC 2577 section 3): it is the
    client's own address and an unprivileged port. The shell listens where
    the backend can reach it and answers with the event ``ActiveOpened`` (the
    address to put in the backend's PORT) or ``ActiveFailed``. The core reads
    no further commands until then.
    """

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class TransferStarted:
    """A transfer command went to the backend: ``download`` says which way the data flows.

    A download is over once the backend's last byte and end (FIN) have
    reached the client; the shell then ends the other direction towards the
    backend too, so a server that lingers for its peer's FIN before it
    answers (ProFTPD, for ten seconds) answers at once, whatever the client
    does with its socket.

    ``protected`` is the PROT level in force now (RFC 4217 section 9: the one
    at the transfer command applies): the client's data connection is TLS
    if it is True, plaintext if not, whatever it was when the port opened.
    """

    download: bool
    protected: bool = False


@dataclass(frozen=True, slots=True)
class AbortTransfer:
    """The client sent ABOR during a transfer: break its data connection now.

    Both ends are reset, and a backend still waiting for its end is dialed and
    reset, so the backend ends the transfer at once and answers it; the core
    answers the ABOR itself after that reply (see ``verbs.py``).
    """


@dataclass(frozen=True, slots=True)
class SettleTransfer:
    """Tell the core, with the event ``TransferSettled``, once the current
    transfer's data connection is closed and the backend has then sent
    nothing for a moment.

    Asked after an ABOR, and after a second 1xx to a transfer command. Every
    server answers a broken data connection with a final reply within
    milliseconds, except pure-ftpd, which sends a second 150 and nothing more.
    The core then asks the backend a NOOP: its 200 proves the transfer's reply
    will never come (see ``verbs.py``).
    """


@dataclass(frozen=True, slots=True)
class FinishTransfer:
    """The backend answered a transfer command (RETR, STOR, LIST, ...) with a 2xx.

    The core holds that reply and reads no further replies until the shell
    answers with the event ``TransferDone``: once the data relay has
    delivered the last byte (a backend sends "226 Transfer complete" when its
    own socket is drained, while ftpfix may still be relaying the tail), or
    once it failed. A relay that failed turns the 2xx into a 426 (or a 425 if
    no data connection was made): a client must never believe a transfer that
    did not happen.
    """


@dataclass(frozen=True, slots=True)
class CancelTransfer:
    """The backend refused or failed a transfer command (4xx or 5xx).

    The transfer is over: close its data connection now, so a client that
    connected early (ftplib does, right after the 227) gets its 550 at once
    and the port goes back to the pool.
    """


@dataclass(frozen=True, slots=True)
class AwaitQuiet:
    """Tell the core, with the event ``BackendQuiet``, once the backend has
    sent nothing for a moment.

    Asked before PASV, EPSV, PORT or EPRT goes out after a multi-line reply:
    a server that lists names at the start of lines (STAT) lets a client forge
    the reply's end, and the rest of the real reply must not be taken for the
    answer to what ftpfix sends next.
    """


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The client sent AUTH TLS: stop reading its control connection, send
    ``reply`` (the 234) in plain text, then run the TLS handshake as the
    server (RFC 4217 section 4).

    The reader must be stopped *before* the 234 leaves: a conforming client
    sends its ClientHello only after reading it, so every byte read until
    then is plaintext sent after AUTH, which the core has thrown away. Bytes
    read after the 234 would be the ClientHello, and must reach the TLS
    layer. The shell answers with the event ``TlsStarted``, or ends the
    session if the handshake fails.
    """

    side: Side
    reply: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """End the session, after sending what was queued before this command."""

    reason: str


class Tally(enum.StrEnum):
    """Things the core counts for the metrics, by what only the core knows.

    A closed set, so the shell's counters have bounded labels: never a
    client address, a user or a file name.
    """

    REWRITE_227 = "rewrite_227"  # a 227 rewritten to carry the public address and a leased port
    REWRITE_229 = "rewrite_229"  # a 229 rewritten to carry a leased port
    ALIAS = "alias"  # a verb rewritten by [commands] aliases (P@SW)
    EPSV_TRANSLATED = "epsv_translated"  # a client's EPSV sent to the backend as PASV
    BOUNCE = "bounce"  # a PORT or EPRT refused by the bounce checks (RFC 2577 section 3)
    LONG_LINE = "long_line"  # a command line over [limits] max_line


@dataclass(frozen=True, slots=True)
class Count:
    """Count one ``what`` for the metrics. Counting is a command, like
    logging, so a test can see which input moved which counter."""

    what: Tally


@dataclass(frozen=True, slots=True)
class TransferReplied:
    """The client got the final reply to a transfer command (RETR, STOR, LIST, ...).

    ``code`` is the reply the client got, which may be ftpfix's 425 or 426
    in place of the backend's. ``path`` is the command's argument as the
    client sent it: the shell escapes it for each log it writes. ``relayed``
    says the data connection went through ftpfix, so the shell's figures
    (bytes, duration) belong to it.
    """

    verb: str
    path: bytes
    code: int
    relayed: bool


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line. Logging is a command so tests can see it."""

    event: str
    level: Level = Level.INFO
    fields: dict[str, Any] = field(default_factory=dict)


Command = (
    SendTo
    | OpenPassive
    | OpenActive
    | TransferStarted
    | AbortTransfer
    | SettleTransfer
    | FinishTransfer
    | CancelTransfer
    | AwaitQuiet
    | StartTLS
    | Close
    | Note
    | Count
    | TransferReplied
)
