"""deploy/haproxy/haproxy.cfg with the real HAProxy (Debian's, unpacked by tests/install-servers)
in front of two ftpfix replicas, each leasing its slice of one passive range.

Addresses: HAProxy is the public side on 127.0.0.10, the replicas listen on
127.0.0.11 and 127.0.0.12 (control, passive and probe listeners), the clients
bind 127.0.0.20 and up.

The committed file runs as it is, send-proxy-v2 included, with its addresses
and ports from the environment. Checked: the slices in the file are ftpfix's
own; 20 concurrent sessions from 20 addresses move their files intact, the
control port reaching either replica and every data connection the replica
that advertised its port; each replica logs the real client addresses (from
the PROXY header), never HAProxy's; a per-address limit holds for the real
address behind the balancer, so one client's sessions do not lock out others;
a stopped replica fails its /readyz check and new sessions go to the other.
"""

from __future__ import annotations

import ftplib
import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ftpfix.ports import PortRange, Slice
from tests.conftest import require
from tests.harness import legacy
from tests.harness.proxy import ROOT, config_text, start_ftpfix
from tests.integration.test_shared_ports import free_range

pytestmark = [pytest.mark.servers, pytest.mark.root]

CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = ROOT / "tests" / ".cache" / "debs" / "haproxy" / "usr" / "sbin" / "haproxy"
PUBLIC = "127.0.0.10"
REPLICAS = ("127.0.0.11", "127.0.0.12")
SESSIONS = 20
#: HAProxy's own address towards the replicas (loopback's source address):
#: the only one the replicas take a PROXY header from.
BALANCER = "127.0.0.1"


def presets() -> dict[str, str]:
    return dict(re.findall(r"^\s*presetenv (\S+) (\S+)", CONFIG.read_text(), re.MULTILINE))


def test_the_slices_in_the_file_are_ftpfixs() -> None:
    defaults = presets()
    whole = PortRange(50000, 50019)  # README and deploy/ftpfix.toml's range
    for index in (1, 2):
        assert defaults[f"SLICE_{index}"] == str(Slice(index, 2).of(whole))


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def test_twenty_sessions_through_haproxy_and_two_replicas(vsftpd, tmp_path: Path) -> None:
    require(HAPROXY.exists(), f"HAProxy is not unpacked at {HAPROXY} (run tests/install-servers)")
    data = os.urandom(1024 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    first, ports = free_range(20)
    whole = PortRange(first, first + 19)
    control_port, metrics_port = free_port(REPLICAS[0]), free_port(REPLICAS[0])
    replicas = []
    haproxy = None
    try:
        for index, host in enumerate(REPLICAS, start=1):
            replicas.append(
                start_ftpfix(
                    tmp_path / f"replica{index}",
                    config_text(
                        listen=(host, control_port),
                        backend=(vsftpd.host, vsftpd.port),
                        public_address=PUBLIC,
                        ports=ports,
                        passive_extra=f'slice = "{index}/2"\nlisten_address = "{host}"',
                        extra=f'[limits]\nmax_sessions_per_ip = 2\n[metrics]\nlisten = "{host}:{metrics_port}"\n',
                    ).replace(
                        "[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1
                    ),
                )
            )
        public_port = free_port(PUBLIC)
        assert "send-proxy-v2" in CONFIG.read_text()
        env = {
            **os.environ,
            "PUBLIC_ADDRESS": PUBLIC,
            "CONTROL_PORT": str(public_port),
            "SLICE_1": str(Slice(1, 2).of(whole)),
            "SLICE_2": str(Slice(2, 2).of(whole)),
            "REPLICA_1": REPLICAS[0],
            "REPLICA_2": REPLICAS[1],
            "REPLICA_CONTROL_PORT": str(control_port),
            "REPLICA_METRICS_PORT": str(metrics_port),
        }
        log = (tmp_path / "haproxy.log").open("wb")
        haproxy = subprocess.Popen(
            [str(HAPROXY), "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wait_listening(PUBLIC, public_port)
        clients = {f"127.0.0.{20 + number}" for number in range(SESSIONS)}
        results: list[bytes | BaseException] = []

        def session(number: int) -> None:
            try:
                ftp = ftplib.FTP(timeout=30, source_address=(f"127.0.0.{20 + number}", 0))
                ftp.trust_server_pasv_ipv4_address = True
                ftp.connect(PUBLIC, public_port)
                ftp.login("anonymous", "x")
                ftp.voidcmd("TYPE I")
                for _ in range(2 if number < SESSIONS else 1):
                    chunks: list[bytes] = []
                    ftp.retrbinary("RETR f.bin", chunks.append)
                    results.append(hashlib.sha256(b"".join(chunks)).digest())
                ftp.quit()
            except BaseException as error:  # noqa: BLE001 - reported below, per session
                results.append(error)

        threads = [threading.Thread(target=session, args=(number,)) for number in range(SESSIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        errors = [result for result in results if isinstance(result, BaseException)]
        assert not errors, errors[:3]
        assert results == [hashlib.sha256(data).digest()] * (2 * SESSIONS)
        for index, replica in enumerate(replicas, start=1):
            mine = Slice(index, 2).of(whole)
            mappings = replica.events("passive mapping")
            # The control port reached both replicas, and each advertised only its own slice.
            assert mappings, f"replica {index} served no session"
            assert all(int(event["public"].rsplit(":", 1)[1]) in mine for event in mappings)
            transfers = replica.events("transfer")
            assert transfers and all(event["code"] == 226 for event in transfers)
        assert sum(len(replica.events("transfer")) for replica in replicas) == 2 * SESSIONS
        # Each replica saw the clients' own addresses, from the PROXY header.
        seen = set()
        for replica in replicas:
            opened = {event["client"].rsplit(":", 1)[0] for event in replica.events("session opened")}
            assert opened and opened <= clients | {"127.0.0.1"}  # 127.0.0.1: wait_listening's probe
            seen |= opened
        assert seen >= clients
        # A per-address limit counts the real address: one client gets at most
        # max_sessions_per_ip (2) on each replica, and another still gets in.
        greedy = []
        greetings = []
        for _ in range(6):
            sock = socket.create_connection((PUBLIC, public_port), timeout=10, source_address=("127.0.0.50", 0))
            greedy.append(sock)
            greetings.append(sock.recv(200))
        accepted = [greeting for greeting in greetings if greeting.startswith(b"220")]
        refused = [greeting for greeting in greetings if greeting.startswith(b"421")]
        assert len(accepted) + len(refused) == 6
        assert 2 <= len(accepted) <= 4 and refused
        refusals = [event for replica in replicas for event in replica.events("session refused")]
        assert refusals and {event["client"] for event in refusals} == {"127.0.0.50"}
        other = ftplib.FTP(timeout=30, source_address=("127.0.0.51", 0))
        other.connect(PUBLIC, public_port)
        other.login("anonymous", "x")
        other.quit()
        for sock in greedy:
            sock.close()
        # A replica that stops fails HAProxy's /readyz check; new sessions go to the other.
        replicas[1].stop()
        deadline = time.monotonic() + 30
        while "control/replica2 is DOWN" not in (tmp_path / "haproxy.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()[-2000:]
            time.sleep(0.2)
        before = len(replicas[0].events("transfer"))
        for number in range(SESSIONS, SESSIONS + 4):
            session(number)
        assert results[-4:] == [hashlib.sha256(data).digest()] * 4
        assert len(replicas[0].events("transfer")) == before + 4
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for replica in replicas:
            replica.stop()
