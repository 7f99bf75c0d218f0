"""Shared passive ports at scale: N concurrent passive RETRs from A client addresses through P ports.

Every session logs in and sends PASV first; only when all N mappings wait at
once (which needs N <= P x A: one waiting mapping per address per port) do
the clients connect and send RETR. Every file is checked with sha256; the
aggregate throughput (from the first RETR to the last 226) and the CPU time
ftpfix used are reported. Clients bind addresses in 127.0.1.0/24 and up, so
one machine plays A client hosts.

    .venv/bin/python -m tests.bench.shared_ports                 # 1000 x 4 MiB, 50 addresses, 20 ports
    .venv/bin/python -m tests.bench.shared_ports --smoke         # 60 x 256 KiB, 6 addresses, 10 ports
    .venv/bin/python -m tests.bench.shared_ports --haproxy       # the same through HAProxy and two replicas

``--haproxy`` runs deploy/haproxy/haproxy.cfg as committed (send-proxy-v2 on
the control and the passive ports) on 127.0.0.10, in front of two ftpfix
replicas on 127.0.0.11 and .12, each leasing its half of the range
(``[passive] slice``). A session lands on either replica (leastconn), so one
address's sessions can split unevenly; 100 addresses by default there (10
sessions each) keep a port for every waiting mapping on either replica.

The descriptor limit of this process is raised to its hard limit (each
session needs two sockets here, ftpfix about eight); raise the hard limit
(ulimit -Hn, LimitNOFILE) for more sessions than it allows.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from ftpfix.ports import PortRange, Slice
from tests.harness import haproxy, legacy
from tests.harness.procstat import cpu_seconds, open_fds, rss_kib
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

#: Seconds any single step of a session may take before the run fails.
STEP_TIMEOUT = 120

#: Sessions logging in at once. vsftpd accepts with a backlog of 32 and forks
#: per session: a thousand simultaneous connects overflow it, and a connection
#: the kernel completed but vsftpd never accepts waits for a greeting that does
#: not come. What is measured is the transfers, which all wait at once anyway.
LOGINS_AT_ONCE = 32


def address(index: int, addresses: int) -> str:
    number = index % addresses
    return f"127.0.{1 + number // 250}.{1 + number % 250}"


def free_range(size: int) -> str:
    for first in range(24000, 31000, size):
        try:
            for port in range(first, first + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return f"{first}-{first + size - 1}"
    raise RuntimeError("no free block of ports")


class Client:
    """A minimal FTP client over a trio stream: replies, PASV, RETR."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def reply(self) -> bytes:
        lines = []
        while True:
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"connection closed; so far {b''.join(lines)!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            lines.append(line)
            first = lines[0]
            if len(first) >= 4 and first[3:4] == b"-":
                if line[:3] == first[:3] and line[3:4] == b" ":
                    return b"\n".join(lines)
                continue
            return b"\n".join(lines)

    async def command(self, text: str, expect: bytes) -> bytes:
        await self.stream.send_all(text.encode() + b"\r\n")
        reply = await self.reply()
        if not reply.startswith(expect):
            raise RuntimeError(f"{text!r} got {reply[:200]!r}")
        return reply


async def session(index: int, args: argparse.Namespace, port: int, user: str, password: str, state: dict) -> None:
    source = address(index, args.addresses)
    state["step"][index] = "connect"
    await state["logins"].acquire()
    with trio.fail_after(STEP_TIMEOUT):
        stream = await trio.open_tcp_stream(state["host"], port, local_address=source)
    async with stream:
        client = Client(stream)
        state["step"][index] = "login"
        with trio.fail_after(STEP_TIMEOUT):
            await client.reply()
            await client.command(f"USER {user}", b"331")
            await client.command(f"PASS {password}", b"230")
            await client.command("TYPE I", b"200")
            state["step"][index] = "PASV"
            reply = await client.command("PASV", b"227")
        state["logins"].release()
        numbers = reply.split(b"(", 1)[1].split(b")", 1)[0].split(b",")
        data_host = ".".join(number.decode() for number in numbers[:4])
        data_port = int(numbers[4]) * 256 + int(numbers[5])
        state["ports"].add(data_port)
        state["waiting"] += 1
        if state["waiting"] == args.transfers:
            state["all_waiting"].set()
            state["started"] = time.monotonic()
        state["step"][index] = "waiting for the others"
        with trio.fail_after(STEP_TIMEOUT * 2):
            await state["all_waiting"].wait()
        state["step"][index] = "RETR"
        with trio.fail_after(STEP_TIMEOUT):
            data = await trio.open_tcp_stream(data_host, data_port, local_address=source)
        digest = hashlib.sha256()
        async with data:
            with trio.fail_after(STEP_TIMEOUT):
                await stream.send_all(b"RETR big.bin\r\n")
                if not (await client.reply()).startswith(b"150"):
                    raise RuntimeError("RETR not started")
                while chunk := await data.receive_some(1 << 18):
                    digest.update(chunk)
                    state["bytes"] += len(chunk)
        with trio.fail_after(STEP_TIMEOUT):
            if not (await client.reply()).startswith(b"226"):
                raise RuntimeError("RETR not completed")
        state["digests"].append(digest.digest())
        state["finished"] = time.monotonic()
        await stream.send_all(b"QUIT\r\n")


