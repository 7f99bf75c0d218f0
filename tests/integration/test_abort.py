"""ABOR through ftpfix, pinned down on vsftpd, pure-ftpd and ProFTPD.

RFC 959 section 4.1.3: an ABOR during a transfer brings two replies, in this
order: the transfer's (426, or 226 if it had ended anyway) and then ABOR's own
(225 or 226). The session then goes on as if nothing had happened.

The client here is a raw socket, not ftplib's ``abort()``, so the test decides
every byte and the moment it is sent. Two ABOR forms are tried:

- ``telnet``: RFC 959's own, IAC IP, then IAC DM with the DM byte as TCP urgent
  data, then ``ABOR`` (lftp sends this);
- ``urgent``: a plain ``ABOR\\r\\n`` whose last byte is urgent (ftplib, and some
  other clients, send this).

The data connection is kept open and unread (download) or open after some data
(upload) while the ABOR is sent: the server cannot finish the transfer on its
own, and ftpfix has to make the abort happen. The time from the ABOR to its
reply is measured; each case must be under ``ABOR_LIMIT`` and the per-server
median is printed at the end of the run with what each server does on its own
(the ``direct`` tests, which only report).

What the servers do on their own (the direct tests, on Debian 12's packages):

- vsftpd sends nothing at all after an ABOR while the client holds the data
  connection open: it notices the ABOR only once its data connection breaks;
- ProFTPD closes a data connection with a lingering close (TimeoutLinger, 10 s):
  its 226, to ABOR or at the end of a download, waits until the client closes
  its side or 10 s pass; during a STOR it answers ``226 Abort successful``
  before its ``426``, the wrong order;
- pure-ftpd answers an ABOR during a STOR with 426 then 451, not 225/226;
- the ``urgent`` form loses its last byte (the urgent one) on a server that
  does not read urgent data inline, so pure-ftpd and ProFTPD do not see a whole
  ABOR line. Through ftpfix they always get the canonical form.

``-s`` shows each case as it runs; the summary table is printed at the end of
the run in any case.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

from tests.conftest import require_servers
from tests.harness import legacy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "20760-20779"

#: Seconds any one socket read may wait; also the bound on waiting for replies.
TIMEOUT = 10.0
#: The direct tests wait a little longer, past ProFTPD's 10 s lingering close,
#: so that its late 226 shows up with its time.
DIRECT_WAIT = 12.0
#: Seconds from sending ABOR to its reply that no case may reach.
ABOR_LIMIT = 1.0
#: Seconds the median case should stay within (printed, not asserted).
ABOR_TARGET = 0.1
#: Seconds after the data connection's EOF by which the 226 must be there.
EOF_REPLY_LIMIT = 2.0

#: Far more than the socket buffers between server and client hold, through
#: ftpfix included, so an unread download cannot finish by itself.
BIG = 64 * 1024 * 1024
SMALL = 1024 * 1024
MEDIUM = 4 * 1024 * 1024
#: What an upload sends before its ABOR.
UPLOAD_BEFORE_ABOR = 1024 * 1024

FORMS = {
    "telnet": "IAC IP, IAC DM (DM urgent), ABOR",
    "urgent": "ABOR\\r\\n, last byte urgent",
}
TYPES = ("A", "I")

TRANSFER_REPLIES = (426, 226)
ABOR_REPLIES = (225, 226)

_names = count()


# -- a raw control connection --------------------------------------------------


class ProtocolError(Exception):
    """The server said something the scenario does not allow at that step."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str
    at: float  # time.monotonic() when it was read

    def __str__(self) -> str:
        first = self.text.splitlines()[0] if self.text else ""
        return first if len(first) <= 60 else first[:57] + "..."


def expect(reply: Reply, *codes: int, step: str) -> Reply:
    if reply.code not in codes:
        raise ProtocolError(f"{step}: got {reply} (want {'/'.join(map(str, codes))})")
    return reply


