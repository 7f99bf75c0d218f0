"""Benchmark FTPS: ftpfix terminating TLS, against vsftpd's own FTPS and
against ProFTPD mod_proxy + mod_tls terminating TLS.

    .venv/bin/python -m tests.bench.ftps             # 1 GiB each way, 5 runs per point
    .venv/bin/python -m tests.bench.ftps --smoke     # 8 MiB, checks sha256 only
    .venv/bin/python -m tests.bench.ftps --only handshakes --handshake-seconds 10

Three ways to reach the same files over FTPS with ``PROT P``, in one run:

- ``direct``: vsftpd with ``ssl_enable=YES`` (and ``require_ssl_reuse``), the
  legacy server doing TLS itself;
- ``ftpfix``: ftpfix with TLS towards the client, plain FTP to a plain vsftpd
  that serves the same folder;
- ``mod_proxy``: ProFTPD 1.3.8 with mod_proxy in reverse mode and mod_tls on
  its front, plain to the same plain vsftpd.

Every path gets the same client, curl (C, OpenSSL), with ``--ssl-reqd`` and
the test CA, so every data connection is TLS and resumes the control
session. The certificate (ECDSA P-256, from trustme) is made at run time and
shared by all three. The transfer points run interleaved (direct, ftpfix,
mod_proxy, then again) so that the machine's changing load hits all three
alike; the table shows medians. Files live in /dev/shm.

The handshake rate opens many control connections in parallel (connect, 220,
AUTH TLS, 234, a full TLS handshake, QUIT inside TLS, 221) for a few seconds
and counts those that finish; the client (Python threads in two processes,
their handshakes in OpenSSL) shares the CPUs with the server under test, but
costs the same for each target, so the ratio is what to read.

Relay CPU is what the terminating process used per GB moved: ftpfix's own
process; for mod_proxy and direct vsftpd the listener with the per-session
processes it has reaped. The whole path adds curl and the plain vsftpd
behind ftpfix and mod_proxy: the machine is shared and its load changes
from second to second, so MB/s vary widely from run to run, while CPU
seconds per GB barely do; when the CPUs are all busy, throughput follows
the inverse of the whole path's CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.bench import _fmt, _write_random
from tests.harness import legacy
from tests.harness.clients import sha256
from tests.harness.ftps import Certificates, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

#: Where mod_tls comes from: Debian's proftpd-mod-crypto (tests/install-servers).
MOD_TLS = ("proftpd-mod-crypto", "usr/lib/proftpd/mod_tls.so")

TARGETS = ("direct", "ftpfix", "mod_proxy")


@dataclass
class Target:
    name: str
    port: int
    pid: int  # the process whose CPU time (with its reaped children) is the relay's
    cipher: str = "?"
    retr: list[float] = field(default_factory=list)  # MB/s per run
    stor: list[float] = field(default_factory=list)
    retr_cpu: list[float] = field(default_factory=list)  # CPU s/GB per run, the TLS end
    stor_cpu: list[float] = field(default_factory=list)
    retr_path: list[float] = field(default_factory=list)  # CPU s/GB per run, client + TLS end + backend
    stor_path: list[float] = field(default_factory=list)
    handshakes: float = 0.0


def cpu_with_children(pid: int) -> float:
    """User and system time of ``pid`` and of the children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def start_vsftpd_tls(workdir: Path, plain: legacy.LegacyServer, certs: Certificates) -> subprocess.Popen[bytes]:
    """A second vsftpd, FTPS only, serving the plain one's folder: the direct
    path. Its config is the harness's plain one plus TLS, as an admin who
    turns on vsftpd's own FTPS would write it (Debian's defaults: require_ssl_reuse)."""
    workdir.mkdir(parents=True)
    port = legacy.free_port()
    config = (plain.workdir / "vsftpd.conf").read_text().replace(f"listen_port={plain.port}", f"listen_port={port}")
    config += "\n".join(
        [
            "ssl_enable=YES",
            f"rsa_cert_file={certs.certificate}",
            f"rsa_private_key_file={certs.key}",
            "allow_anon_ssl=YES",
            "force_anon_logins_ssl=YES",
            "force_anon_data_ssl=YES",
            "require_ssl_reuse=YES",
            "ssl_sslv2=NO",
            "ssl_sslv3=NO",
            "ssl_tlsv1=YES",
            "ssl_ciphers=HIGH",
            "",
        ]
    )
    (workdir / "vsftpd.conf").write_text(config)
    process = subprocess.Popen(
        [str(legacy.binary("vsftpd")), str(workdir / "vsftpd.conf")],
        stdout=(workdir / "vsftpd.log").open("ab"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    legacy.wait_for_banner("127.0.0.1", port, process=process)
    process.port = port  # type: ignore[attr-defined]
    return process


def start_mod_proxy_tls(workdir: Path, backend_port: int, certs: Certificates) -> tuple[subprocess.Popen[bytes], int]:
    """ProFTPD, mod_proxy in reverse mode to ``backend_port`` (plain), mod_tls
    on the client side: TLS required, data connections protected and bound
    to the control session (mod_tls's default, as vsftpd's)."""
    workdir.mkdir(parents=True)
    tables = workdir / "tables"
    tables.mkdir()
    tables.chmod(0o777)
    # ModulePath takes one folder: link both modules into one.
    modules = workdir / "modules"
    modules.mkdir()
    for package, path in (legacy.MOD_PROXY, MOD_TLS):
        (modules / Path(path).name).symlink_to(legacy.package_root(package) / path)
    port = legacy.free_port()
    extra = f"""\
MaxInstances 5000
ModulePath {modules}
LoadModule mod_tls.c
LoadModule mod_proxy.c
<IfModule mod_tls.c>
  TLSEngine on
  TLSRequired on
  TLSProtocol TLSv1.2 TLSv1.3
  TLSECCertificateFile {certs.certificate}
  TLSECCertificateKeyFile {certs.key}
  TLSVerifyClient off
  TLSRenegotiate none
</IfModule>
<IfModule mod_proxy.c>
  ProxyEngine on
  ProxyRole reverse
  ProxyTables {tables}
  ProxyReverseServers ftp://127.0.0.1:{backend_port}
  ProxyDataTransferPolicy PASV
  ProxyTLSEngine off
</IfModule>
"""
    config = legacy.proftpd_config(workdir, "127.0.0.1", port, None, extra).replace("MaxInstances 500\n", "")
    (workdir / "proxy.conf").write_text(config)
    # mod_proxy and mod_tls need OpenSSL symbols the core binary does not link.
    env = {**os.environ, "LD_PRELOAD": "libssl.so.3:libcrypto.so.3"}
    process = subprocess.Popen(
        [str(legacy.binary("proftpd")), "--nodaemon", "-c", str(workdir / "proxy.conf")],
        stdout=(workdir / "proxy.log").open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    legacy.wait_for_banner("127.0.0.1", port, process=process)
    return process, port


# -- the client -----------------------------------------------------------


def curl(target: Target, certs: Certificates, args: list[str]) -> tuple[float, str, str]:
    """One curl FTPS transfer; (seconds, stdout, stderr). Raises if it fails."""
    argv = ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(certs.ca), "--disable-epsv"]
    argv += ["--user", "anonymous:bench", "--max-time", "600", *args]
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{target.name}: curl {' '.join(args)} failed: {result.stderr.strip()}")
    return elapsed, result.stdout, result.stderr


def _handshake_worker(port: int, ca: str, seconds: float, threads: int, results: multiprocessing.Queue) -> None:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    deadline = time.monotonic() + seconds
    counts = [0] * threads
    errors: list[str] = []

    def reply(stream, buffer: bytearray) -> bytes:  # type: ignore[no-untyped-def]
        while b"\r\n" not in buffer:
            chunk = stream.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {bytes(buffer)!r}")
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\r\n")
        buffer[:] = rest
        return line

    def loop(index: int) -> None:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    buffer = bytearray()
                    # Banners may span lines (220-...); read up to the final one.
                    while not (line := reply(raw, buffer)).startswith(b"220 "):
                        pass
                    raw.sendall(b"AUTH TLS\r\n")
                    if not (line := reply(raw, buffer)).startswith(b"234"):
                        raise ConnectionError(f"AUTH TLS: {line!r}")
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(b"QUIT\r\n")
                        buffer.clear()
                        if not (line := reply(tls, buffer)).startswith(b"221"):
                            raise ConnectionError(f"QUIT: {line!r}")
                counts[index] += 1
            except (OSError, ConnectionError) as error:
                if len(errors) < 5:
                    errors.append(str(error))

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put((sum(counts), errors))


def handshake_rate(port: int, certs: Certificates, seconds: float, processes: int, threads: int) -> tuple[float, list]:
    """Control-port TLS sessions completed per second, ``processes`` x ``threads`` at a time."""
    results: multiprocessing.Queue = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_handshake_worker, args=(port, str(certs.ca), seconds, threads, results))
        for _ in range(processes)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    outcomes = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    errors = [error for _, found in outcomes for error in found]
    return sum(count for count, _ in outcomes) / elapsed, errors


# -- the bench ------------------------------------------------------------


class FtpsBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.failures: list[str] = []
        self.notes: list[str] = []

    def setup(self) -> None:
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.workdir = Path(tempfile.mkdtemp(prefix="ftpfix-ftps-bench-", dir=base))
        self.workdir.chmod(0o755)
        self.certs = make_certificates(self.workdir / "certs")
        for path in (self.certs.certificate, self.certs.key):
            path.chmod(0o644)  # ProFTPD reads them after dropping to nobody on reload; harmless here
        self.server = legacy.start("vsftpd", self.workdir / "vsftpd")
        self.big = self.server.files / "big.bin"
        _write_random(self.big, self.args.size_mib << 20)
        self.big_digest = sha256(self.big)
        self.upload_source = self.workdir / "upload-source.bin"
        shutil.copyfile(self.big, self.upload_source)
        self.direct = start_vsftpd_tls(self.workdir / "vsftpd-tls", self.server, self.certs)
        config = config_text(
            listen=("127.0.0.1", 0),
            backend=("127.0.0.1", self.server.port),
            public_address="127.0.0.1",
            ports="22300-22599",
            extra="[limits]\nmax_sessions = 10000\nmax_sessions_per_ip = 10000\n" + tls_section(self.certs),
        ).replace('level = "debug"', 'level = "info"')
        self.ftpfix: Ftpfix = start_ftpfix(self.workdir / "ftpfix", config)
        self.mod_proxy, mod_proxy_port = start_mod_proxy_tls(self.workdir / "mod_proxy", self.server.port, self.certs)
        self.targets = [
            Target("direct", self.direct.port, self.direct.pid),  # type: ignore[attr-defined]
            Target("ftpfix", self.ftpfix.port, self.ftpfix.process.pid),
            Target("mod_proxy", mod_proxy_port, self.mod_proxy.pid),
        ]

    def teardown(self) -> None:
        self.ftpfix.stop()
        for process in (self.mod_proxy, self.direct):
            process.terminate()
            process.wait(10)
        self.server.stop()
        subprocess.run(["pkill", "-f", str(self.workdir)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def url(self, target: Target, name: str) -> str:
        return f"ftp://127.0.0.1:{target.port}/{name}"

    def transfers(self) -> None:
        size = self.big.stat().st_size
        for run in range(self.args.runs):
            for target in self.targets:
                self._retr(target, size, run)
                self._stor(target, size, run)

    def _measure(self, target: Target, action) -> tuple[float, float, float, str, str]:  # type: ignore[no-untyped-def]
        """(seconds, CPU of the TLS end, CPU of the whole path, curl's stdout, stderr).

        The whole path is curl (reaped by this process), the TLS end, and the
        plain vsftpd behind ftpfix and mod_proxy: on a machine whose CPUs are
        all busy, throughput follows the inverse of it, whatever else runs.
        """
        before = cpu_with_children(target.pid)
        backend_before = cpu_with_children(self.server.process.pid)
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        elapsed, out, err = action()
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        time.sleep(0.3)  # the per-session processes of vsftpd and ProFTPD exit and are reaped
        end = cpu_with_children(target.pid) - before
        client = (client_after.ru_utime - client_before.ru_utime) + (client_after.ru_stime - client_before.ru_stime)
        backend = cpu_with_children(self.server.process.pid) - backend_before
        return elapsed, end, end + client + backend, out, err

    def _retr(self, target: Target, size: int, run: int) -> None:
        out = self.workdir / "retr.bin" if self.args.smoke else Path("/dev/null")
        args = ["-w", "%{size_download}", "-o", str(out), self.url(target, "big.bin")]
        if run == 0:
            args = ["-v", *args]
        elapsed, cpu, path, stdout, stderr = self._measure(target, lambda: curl(target, self.certs, args))
        if run == 0:
            target.cipher = next(
                (line.split("using ", 1)[1] for line in stderr.splitlines() if "SSL connection using" in line), "?"
            )
        if int(stdout or 0) != size:
            self.failures.append(f"{target.name} RETR: {stdout} bytes, not {size}")
        if self.args.smoke:
            if sha256(out) != self.big_digest:
                self.failures.append(f"{target.name} RETR: sha256 mismatch")
            out.unlink()
        target.retr.append(size / elapsed / 1e6)
        target.retr_cpu.append(cpu / (size / 1e9))
        target.retr_path.append(path / (size / 1e9))
        print(
            f"run {run} {target.name} RETR {size / elapsed / 1e6:.0f} MB/s, {cpu / (size / 1e9):.2f} CPU-s/GB",
            flush=True,
        )

    def _stor(self, target: Target, size: int, run: int) -> None:
        name = f"up-{target.name}-{run}.bin"
        args = ["-T", str(self.upload_source), self.url(target, name)]
        elapsed, cpu, path, _, _ = self._measure(target, lambda: curl(target, self.certs, args))
        stored = self.server.files / name
        if not stored.exists() or sha256(stored) != self.big_digest:
            self.failures.append(f"{target.name} STOR: the stored file differs")
        stored.unlink(missing_ok=True)
        target.stor.append(size / elapsed / 1e6)
        target.stor_cpu.append(cpu / (size / 1e9))
        target.stor_path.append(path / (size / 1e9))
        print(
            f"run {run} {target.name} STOR {size / elapsed / 1e6:.0f} MB/s, {cpu / (size / 1e9):.2f} CPU-s/GB",
            flush=True,
        )

    def handshakes(self) -> None:
        for target in self.targets:
            rates = []
            for _ in range(self.args.runs):
                rate, errors = handshake_rate(
                    target.port, self.certs, self.args.handshake_seconds, processes=2, threads=self.args.threads
                )
                rates.append(rate)
                if errors and target.name == "ftpfix":
                    self.failures.append(f"{target.name} handshakes: {errors[:3]}")
                elif errors:
                    # A peer's own failures are measured, not ftpfix's fault
                    # (mod_proxy drops a session now and then under the burst).
                    self.notes.append(f"{target.name} handshakes: {len(errors)}+ failed, e.g. {errors[:2]}")
                print(f"{target.name} handshakes {rate:.0f}/s", flush=True)
            target.handshakes = statistics.median(rates)

    def table(self) -> str:
        by = {target.name: target for target in self.targets}
        rows = [
            (
                "| measure | direct FTPS (vsftpd) | ftpfix | mod_proxy + mod_tls | ftpfix / direct "
                "| ftpfix / mod_proxy | target | met |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        med = statistics.median
        for verb in ("retr", "stor"):
            speeds = {name: med(getattr(target, verb)) for name, target in by.items() if getattr(target, verb)}
            if len(speeds) < 3:
                continue
            direct_ratio, peer_ratio = speeds["ftpfix"] / speeds["direct"], speeds["ftpfix"] / speeds["mod_proxy"]
            met = direct_ratio >= 0.5 and peer_ratio >= 1.3
            rows.append(
                f"| {verb.upper()} {self.args.size_mib} MiB, PROT P, MB/s (median of {len(by['ftpfix'].retr)}) | "
                f"{_fmt(speeds['direct'])} | {_fmt(speeds['ftpfix'])} | {_fmt(speeds['mod_proxy'])} | "
                f"{direct_ratio:.2f}x | {peer_ratio:.2f}x | >= 0.5x direct, >= 1.3x mod_proxy | "
                f"{'yes' if met else 'no'} |"
            )
            cpus = {name: med(getattr(target, f"{verb}_cpu")) for name, target in by.items()}
            rows.append(
                f"| {verb.upper()} CPU s/GB of the TLS end (median) | {cpus['direct']:.2f} | {cpus['ftpfix']:.2f} | "
                f"{cpus['mod_proxy']:.2f} | {_ratio(cpus['ftpfix'], cpus['direct'])} | "
                f"{_ratio(cpus['ftpfix'], cpus['mod_proxy'])} | reported | |"
            )
            paths = {name: med(getattr(target, f"{verb}_path")) for name, target in by.items()}
            rows.append(
                f"| {verb.upper()} CPU s/GB of the whole path: curl + TLS end + plain vsftpd (median) | "
                f"{paths['direct']:.2f} | {paths['ftpfix']:.2f} | {paths['mod_proxy']:.2f} | "
                f"{_ratio(paths['ftpfix'], paths['direct'])} | {_ratio(paths['ftpfix'], paths['mod_proxy'])} | "
                "reported | |"
            )
        if all(target.handshakes for target in self.targets):
            rates = {name: target.handshakes for name, target in by.items()}
            rows.append(
                f"| control-port TLS sessions/s (AUTH TLS, handshake, QUIT; {2 * self.args.threads} at once) | "
                f"{rates['direct']:.0f} | {rates['ftpfix']:.0f} | {rates['mod_proxy']:.0f} | "
                f"{rates['ftpfix'] / rates['direct']:.2f}x | {rates['ftpfix'] / rates['mod_proxy']:.2f}x | reported | |"
            )
        ciphers = ", ".join(f"{target.name}: {target.cipher}" for target in self.targets)
        return "\n".join(rows) + f"\n\nNegotiated (curl -v, first RETR): {ciphers}"


def _ratio(value: float, base: float) -> str:
    # CPU time comes in clock ticks (10 ms): at --smoke sizes a path may show none.
    return f"{value / base:.2f}x" if base else ""


MEASURES = {"transfers": "transfers", "handshakes": "handshakes"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="8 MiB, one run, short handshake burst; checks correctness"
    )
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5, help="runs per point; the table shows the median")
    parser.add_argument("--handshake-seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8, help="client threads per process (two processes)")
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated, of {', '.join(MEASURES)}")
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(MEASURES):
        parser.error(f"unknown measures: {', '.join(sorted(unknown))}")
    if args.smoke:
        args.size_mib, args.runs, args.handshake_seconds, args.threads = 8, 1, 1.0, 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    load = os.getloadavg()
    bench = FtpsBench(args)
    bench.setup()
    try:
        for name in chosen:
            getattr(bench, MEASURES[name])()
    finally:
        bench.teardown()
    print()
    command = " ".join(["python -m tests.bench.ftps", *(argv if argv is not None else sys.argv[1:])])
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {command}, load average at start {load[0]:.2f} {load[1]:.2f}:")
    print(bench.table())
    for note in bench.notes:
        print(f"note: {note}")
    for failure in bench.failures:
        print(f"FAILED: {failure}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
