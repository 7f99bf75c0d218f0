"""The FTP control-channel core of ftpfix.

This package has no networking code at all, in the manner of h11: the shell in
``ftpfix.net`` feeds it everything that happens as events
(``ftpfix.protocol.events``) through ``Session.receive``, and executes the
commands it returns (``ftpfix.protocol.commands``). Keeping it pure lets every
transcript be tested synchronously, one byte at a time, and fuzzed.
"""

from .commands import (
    AbortTransfer,
    AwaitQuiet,
    CancelTransfer,
    Close,
    Command,
    Count,
    FinishTransfer,
    Level,
    Note,
    OpenActive,
    OpenPassive,
    SendTo,
    SettleTransfer,
    Side,
    StartTLS,
    Tally,
    TransferReplied,
    TransferStarted,
)
from .errors import BackendError, FtpfixError, ProtocolError
from .events import (
    ActiveFailed,
    ActiveOpened,
    BackendQuiet,
    ConnectionClosed,
    DataFailed,
    DataReceived,
    Event,
    PassiveFailed,
    PassiveOpened,
    ReadOn,
    TlsStarted,
    TransferDone,
    TransferSettled,
)
from .policy import ActiveMode, EpsvMode, Policy, TlsMode
from .session import Session
from .state import TRANSITIONS, Waiting

__all__ = [
    "TRANSITIONS",
    "AbortTransfer",
    "ActiveFailed",
    "ActiveMode",
    "ActiveOpened",
    "AwaitQuiet",
    "BackendError",
    "BackendQuiet",
    "CancelTransfer",
    "Close",
    "Command",
    "ConnectionClosed",
    "Count",
    "DataFailed",
    "DataReceived",
    "EpsvMode",
    "Event",
    "FinishTransfer",
    "FtpfixError",
    "Level",
    "Note",
    "OpenActive",
    "OpenPassive",
    "PassiveFailed",
    "PassiveOpened",
    "Policy",
    "ProtocolError",
    "ReadOn",
    "SendTo",
    "Session",
    "SettleTransfer",
    "Side",
    "StartTLS",
    "Tally",
    "TlsMode",
    "TlsStarted",
    "TransferDone",
    "TransferReplied",
    "TransferSettled",
    "TransferStarted",
    "Waiting",
]
