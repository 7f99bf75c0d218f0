"""Where a transfer's CPU goes: STOR (or RETR) through ftpfix, mod_proxy and direct.

    .venv/bin/python -m tests.bench.upload                       # 5 rounds of a 1 GiB STOR
    .venv/bin/python -m tests.bench.upload --syscalls            # and ftpfix's system calls
    .venv/bin/python -m tests.bench.upload --baseline /tmp/before   # A/B against another checkout
    .venv/bin/python -m tests.bench.upload --devnull             # vsftpd stores to /dev/null
    .venv/bin/python -m tests.bench.upload --retr                # downloads instead

``tests.bench.bench`` says how fast; this says why. It runs the same setup
(vsftpd on loopback, ftpfix and ProFTPD's mod_proxy in front of it, files in
/dev/shm, curl as the client) and reports, per path, the median throughput and
the CPU seconds per GB of every process on the path: curl, the proxy, and the
server's session process. On two cores the three compete for CPU, so a proxy
that saves itself work but costs curl or vsftpd more, through extra wake-ups
or colder data, loses; only these per-process numbers show it.

The paths take turns round by round, so a noisy neighbour (these machines are
shared) hurts them alike; a single round means little, the medians do.

- ``--baseline DIR`` adds the ftpfix of another checkout as a fourth path, for
  a before/after in one run:
  ``mkdir /tmp/before && git archive HEAD | tar -x -C /tmp/before``.
- ``--devnull`` makes vsftpd append to a symlink to /dev/null (APPE, since
  STOR truncates and /dev/null cannot be truncated), which takes the server's
  page-cache write out of the measurement and leaves the network path.
- ``--syscalls`` counts ftpfix's system calls by type during one more
  transfer, with ``perf stat`` on the syscall tracepoints: a counter, not
  ptrace, so unlike ``strace -c`` it barely slows what it counts.
- ``--profile DIR`` records each transfer system-wide with ``perf record -g``
  for ``perf report -i DIR/up-<path>-<round>.data --sort comm,sym``; it slows the
  transfers, so only the shares mean something.

Process CPU comes from /proc: ftpfix's own utime and stime; vsftpd's and
mod_proxy's session processes' through their master's children-time, read
once the master has reaped the session; curl's from this process's children.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench.bench import Endpoint, _write_random, start_mod_proxy
from tests.harness import legacy
from tests.harness.clients import sha256
from tests.harness.procstat import CLOCK_TICKS
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

#: System calls counted by name with ``--syscalls``; the rest are summed as "other".
SYSCALLS = ("splice", "recvfrom", "sendto", "epoll_wait", "epoll_ctl", "read", "write", "ioctl", "pipe2", "fcntl")

#: Seconds to wait for a server's session process to be reaped after curl exits.
REAP_TIMEOUT = 5.0

#: Seconds ``perf stat`` is given to attach before the transfer starts; it
#: reports nothing when it is ready, so there is nothing to wait on.
PERF_ATTACH = 0.5


def _times(pid: int) -> tuple[float, float, float, float]:
    """utime, stime, cutime and cstime of ``pid``, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(value) / CLOCK_TICKS for value in fields[11:15])
    return utime, stime, cutime, cstime


def _switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of ``pid``'s main thread."""
    counts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        counts[key] = value.strip()
    return int(counts["voluntary_ctxt_switches"]), int(counts["nonvoluntary_ctxt_switches"])


def _children(pid: int) -> set[int]:
    try:
        return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _wait_reaped(pid: int, before: set[int]) -> None:
    """Wait until the session processes ``pid`` forked since ``before`` are
    gone, so that their CPU time has reached ``pid``'s children-time."""
    deadline = time.monotonic() + REAP_TIMEOUT
    while _children(pid) - before and time.monotonic() < deadline:
        time.sleep(0.01)


