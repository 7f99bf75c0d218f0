"""Limits, hostile input, faults and lifecycle, against real legacy servers."""

from __future__ import annotations

import ftplib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_servers
from tests.harness import legacy
from tests.harness.clients import Endpoint, sha256, transfer
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "20800-20819"


def start(
    server: legacy.LegacyServer,
    tmp_path: Path,
    limits: str = "",
    *,
    access: str = "",
    backend_port: int | None = None,
    ports: str = PORTS,
) -> Ftpfix:
    extra = f"[limits]\n{limits}\n" + (f"[access]\n{access}\n" if access else "")
    return start_ftpfix(
        tmp_path / f"ftpfix-{time.monotonic_ns()}",
        config_text(
            listen=("0.0.0.0", 0),
            backend=(server.host, backend_port or server.port),
            public_address="127.0.0.1",
            ports=ports,
            extra=extra,
        ),
    )


@pytest.fixture
def stop_all() -> Iterator[list[Ftpfix]]:
    started: list[Ftpfix] = []
    yield started
    for proxy in started:
        proxy.stop()


def connect(proxy: Ftpfix, source: str = "127.0.0.1", timeout: float = 10) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=timeout, source_address=(source, 0))
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect("127.0.0.1", proxy.port)
    return ftp


def greeting(proxy: Ftpfix, source: str = "127.0.0.1") -> str:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10, source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline().decode()


# -- limits ------------------------------------------------------------------


def test_session_limits_in_all_and_per_address(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, "max_sessions = 3\nmax_sessions_per_ip = 2")
    stop_all.append(proxy)
    held = [connect(proxy), connect(proxy)]
    assert greeting(proxy).startswith("421 Too many connections from your address (2 at most).")
    held.append(connect(proxy, "127.0.0.2"))
    assert greeting(proxy, "127.0.0.3").startswith("421 Too many users (3 at most), try again later.")
    held.pop().quit()
    proxy.wait_for("session closed")
    assert greeting(proxy, "127.0.0.3").startswith("220")
    for ftp in held:
        ftp.quit()


def test_access_allow_and_deny_lists(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, access='allow = ["127.0.0.0/30"]\ndeny = ["127.0.0.2/32"]')
    stop_all.append(proxy)
    assert greeting(proxy, "127.0.0.1").startswith("220")
    assert greeting(proxy, "127.0.0.2").startswith("421 Access denied for your address.")
    assert greeting(proxy, "127.0.0.9").startswith("421 Access denied for your address.")


def test_anonymous_refused_without_asking_the_backend(vsftpd, tmp_path, stop_all) -> None:
    # vsftpd here serves anonymous users: a 530 can only come from ftpfix.
    proxy = start(vsftpd, tmp_path, access="deny_anonymous = true")
    stop_all.append(proxy)
    for user in ("anonymous", "ftp", "FTP"):
        ftp = connect(proxy)
        with pytest.raises(ftplib.error_perm, match="530 Anonymous logins are not allowed here."):
            ftp.login(user, "x@example.org")
        ftp.close()


def test_login_timeout(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, "login_timeout = 1")
    stop_all.append(proxy)
    ftp = connect(proxy)  # and never logs in
    assert ftp.getline().startswith("421 Login timeout (1 s)")
    assert ftp.sock.recv(1) == b""


def test_idle_timeout_but_a_transfer_counts_as_activity(vsftpd, tmp_path, stop_all) -> None:
    data = os.urandom(600_000)
    legacy.put_file(vsftpd, "slow.bin", data)
    proxy = start(vsftpd, tmp_path, "idle_timeout = 1\ndownload_rate = 200000")
    stop_all.append(proxy)
    ftp = connect(proxy)
    ftp.login("anonymous", "x")
    chunks: list[bytes] = []
    started = time.monotonic()
    ftp.retrbinary("RETR slow.bin", chunks.append)  # about 3 s, thrice the idle limit
    assert time.monotonic() - started > 2
    assert b"".join(chunks) == data
    assert ftp.getline().startswith("421 Idle timeout (1 s)")


def test_slowloris_line_deadline(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, "line_timeout = 1")
    stop_all.append(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"NOO")  # ... and the rest never comes
        assert reader.readline().startswith(b"421 Command line not completed within 1 s.")
        assert sock.recv(1) == b""


