"""Scale: many concurrent transfers through a small passive range, and many idle sessions.

    .venv/bin/python -m tests.bench.scale                 # the full run (issue 12's figures)
    .venv/bin/python -m tests.bench.scale --smoke         # small counts: correctness only
    .venv/bin/python -m tests.bench.scale --only idle     # one measure

- ``transfers``: N concurrent passive RETRs of a file through ftpfix, from
  many client addresses in 127.0.0.0/8, through a 20-port range: shared
  passive ports are what let 1,000 transfers wait on 20 ports. Every file is
  checked with sha256 as it arrives; aggregate throughput and ftpfix's CPU
  are reported.
- ``haproxy``: the same transfers through HAProxy in front of two ftpfix
  replicas, each leasing its slice of the range (``deploy/haproxy/``).
- ``idle``: N logged-in sessions that then stay idle: their setup is timed and
  ftpfix's RSS above its baseline is divided among them.

The clients are one asyncio process, not N curl processes: a thousand
processes would measure the machine's scheduler. For ``idle`` the backend
is a minimal asyncio FTP server that answers USER and PASS: vsftpd forks
two processes per session, and 10,000 of them would measure the machine
rather than ftpfix.

Descriptors: ftpfix needs two per session (client and backend). The bench
raises its soft limit to the hard one; when the hard limit cannot hold
10,000 sessions (a container without CAP_SYS_RESOURCE: ``ulimit -Hn``), it
runs as many as fit and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import legacy
from tests.harness.procstat import cpu_seconds, rss_kib
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

#: Descriptors ftpfix keeps for itself: listeners, the log, epoll, slack.
RESERVED_FDS = 64

PASV_227 = re.compile(rb"227 [^(]*\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)")


@dataclass
class Outcome:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    bytes: int = 0


def client_addresses(count: int) -> list[str]:
    """``count`` loopback addresses other than 127.0.0.1, one per client host."""
    return [f"127.0.{1 + n // 250}.{2 + n % 250}" for n in range(count)]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (multi-line ones too)."""
    line = await reader.readline()
    if len(line) >= 4 and line[3:4] == b"-":
        code = line[:3] + b" "
        while not (more := await reader.readline()).startswith(code):
            if not more:
                break
        line = more
    return line


