"""Benchmark ftpfix against a direct connection and against ProFTPD's mod_proxy.

    .venv/bin/python -m tests.bench.bench            # the full run (a few minutes)
    .venv/bin/python -m tests.bench.bench --smoke    # small sizes, checks correctness only
    .venv/bin/python -m tests.bench.bench --only latency,setup   # some measures only

It starts a real vsftpd on loopback, ftpfix in front of it, and ProFTPD 1.3.8
with mod_proxy in reverse mode in front of the same vsftpd, then measures each
path in the same run, so that only ratios matter: these machines are shared
and their absolute speed varies from run to run. Files live in /dev/shm, so
the disk is not what is measured. Transfers use curl, a C client, so the
client is not the bottleneck.
"""

from __future__ import annotations

import argparse
import ftplib
import hashlib
import math
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import legacy
from tests.harness.clients import sha256
from tests.harness.procstat import cpu_seconds, rss_kib
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix


@dataclass
class Endpoint:
    name: str
    port: int

    def url(self, path: str) -> str:
        return f"ftp://anonymous:bench@127.0.0.1:{self.port}/{path}"


def start_mod_proxy(workdir: Path, backend_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """ProFTPD with mod_proxy in reverse mode in front of ``backend_port``."""
    workdir.mkdir(parents=True)
    tables = workdir / "tables"
    tables.mkdir()
    tables.chmod(0o777)
    port = legacy.free_port()
    module_dir = legacy.package_root(legacy.MOD_PROXY[0]) / Path(legacy.MOD_PROXY[1]).parent
    extra = f"""\
MaxInstances 5000
ModulePath {module_dir}
LoadModule mod_proxy.c
<IfModule mod_proxy.c>
  ProxyEngine on
  ProxyRole reverse
  ProxyTables {tables}
  ProxyReverseServers ftp://127.0.0.1:{backend_port}
  ProxyDataTransferPolicy PASV
</IfModule>
"""
    config = legacy.proftpd_config(workdir, "127.0.0.1", port, None, extra).replace("MaxInstances 500\n", "")
    (workdir / "proxy.conf").write_text(config)
    # mod_proxy needs OpenSSL symbols that the core binary does not link.
    env = {**os.environ, "LD_PRELOAD": "libssl.so.3:libcrypto.so.3"}
    log = (workdir / "proxy.log").open("ab")
    process = subprocess.Popen(
        [str(legacy.binary("proftpd")), "--nodaemon", "-c", str(workdir / "proxy.conf")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    legacy.wait_for_banner("127.0.0.1", port, process=process)
    return process, port


def curl(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--disable-epsv", *args], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - started, result.stdout


def best_of(runs: int, measure) -> float:
    return statistics.median(measure() for _ in range(runs))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[tuple[str, str, float, float, float | None, str, bool | None]] = []
        self.failures: list[str] = []

    def setup(self) -> None:
        self.workdir = Path(
            tempfile.mkdtemp(prefix="ftpfix-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )
        self.workdir.chmod(0o755)
        self.server = legacy.start("vsftpd", self.workdir / "vsftpd")
        size = self.args.size_mib << 20
        self.big = self.server.files / "big.bin"
        _write_random(self.big, size)
        self.big_digest = sha256(self.big)
        self.medium = self.server.files / "medium.bin"
        _write_random(self.medium, self.args.concurrent_mib << 20)
        self.medium_digest = sha256(self.medium)
        self.upload_source = self.workdir / "upload-source.bin"
        shutil.copyfile(self.big, self.upload_source)
        config = config_text(
            listen=("127.0.0.1", 0),
            backend=("127.0.0.1", self.server.port),
            public_address="127.0.0.1",
            ports="22000-22299",
            extra="[limits]\nmax_sessions = 10000\nmax_sessions_per_ip = 10000\n",
        ).replace('level = "debug"', 'level = "info"')
        self.ftpfix: Ftpfix = start_ftpfix(self.workdir / "ftpfix", config)
        self.mod_proxy, mod_proxy_port = start_mod_proxy(self.workdir / "mod_proxy", self.server.port)
        self.endpoints = [
            Endpoint("direct", self.server.port),
            Endpoint("ftpfix", self.ftpfix.port),
            Endpoint("mod_proxy", mod_proxy_port),
        ]

    def teardown(self) -> None:
        self.ftpfix.stop()
        self.mod_proxy.terminate()
        self.mod_proxy.wait(10)
        self.server.stop()
        subprocess.run(["pkill", "-f", str(self.workdir)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def record(
        self,
        metric: str,
        unit: str,
        values: dict[str, float],
        target: str,
        met: bool | None,
        higher_is_better: bool = True,
    ) -> None:
        direct, ftpfix, mod_proxy = values["direct"], values["ftpfix"], values.get("mod_proxy")
        self.rows.append((metric, unit, direct, ftpfix, mod_proxy, target, met))
        print(f"{metric}: {values}  target {target}: {'met' if met else 'MISSED' if met is False else '-'}", flush=True)

    # -- the measurements -------------------------------------------------

    def transfers(self) -> None:
        size = self.big.stat().st_size
        runs = 1 if self.args.smoke else 3
        for direction in ("RETR", "STOR"):
            speeds: dict[str, float] = {}
            cpu_per_gb = 0.0
            for endpoint in self.endpoints:
                timings = []
                for run in range(runs):
                    before = cpu_seconds(self.ftpfix.process.pid)
                    if direction == "RETR":
                        out = self.workdir / "retr.bin" if self.args.smoke else Path("/dev/null")
                        elapsed, _ = curl(["-o", str(out), endpoint.url("big.bin")])
                        if self.args.smoke:
                            self.check(out, self.big_digest, f"{endpoint.name} RETR")
                    else:
                        name = f"up-{endpoint.name}-{run}.bin"
                        elapsed, _ = curl(["-T", str(self.upload_source), endpoint.url(name)])
                        self.check(self.server.files / name, self.big_digest, f"{endpoint.name} STOR")
                        (self.server.files / name).unlink()
                    timings.append(elapsed)
                    if endpoint.name == "ftpfix":
                        cpu_per_gb = max(cpu_per_gb, (cpu_seconds(self.ftpfix.process.pid) - before) / (size / 1e9))
                speeds[endpoint.name] = size / statistics.median(timings) / 1e6
            ratio_direct = speeds["ftpfix"] / speeds["direct"]
            ratio_peer = speeds["ftpfix"] / speeds["mod_proxy"]
            self.record(
                f"1 transfer of {self.args.size_mib} MiB, {direction}",
                "MB/s",
                speeds,
                ">= 0.75x direct, >= 1.3x mod_proxy",
                ratio_direct >= 0.75 and ratio_peer >= 1.3,
            )
            self.rows.append(
                (f"relay CPU, {direction}", "CPU s/GB", float("nan"), cpu_per_gb, None, "<= 1.0", cpu_per_gb <= 1.0)
            )
            print(f"relay CPU {direction}: {cpu_per_gb:.2f} CPU-s/GB", flush=True)

    def concurrent(self) -> None:
        count, size = self.args.concurrent, self.medium.stat().st_size
        speeds = {}
        for endpoint in self.endpoints:
            started = time.perf_counter()
            outputs = [
                self.workdir / f"c-{endpoint.name}-{n}.bin" if self.args.smoke else Path("/dev/null")
                for n in range(count)
            ]
            processes = [
                subprocess.Popen(
                    [
                        "curl",
                        "--silent",
                        "--disable-epsv",
                        "-o",
                        str(out),
                        "-w",
                        "%{size_download}",
                        endpoint.url("medium.bin"),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for out in outputs
            ]
            sizes = [int(process.communicate()[0] or 0) for process in processes]
            elapsed = time.perf_counter() - started
            if any(process.returncode for process in processes) or any(got != size for got in sizes):
                self.failures.append(f"{endpoint.name}: concurrent RETRs incomplete: {sorted(set(sizes))}")
            if self.args.smoke:
                for out in outputs:
                    self.check(out, self.medium_digest, f"{endpoint.name} concurrent RETR")
                    out.unlink()
            speeds[endpoint.name] = count * size / elapsed / 1e6
        self.record(
            f"{count} concurrent RETRs of {self.args.concurrent_mib} MiB, aggregate",
            "MB/s",
            speeds,
            ">= 0.7x direct",
            speeds["ftpfix"] / speeds["direct"] >= 0.7,
        )

    def idle_sessions(self) -> None:
        count = self.args.idle
        pid = self.ftpfix.process.pid
        baseline = rss_kib(pid)
        sessions = []
        for _ in range(count):
            ftp = ftplib.FTP(timeout=30)
            ftp.connect("127.0.0.1", self.ftpfix.port)
            ftp.login("anonymous", "bench")
            sessions.append(ftp)
        time.sleep(1)
        per_session = (rss_kib(pid) - baseline) / count
        for ftp in sessions:
            ftp.close()
        self.rows.append(
            (
                f"{count} idle logged-in sessions",
                "KiB RSS per session",
                float("nan"),
                per_session,
                None,
                "<= 30",
                per_session <= 30,
            )
        )
        print(f"idle sessions: {per_session:.1f} KiB each", flush=True)

    def latency(self) -> None:
        medians = {}
        rounds = 200 if self.args.smoke else 2000
        for endpoint in self.endpoints:
            ftp = ftplib.FTP(timeout=30)
            ftp.connect("127.0.0.1", endpoint.port)
            ftp.login("anonymous", "bench")
            ftp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                ftp.voidcmd("NOOP")
                samples.append(time.perf_counter() - started)
            ftp.quit()
            medians[endpoint.name] = statistics.median(samples) * 1000
        added = medians["ftpfix"] - medians["direct"]
        self.record(
            "NOOP round trip, median", "ms", medians, "<= direct + 0.3 ms", added <= 0.3, higher_is_better=False
        )

    def setup_rate(self) -> None:
        rates = {}
        count = 50 if self.args.smoke else 400
        for endpoint in self.endpoints:
            started = time.perf_counter()
            for _ in range(count):
                ftp = ftplib.FTP(timeout=30)
                ftp.connect("127.0.0.1", endpoint.port)
                ftp.login("anonymous", "bench")
                ftp.quit()
            rates[endpoint.name] = count / (time.perf_counter() - started)
        self.record(
            "session setup (connect, USER, PASS, QUIT)",
            "per s",
            rates,
            ">= 0.7x direct",
            rates["ftpfix"] / rates["direct"] >= 0.7,
        )

    def check(self, path: Path, digest: str, what: str) -> None:
        if sha256(path) != digest:
            self.failures.append(f"{what}: sha256 mismatch")

    def table(self) -> str:
        lines = [
            "| measure | unit | direct | ftpfix | mod_proxy | ftpfix / direct | ftpfix / mod_proxy | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for metric, unit, direct, ftpfix, mod_proxy, target, met in self.rows:
            has_direct = not math.isnan(direct)
            lines.append(
                f"| {metric} | {unit} | {_fmt(direct) if has_direct else ''} | {_fmt(ftpfix)} | "
                f"{_fmt(mod_proxy) if mod_proxy else ''} | "
                f"{f'{ftpfix / direct:.2f}x' if has_direct else ''} | "
                f"{f'{ftpfix / mod_proxy:.2f}x' if mod_proxy else ''} | {target} | "
                f"{'yes' if met else 'no' if met is False else ''} |"
            )
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.0f}"


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as file:
        block = os.urandom(1 << 20)
        for offset in range(0, size, len(block)):
            # Vary each block so no layer can deduplicate or compress.
            file.write(hashlib.sha256(offset.to_bytes(8, "big")).digest() + block[32 : min(len(block), size - offset)])
    os.chown(path, legacy.NOBODY_UID, legacy.NOBODY_GID)


#: What ``--only`` may name, and the method that measures it, in run order.
MEASURES = {
    "transfers": "transfers",
    "concurrent": "concurrent",
    "latency": "latency",
    "setup": "setup_rate",
    "idle": "idle_sessions",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes; check correctness, not speed")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--concurrent-mib", type=int, default=64)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument(
        "--only", default=",".join(MEASURES), help=f"comma-separated measures to run, of {', '.join(MEASURES)}"
    )
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(MEASURES):
        parser.error(f"unknown measures: {', '.join(sorted(unknown))}")
    if args.smoke:
        args.size_mib, args.concurrent, args.concurrent_mib, args.idle = 8, 4, 2, 20
    # Thousands of sessions need thousands of descriptors, here and in ftpfix.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    bench = Bench(args)
    bench.setup()
    try:
        for name in chosen:
            getattr(bench, MEASURES[name])()
    finally:
        bench.teardown()
    print()
    print(f"{time.strftime('%Y-%m-%d')}, python -m tests.bench.bench{' --smoke' if args.smoke else ''}:")
    print(bench.table())
    for failure in bench.failures:
        print(f"FAILED: {failure}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
