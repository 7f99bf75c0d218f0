"""The image: built from the Dockerfile with ../shared/tools/oci-build, run as a
user would run it, in front of a real legacy server, moving real files."""

from __future__ import annotations

import json
import os
import re
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
#: Download rate (bytes/s) in the container's config: 16 MiB take 8 s, long enough to stop one midway.
SLOW_RATE = 2 * 1024 * 1024
#: [limits] shutdown_grace in the container's config: podman stop's 10 s must outlast it.
GRACE = 3


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


def wait_for_log(name: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in oci("podman", "logs", name).stdout:
        assert time.monotonic() < deadline, oci("podman", "logs", name).stdout
        time.sleep(0.2)


@pytest.fixture
def container(
    request: pytest.FixtureRequest, image: str, server_dir: Path
) -> Iterator[tuple[int, legacy.LegacyServer]]:
    """ftpfix in the image under --cap-drop ALL, in front of vsftpd; an
    indirect parameter sets its download rate (0: none)."""
    server = legacy.start("vsftpd", server_dir / "vsftpd")
    # A port above 1023: --cap-drop ALL leaves no right to bind below it on
    # the host network (see test_port_21_without_capabilities for port 21).
    port = legacy.free_port()
    config = server_dir / "ftpfix.toml"
    config.write_text(
        f'[listen]\naddress = "127.0.0.1"\nport = {port}\n'
        f'[backend]\naddress = "{server.host}"\nport = {server.port}\n'
        f'[passive]\npublic_address = "127.0.0.1"\nports = "{PASSIVE_PORTS}"\n'
        f"[limits]\ndownload_rate = {getattr(request, 'param', 0)}\nshutdown_grace = {GRACE}\n"
        f'[metrics]\nlisten = "127.0.0.1:{legacy.free_port()}"\nready_interval = 1\n'
    )
    config.chmod(0o644)
    oci("podman", "rm", "-f", CONTAINER)
    started = oci(
        "run",
        "-d",
        "--name",
        CONTAINER,
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        f"{config}:/etc/ftpfix/ftpfix.toml:ro",
        image,
    )
    assert started.returncode == 0, started.stderr
    try:
        wait_for_log(CONTAINER, '"listening"')
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
    healthy = oci("podman", "exec", CONTAINER, "ftpfix", "health")
    assert healthy.returncode == 0, healthy.stderr
    assert "ok: serving" in healthy.stdout
    ready = oci("podman", "exec", CONTAINER, "ftpfix", "health", "--ready")
    assert ready.returncode == 0, ready.stderr
    # The image's own HEALTHCHECK, as the engine runs it.
    assert oci("podman", "healthcheck", "run", CONTAINER).returncode == 0
    assert oci("podman", "exec", CONTAINER, "id", "-u").stdout.strip() != "0"
    status = oci("podman", "exec", CONTAINER, "cat", "/proc/1/status").stdout
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE), status
    assert re.search(r"^CapPrm:\s+0+$", status, re.MULTILINE), status
    inspected = json.loads(oci("podman", "image", "inspect", image).stdout)[0]
    # Built with --format docker: the OCI format would have dropped it.
    assert inspected["Healthcheck"]["Test"] == ["CMD", "ftpfix", "health"]
    assert inspected["Config"]["StopSignal"] == "SIGTERM"
    exposed = inspected["Config"]["ExposedPorts"]
    assert "21/tcp" in exposed and "50000-50019/tcp" in exposed


@pytest.mark.parametrize("container", [SLOW_RATE], indirect=True)
def test_a_stop_drains_within_the_grace(
    container: tuple[int, legacy.LegacyServer], big_file: Path, tmp_path: Path
) -> None:
    require_programs("curl")
    port, server = container
    legacy.put_file(server, "slow.bin", big_file.read_bytes())
    endpoint = Endpoint("127.0.0.1", port, server.user, server.password)
    download = subprocess.Popen(
        ["curl", "-sS", "--no-ftp-skip-pasv-ip", "--user", f"{endpoint.user}:{endpoint.password}",
         "-o", str(tmp_path / "slow.bin"), f"ftp://127.0.0.1:{port}/slow.bin"],
    )  # fmt: skip
    try:
        wait_for_log(CONTAINER, '"passive mapping"')
        started = time.monotonic()
        stopped = oci("podman", "stop", "--time", "10", CONTAINER)
        elapsed = time.monotonic() - started
        assert stopped.returncode == 0, stopped.stderr
    finally:
        download.wait(30)
    # ftpfix ended the transfer it could not finish after GRACE seconds and
    # exited by itself, well before podman's 10 s and its SIGKILL (137).
    assert GRACE - 0.5 < elapsed < GRACE + 4, elapsed
    state = json.loads(oci("podman", "inspect", CONTAINER).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state
    logs = oci("podman", "logs", CONTAINER).stdout
    assert '"stopping"' in logs and '"stopped"' in logs


def test_port_21_without_capabilities(image: str) -> None:
    """The image's default config listens on 21. Under --cap-drop ALL that
    needs the container's own network namespace with
    net.ipv4.ip_unprivileged_port_start=0, which Docker sets by default and
    podman (4.3) does not; without it, ftpfix says why and exits."""
    name = f"{CONTAINER}-21"
    oci("podman", "rm", "-f", name)
    try:
        started = oci(
            "podman", "run", "-d", "--name", name, "--network", "none", "--cap-drop", "ALL",
            "--sysctl", "net.ipv4.ip_unprivileged_port_start=0", image,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        wait_for_log(name, '"listening"')
        listening = next(
            json.loads(line) for line in oci("podman", "logs", name).stdout.splitlines() if '"listening"' in line
        )
        assert "0.0.0.0:21" in listening["control"]
        assert listening["probes"] == ["127.0.0.1:9121"]
        # The backend of the example config is out of reach: alive, not ready.
        assert oci("podman", "exec", name, "ftpfix", "health").returncode == 0
        not_ready = oci("podman", "exec", name, "ftpfix", "health", "--ready")
        assert not_ready.returncode == 1 and "503" in not_ready.stderr
        oci("podman", "rm", "-f", name)
        refused = oci("podman", "run", "--name", name, "--network", "none", "--cap-drop", "ALL", image)
        assert refused.returncode == 1
        assert "cannot listen on [0.0.0.0]:21: Permission denied" in refused.stderr
    finally:
        oci("podman", "rm", "-f", name)
