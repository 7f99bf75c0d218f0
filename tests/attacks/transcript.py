"""A raw-socket attacker for the attack suite: tests read like FTP transcripts.

``Attacker`` speaks to ftpfix over a plain TCP socket. Nothing is encoded,
normalised or terminated for you: ``send`` writes exactly the bytes given, so a
test can send NULs, bare CRs, tabs, pipelined commands and half lines.
``reply`` reads the next complete FTP reply (RFC 959 multi-line aware) and
fails with a clear message on timeout or EOF.

Stable API (other attack modules import it):

    Attacker(proxy_or_port, *, host="127.0.0.1", source="127.0.0.1", timeout=10)
      .banner                      the 220 greeting, read on connect (greet=False skips)
      .send(data: bytes)           raw
      .line(text: str)             text + CRLF, latin-1
      .reply(timeout=None) -> str  next full reply incl. code, lines joined by "\n"
      .code(timeout=None) -> str   three-digit code of the next reply
      .expect(prefix, timeout=None) -> str   next reply, asserted to start with prefix
      .command(text) -> str        line(text) then reply()
      .login(user, password) -> str     the final reply (230), asserted
      .pasv() -> (host, port)      PASV, parses the 227
      .epsv() -> port              EPSV, parses the 229
      .data_connect(port, host=None) -> socket.socket
      .reset()                     SO_LINGER {1,0} then close: the peer sees RST
      .closed(timeout=2.0) -> bool the peer closed (EOF or RST) within timeout
      .close()
    parse_227(text) -> (host, port); parse_229(text) -> port
    reset_socket(sock)             RST on any socket (e.g. a data socket)
    recv_all(sock, timeout=10) -> bytes  read a data socket to EOF
    Listener(host, port=0)         a TCP listener in a thread that records who connected
    ProcessProbe(pid)              rss_kib(), fds(); RssSampler(pid) samples RSS in a thread
    assert_healthy(proxy)          still running, no "session crashed"/"data connection crashed" events
    crash_events(proxy) -> list[dict]
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Self

REPLY_LINE = re.compile(rb"^(\d{3})([ -])")
_227 = re.compile(r"(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)")
_229 = re.compile(r"\((.)\1\1(\d+)\1\)")


class ReplyError(AssertionError):
    """The peer did not send the reply a test waited for."""


def _port_of(target: Any) -> int:
    return target if isinstance(target, int) else int(target.port)


def parse_227(text: str) -> tuple[str, int]:
    match = _227.search(text.split(" ", 1)[1] if " " in text else text)
    if not text.startswith("227") or match is None:
        raise ReplyError(f"not a parsable 227 reply: {text!r}")
    numbers = [int(n) for n in match.groups()]
    return ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]


def parse_229(text: str) -> int:
    match = _229.search(text)
    if not text.startswith("229") or match is None:
        raise ReplyError(f"not a parsable 229 reply: {text!r}")
    return int(match.group(2))


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with SO_LINGER {1,0}: the kernel sends RST, not FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def recv_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


class Attacker:
    def __init__(
        self,
        target: Any,
        *,
        host: str = "127.0.0.1",
        source: str = "127.0.0.1",
        timeout: float = 10.0,
        greet: bool = True,
    ) -> None:
        self.host = host
        self.port = _port_of(target)
        self.timeout = timeout
        self.sock = socket.create_connection((host, self.port), timeout=timeout, source_address=(source, 0))
        self._buffer = b""
        self.transcript: list[tuple[str, bytes]] = []
        self.banner = self.expect("220") if greet else ""

    # -- sending ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.transcript.append((">", data))
        self.sock.sendall(data)

    def line(self, text: str) -> None:
        self.send(text.encode("latin-1") + b"\r\n")

    # -- receiving -------------------------------------------------------------

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplyError(f"timeout waiting for a reply; partial {self._buffer!r}; transcript {self._tail()}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as error:
                raise ReplyError(
                    f"connection failed while waiting for a reply ({error}); partial {self._buffer!r}; "
                    f"transcript {self._tail()}"
                ) from None
            if not chunk:
                raise ReplyError(f"EOF while waiting for a reply; partial {self._buffer!r}; transcript {self._tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self, timeout: float | None = None) -> str:
        """The next complete reply: its lines joined by "\\n", the code first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        first = self._read_line(deadline)
        match = REPLY_LINE.match(first)
        if match is None:
            raise ReplyError(f"not an FTP reply line: {first!r}; transcript {self._tail()}")
        lines = [first]
        if match.group(2) == b"-":
            end = match.group(1) + b" "
            while True:
                line = self._read_line(deadline)
                lines.append(line)
                if line.startswith(end):
                    break
        text = b"\n".join(lines).decode("latin-1")
        self.transcript.append(("<", text.encode("latin-1")))
        return text

    def code(self, timeout: float | None = None) -> str:
        return self.reply(timeout)[:3]

    def expect(self, prefix: str, timeout: float | None = None) -> str:
        text = self.reply(timeout)
        if not text.startswith(prefix):
            raise ReplyError(f"expected a reply starting {prefix!r}, got {text!r}; transcript {self._tail()}")
        return text

    def command(self, text: str, timeout: float | None = None) -> str:
        self.line(text)
        return self.reply(timeout)

    def replies(self, count: int, timeout: float | None = None) -> list[str]:
        return [self.reply(timeout) for _ in range(count)]

    # -- FTP steps ---------------------------------------------------------------

    def login(self, user: str, password: str) -> str:
        first = self.command(f"USER {user}")
        if first.startswith("230"):
            return first
        if not first.startswith("331"):
            raise ReplyError(f"USER {user} got {first!r}")
        return self.expect_after(f"PASS {password}", "230")

    def expect_after(self, text: str, prefix: str) -> str:
        self.line(text)
        return self.expect(prefix)

    def pasv(self) -> tuple[str, int]:
        return parse_227(self.command("PASV"))

    def epsv(self) -> int:
        return parse_229(self.command("EPSV"))

    def data_connect(self, port: int, host: str | None = None, timeout: float | None = None) -> socket.socket:
        return socket.create_connection(
            (host or self.host, port), timeout=timeout or self.timeout, source_address=(self.sock.getsockname()[0], 0)
        )

    # -- ending ------------------------------------------------------------------

    def reset(self) -> None:
        reset_socket(self.sock)

    def closed(self, timeout: float = 2.0) -> bool:
        """True if the peer ends the connection (EOF or RST) within ``timeout``.

        Bytes that arrive first are kept for ``reply``; a peer that keeps
        talking without closing counts as open.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except OSError:
                return True
            if not chunk:
                return True
            self._buffer += chunk
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tail(self, count: int = 8) -> str:
        return repr(self.transcript[-count:])


class Listener:
    """A TCP listener that records every connection it accepts (and keeps them open)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted: list[tuple[socket.socket, tuple]] = []
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.accepted.append((conn, peer))
                self._cond.notify_all()

    @property
    def count(self) -> int:
        return len(self.accepted)

    def wait(self, count: int = 1, timeout: float = 10.0) -> socket.socket:
        """The ``count``-th accepted socket, waiting up to ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.accepted) >= count, timeout):
                raise ReplyError(f"listener {self.host}:{self.port} got {len(self.accepted)} connections, not {count}")
            return self.accepted[count - 1][0]

    def close(self) -> None:
        # Stop the accept loop before closing, so the port is free at once.
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        for conn, _ in self.accepted:
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessProbe:
    """What /proc says about one process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.pid}")

    def fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))


class RssSampler:
    """Samples a process's RSS every ``interval`` s in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.probe = ProcessProbe(pid)
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.probe.rss_kib())
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def pid_of(proxy: Any) -> int:
    return proxy.process.pid


CRASH_PREFIXES = ("session crashed", "data connection crashed")


def crash_events(proxy: Any) -> list[dict]:
    return [event for event in proxy.events() if str(event.get("event", "")).startswith(CRASH_PREFIXES)]


def assert_healthy(proxy: Any) -> None:
    """ftpfix still runs and logged no crashed session or data connection."""
    code = proxy.process.poll()
    assert code is None, f"ftpfix exited with {code}; log tail:\n{_log_tail(proxy)}"
    crashes = crash_events(proxy)
    assert not crashes, f"ftpfix logged crashes: {crashes}"


def _log_tail(proxy: Any, lines: int = 40) -> str:
    try:
        return "\n".join(proxy.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