class Control:
    """A control connection that reads replies with a deadline."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(TIMEOUT)
        self.sock.sendall(data)

    def command(self, line: str, *codes: int) -> Reply:
        self.send(line.encode() + b"\r\n")
        reply = self.reply()
        return expect(reply, *codes, step=line.split()[0]) if codes else reply

    def reply(self, deadline: float | None = None) -> Reply:
        """The next reply, single- or multi-line; TimeoutError past ``deadline``."""
        deadline = deadline if deadline is not None else time.monotonic() + TIMEOUT
        first = self._line(deadline)
        if not re.fullmatch(rb"\d{3}([ -].*)?", first, re.DOTALL):
            raise ProtocolError(f"not a reply line: {first!r}")
        lines = [first]
        if first[3:4] == b"-":
            while not (lines[-1][:3] == first[:3] and lines[-1][3:4] == b" "):
                lines.append(self._line(deadline))
        text = b"\n".join(lines).decode("utf-8", "replace")
        return Reply(int(first[:3]), text, time.monotonic())

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the control connection closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    password: str


def login(endpoint: Endpoint) -> Control:
    ctl = Control(endpoint.host, endpoint.port)
    try:
        expect(ctl.reply(), 220, step="greeting")
        if ctl.command(f"USER {endpoint.user}").code == 331:
            ctl.command(f"PASS {endpoint.password}", 230)
    except BaseException:
        ctl.close()
        raise
    return ctl


def open_passive(ctl: Control) -> socket.socket:
    """PASV, and connect to the address and port its 227 names."""
    reply = ctl.command("PASV", 227)
    numbers = re.search(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", reply.text)
    if numbers is None:
        raise ProtocolError(f"PASV: no address in {reply}")
    parts = [int(n) for n in numbers.groups()]
    return socket.create_connection((".".join(map(str, parts[:4])), parts[4] * 256 + parts[5]), timeout=TIMEOUT)


def read_to_eof(data: socket.socket) -> bytes:
    data.settimeout(TIMEOUT)
    received = bytearray()
    while chunk := data.recv(1 << 20):
        received += chunk
    return bytes(received)


def send_abor(ctl: Control, form: str) -> None:
    assert form in FORMS, form
    ctl.sock.settimeout(TIMEOUT)
    if form == "telnet":
        ctl.sock.sendall(b"\xff\xf4\xff")  # IAC IP, IAC
        ctl.sock.send(b"\xf2", socket.MSG_OOB)  # DM, as urgent data
        ctl.sock.sendall(b"ABOR\r\n")
    else:
        ctl.sock.sendall(b"ABOR\r\n", socket.MSG_OOB)  # as ftplib.abort(): last byte urgent


def fetch_small(ctl: Control, expected: bytes) -> None:
    """A whole RETR of a small file, sha256-checked: the session still works."""
    ctl.command("TYPE I", 200)
    with open_passive(ctl) as data:
        ctl.send(b"RETR small.bin\r\n")
        expect(ctl.reply(), 150, 125, step="follow-up RETR")
        received = read_to_eof(data)
    expect(ctl.reply(), 226, 250, step="follow-up RETR's end")
    if hashlib.sha256(received).digest() != hashlib.sha256(expected).digest():
        raise ProtocolError(f"follow-up RETR: {len(received)} bytes with the wrong sha256 (want {len(expected)} bytes)")


# -- the scenarios -------------------------------------------------------------


@dataclass
class AbortRun:
    """What one ABOR during a transfer brought."""

    start: float = 0.0  # time.monotonic() when the ABOR went out
    replies: list[Reply] = field(default_factory=list)
    elapsed: float | None = None  # ABOR sent -> second reply read
    noop: Reply | None = None
    error: str | None = None

    def replies_text(self) -> str:
        return ", ".join(f"{reply.code} @{reply.at - self.start:.3f}s" for reply in self.replies) or "-"

    def problems(self, wait: float = TIMEOUT) -> list[str]:
        found = []
        codes = [reply.code for reply in self.replies]
        if len(codes) >= 1 and codes[0] not in TRANSFER_REPLIES:
            found.append(f"first reply {self.replies[0]} (want 426, or 226)")
        if len(codes) >= 2 and codes[1] not in ABOR_REPLIES:
            found.append(f"second reply {self.replies[1]} (want 225 or 226)")
        if len(codes) < 2:
            found.append(f"only {len(codes)} replies within {wait:.0f} s of the ABOR")
        if self.elapsed is not None and self.elapsed >= ABOR_LIMIT:
            found.append(f"ABOR took {self.elapsed:.3f} s (limit {ABOR_LIMIT} s)")
        if self.error:
            found.append(self.error)
        elif self.noop is not None and self.noop.code != 200:
            found.append(f"NOOP got {self.noop}")
        return found


def abort_transfer(
    endpoint: Endpoint, direction: str, form: str, type_: str, small: bytes, wait: float = TIMEOUT
) -> AbortRun:
    """Start a RETR of big.bin (unread) or a STOR (after some data), ABOR it
    with the data connection still open, wait up to ``wait`` seconds for the
    two replies, then NOOP and a small RETR."""
    run = AbortRun()
    ctl = login(endpoint)
    try:
        ctl.command(f"TYPE {type_}", 200)
        with open_passive(ctl) as data:
            if direction == "RETR":
                ctl.send(b"RETR big.bin\r\n")
            else:
                ctl.send(f"STOR aborted-{next(_names)}.bin\r\n".encode())
            expect(ctl.reply(), 150, 125, step=direction)
            if direction == "STOR":
                data.settimeout(TIMEOUT)
                data.sendall(b"x" * UPLOAD_BEFORE_ABOR)
            run.start = start = time.monotonic()
            send_abor(ctl, form)
            deadline = start + wait
            try:
                while len(run.replies) < 2:
                    run.replies.append(ctl.reply(deadline))
            except (TimeoutError, ConnectionError, ProtocolError) as error:
                run.error = f"after ABOR: {error}"
                return run
            run.elapsed = run.replies[1].at - start
        # The data connection closes only now, after both replies.
        run.noop = ctl.command("NOOP")
        if run.noop.code == 200:
            fetch_small(ctl, small)
    except (TimeoutError, ConnectionError, ProtocolError, OSError) as error:
        run.error = run.error or f"{type(error).__name__}: {error}"
    finally:
        ctl.close()
    return run


@dataclass
class EofRun:
    """When the 226 came for a download the client read to EOF but kept open."""

    size: int = 0
    reply: Reply | None = None
    after_eof: float | None = None  # EOF -> 226 read
    after_close: float | None = None  # when it came only once the client closed
    error: str | None = None

    def problems(self, expected: int, wait: float = TIMEOUT) -> list[str]:
        found = []
        if self.error:
            found.append(self.error)
        if self.size != expected:
            found.append(f"read {self.size} bytes, want {expected}")
        if self.after_eof is None:
            later = (
                f"; it came {self.after_close:.3f} s after the client closed" if self.after_close is not None else ""
            )
            found.append(f"no reply within {wait:.0f} s of EOF with the data connection open{later}")
        elif self.after_eof >= EOF_REPLY_LIMIT:
            found.append(f"the reply came {self.after_eof:.3f} s after EOF (limit {EOF_REPLY_LIMIT} s)")
        if self.reply is not None and self.reply.code != 226:
            found.append(f"the reply was {self.reply} (want 226)")
        return found


def download_to_eof_then_wait(endpoint: Endpoint, expected: bytes, wait: float = TIMEOUT) -> EofRun:
    """RETR medium.bin, read it to EOF, keep the data socket open and wait up
    to ``wait`` seconds for the 226; if none comes, close it and wait again."""
    run = EofRun()
    ctl = login(endpoint)
    try:
        ctl.command("TYPE I", 200)
        data = open_passive(ctl)
        try:
            ctl.send(b"RETR medium.bin\r\n")
            expect(ctl.reply(), 150, 125, step="RETR")
            received = read_to_eof(data)
            eof = time.monotonic()
            run.size = len(received)
            if hashlib.sha256(received).digest() != hashlib.sha256(expected).digest():
                run.error = "the download has the wrong sha256"
            try:
                run.reply = ctl.reply(eof + wait)
                run.after_eof = run.reply.at - eof
            except TimeoutError:
                closed = time.monotonic()
                data.close()
                run.reply = ctl.reply(closed + TIMEOUT)
                run.after_close = run.reply.at - closed
        finally:
            data.close()
        ctl.command("NOOP", 200)
    except (TimeoutError, ConnectionError, ProtocolError, OSError) as error:
        run.error = "; ".join(filter(None, [run.error, f"{type(error).__name__}: {error}"]))
    finally:
        ctl.close()
    return run


# -- the results table, printed at the end of the run ---------------------------


@dataclass
class Row:
    path: str  # "ftpfix" or "direct"
    server: str
    scenario: str
    form: str
    type_: str
    replies: str
    seconds: float | None
    verdict: str


class Report:
    """Collects one row per case and prints them as pytest's run ends."""

    name = "ftpfix-abort-report"

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        seconds = f"{row.seconds:.3f} s" if row.seconds is not None else "-"
        print(
            f"{row.path} {row.server} {row.scenario} {row.form} TYPE {row.type_}: {row.replies}; {seconds}; "
            f"{row.verdict}"
        )

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.rows:
            return
        write = terminalreporter.write_line
        terminalreporter.section("ABOR through ftpfix and direct")
        write("time: from the first byte of ABOR to the second reply (RETR-EOF: from EOF to the 226)")
        columns = f"{'path':7} {'server':10} {'scenario':9} {'form':7} {'TYPE':4}"
        header = f"{columns} {'replies (time read)':34} {'time':>8}  result"
        write(header)
        write("-" * len(header))
        for row in sorted(self.rows, key=lambda r: (r.path != "ftpfix", r.server, r.scenario, r.form, r.type_)):
            seconds = f"{row.seconds:.3f}" if row.seconds is not None else "-"
            write(
                f"{row.path:7} {row.server:10} {row.scenario:9} {row.form:7} {row.type_:4} {row.replies:34} "
                f"{seconds:>8}  {row.verdict}"
            )
        write("")
        write(f"median ABOR time per server (limit {ABOR_LIMIT} s per case, target median <= {ABOR_TARGET} s):")
        groups: dict[tuple[str, str, str], list[float]] = {}
        for row in self.rows:
            if row.scenario in ("RETR", "STOR") and row.seconds is not None:
                groups.setdefault((row.path, row.server, row.scenario), []).append(row.seconds)
        for (path, server, scenario), times in sorted(groups.items()):
            median = statistics.median(times)
            target = "" if path == "direct" else ("  target met" if median <= ABOR_TARGET else "  target NOT met")
            write(f"  {path:7} {server:10} {scenario:5} median {median:.3f} s over {len(times)} cases{target}")


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Report:
    manager = request.config.pluginmanager
    plugin = manager.get_plugin(Report.name)
    if plugin is None:
        plugin = Report()
        manager.register(plugin, Report.name)
    return plugin