@pytest.mark.parametrize("direction", ["get", "put"])
def test_rate_limits_are_accurate(direction: str, vsftpd, tmp_path, stop_all) -> None:
    rate = 2_000_000
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(5 * rate))  # five seconds' worth
    legacy.put_file(vsftpd, "payload.bin", payload.read_bytes())
    proxy = start(vsftpd, tmp_path, f"upload_rate = {rate}\ndownload_rate = {rate}")
    stop_all.append(proxy)
    endpoint = Endpoint("127.0.0.1", proxy.port, vsftpd.user, vsftpd.password)
    local = tmp_path / "copy.bin" if direction == "get" else payload
    started = time.monotonic()
    result = transfer("curl", direction, endpoint, "payload.bin" if direction == "get" else "up.bin", local)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert sha256(local if direction == "get" else vsftpd.files / "up.bin") == sha256(payload)
    measured = 5 * rate / elapsed
    assert 0.9 * rate <= measured <= 1.1 * rate, f"{measured:.0f} B/s for a limit of {rate}"


# -- hostile input -----------------------------------------------------------


def test_over_long_lines_get_500_and_a_session_that_insists_is_closed(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, "max_line = 4096")
    stop_all.append(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"USER " + b"a" * 5000 + b"\r\nNOOP\r\n")
        assert reader.readline() == b"500 Command line too long (the limit is 4096 bytes).\r\n"
        assert reader.readline()[:3].isdigit()  # NOOP's own reply: the session goes on
        sock.sendall((b"X" * 5000 + b"\r\n") * 2)
        assert reader.readline().startswith(b"500 ")
        assert reader.readline().startswith(b"500 ")
        assert reader.readline() == b""  # the third strike closed it
    proxy.wait_for("too many over-long command lines")


def test_nul_bytes_and_invalid_utf8_reach_the_backend_as_bytes(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path)
    stop_all.append(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"USER anonymous\r\nPASS x\r\n")
        assert reader.readline().startswith(b"331") and reader.readline().startswith(b"230")
        sock.sendall(b"SIZE caf\xe9\x00\xff\xfe.bin\r\nNOOP\r\n")
        assert reader.readline()[:1] in (b"5", b"4")
        assert reader.readline().startswith(b"200")


def test_a_pasv_storm_holds_one_port(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, ports="20820-20821")
    stop_all.append(proxy)
    storm, other = connect(proxy), connect(proxy)
    storm.login("anonymous", "x")
    other.login("anonymous", "x")
    for _ in range(200):
        assert storm.sendcmd("PASV").startswith("227")
    # The storm holds one port of two; everyone else still gets the other.
    assert other.sendcmd("PASV").startswith("227")
    storm.quit()
    other.quit()


# -- faults ------------------------------------------------------------------


def test_an_unreachable_backend_gets_421_promptly(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, backend_port=legacy.free_port())
    stop_all.append(proxy)
    started = time.monotonic()
    assert greeting(proxy).startswith("421 Service not available, the FTP server cannot be reached.")
    assert time.monotonic() - started < 2


def test_the_backend_dying_mid_transfer(vsftpd, tmp_path, stop_all) -> None:
    legacy.put_file(vsftpd, "big.bin", os.urandom(20_000_000))
    proxy = start(vsftpd, tmp_path, "download_rate = 4000000")
    stop_all.append(proxy)
    bystander = connect(proxy)
    bystander.login("anonymous", "x")
    victim = connect(proxy)
    victim.login("anonymous", "x")
    victim.voidcmd("TYPE I")
    conn = victim.transfercmd("RETR big.bin")
    conn.recv(1 << 16)
    # vsftpd forks one process per session; the victim logged in last.
    victim_pid = max(_children(vsftpd.process.pid))
    for pid in [victim_pid, *_children(victim_pid)]:
        os.kill(pid, signal.SIGKILL)
    victim.sock.settimeout(10)
    assert victim.getline().startswith("421 Service not available, the server closed the connection.")
    conn.close()
    # The other session carries on.
    assert bystander.sendcmd("NOOP").startswith("200")
    assert len(bystander.nlst()) >= 1
    bystander.quit()


