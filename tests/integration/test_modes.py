"""ABOR, IPv6, active-mode safety and FEAT, against real legacy servers."""

from __future__ import annotations

import ftplib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_programs, require_root, require_servers
from tests.harness import legacy
from tests.harness.clients import Endpoint, sha256, transfer
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "20500-20519"


def ftpfix_for(
    server: legacy.LegacyServer,
    workdir: Path,
    *,
    listen: str | list[str] = "127.0.0.1",
    port: int = 0,
    extra: str = "",
    passive_extra: str = "",
) -> Ftpfix:
    return start_ftpfix(
        workdir,
        config_text(
            listen=(listen, port),
            backend=(server.host, server.port),
            public_address="127.0.0.1",
            ports=PORTS,
            passive_extra=passive_extra,
            extra=extra,
        ),
    )


@pytest.fixture
def proxy(backend: legacy.LegacyServer, tmp_path: Path) -> Iterator[Ftpfix]:
    ftpfix = ftpfix_for(backend, tmp_path / "ftpfix")
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


def login(proxy: Ftpfix, server: legacy.LegacyServer, host: str | None = None) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=20)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(host or proxy.host, proxy.port)
    ftp.login(server.user, server.password)
    return ftp


def finish_abort(ftp: ftplib.FTP, first: str, server: legacy.LegacyServer) -> None:
    """Read both replies an ABOR during a RETR brings (RFC 959 section 4.1.3):
    one for the transfer (426, or 226 if it had just ended) and one for the
    ABOR itself (225 or 226). Then the next command gets its own reply."""
    assert first[:3] in ("426", "226"), first
    assert ftp.getresp()[:3] in ("225", "226")


# -- ABOR --------------------------------------------------------------------


def test_abor_with_urgent_data_as_ftplib_sends_it(backend: legacy.LegacyServer, proxy: Ftpfix) -> None:
    legacy.put_file(backend, "big.bin", os.urandom(64 * 1024 * 1024))
    ftp = login(proxy, backend)
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd("RETR big.bin")
    assert len(conn.recv(1 << 20)) > 0
    # ftplib.abort() sends "ABOR\r\n" with MSG_OOB: the last byte is urgent,
    # and only SO_OOBINLINE keeps it in the command stream.
    try:
        first = ftp.abort()
    except ftplib.error_proto as odd:
        first = str(odd)
    finish_abort(ftp, first, backend)
    conn.close()
    assert ftp.sendcmd("NOOP").startswith("200")
    # The session is still good for a whole transfer.
    assert len(ftp.nlst()) >= 1
    ftp.quit()


def test_abor_with_telnet_ip_and_dm_as_lftp_sends_it(backend: legacy.LegacyServer, proxy: Ftpfix) -> None:
    legacy.put_file(backend, "big.bin", os.urandom(64 * 1024 * 1024))
    ftp = login(proxy, backend)
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd("RETR big.bin")
    assert len(conn.recv(1 << 20)) > 0
    # lftp: IAC IP, then IAC DM as urgent data (RFC 959 section 4.1.3), then ABOR.
    ftp.sock.sendall(b"\xff\xf4\xff")
    ftp.sock.send(b"\xf2", socket.MSG_OOB)
    ftp.sock.sendall(b"ABOR\r\n")
    finish_abort(ftp, ftp.getmultiline(), backend)
    conn.close()
    assert ftp.sendcmd("NOOP").startswith("200")
    ftp.quit()
    closed = proxy.wait_for("session closed")
    assert closed[-1]["bytes_down"] < 64 * 1024 * 1024


# -- IPv6 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "client, mode",
    [("curl", "epsv"), ("curl", "eprt"), ("lftp", "epsv"), ("lftp", "eprt"), ("ftplib", "epsv"), ("ftplib", "eprt")],
)
def test_ipv6_clients_in_front_of_an_ipv4_backend(
    client: str, mode: str, server_dir: Path, tmp_path: Path, big_file: Path
) -> None:
    require_servers("vsftpd")
    require_programs("curl", "lftp")
    require(socket.has_ipv6 and _ipv6_loopback(), "no IPv6 loopback (::1) on this machine")
    server = legacy.start("vsftpd", server_dir / "vsftpd")  # IPv4 only, on 127.0.0.1
    port = legacy.free_port("::1")
    proxy = ftpfix_for(server, tmp_path / "ftpfix", listen=["127.0.0.1", "::1"], port=port)
    try:
        legacy.put_file(server, "download.bin", big_file.read_bytes())
        endpoint = Endpoint("::1", port, server.user, server.password)
        out = tmp_path / "out.bin"
        result = transfer(client, "get", endpoint, "download.bin", out, mode=mode)
        assert result.returncode == 0, result.stderr
        assert sha256(out) == sha256(big_file)
        result = transfer(client, "put", endpoint, "up6.bin", big_file, mode=mode)
        assert result.returncode == 0, result.stderr
        assert sha256(server.files / "up6.bin") == sha256(big_file)
        assert all(event["client"].startswith("::1") for event in proxy.events("session opened"))
    finally:
        proxy.stop()
        server.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- active mode safety ------------------------------------------------------