# -- servers and ftpfix ----------------------------------------------------------


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    return {"big.bin": os.urandom(BIG), "small.bin": os.urandom(SMALL), "medium.bin": os.urandom(MEDIUM)}


@pytest.fixture(scope="module", params=legacy.SERVERS)
def server(request: pytest.FixtureRequest, payloads: dict[str, bytes]) -> Iterator[legacy.LegacyServer]:
    """One real server per kind, shared by this file's cases (each uses its own session)."""
    kind = request.param
    require_servers(kind)
    # Mode 0755, not pytest's 0700: ProFTPD's nobody must reach its home.
    root = Path(tempfile.mkdtemp(prefix="ftpfix-abort-"))
    root.chmod(0o755)
    server = legacy.start(kind, root / kind)
    try:
        for name, data in payloads.items():
            legacy.put_file(server, name, data)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def proxy(server: legacy.LegacyServer, tmp_path: Path) -> Iterator[Ftpfix]:
    """A fresh ftpfix per case, so one case's leftovers cannot slow the next."""
    ftpfix = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0), backend=(server.host, server.port), public_address="127.0.0.1", ports=PORTS
        ),
    )
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


def via(proxy: Ftpfix, server: legacy.LegacyServer) -> Endpoint:
    return Endpoint(proxy.host, proxy.port, server.user, server.password)


