"""The diagnosing client's I/O: an FTP control connection and data sockets
that never hang and never buffer without bound.

``ftpfix diagnose`` dials arbitrary hosts, so the far end may be hostile or
broken: it may never answer, answer forever, send a line without end or a
reply of a million lines. Every read here has a deadline and a size bound,
and breaking either raises ``WireError`` with a sentence that says which.

Plain blocking sockets with timeouts, not trio: the prober is one sequence
of steps, and the only concurrency it needs (dialing every passive port at
once) is a ``selectors`` loop over non-blocking connects (``scan``).
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import time
from collections.abc import Iterable

from .checks import Outcome

#: Longest reply line read, in bytes. RFC 959 sets no limit; real servers
#: stay under 512, a STAT listing line under 4096.
MAX_LINE = 8 * 1024

#: Most lines in one reply (a FEAT list is about 20; HELP about 40).
MAX_REPLY_LINES = 512

#: Most preliminary (1xx) replies before a final one: a server sends one
#: (150, or 125), a few at most; an endless stream of them is a hostile server.
MAX_PRELIMINARY = 16

#: Most bytes read from one data connection: a LIST of a large folder fits.
MAX_DATA = 16 * 1024 * 1024

#: Sockets dialed at once by ``scan``; well under the usual 1024 descriptors.
SCAN_PARALLEL = 256


class WireError(Exception):
    """The far end broke the protocol, went quiet past a deadline, or hung up."""


class Control:
    """One FTP control connection, read with deadlines and bounds."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buffer = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, line: str) -> None:
        self.sock.settimeout(self.timeout)
        # UTF-8 (RFC 2640) for what a user typed; surrogateescape gives back the very bytes of a name
        # read from a listing that is not UTF-8 (decoded the same way).
        self.sock.sendall(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def reply(self, timeout: float | None = None) -> tuple[int, list[str]]:
        """The next complete reply (RFC 959 section 4.2, multi-line included): its code and lines."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        first = self._line(deadline)
        if len(first) < 3 or not first[:3].isdigit() or first[3:4] not in (" ", "-", ""):
            raise WireError(f"not an FTP reply: {first[:80]!r}")
        code, lines = int(first[:3]), [first]
        if first[3:4] == "-":
            while True:
                if len(lines) >= MAX_REPLY_LINES:
                    raise WireError(f"a reply of over {MAX_REPLY_LINES} lines")
                line = self._line(deadline)
                lines.append(line)
                if line[:3] == first[:3] and line[3:4] == " ":
                    break
        return code, lines

    def command(self, line: str, timeout: float | None = None) -> tuple[int, list[str]]:
        self.send(line)
        return self.reply(timeout)

    def final(self, line: str, timeout: float | None = None) -> tuple[int, list[str]]:
        """``line``'s reply, past any 1xx."""
        code, lines = self.command(line, timeout)
        return self.past_preliminary(code, lines, timeout)

    def past_preliminary(self, code: int, lines: list[str], timeout: float | None = None) -> tuple[int, list[str]]:
        """The final reply after ``code``: any 1xx replies are read past, ``MAX_PRELIMINARY`` at most."""
        for _ in range(MAX_PRELIMINARY):
            if code >= 200:
                return code, lines
            code, lines = self.reply(timeout)
        if code >= 200:
            return code, lines
        raise WireError(f"over {MAX_PRELIMINARY} preliminary (1xx) replies and no final one")

    def _line(self, deadline: float) -> str:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise WireError(f"a reply line of over {MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireError("no reply in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise WireError("no reply in time") from None
            if not chunk:
                raise WireError(
                    "the server closed the connection" + (f" after {self._buffer[:80]!r}" if self._buffer else "")
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        if len(line) > MAX_LINE:
            raise WireError(f"a reply line of over {MAX_LINE} bytes")
        return line.rstrip(b"\r").decode("utf-8", "replace")


def text(lines: list[str]) -> str:
    """A reply as one line, for a summary."""
    return " / ".join(line.strip() for line in lines)[:300]


def dial(host: str, port: int, timeout: float) -> tuple[Outcome, socket.socket | None, float, str]:
    """Connect; the outcome, the socket if open, the seconds it took, and the error text."""
    started = time.monotonic()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except TimeoutError:
        sock.close()
        return Outcome.TIMEOUT, None, time.monotonic() - started, "timed out"
    except ConnectionRefusedError:
        sock.close()
        return Outcome.REFUSED, None, time.monotonic() - started, "refused"
    except OSError as error:
        sock.close()
        outcome = Outcome.UNREACHABLE if error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else Outcome.TIMEOUT
        return outcome, None, time.monotonic() - started, error.strerror or str(error)
    return Outcome.OPEN, sock, time.monotonic() - started, ""


def own_address(target: str, port: int) -> str | None:
    """The source address this host uses towards ``target``: a UDP connect sends nothing."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((target, port))
            return sock.getsockname()[0]
    except OSError:
        return None


def read_all(
    sock: socket.socket | ssl.SSLSocket,
    timeout: float,
    limit: int = MAX_DATA,
    total: float | None = None,
    *,
    cut: bool = False,
) -> bytes:
    """A data connection's bytes to its end. WireError after ``timeout`` seconds of
    silence, past ``limit`` bytes (with ``cut``: its first ``limit`` bytes instead), or
    when it is still sending after ``total`` seconds."""
    chunks: list[bytes] = []
    size = 0
    deadline = None if total is None else time.monotonic() + total
    while True:
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left <= 0:
            raise WireError(f"the data connection was still sending after {total:g} s ({size} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise WireError(f"the data connection was still sending after {total:g} s ({size} bytes)") from None
            raise WireError(f"the data connection went quiet for {timeout:g} s") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit and cut:
            return b"".join([*chunks, chunk])[:limit]
        if size > limit:
            raise WireError(f"the data connection sent over {limit} bytes")
        chunks.append(chunk)


def scan(host: str, ports: Iterable[int], timeout: float) -> dict[int, Outcome]:
    """Dial every port at once (``SCAN_PARALLEL`` at a time); how each connect ended.

    An open connection is closed at once. Twenty ports take one timeout at
    worst, not twenty.

    Resource handling: at most ``SCAN_PARALLEL`` sockets are open at once,
    and every one is closed before the next batch, answered or not.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    results: dict[int, Outcome] = {}
    queue = list(ports)
    while queue:
        batch, queue = queue[:SCAN_PARALLEL], queue[SCAN_PARALLEL:]
        selector = selectors.DefaultSelector()
        try:
            for port in batch:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex((host, port))
                if code in (0, errno.EINPROGRESS):
                    selector.register(sock, selectors.EVENT_WRITE, port)
                else:
                    results[port] = _outcome(code)
                    sock.close()
            deadline = time.monotonic() + timeout
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for key, _ in selector.select(left):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    results[key.data] = _outcome(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
                    selector.unregister(sock)
                    sock.close()
            for key in list(selector.get_map().values()):
                results[key.data] = Outcome.TIMEOUT
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
        finally:
            selector.close()
    return results


def _outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome.OPEN
    if code == errno.ECONNREFUSED:
        return Outcome.REFUSED
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Outcome.UNREACHABLE
    return Outcome.TIMEOUT