def test_bounce_attempts_are_refused_and_nothing_is_dialed(backend: legacy.LegacyServer, tmp_path: Path) -> None:
    proxy = ftpfix_for(backend, tmp_path / "ftpfix", extra="[active]\nfix_address = false\n")
    try:
        with socket.socket() as target:
            # A third party on another address, listening: it must never see a SYN.
            target.bind(("127.0.0.2", 0))
            target.listen()
            target.settimeout(0.5)
            port = target.getsockname()[1]
            ftp = login(proxy, backend)
            for command, code in [
                (f"PORT 127,0,0,2,{port >> 8},{port & 255}", "501"),
                (f"EPRT |1|127.0.0.2|{port}|", "501"),
                ("PORT 8,8,8,8,4,1", "501"),
                ("PORT 127,0,0,1,0,25", "504"),
                ("EPRT |1|127.0.0.1|21|", "504"),
            ]:
                with pytest.raises(ftplib.error_perm, match=f"^{code} "):
                    ftp.sendcmd(command)
            with pytest.raises(ftplib.error_perm, match="^522 "):
                ftp.sendcmd("EPRT |7|x|4242|")
            with pytest.raises(TimeoutError):
                target.accept()
            assert ftp.sendcmd("NOOP").startswith("200")
            ftp.quit()
    finally:
        proxy.stop()


def test_a_client_behind_nat_that_sends_its_private_address(backend: legacy.LegacyServer, tmp_path: Path) -> None:
    payload = os.urandom(1 << 20)
    legacy.put_file(backend, "f.bin", payload)
    proxy = ftpfix_for(backend, tmp_path / "ftpfix")
    try:
        ftp = login(proxy, backend)
        ftp.voidcmd("TYPE I")
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            # 10.0.0.5 is what a client behind its own NAT believes it is.
            assert ftp.sendcmd(f"PORT 10,0,0,5,{port >> 8},{port & 255}").startswith("200")
            ftp.sendcmd("RETR f.bin")
            conn, _ = listener.accept()
            with conn:
                received = b"".join(iter(lambda: conn.recv(1 << 16), b""))
        assert ftp.voidresp().startswith("226")
        assert received == payload
        ftp.quit()
        assert proxy.events("active mode address fixed")[0]["sent"] == "10.0.0.5"
    finally:
        proxy.stop()


def test_active_data_can_come_from_port_20(server_dir: Path, tmp_path: Path) -> None:
    require_servers("vsftpd")
    server = legacy.start("vsftpd", server_dir / "vsftpd")
    legacy.put_file(server, "f.bin", b"from port 20\n")
    proxy = ftpfix_for(server, tmp_path / "ftpfix", extra="[active]\nsource_port = 20\n")
    try:
        ftp = login(proxy, server)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            ftp.sendcmd(f"PORT 127,0,0,1,{port >> 8},{port & 255}")
            ftp.sendcmd("RETR f.bin")
            conn, peer = listener.accept()
            with conn:
                assert b"".join(iter(lambda: conn.recv(4096), b"")) == b"from port 20\n"
        assert peer[1] == 20
        assert ftp.voidresp().startswith("226")
        ftp.quit()
    finally:
        proxy.stop()
        server.stop()


def test_source_port_20_without_the_right_is_a_clear_error(server_dir: Path) -> None:
    require_root()
    config = server_dir / "ftpfix.toml"
    config.write_text(
        config_text(
            listen=("127.0.0.1", legacy.free_port()),
            backend=("127.0.0.1", 2121),
            public_address="127.0.0.1",
            ports=PORTS,
            extra="[active]\nsource_port = 20\n",
        )
    )
    config.chmod(0o644)
    # Run without the right to bind privileged ports, the way a careless
    # container would. Still as root, so ftpfix can be read wherever the clone
    # lives: as nobody it could not, under a mode-700 home directory.
    argv = [
        "setpriv",
        "--bounding-set=-net_bind_service",
        "--inh-caps=-all",
        sys.executable,
        "-m",
        "ftpfix",
        "run",
        "--config",
        str(config),
    ]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1
    assert "ftpfix: [active] source_port = 20 needs the right to bind privileged ports" in result.stderr


def test_active_mode_can_be_denied(backend: legacy.LegacyServer, tmp_path: Path) -> None:
    proxy = ftpfix_for(backend, tmp_path / "ftpfix", extra='[active]\nmode = "deny"\n')
    try:
        ftp = login(proxy, backend)
        with pytest.raises(ftplib.error_perm, match="^502 PORT is disabled here"):
            ftp.sendcmd("PORT 127,0,0,1,195,80")
        ftp.quit()
    finally:
        proxy.stop()


# -- FEAT --------------------------------------------------------------------


def test_feat_lists_what_ftpfix_provides(backend: legacy.LegacyServer, proxy: Ftpfix) -> None:
    ftp = login(proxy, backend)
    features = {line.strip().split(" ")[0] for line in ftp.sendcmd("FEAT").splitlines()[1:-1]}
    assert {"EPSV", "EPRT"} <= features
    assert not features & {"AUTH", "PBSZ", "PROT"}
    with pytest.raises(ftplib.error_perm, match="^502 AUTH is not available"):
        ftp.sendcmd("AUTH TLS")
    ftp.quit()