async def run_all(args: argparse.Namespace, host: str, port: int, user: str, password: str) -> dict:
    state = {
        "host": host,
        "step": {},
        "logins": trio.Semaphore(LOGINS_AT_ONCE),
        "waiting": 0,
        "all_waiting": trio.Event(),
        "bytes": 0,
        "digests": [],
        "ports": set(),
        "errors": [],
    }

    async def guarded(index: int) -> None:
        try:
            await session(index, args, port, user, password, state)
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            if state["step"].get(index) in ("connect", "login", "PASV"):
                state["logins"].release()
            where = address(index, args.addresses)
            state["errors"].append(f"session {index} from {where}, at {state['step'].get(index)}: {error!r}")
            state["all_waiting"].set()  # do not leave the others waiting for it

    async with trio.open_nursery() as nursery:
        for index in range(args.transfers):
            nursery.start_soon(guarded, index)
    return state


#: --haproxy: HAProxy's public address and the two replicas' addresses.
PUBLIC = "127.0.0.10"
REPLICAS = ("127.0.0.11", "127.0.0.12")
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

#: Both modes: no limit gets in the way, and waiting mappings outlast the run.
LIMITS = (
    "[limits]\nmax_sessions = 100000\nmax_sessions_per_ip = 100000\n"
    f"data_connect_timeout = {STEP_TIMEOUT * 2}\nlogin_timeout = {STEP_TIMEOUT * 2}\n"
)


def start_one(workdir: Path, server: legacy.LegacyServer, ports: str) -> tuple[list[Ftpfix], str, int, list]:
    """ftpfix alone, on 127.0.0.1."""
    config = config_text(
        listen=("127.0.0.1", 0),
        backend=("127.0.0.1", server.port),
        public_address="127.0.0.1",
        ports=ports,
        extra=LIMITS,
    ).replace('level = "debug"', 'level = "info"')
    proxy = start_ftpfix(workdir / "ftpfix", config)
    return [proxy], proxy.host, proxy.port, []


