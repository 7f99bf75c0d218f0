"""The FTP control-channel core of ftpfix.

This package has no networking code at all, in the manner of h11: the shell in
``ftpfix.net`` feeds it the bytes that arrived from either side and executes the
commands it returns (``ftpfix.protocol.commands``). Keeping it pure lets every
transcript be tested synchronously, one byte at a time, and fuzzed.
"""

from .commands import (
    AbortTransfer,
    AwaitQuiet,
    CancelTransfer,
    Close,
    Command,
    FinishTransfer,
    Note,
    OpenActive,
    OpenPassive,
    SendTo,
    Side,
)
from .errors import BackendError, ClientError, FtpfixError, ProtocolError
from .session import Policy, Session, Waiting

__all__ = [
    "AbortTransfer",
    "AwaitQuiet",
    "BackendError",
    "CancelTransfer",
    "ClientError",
    "Close",
    "Command",
    "FinishTransfer",
    "FtpfixError",
    "Note",
    "OpenActive",
    "OpenPassive",
    "Policy",
    "ProtocolError",
    "SendTo",
    "Session",
    "Side",
    "Waiting",
]
