"""What /readyz knows: whether the backend greeted with 220 lately.

A background task dials the backend every ``[metrics] ready_interval``
seconds, reads its greeting and hangs up; a probe only reads the last result.
So probes never open backend connections, however often they come, and a
flood of them costs the backend nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio
from structlog.typing import FilteringBoundLogger

from ..config import Backend, BackendTls, Config
from .backend_tls import backend_context
from .proxied import backend_header
from .stopping import Stopping

#: Bytes of the greeting read: the reply code and the start of its text.
#: A multi-line 220 (RFC 959 section 4.2, "220-") is told by its first line.
GREETING_PREFIX = 512

#: A result older than this many check intervals (plus the check's own
#: timeout) is stale: the checker is stuck, and "ready" would be a guess.
STALE_INTERVALS = 2


async def greets(backend: Backend) -> str | None:
    """Dial the backend and read its greeting: None for a 220, else why not.

    Error handling: every failure (no route, refused, reset, silence past
    ``connect_timeout``, which bounds the whole check) is returned as text,
    never raised.
    """
    try:
        with trio.fail_after(backend.connect_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(backend.address, backend.port)
            try:
                if header := backend_header(backend.proxy_protocol, None, None):
                    # A backend that expects a PROXY header waits for it
                    # before it greets: this check is ftpfix's own connection.
                    await stream.send_all(header)
                if backend.tls == BackendTls.IMPLICIT:
                    # The greeting comes inside TLS (after any PROXY header);
                    # a certificate that fails verification fails every
                    # session, so it fails this too.
                    stream = trio.SSLStream(stream, backend_context(backend), server_hostname=backend.address)
                greeting = b""
                while b"\n" not in greeting and len(greeting) < GREETING_PREFIX:
                    chunk = await stream.receive_some(GREETING_PREFIX - len(greeting))
                    if not chunk:
                        break
                    greeting += chunk
                if greeting[:3] == b"220" and greeting[3:4] in (b" ", b"-"):
                    # Say goodbye rather than vanish, so the backend logs a
                    # clean end; its 221 is not waited for, and a backend
                    # that hung up already still greeted.
                    with contextlib.suppress(trio.BrokenResourceError, OSError):
                        await stream.send_all(b"QUIT\r\n")
                    return None
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        return f"no greeting within {backend.connect_timeout:g} s"
    except (OSError, trio.BrokenResourceError) as error:
        return _describe(error)
    if not greeting:
        return "closed without a greeting"
    line = greeting.split(b"\n", 1)[0].rstrip(b"\r")
    return f"greeted with {line[:80].decode('ascii', 'replace')!r}, not 220"


def _describe(error: BaseException) -> str:
    # trio.open_tcp_stream raises "all attempts to connect ... failed" from
    # a group of the real errors: name those ("Connection refused").
    cause = error.__cause__
    causes = cause.exceptions if isinstance(cause, BaseExceptionGroup) else [cause] if cause else []
    reasons = sorted({str(item) for item in causes if str(item)})
    return "; ".join(reasons) or getattr(error, "strerror", None) or str(error) or type(error).__name__


class Readiness:
    """The last backend check and whether ftpfix is draining; read by /readyz."""

    def __init__(self, stopping: Stopping) -> None:
        self.stopping = stopping
        #: trio.current_time() of the last 220, and the failure of the last check (None if it got one).
        self.greeted_at: float | None = None
        self.failure: str | None = None
        self.checked = False

    def record(self, failure: str | None, now: float) -> None:
        self.checked = True
        self.failure = failure
        if failure is None:
            self.greeted_at = now

    def verdict(self, now: float, interval: float, timeout: float) -> tuple[bool, str]:
        """(ready, reason): ready only while not draining and the backend greeted lately."""
        if self.stopping.is_set():
            return False, "shutting down: sessions are draining after SIGTERM"
        if not self.checked:
            return False, "the backend has not been checked yet"
        if self.failure is not None:
            return False, f"backend: {self.failure}"
        assert self.greeted_at is not None
        age = now - self.greeted_at
        if age > STALE_INTERVALS * interval + timeout:
            return False, f"backend: last greeting {age:.0f} s ago, the check is late"
        return True, f"backend greeted {age:.1f} s ago"


async def keep_checking(readiness: Readiness, current: Callable[[], Config], log: FilteringBoundLogger) -> None:
    """Check the backend now and every ready_interval seconds, until cancelled.

    ``current`` returns the running config, so a reload's new backend or
    interval applies from the next check. Logs only changes (and each check
    at debug), so a steady state writes nothing.
    """
    while True:
        config = current()
        backend = config.backend
        try:
            failure = await greets(backend)
        except Exception as error:
            log.exception("backend check crashed: this is a bug in ftpfix")
            failure = f"the check crashed: {type(error).__name__}"
        previous = (readiness.checked, readiness.failure)
        readiness.record(failure, trio.current_time())
        log.debug("backend checked", backend=f"{backend.address}:{backend.port}", failure=failure)
        if previous != (True, failure):
            if failure is None:
                log.info("backend ready", backend=f"{backend.address}:{backend.port}")
            else:
                log.warning("backend not ready", backend=f"{backend.address}:{backend.port}", reason=failure)
        await trio.sleep(config.metrics.ready_interval)