def start_balanced(workdir: Path, server: legacy.LegacyServer, ports: str) -> tuple[list[Ftpfix], str, int, list]:
    """deploy/haproxy/haproxy.cfg as committed, in front of two replicas, each with its slice."""
    if not haproxy.installed():
        raise RuntimeError(f"HAProxy is not unpacked at {haproxy.BINARY} (run tests/install-servers)")
    control, metrics = haproxy.free_port(REPLICAS[0]), haproxy.free_port(REPLICAS[0])
    replicas = []
    for index, host in enumerate(REPLICAS, start=1):
        config = config_text(
            listen=(host, control),
            backend=("127.0.0.1", server.port),
            public_address=PUBLIC,
            ports=ports,
            passive_extra=f'slice = "{index}/2"\nlisten_address = "{host}"',
            extra=LIMITS + f'[metrics]\nlisten = "{host}:{metrics}"\n',
        ).replace('level = "debug"', 'level = "info"')
        # HAProxy reaches the replicas from 127.0.0.1 (loopback's source address).
        config = config.replace(
            "[listen]\n", '[listen]\nproxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n', 1
        )
        replicas.append(start_ftpfix(workdir / f"replica{index}", config))
    whole = PortRange(*(int(port) for port in ports.split("-")))
    public_port = haproxy.free_port(PUBLIC)
    env = {
        **os.environ,
        "PUBLIC_ADDRESS": PUBLIC,
        "CONTROL_PORT": str(public_port),
        "SLICE_1": str(Slice(1, 2).of(whole)),
        "SLICE_2": str(Slice(2, 2).of(whole)),
        "REPLICA_1": REPLICAS[0],
        "REPLICA_2": REPLICAS[1],
        "REPLICA_CONTROL_PORT": str(control),
        "REPLICA_METRICS_PORT": str(metrics),
    }
    log = (workdir / "haproxy.log").open("wb")
    balancer = subprocess.Popen(
        [str(haproxy.BINARY), "-db", "-f", str(HAPROXY_CONFIG)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((PUBLIC, public_port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or balancer.poll() is not None:
                raise RuntimeError(f"HAProxy did not start: {(workdir / 'haproxy.log').read_text()[-2000:]}") from None
            time.sleep(0.05)
    # Both replicas pass HAProxy's /readyz check before the run.
    time.sleep(6)
    return replicas, PUBLIC, public_port, [balancer]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes; check correctness, not speed")
    parser.add_argument("--haproxy", action="store_true", help="through HAProxy and two replicas (deploy/haproxy)")
    parser.add_argument("--transfers", type=int, default=1000)
    parser.add_argument("--addresses", type=int, default=None, help="client addresses (50; 100 with --haproxy)")
    parser.add_argument("--ports", type=int, default=20)
    parser.add_argument("--size-kib", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.addresses is None:
        args.addresses = 100 if args.haproxy else 50
    if args.smoke:
        args.transfers, args.addresses, args.ports, args.size_kib = 60, 12 if args.haproxy else 6, 10, 256
    # Every replica must fit all its mappings even if one address's sessions all land on it.
    per_address_ports = args.ports // (2 if args.haproxy else 1)
    if -(-args.transfers // args.addresses) > per_address_ports:
        parser.error(f"{args.transfers} transfers cannot all wait at once on {args.ports} ports x {args.addresses}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="ftpfix-shared-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    workdir.chmod(0o755)
    server = legacy.start("vsftpd", workdir / "vsftpd")
    proxies: list[Ftpfix] = []
    others: list[subprocess.Popen[bytes]] = []
    ok = False
    try:
        data = os.urandom(args.size_kib * 1024)
        legacy.put_file(server, "big.bin", data)
        expected = hashlib.sha256(data).digest()
        ports = free_range(args.ports)
        proxies, host, port, others = (start_balanced if args.haproxy else start_one)(workdir, server, ports)
        pids = [proxy.process.pid for proxy in proxies]
        fds_before, rss_before = [open_fds(pid) for pid in pids], [rss_kib(pid) for pid in pids]
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        began = time.monotonic()
        state = trio.run(run_all, args, host, port, server.user, server.password)
        wall = time.monotonic() - began
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        time.sleep(1)
        fds_after = [open_fds(pid) for pid in pids]
        rss_after = [rss_kib(pid) for pid in pids]
        intact = sum(digest == expected for digest in state["digests"])
        elapsed = state["finished"] - state["started"] if "started" in state and "finished" in state else 0
        mib = state["bytes"] / (1 << 20)
        served = [len(proxy.events("transfer")) for proxy in proxies]
        flags = (" --smoke" if args.smoke else "") + (" --haproxy" if args.haproxy else "")
        print(
            f"{time.strftime('%Y-%m-%d')}, python -m tests.bench.shared_ports{flags}:\n"
            f"  {args.transfers} concurrent passive RETRs of {args.size_kib} KiB from {args.addresses} client "
            f"addresses through {args.ports} ports ({ports}); ports used: {len(state['ports'])}\n"
            + (
                f"  through HAProxy ({PUBLIC}) to two replicas; transfers each served: {served}\n"
                if args.haproxy
                else ""
            )
            + f"  all {state['waiting']} mappings waiting at once: {state['waiting'] == args.transfers}\n"
            f"  intact (sha256): {intact} of {args.transfers}\n"
            f"  aggregate: {mib:.0f} MiB in {elapsed:.2f} s = {mib / elapsed if elapsed > 0 else 0:.0f} MiB/s"
            f" (first RETR to last 226); whole run {wall:.1f} s\n"
            f"  ftpfix CPU: {cpu:.2f} s ({cpu / max(mib / 1024, 1e-9):.2f} s per GiB); RSS {rss_before} ->"
            f" {rss_after} KiB; descriptors {fds_before} -> {fds_after}"
        )
        for error in state["errors"][:10]:
            print(f"FAILED: {error}")
        ok = intact == args.transfers and not state["errors"] and len(state["ports"]) <= args.ports
        if not ok:
            print("FAILED: not every transfer was intact")
        return 0 if ok else 1
    finally:
        for process in others:
            process.terminate()
            process.wait(10)
        for proxy in proxies:
            proxy.stop()
        server.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