def _children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], check=False, capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def test_a_client_vanishing_mid_transfer_frees_everything(vsftpd, tmp_path, stop_all) -> None:
    legacy.put_file(vsftpd, "big.bin", os.urandom(20_000_000))
    proxy = start(vsftpd, tmp_path, "download_rate = 4000000", ports="20830-20830")
    stop_all.append(proxy)
    ftp = connect(proxy)
    ftp.login("anonymous", "x")
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd("RETR big.bin")
    conn.recv(1 << 16)
    for sock in (conn, ftp.sock):
        # RST, not FIN: the client is gone, not finished.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()
    ftp.close()  # closes ftplib's file object too, so the socket really goes
    closed = proxy.wait_for("session closed")[0]
    assert closed["bytes_down"] < 20_000_000
    # The single passive port is free again.
    again = connect(proxy)
    again.login("anonymous", "x")
    assert again.sendcmd("PASV").startswith("227")
    again.quit()


# -- lifecycle ---------------------------------------------------------------


def test_sigterm_stops_accepting_and_lets_transfers_finish(vsftpd, tmp_path, stop_all) -> None:
    data = os.urandom(6_000_000)
    legacy.put_file(vsftpd, "f.bin", data)
    proxy = start(vsftpd, tmp_path, "download_rate = 3000000\nshutdown_grace = 20")
    stop_all.append(proxy)
    ftp = connect(proxy)
    ftp.login("anonymous", "x")
    received: list[bytes] = []
    worker = threading.Thread(target=lambda: ftp.retrbinary("RETR f.bin", received.append))
    worker.start()
    proxy.wait_for("passive mapping")
    proxy.process.send_signal(signal.SIGTERM)
    proxy.wait_for("stopped accepting; sessions may finish")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).recv(1)
    worker.join(30)
    assert b"".join(received) == data
    # Its transfer done, the session is idle: it is told at once.
    assert ftp.getline().startswith("421 Service shutting down")
    assert proxy.process.wait(20) == 0
    assert proxy.events("stopped")


def test_the_shutdown_grace_ends_idle_sessions_with_421(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path, "shutdown_grace = 1")
    stop_all.append(proxy)
    ftp = connect(proxy)
    ftp.login("anonymous", "x")
    proxy.process.send_signal(signal.SIGTERM)
    assert ftp.getline().startswith("421 Service shutting down")
    assert proxy.process.wait(10) == 0


def test_sighup_reloads_for_new_sessions_and_survives_a_bad_file(vsftpd, tmp_path, stop_all) -> None:
    proxy = start(vsftpd, tmp_path)
    stop_all.append(proxy)
    config = proxy.log.parent / "ftpfix.toml"
    old = connect(proxy)
    old.login("anonymous", "x")
    config.write_text(config.read_text().replace('public_address = "127.0.0.1"', 'public_address = "192.0.2.99"'))
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for("config reloaded")
    new = connect(proxy)
    new.login("anonymous", "x")
    assert "(192,0,2,99," in new.sendcmd("PASV")
    assert "(127,0,0,1," in old.sendcmd("PASV")  # the running session keeps its config
    config.write_text("this is [not valid toml")
    proxy.process.send_signal(signal.SIGHUP)
    failed = proxy.wait_for("config reload failed; keeping the running config")[0]
    assert "not valid TOML" in failed["error"]
    newest = connect(proxy)
    newest.login("anonymous", "x")
    assert "(192,0,2,99," in newest.sendcmd("PASV")
    for ftp in (old, new, newest):
        ftp.quit()


def test_injected_227s_never_open_a_mapping(server_dir, tmp_path, stop_all) -> None:
    """ProFTPD echoes file names in its replies: a 550 that quotes a 227, a
    PWD that names one, a SITE that carries one; none may open a port."""
    require_servers("proftpd")
    server = legacy.start("proftpd", server_dir / "proftpd")
    try:
        proxy = start(server, tmp_path)
        stop_all.append(proxy)
        ftp = connect(proxy)
        ftp.login(server.user, server.password)
        injected = "227 Entering Passive Mode (127,0,0,1,0,22)"
        with pytest.raises(ftplib.error_perm) as refused:
            ftp.sendcmd(f"RETR {injected}")
        assert "127,0,0,1,0,22" in str(refused.value)  # relayed as text, unchanged
        ftp.mkd("10,0,0,1,0,22")
        ftp.cwd("10,0,0,1,0,22")
        assert "10,0,0,1,0,22" in ftp.sendcmd("PWD")
        with pytest.raises(ftplib.error_perm):
            ftp.sendcmd(f"SITE {injected}")
        assert ftp.sendcmd("NOOP").startswith("200")
        ftp.quit()
        proxy.wait_for("session closed")
        assert proxy.events("passive mapping") == []
    finally:
        server.stop()
