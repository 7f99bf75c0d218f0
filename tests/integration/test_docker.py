"""The image: built from the Dockerfile with ../shared/tools/oci-build, run as a
user would run it, in front of a real legacy server, moving real files."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_programs, require_servers
from tests.harness import legacy
from tests.harness.clients import CLIENTS, Endpoint, sha256, transfer
from tests.harness.proxy import ROOT

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.servers]

OCI_BUILD = ROOT.parent / "shared" / "tools" / "oci-build"
IMAGE = f"localhost/ftpfix:test-{os.getpid()}"
CONTAINER = f"ftpfix-test-{os.getpid()}"
PASSIVE_PORTS = "20300-20319"


def oci(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(OCI_BUILD), *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    require(OCI_BUILD.exists(), f"{OCI_BUILD} is not there (it comes with the workplace's shared/ folder)")
    require_servers("vsftpd")
    # --format docker keeps the HEALTHCHECK, which the OCI format drops.
    built = oci("build", "--format", "docker", "-t", IMAGE, str(ROOT))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        yield IMAGE
    finally:
        oci("podman", "rmi", "-f", IMAGE)


@pytest.fixture
def container(image: str, server_dir: Path) -> Iterator[tuple[int, legacy.LegacyServer]]:
    server = legacy.start("vsftpd", server_dir / "vsftpd")
    # Port 21 when it is free, to prove the non-root user can bind it.
    port = legacy.free_port() if legacy.port_in_use(21) else 21
    config = server_dir / "ftpfix.toml"
    config.write_text(
        f'[listen]\naddress = "127.0.0.1"\nport = {port}\n'
        f'[backend]\naddress = "{server.host}"\nport = {server.port}\n'
        f'[passive]\npublic_address = "127.0.0.1"\nports = "{PASSIVE_PORTS}"\n'
    )
    config.chmod(0o644)
    oci("podman", "rm", "-f", CONTAINER)
    started = oci("run", "-d", "--name", CONTAINER, "-v", f"{config}:/etc/ftpfix/ftpfix.toml:ro", image)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 30
        while '"listening"' not in oci("podman", "logs", CONTAINER).stdout:
            assert time.monotonic() < deadline, oci("podman", "logs", CONTAINER).stdout
            time.sleep(0.2)
        yield port, server
    finally:
        oci("podman", "rm", "-f", CONTAINER)
        server.stop()


def test_the_container_relays_transfers(
    container: tuple[int, legacy.LegacyServer], big_file: Path, tmp_path: Path
) -> None:
    require_programs("curl", "lftp")
    port, server = container
    legacy.put_file(server, "download.bin", big_file.read_bytes())
    endpoint = Endpoint("127.0.0.1", port, server.user, server.password)
    for client in CLIENTS:
        downloaded = tmp_path / f"{client}.bin"
        result = transfer(client, "get", endpoint, "download.bin", downloaded)
        assert result.returncode == 0, result.stderr
        assert sha256(downloaded) == sha256(big_file)
        result = transfer(client, "put", endpoint, f"up-{client}.bin", big_file)
        assert result.returncode == 0, result.stderr
        assert sha256(server.files / f"up-{client}.bin") == sha256(big_file)

    logs = [json.loads(line) for line in oci("podman", "logs", CONTAINER).stdout.splitlines() if line.startswith("{")]
    closed = [event for event in logs if event["event"] == "session closed"]
    assert len(closed) >= 6
    assert all(
        20300 <= int(event["public"].rpartition(":")[2]) <= 20319
        for event in logs
        if event["event"] == "passive mapping"
    )


def test_the_container_is_healthy_and_not_root(container: tuple[int, legacy.LegacyServer], image: str) -> None:
    assert oci("podman", "exec", CONTAINER, "ftpfix", "health").returncode == 0
    assert oci("podman", "exec", CONTAINER, "id", "-u").stdout.strip() != "0"
    inspected = json.loads(oci("podman", "image", "inspect", image).stdout)[0]
    assert inspected["Healthcheck"]["Test"] == ["CMD", "ftpfix", "health"]
    exposed = inspected["Config"]["ExposedPorts"]
    assert "21/tcp" in exposed and "50000-50019/tcp" in exposed
