"""The transfer log: one line per transfer, in the structured log and, when
``[log] xferlog`` names a file, in wu-ftpd's classic ``xferlog`` format.

The xferlog format (wu-ftpd's xferlog(5), kept by ProFTPD, vsftpd and
pure-ftpd for the log analyzers that read it: webalizer, awstats, xferstats)
is one line of space-separated fields::

    Mon Oct  5 13:10:21 2026 2 203.0.113.5 1048576 /pub/f.bin b _ o r alice ftp 0 * c

current time (ctime), transfer seconds, remote host, bytes, file name,
type (``a``scii/``b``inary), special action (``_`` none), direction (``o``ut,
``i``n), access mode (``a``nonymous or ``r``eal), user name, service, the
authentication method (0 none) and user id (``*``), completion (``c``omplete,
``i``ncomplete).

The file name and the user are the client's to choose and may hold spaces,
newlines or control characters, which would shift every field after them or
start a forged line. Both are escaped as the login lines are (``loggable``:
every character that is not printable becomes ``\\xNN``, a backslash is
doubled) and a space becomes ``\\x20``, so each is one field, reversibly,
and a line always has 18 fields. ftpfix does not follow TYPE, so the type
field is always ``b``.

The file is opened in append mode and reopened on SIGHUP, after logrotate
has moved it away.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from structlog.typing import FilteringBoundLogger

from ..protocol import TransferReplied
from ..protocol.logins import loggable
from .metrics import METRICS, transfer_result

#: Longest file name written, in characters after escaping (PATH_MAX is 4096).
MAX_LOGGED_PATH = 1024

#: Verbs that move a file; listings (LIST, NLST, MLSD) are not in xferlog.
XFERLOG_VERBS = {"RETR": "o", "STOR": "i", "STOU": "i", "APPE": "i"}

#: User names of anonymous FTP (RFC 1635): xferlog's access mode "a".
ANONYMOUS_USERS = frozenset({"anonymous", "ftp"})


def xferlog_field(text: bytes | str) -> str:
    """``text`` as one xferlog field: escaped, no space, never empty."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return loggable(raw, MAX_LOGGED_PATH).replace(" ", "\\x20") or "-"


def xferlog_line(
    *,
    now: float,
    seconds: float,
    host: str,
    size: int,
    path: bytes,
    verb: str,
    user: str | None,
    complete: bool,
) -> str | None:
    """One xferlog line (with its newline), or None for a verb xferlog does not log.

    ``user`` is already escaped by the core; it is escaped again only for spaces.
    """
    direction = XFERLOG_VERBS.get(verb)
    if direction is None:
        return None
    name = (user or "*").replace(" ", "\\x20") or "*"
    access = "a" if name.lower() in ANONYMOUS_USERS else "r"
    fields = [
        time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now)),
        str(round(seconds)),
        host,
        str(size),
        xferlog_field(path),
        "b",
        "_",
        direction,
        access,
        name,
        "ftp",
        "0",
        "*",
        "c" if complete else "i",
    ]
    # ctime pads the day with a space ("Oct  5"), as wu-ftpd writes it.
    day = fields[0]
    if day[8] == "0":
        fields[0] = day[:8] + " " + day[9:]
    return " ".join(fields) + "\n"


class XferLog:
    """The xferlog file, if one is configured; one per process."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._file: TextIO | None = None
        #: Why the file could not be opened or written, once it could not.
        self.error: str | None = None

    def configure(self, path: Path | None) -> None:
        """Use ``path`` (None: none) and (re)open it: at start and on SIGHUP.

        Error handling: a file that cannot be opened is recorded in
        ``error`` and nothing is written, never raised: the transfer log
        must not stop the proxy.
        """
        self.close()
        self.path = path
        self.error = None
        if path is None:
            return
        try:
            # Line-buffered: each line reaches the file whole, at once.
            self._file = path.open("a", encoding="utf-8", buffering=1)
        except OSError as error:
            self.error = f"cannot open {path}: {error.strerror or error}"

    def write(self, line: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(line)
        except OSError as error:
            self.error = f"cannot write {self.path}: {error.strerror or error}"

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


#: The process's xferlog.
XFERLOG = XferLog()


def log_transfer(
    log: FilteringBoundLogger,
    replied: TransferReplied,
    *,
    client: str,
    user: str | None,
    seconds: float,
    upload: int,
    download: int,
    mode: str,
) -> None:
    """Write one transfer's line (structured log, xferlog) and count it.

    ``upload`` and ``download`` are the bytes its data connection moved;
    ``mode`` is passive, active or passthrough (no figures: the data
    connection bypassed ftpfix).
    """
    direction = "upload" if XFERLOG_VERBS.get(replied.verb) == "i" else "download"
    size = upload if direction == "upload" else download
    complete = 200 <= replied.code < 300
    METRICS.transfers.labels(direction, mode, transfer_result(replied.code)).inc()
    METRICS.transfer_seconds.labels(direction).observe(seconds)
    log.info(
        "transfer",
        user=user,
        verb=replied.verb,
        path=loggable(replied.path, MAX_LOGGED_PATH),
        bytes=size,
        duration=round(seconds, 3),
        rate=round(size / seconds) if seconds > 0 else None,
        mode=mode,
        code=replied.code,
    )
    line = xferlog_line(
        now=time.time(),
        seconds=seconds,
        host=client,
        size=size,
        path=replied.path,
        verb=replied.verb,
        user=user,
        complete=complete,
    )
    if line is not None:
        XFERLOG.write(line)
