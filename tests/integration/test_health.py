"""The probe listener ([metrics] listen) against a real ftpfix process and a
real backend: /healthz and /readyz with the backend up, down and during a
SIGTERM drain; probes that never reach the backend nor count as sessions;
and what a hostile peer can send it."""

from __future__ import annotations

import ftplib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import legacy
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "20840-20849"


def start(server: legacy.LegacyServer, workdir: Path, *, limits: str = "", interval: float = 0.2) -> Ftpfix:
    return start_ftpfix(
        workdir / f"ftpfix-{time.monotonic_ns()}",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(server.host, server.port),
            public_address="127.0.0.1",
            ports=PORTS,
            extra=f'[limits]\n{limits}\n[metrics]\nlisten = "127.0.0.1:0"\nready_interval = {interval}\n',
        ),
    )


def probe_port(proxy: Ftpfix) -> int:
    (address,) = proxy.events("listening")[0]["probes"]
    return int(address.rpartition(":")[2])


def exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the probe listener, read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if request:
            sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def get(port: int, path: str) -> tuple[int, str]:
    answer = exchange(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def wait_until(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def proxies() -> Iterator[list[Ftpfix]]:
    started: list[Ftpfix] = []
    yield started
    for proxy in started:
        proxy.stop()


def test_healthz_and_readyz_follow_the_backend(server_dir: Path, tmp_path: Path, proxies: list[Ftpfix]) -> None:
    server = legacy.start("proftpd", server_dir / "proftpd")
    try:
        proxy = start(server, tmp_path)
        proxies.append(proxy)
        port = probe_port(proxy)
        proxy.wait_for("backend ready")
        assert get(port, "/healthz")[0] == 200
        status, body = get(port, "/readyz")
        assert status == 200 and body.startswith("ready: backend greeted")
    finally:
        server.stop()
    # The backend is gone: not ready, with the reason; still alive.
    proxy.wait_for("backend not ready")
    status, body = get(port, "/readyz")
    assert status == 503 and body.startswith("not ready: backend: "), body
    assert get(port, "/healthz")[0] == 200
    health = [sys.executable, "-m", "ftpfix", "health", "--config", str(proxy.log.parent / "ftpfix.toml")]
    # The CLI needs a fixed port; point it at the bound one.
    config = proxy.log.parent / "cli.toml"
    config.write_text((proxy.log.parent / "ftpfix.toml").read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    health[-1] = str(config)
    alive = subprocess.run(health, capture_output=True, text=True, cwd=ROOT, check=False)
    assert alive.returncode == 0, alive.stderr
    assert "ok: serving" in alive.stdout
    ready = subprocess.run([*health, "--ready"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert ready.returncode == 1
    assert "not ready" in ready.stderr and "503" in ready.stderr


def test_readyz_is_503_during_a_sigterm_drain(vsftpd: legacy.LegacyServer, tmp_path: Path, proxies) -> None:
    data = os.urandom(4_000_000)
    legacy.put_file(vsftpd, "f.bin", data)
    proxy = start(vsftpd, tmp_path, limits="download_rate = 1000000\nshutdown_grace = 20")
    proxies.append(proxy)
    port = probe_port(proxy)
    proxy.wait_for("backend ready")
    assert get(port, "/readyz")[0] == 200
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", proxy.port, timeout=10)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.login("anonymous", "x")
    received: list[bytes] = []
    worker = threading.Thread(target=lambda: ftp.retrbinary("RETR f.bin", received.append))
    worker.start()
    proxy.wait_for("passive mapping")
    proxy.process.send_signal(signal.SIGTERM)
    proxy.wait_for("stopped accepting; sessions may finish")
    # The download runs on for about 4 s: the probes still answer meanwhile.
    status, body = get(port, "/readyz")
    assert status == 503 and "shutting down" in body
    status, body = get(port, "/healthz")
    assert status == 200 and "draining" in body
    worker.join(30)
    assert b"".join(received) == data
    assert proxy.process.wait(20) == 0


def test_probes_open_no_backend_session_and_count_against_no_limit(
    vsftpd: legacy.LegacyServer, tmp_path: Path, proxies
) -> None:
    # One session in all: any probe that became a session would lock the client out.
    proxy = start(vsftpd, tmp_path, limits="max_sessions = 1\nmax_sessions_per_ip = 1", interval=3600)
    proxies.append(proxy)
    port = probe_port(proxy)
    proxy.wait_for("backend checked")
    before = len(proxy.events())
    for _ in range(20):
        assert get(port, "/readyz")[0] == 200
        assert get(port, "/healthz")[0] == 200
    subprocess.run(
        [sys.executable, "-m", "ftpfix", "health", "--config", str(proxy.log.parent / "ftpfix.toml")],
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    # No backend connection: the only check is the one at start (the next
    # is an hour away), and no connection to the backend is open.
    assert len(proxy.events("backend checked")) == 1
    established = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{vsftpd.port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert established.strip() == "", established
    # Nothing logged for 40 probes, no session opened or refused.
    assert proxy.events()[before:] == []
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", proxy.port, timeout=10)
    assert ftp.login("anonymous", "x").startswith("230")
    # While that one session runs, the probes still answer.
    assert get(port, "/healthz")[0] == 200
    ftp.quit()
    assert not proxy.events("session refused")


GARBAGE = [
    b"\x00\xff\xfe\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /healthz\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"GET http://evil/healthz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nX: \x00\r\n\r\n",
    b"GET /../../etc/passwd HTTP/1.1\r\n\r\n",
    b"DELETE /readyz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # the head never ends
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"X-Flood: y\r\n" * 5000 + b"\r\n",
    os.urandom(20_000),
]


def test_garbage_gets_a_4xx_or_a_close_and_never_hurts_ftpfix(
    vsftpd: legacy.LegacyServer, tmp_path: Path, proxies
) -> None:
    proxy = start(vsftpd, tmp_path)
    proxies.append(proxy)
    port = probe_port(proxy)
    for request in GARBAGE:
        answer = exchange(port, request)
        assert answer == b"" or answer.split(b" ", 2)[1][:1] in (b"4", b"5"), (request[:60], answer[:200])
        assert not answer.startswith(b"HTTP/1.1 200"), request[:60]
    # Silent peers and slowloris: each is cut off after the request timeout,
    # and while dozens hang, the listener still answers (or refuses, never hangs).
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    slow.settimeout(15)
    assert slow.recv(4096).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 10
    for sock in [*idle, slow]:
        sock.close()
    wait_until(lambda: _answers(port))
    # ftpfix never crashed, logged no bug, and still serves FTP.
    assert proxy.process.poll() is None
    assert not [event for event in proxy.events() if "bug" in event["event"]]
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", proxy.port, timeout=10)
    assert ftp.login("anonymous", "x").startswith("230")
    ftp.quit()


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] == 200
    except (OSError, IndexError, ValueError):
        return False