def direct(server: legacy.LegacyServer) -> Endpoint:
    return Endpoint(server.host, server.port, server.user, server.password)


def record_abort(
    report: Report,
    path: str,
    server: legacy.LegacyServer,
    scenario: str,
    form: str,
    type_: str,
    run: AbortRun,
    problems: list[str],
) -> None:
    verdict = "ok" if not problems else "; ".join(problems)
    if path == "direct":
        verdict = f"(info) {verdict}"
    report.add(Row(path, server.kind, scenario, form, type_, run.replies_text(), run.elapsed, verdict))


# -- 1 and 2: ABOR during a download and during an upload, through ftpfix ---------


@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("form", FORMS)
def test_abor_during_a_download(
    server: legacy.LegacyServer, proxy: Ftpfix, form: str, type_: str, payloads: dict[str, bytes], report: Report
) -> None:
    """An ABOR during a RETR whose data connection the client keeps open and
    unread gets, within ABOR_LIMIT, the transfer's reply (426, or 226) and
    then ABOR's (225 or 226), in that order; then NOOP gets 200 and a new
    RETR delivers a whole file."""
    run = abort_transfer(via(proxy, server), "RETR", form, type_, payloads["small.bin"])
    problems = run.problems()
    record_abort(report, "ftpfix", server, "RETR", form, type_, run, problems)
    assert not problems, (
        f"{server.kind}, {FORMS[form]}, TYPE {type_}: {'; '.join(problems)} (replies: {run.replies_text()})"
    )