def _system_busy() -> float:
    """CPU seconds spent on anything but idling, summed over all CPUs since boot."""
    values = [int(value) / CLOCK_TICKS for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal


@dataclass
class Route:
    """One way to the server: its endpoint, and where its proxy's CPU time shows."""

    endpoint: Endpoint
    proxy: int | None = None  # a proxy process whose own CPU time counts
    forking: int | None = None  # a proxy master whose children-time counts


@dataclass
class Sample:
    seconds: float
    curl: float
    proxy_user: float
    proxy_sys: float
    server: float
    busy: float
    switches: tuple[int, int]


class UploadBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ftpfixes: list[Ftpfix] = []
        self.mod_proxy: subprocess.Popen[bytes] | None = None

    def setup(self) -> None:
        self.workdir = Path(
            tempfile.mkdtemp(prefix="ftpfix-upload-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )
        self.workdir.chmod(0o755)
        self.server = legacy.start("vsftpd", self.workdir / "vsftpd")
        self.source = self.server.files / "big.bin"
        _write_random(self.source, self.args.size_mib << 20)
        self.digest = sha256(self.source)
        names = self.args.paths.split(",")
        if self.args.baseline:
            names.append("baseline")
        self.routes: list[Route] = []
        for name in names:
            if name == "direct":
                self.routes.append(Route(Endpoint(name, self.server.port)))
            elif name in ("ftpfix", "baseline"):
                ftpfix = self.start_ftpfix(name, len(self.ftpfixes))
                self.routes.append(Route(Endpoint(name, ftpfix.port), proxy=ftpfix.process.pid))
            elif name == "mod_proxy":
                self.mod_proxy, port = start_mod_proxy(self.workdir / "mod_proxy", self.server.port)
                self.routes.append(Route(Endpoint(name, port), forking=self.mod_proxy.pid))
            else:
                raise SystemExit(f"unknown path {name!r}: use direct, ftpfix, mod_proxy")

    def start_ftpfix(self, name: str, index: int) -> Ftpfix:
        first = 22000 + 100 * index
        config = config_text(
            listen=("127.0.0.1", 0),
            backend=("127.0.0.1", self.server.port),
            public_address="127.0.0.1",
            ports=f"{first}-{first + 99}",
        ).replace('level = "debug"', 'level = "info"')
        # python -m imports the package from its working directory first.
        wrapper = ["env", "-C", str(self.args.baseline.resolve())] if name == "baseline" else []
        ftpfix = start_ftpfix(self.workdir / name, config, wrapper=wrapper)
        self.ftpfixes.append(ftpfix)
        return ftpfix

    def teardown(self) -> None:
        for ftpfix in self.ftpfixes:
            ftpfix.stop()
        if self.mod_proxy is not None:
            self.mod_proxy.terminate()
            self.mod_proxy.wait(10)
        self.server.stop()
        subprocess.run(["pkill", "-f", str(self.workdir)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def transfer(self, route: Route, name: str) -> Sample:
        server = self.server.process.pid
        masters = [server] + ([route.forking] if route.forking else [])
        children = {pid: _children(pid) for pid in masters}
        before = {pid: _times(pid) for pid in [*masters, *([route.proxy] if route.proxy else [])]}
        switches = _switches(route.proxy) if route.proxy else (0, 0)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        url = route.endpoint.url("big.bin" if self.args.retr else name)
        if self.args.retr:
            command = ["curl", "--silent", "--show-error", "--disable-epsv", "-o", "/dev/null", url]
        elif self.args.devnull:
            (self.server.files / name).symlink_to("/dev/null")
            command = ["curl", "--silent", "--show-error", "--disable-epsv", "--append", "-T", str(self.source), url]
        else:
            command = ["curl", "--silent", "--show-error", "--disable-epsv", "-T", str(self.source), url]
        if self.args.profile:
            self.args.profile.mkdir(parents=True, exist_ok=True)
            command = [
                "perf",
                "record",
                "--quiet",
                "-a",
                "-g",
                "-o",
                str(self.args.profile / f"{Path(name).stem}.data"),
                "--",
                *command,
            ]
        busy = _system_busy()
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        busy = _system_busy() - busy
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        for pid in masters:
            _wait_reaped(pid, children[pid])
        after = {pid: _times(pid) for pid in before}
        if route.proxy:
            proxy_user = after[route.proxy][0] - before[route.proxy][0]
            proxy_sys = after[route.proxy][1] - before[route.proxy][1]
        elif route.forking:
            proxy_user = after[route.forking][2] - before[route.forking][2]
            proxy_sys = after[route.forking][3] - before[route.forking][3]
        else:
            proxy_user = proxy_sys = 0.0
        switches_after = _switches(route.proxy) if route.proxy else (0, 0)
        if not self.args.retr:
            stored = self.server.files / name
            if not self.args.devnull and not self.args.no_check and sha256(stored) != self.digest:
                raise RuntimeError(f"{route.endpoint.name}: the upload arrived corrupted")
            stored.unlink()
        return Sample(
            seconds=seconds,
            curl=usage_after.ru_utime + usage_after.ru_stime - usage.ru_utime - usage.ru_stime,
            proxy_user=proxy_user,
            proxy_sys=proxy_sys,
            server=after[server][2] + after[server][3] - before[server][2] - before[server][3],
            busy=busy,
            switches=(switches_after[0] - switches[0], switches_after[1] - switches[1]),
        )

    def syscalls(self, route: Route) -> dict[str, int]:
        """``route``'s proxy's system calls by type during one transfer."""
        assert route.proxy is not None
        events = ",".join([*(f"syscalls:sys_enter_{name}" for name in SYSCALLS), "raw_syscalls:sys_enter"])
        output = self.workdir / f"perf-{route.endpoint.name}.txt"
        perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(output), "-e", events, "-p", str(route.proxy)])
        time.sleep(PERF_ATTACH)
        try:
            self.transfer(route, f"syscalls-{route.endpoint.name}.bin")
        finally:
            perf.send_signal(2)
            perf.wait(10)
        counts: dict[str, int] = {}
        for line in output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].strip().isdigit():
                counts[fields[2].rpartition(":")[2].removeprefix("sys_enter_")] = int(fields[0])
        counts["other"] = counts.pop("sys_enter", 0) - sum(counts.values())
        return counts

    def run(self) -> None:
        size = self.args.size_mib << 20
        gb = size / 1e9
        samples: dict[str, list[Sample]] = {route.endpoint.name: [] for route in self.routes}
        for round_ in range(self.args.rounds):
            for route in self.routes:
                sample = self.transfer(route, f"up-{route.endpoint.name}-{round_}.bin")
                samples[route.endpoint.name].append(sample)
                print(
                    f"round {round_} {route.endpoint.name:9} {size / sample.seconds / 1e6:6.0f} MB/s   CPU s/GB: "
                    f"curl {sample.curl / gb:.2f}  proxy {sample.proxy_user / gb:.2f}u+{sample.proxy_sys / gb:.2f}s  "
                    f"server {sample.server / gb:.2f}  all CPUs busy {sample.busy / (2 * sample.seconds):.0%}  "
                    f"ftpfix context switches {sample.switches[0]}v/{sample.switches[1]}i",
                    flush=True,
                )
        what = "RETR" if self.args.retr else "APPE to /dev/null" if self.args.devnull else "STOR"
        print()
        print(f"{what} of {self.args.size_mib} MiB, median of {self.args.rounds} rounds; CPU in seconds per GB moved")
        print("| path | MB/s | vs direct | curl | proxy user | proxy sys | server | all CPUs | CPUs busy |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        speeds = {name: size / statistics.median(s.seconds for s in runs) / 1e6 for name, runs in samples.items()}
        for name, runs in samples.items():

            def per_gb(field: str, runs: list[Sample] = runs) -> str:
                return f"{statistics.median(getattr(s, field) for s in runs) / gb:.2f}"

            ratio = f"{speeds[name] / speeds['direct']:.2f}x" if "direct" in speeds else ""
            occupancy = statistics.median(s.busy / (2 * s.seconds) for s in runs)
            print(
                f"| {name} | {speeds[name]:.0f} | {ratio} | {per_gb('curl')} | {per_gb('proxy_user')} | "
                f"{per_gb('proxy_sys')} | {per_gb('server')} | {per_gb('busy')} | {occupancy:.0%} |"
            )
        if self.args.syscalls:
            for route in self.routes:
                if route.proxy is None:
                    continue
                counts = self.syscalls(route)
                print()
                print(f"{route.endpoint.name} system calls during one {what} of {self.args.size_mib} MiB:")
                for name, count in sorted(counts.items(), key=lambda item: -item[1]):
                    if count:
                        print(f"  {name:12} {count:9d}  ({count / self.args.size_mib:.2f} per MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--paths", default="direct,ftpfix,mod_proxy", help="comma-separated: direct, ftpfix, mod_proxy")
    parser.add_argument("--baseline", type=Path, help="a checkout whose ftpfix runs as one more path")
    parser.add_argument("--retr", action="store_true", help="measure downloads instead of uploads")
    parser.add_argument("--devnull", action="store_true", help="vsftpd appends to /dev/null: the network path alone")
    parser.add_argument("--no-check", action="store_true", help="skip the sha256 of each upload")
    parser.add_argument("--syscalls", action="store_true", help="count ftpfix's system calls with perf stat")
    parser.add_argument("--profile", type=Path, help="record each transfer with perf into this folder (slows it)")
    args = parser.parse_args(argv)
    bench = UploadBench(args)
    bench.setup()
    try:
        bench.run()
    finally:
        bench.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
