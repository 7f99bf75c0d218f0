"""Error types that may leave the core.

Each carries the FTP reply it implies for the client, in the manner of h11's
``error_status_hint``: the shell sends ``error.reply`` and closes, without having
to know what went wrong.
"""


class FtpfixError(Exception):
    """Base of every error ftpfix raises on purpose."""


class ProtocolError(FtpfixError):
    """A peer broke the protocol so badly that the session cannot go on."""

    def __init__(self, message: str, *, reply: bytes) -> None:
        super().__init__(message)
        self.reply = reply


class BackendError(ProtocolError):
    """The backend server sent something the session cannot survive."""