async def retr(host: str, port: int, source: str, name: str, digest: str, timeout: float) -> tuple[int, str | None]:
    """Log in from ``source``, RETR ``name`` in passive mode, check it; (bytes, failure)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))

            async def command(text: str) -> bytes:
                writer.write(text.encode() + b"\r\n")
                return await _reply(reader)

            if not (await _reply(reader)).startswith(b"220"):
                return 0, "no 220"
            await command("USER anonymous")
            if not (answer := await command("PASS bench")).startswith(b"230"):
                return 0, f"login: {answer!r}"
            await command("TYPE I")
            answer = await command("PASV")
            if not (match := PASV_227.search(answer)):
                return 0, f"PASV: {answer.strip()!r}"
            numbers = [int(n) for n in match.groups()]
            data_host, data_port = ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]
            data_reader, data_writer = await asyncio.open_connection(data_host, data_port, local_addr=(source, 0))
            writer.write(f"RETR {name}\r\n".encode())
            hasher, size = hashlib.sha256(), 0
            while chunk := await data_reader.read(1 << 18):
                hasher.update(chunk)
                size += len(chunk)
            data_writer.close()
            preliminary = await _reply(reader)
            final = await _reply(reader) if preliminary.startswith(b"1") else preliminary
            writer.write(b"QUIT\r\n")
            if not final.startswith(b"226"):
                return size, f"RETR: {final.strip()!r}"
            if hasher.hexdigest() != digest:
                return size, "sha256 mismatch"
            return size, None
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
        return 0, f"{type(error).__name__}: {error}"
    finally:
        if writer is not None:
            writer.close()


async def many_retrs(
    host: str, port: int, sources: list[str], count: int, name: str, digest: str, timeout: float
) -> Outcome:
    results = await asyncio.gather(
        *(retr(host, port, sources[n % len(sources)], name, digest, timeout) for n in range(count))
    )
    outcome = Outcome()
    for size, failure in results:
        outcome.bytes += size
        if failure is None:
            outcome.ok += 1
        else:
            outcome.failures.append(failure)
    return outcome


async def idle_backend_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 idle bench backend\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        answer = {b"USER": b"331 password", b"PASS": b"230 logged in", b"QUIT": b"221 bye"}.get(verb, b"200 ok")
        writer.write(answer + b"\r\n")
        if verb == b"QUIT":
            break
    writer.close()


def run_idle_backend(port_file: Path) -> None:
    """The minimal backend for ``idle``, in its own process."""

    async def serve() -> None:
        server = await asyncio.start_server(idle_backend_session, "127.0.0.1", 0, backlog=4096)
        port_file.write_text(str(server.sockets[0].getsockname()[1]))
        await server.serve_forever()

    asyncio.run(serve())


async def open_idle(host: str, port: int, sources: list[str], count: int) -> list[asyncio.StreamWriter]:
    """``count`` logged-in sessions, at most 500 connecting at once."""
    gate = asyncio.Semaphore(500)

    async def one(n: int) -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(sources[n % len(sources)], 0))
            await _reply(reader)
            writer.write(b"USER anonymous\r\n")
            await _reply(reader)
            writer.write(b"PASS bench\r\n")
            if not (answer := await _reply(reader)).startswith(b"230"):
                raise RuntimeError(f"session {n}: {answer!r}")
            return writer

    return await asyncio.gather(*(one(n) for n in range(count)))


class Scale:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[tuple[str, str, str]] = []
        self.failures: list[str] = []
        self.workdir = Path(
            tempfile.mkdtemp(prefix="ftpfix-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )
        self.workdir.chmod(0o755)
        self.sources = client_addresses(args.addresses)

    def close(self) -> None:
        subprocess.run(["pkill", "-f", str(self.workdir)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def transfers(self) -> None:
        args = self.args
        server = legacy.start("vsftpd", self.workdir / "vsftpd")
        try:
            payload = os.urandom(args.size_kib << 10)
            (server.files / "file.bin").write_bytes(payload)
            digest = hashlib.sha256(payload).hexdigest()
            config = config_text(
                listen=("127.0.0.1", 0),
                backend=("127.0.0.1", server.port),
                public_address="127.0.0.1",
                ports=args.ports,
                extra="[limits]\nmax_sessions = 20000\nmax_sessions_per_ip = 20000\n",
            ).replace('level = "debug"', 'level = "info"')
            ftpfix = start_ftpfix(self.workdir / "ftpfix", config)
            try:
                self._measure_transfers("ftpfix, one process", [ftpfix], ftpfix.host, ftpfix.port, digest)
            finally:
                ftpfix.stop()
        finally:
            server.stop()

    def _measure_transfers(self, label: str, processes: list[Ftpfix], host: str, port: int, digest: str) -> None:
        args = self.args
        cpu_before = sum(cpu_seconds(p.process.pid) for p in processes)
        started = time.perf_counter()
        outcome = asyncio.run(
            many_retrs(host, port, self.sources, args.transfers, "file.bin", digest, args.transfer_timeout)
        )
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.process.pid) for p in processes) - cpu_before
        what = (
            f"{args.transfers} concurrent RETRs of {args.size_kib} KiB "
            f"from {len(self.sources)} addresses, ports {args.ports}"
        )
        print(f"{label}: {what}: {outcome.ok} intact in {elapsed:.1f} s, ftpfix CPU {cpu:.1f} s", flush=True)
        self.rows.append((f"{what} ({label})", "intact", f"{outcome.ok} / {args.transfers}"))
        self.rows.append((f"{what} ({label})", "aggregate MB/s", f"{outcome.bytes / elapsed / 1e6:.0f}"))
        self.rows.append(
            (f"{what} ({label})", "ftpfix CPU s (per GB)", f"{cpu:.1f} ({cpu / max(outcome.bytes / 1e9, 1e-9):.2f})")
        )
        if outcome.failures:
            sample = "; ".join(sorted(set(outcome.failures))[:5])
            self.failures.append(f"{label}: {len(outcome.failures)} transfers failed: {sample}")

    def idle(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        count = self.args.idle
        fits = (hard - RESERVED_FDS) // 2
        if count > fits:
            print(
                f"idle: the descriptor hard limit is {hard} (ulimit -Hn) and cannot be raised here; "
                f"{count} sessions need {2 * count + RESERVED_FDS} in ftpfix, so {fits} run",
                flush=True,
            )
            count = fits
        port_file = self.workdir / "backend.port"
        backend = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, pathlib, tests.bench.scale as s; s.run_idle_backend(pathlib.Path(sys.argv[1]))",
                str(port_file),
            ],
            cwd=Path(__file__).resolve().parent.parent.parent,
        )
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline:
                    raise RuntimeError("the idle backend did not start")
                time.sleep(0.05)
            config = config_text(
                listen=("127.0.0.1", 0),
                backend=("127.0.0.1", int(port_file.read_text())),
                public_address="127.0.0.1",
                ports=self.args.ports,
                extra="[limits]\nmax_sessions = 20000\nmax_sessions_per_ip = 20000\n",
            ).replace('level = "debug"', 'level = "info"')
            ftpfix = start_ftpfix(self.workdir / "ftpfix-idle", config)
            try:
                time.sleep(1)
                baseline = rss_kib(ftpfix.process.pid)

                async def hold() -> int:
                    writers = await open_idle(ftpfix.host, ftpfix.port, self.sources, count)
                    await asyncio.sleep(2)
                    grown = rss_kib(ftpfix.process.pid) - baseline
                    for writer in writers:
                        writer.close()
                    return grown

                setup_started = time.perf_counter()
                grown = asyncio.run(hold())
                setup = time.perf_counter() - setup_started - 2
                per_session = grown / count
                print(
                    f"idle: {count} sessions set up in {setup:.1f} s ({count / setup:.0f}/s), "
                    f"{per_session:.1f} KiB RSS each above baseline",
                    flush=True,
                )
                self.rows.append(
                    (f"{count} idle logged-in sessions", "set up in s (per s)", f"{setup:.1f} ({count / setup:.0f})")
                )
                self.rows.append(
                    (
                        f"{count} idle logged-in sessions",
                        "KiB RSS each above baseline (target <= 30)",
                        f"{per_session:.1f}",
                    )
                )
                if per_session > 30 and not self.args.smoke:
                    self.failures.append(f"idle: {per_session:.1f} KiB per session, more than 30")
            finally:
                ftpfix.stop()
        finally:
            backend.terminate()
            backend.wait(10)

    def table(self) -> str:
        lines = ["| measure | unit | value |", "| --- | --- | --- |"]
        lines += [f"| {metric} | {unit} | {value} |" for metric, unit, value in self.rows]
        return "\n".join(lines)


MEASURES = {"transfers": "transfers", "idle": "idle"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small counts; check correctness, not scale")
    parser.add_argument("--transfers", type=int, default=1000)
    parser.add_argument("--size-kib", type=int, default=4096)
    parser.add_argument("--addresses", type=int, default=50)
    parser.add_argument("--ports", default="22400-22419")
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument("--transfer-timeout", type=float, default=600.0)
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated, of {', '.join(MEASURES)}")
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(MEASURES):
        parser.error(f"unknown measures: {', '.join(sorted(unknown))}")
    if args.smoke:
        args.transfers, args.size_kib, args.addresses, args.ports, args.idle = 60, 256, 6, "22400-22403", 300
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ftpfix inherits it
    scale = Scale(args)
    try:
        for name in chosen:
            getattr(scale, MEASURES[name])()
    finally:
        scale.close()
    print()
    print(f"{time.strftime('%Y-%m-%d')}, python -m tests.bench.scale{' --smoke' if args.smoke else ''}:")
    print(scale.table())
    for failure in scale.failures:
        print(f"FAILED: {failure}")
    return 1 if scale.failures else 0


if __name__ == "__main__":
    sys.exit(main())
