"""``ftpfix diagnose --config FILE`` on the ftpfix host, in a network namespace of its own.

Each test sets the host up to fail one way (the kernel's reserved ports, a
passive port another process holds, a backend that is down) and runs the
command as a user would, with the namespace's own sysctls, so nothing here
touches the machine's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_programs, require_servers
from tests.harness import legacy
from tests.harness.netns import in_netns
from tests.harness.proxy import ROOT, config_text

pytestmark = [pytest.mark.root, pytest.mark.servers]

PORTS = "50000-50019"
BACKEND_PORT = 2100


@pytest.fixture
def netns() -> Iterator[str]:
    require_programs("ip")
    name = f"fxhost{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    require(made.returncode == 0, f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def backend(netns: str, server_dir: Path) -> Iterator[legacy.LegacyServer]:
    require_servers("vsftpd")
    server = legacy.start("vsftpd", server_dir / "vsftpd", port=BACKEND_PORT, netns=netns)
    try:
        yield server
    finally:
        server.stop()


def reserve(netns: str, ports: str) -> None:
    subprocess.run(in_netns(netns, ["sysctl", "-q", "-w", f"net.ipv4.ip_local_reserved_ports={ports}"]), check=True)


def diagnose(netns: str, tmp_path: Path, *, backend_port: int = BACKEND_PORT) -> tuple[int, Any, str]:
    path = tmp_path / "ftpfix.toml"
    path.write_text(
        config_text(
            listen=("127.0.0.1", 2121),
            backend=("127.0.0.1", backend_port),
            public_address="203.0.113.1",
            ports=PORTS,
        )
    )
    argv = [sys.executable, "-m", "ftpfix", "diagnose", "--config", str(path), "--timeout", "5"]
    done = subprocess.run(
        in_netns(netns, [*argv, "--json"]), capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert done.returncode in (0, 1), done.stderr
    plain = subprocess.run(in_netns(netns, argv), capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    print(plain.stdout)
    assert plain.returncode == done.returncode
    return done.returncode, json.loads(done.stdout), plain.stdout


def by_stage(document: Any) -> dict[str, dict[str, Any]]:
    return {check["stage"]: check for check in document["checks"]}


def test_a_sound_host(netns: str, backend: legacy.LegacyServer, tmp_path: Path) -> None:
    reserve(netns, PORTS)
    status, document, text = diagnose(netns, tmp_path)
    assert status == 0, text
    checks = by_stage(document)
    assert checks["backend"]["status"] == "ok" and "220" in checks["backend"]["summary"]
    assert checks["passive ports"]["status"] == "ok"
    assert "config [passive] ports" not in checks
    assert not [check for check in document["checks"] if check["status"] == "fail"]
    assert any("hairpin" in note for note in document["cannot_check"])
    assert "ftpfix diagnose ftp://USER@203.0.113.1:2121" in text


def test_an_unreserved_range(netns: str, backend: legacy.LegacyServer, tmp_path: Path) -> None:
    reserve(netns, "")
    _, document, _ = diagnose(netns, tmp_path)
    check = by_stage(document)["config [passive] ports"]
    assert check["status"] == "warn"
    assert "ephemeral range" in check["summary"]
    assert "sysctl -w net.ipv4.ip_local_reserved_ports=50000-50019" in check["hint"]


def test_a_taken_port(netns: str, backend: legacy.LegacyServer, tmp_path: Path) -> None:
    reserve(netns, PORTS)
    holder = subprocess.Popen(
        in_netns(
            netns,
            [sys.executable, "-c", "import socket,time; s=socket.create_server(('0.0.0.0', 50005)); time.sleep(60)"],
        )
    )
    try:
        for _ in range(100):
            probe = "import socket; socket.create_connection(('127.0.0.1', 50005), 0.2)"
            if (
                subprocess.run(
                    in_netns(netns, [sys.executable, "-c", probe]), capture_output=True, check=False
                ).returncode
                == 0
            ):
                break
        status, document, _ = diagnose(netns, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert status == 1
    check = by_stage(document)["passive ports"]
    assert check["status"] == "fail"
    assert check["data"]["taken"] == [50005]
    assert "50005 (pid" in check["summary"]
    assert document["verdict"]["stage"] == "passive ports"


def test_an_unreachable_backend(netns: str, tmp_path: Path) -> None:
    reserve(netns, PORTS)
    status, document, _ = diagnose(netns, tmp_path, backend_port=2999)
    assert status == 1
    assert document["verdict"]["stage"] == "backend"
    assert "127.0.0.1:2999 refused" in document["verdict"]["text"]
    assert "start the FTP server" in document["verdict"]["text"]