@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("form", FORMS)
def test_abor_during_an_upload(
    server: legacy.LegacyServer, proxy: Ftpfix, form: str, type_: str, payloads: dict[str, bytes], report: Report
) -> None:
    """An ABOR during a STOR, after the client sent some data and with its
    data connection still open, gets within ABOR_LIMIT the transfer's reply
    (426, or 226) and then ABOR's (225 or 226); then NOOP gets 200 and a new
    RETR delivers a whole file."""
    run = abort_transfer(via(proxy, server), "STOR", form, type_, payloads["small.bin"])
    problems = run.problems()
    record_abort(report, "ftpfix", server, "STOR", form, type_, run, problems)
    assert not problems, (
        f"{server.kind}, {FORMS[form]}, TYPE {type_}: {'; '.join(problems)} (replies: {run.replies_text()})"
    )


# -- 3: a client that waits for the 226 before it closes its data connection ----


def test_226_comes_while_the_client_keeps_the_data_connection_open(
    server: legacy.LegacyServer, proxy: Ftpfix, payloads: dict[str, bytes], report: Report
) -> None:
    """A client that reads a download to EOF and keeps its data socket open
    until the 226 arrives gets that 226 within EOF_REPLY_LIMIT of the EOF:
    ftpfix must not wait for the client to close first."""
    run = download_to_eof_then_wait(via(proxy, server), payloads["medium.bin"])
    problems = run.problems(MEDIUM)
    seconds = run.after_eof
    replies = f"{run.reply.code}" if run.reply else "-"
    if run.after_close is not None:
        replies += f" only {run.after_close:.3f}s after close"
    report.add(
        Row(
            "ftpfix", server.kind, "RETR-EOF", "-", "I", replies, seconds, "ok" if not problems else "; ".join(problems)
        )
    )
    assert not problems, f"{server.kind}: {'; '.join(problems)}"


# -- 4: what each server does on its own (informational, never fails) ----------

#: The reference runs wait out each server's silences (about 6 minutes in all)
#: and assert nothing, so they run only when asked: FTPFIX_ABOR_REFERENCE=1.
reference = pytest.mark.skipif(
    not os.environ.get("FTPFIX_ABOR_REFERENCE"),
    reason="reference measurement of the servers alone; set FTPFIX_ABOR_REFERENCE=1 to run it",
)


@pytest.mark.parametrize("type_", TYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scenario", ["RETR", "STOR"])
@reference
def test_direct_reference(
    server: legacy.LegacyServer, scenario: str, form: str, type_: str, payloads: dict[str, bytes], report: Report
) -> None:
    """Informational: the same ABOR sent straight to the server, without
    ftpfix, to record its native reply order and timing. Asserts nothing."""
    run = abort_transfer(direct(server), scenario, form, type_, payloads["small.bin"], wait=DIRECT_WAIT)
    record_abort(report, "direct", server, scenario, form, type_, run, run.problems(DIRECT_WAIT))


@reference
def test_direct_reference_226_with_the_data_connection_open(
    server: legacy.LegacyServer, payloads: dict[str, bytes], report: Report
) -> None:
    """Informational: when the server itself sends its 226 to a client that
    keeps the data connection open after EOF. Asserts nothing."""
    run = download_to_eof_then_wait(direct(server), payloads["medium.bin"], wait=DIRECT_WAIT)
    problems = run.problems(MEDIUM, DIRECT_WAIT)
    replies = f"{run.reply.code}" if run.reply else "-"
    if run.after_close is not None:
        replies += f" only {run.after_close:.3f}s after close"
    report.add(
        Row(
            "direct",
            server.kind,
            "RETR-EOF",
            "-",
            "I",
            replies,
            run.after_eof,
            "(info) " + ("ok" if not problems else "; ".join(problems)),
        )
    )
