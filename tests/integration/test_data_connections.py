"""The passive data path against a real backend: who may connect, and when
ports come back."""

from __future__ import annotations

import ftplib
import hashlib
import os
import socket
from pathlib import Path

import pytest

from tests.harness import legacy
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]


def start(vsftpd: legacy.LegacyServer, tmp_path: Path, ports: str, accept_timeout: float = 30):
    return start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports=ports,
            extra=f"[limits]\ndata_connect_timeout = {accept_timeout}\n",
        ),
    )


def login(proxy) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=20)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.port)
    ftp.login("anonymous", "x")
    return ftp


def pasv_port(ftp: ftplib.FTP) -> int:
    return ftplib.parse227(ftp.sendcmd("PASV"))[1]


def test_a_stranger_is_refused_and_the_client_still_gets_its_file(vsftpd, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    proxy = start(vsftpd, tmp_path, "20200-20209")
    try:
        ftp = login(proxy)
        ftp.voidcmd("TYPE I")
        port = pasv_port(ftp)
        # Port stealing (RFC 2577 section 5): a peer at another address races
        # for the port. 127.0.0.2 is loopback too, but not the client's address.
        with socket.socket() as stranger:
            stranger.bind(("127.0.0.2", 0))
            stranger.settimeout(10)
            try:
                # A loaded machine may deliver the reset before connect()
                # has returned: Python then raises it from connect().
                stranger.connect(("127.0.0.1", port))
                assert stranger.recv(1) == b""  # closed at once, nothing relayed
            except ConnectionResetError:
                pass  # refused with a reset: nothing relayed either
        proxy.wait_for("data connection from a stranger refused")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            ftp.sendcmd("RETR f.bin")
            received = bytearray()
            while chunk := conn.recv(1 << 16):
                received += chunk
        assert ftp.voidresp().startswith("226")
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        ftp.quit()
    finally:
        proxy.stop()


def test_an_exhausted_pool_gets_425_and_recovers(vsftpd, tmp_path: Path) -> None:
    proxy = start(vsftpd, tmp_path, "20210-20211", accept_timeout=2)
    try:
        sessions = [login(proxy) for _ in range(3)]
        ports = {pasv_port(sessions[0]), pasv_port(sessions[1])}
        assert ports == {20210, 20211}
        with pytest.raises(ftplib.error_temp, match="425 Can't open data connection: no free passive port"):
            sessions[2].sendcmd("PASV")
        assert sessions[2].sendcmd("NOOP").startswith("200")
        # Nobody connects: the accept timeout releases both ports.
        proxy.wait_for("data port released: the client never connected", count=2)
        assert pasv_port(sessions[2]) in ports
        for ftp in sessions:
            ftp.quit()
    finally:
        proxy.stop()


def test_a_new_pasv_replaces_the_pending_mapping(vsftpd, tmp_path: Path) -> None:
    proxy = start(vsftpd, tmp_path, "20220-20220")
    try:
        ftp = login(proxy)
        for _ in range(5):  # a one-port pool: each PASV frees the last one's port
            assert pasv_port(ftp) == 20220
        ftp.quit()
    finally:
        proxy.stop()


def test_a_port_held_by_another_process_is_skipped(vsftpd, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 20230))
        squatter.listen()
        proxy = start(vsftpd, tmp_path, "20230-20231")
        try:
            ftp = login(proxy)
            assert pasv_port(ftp) == 20231
            ftp.quit()
        finally:
            proxy.stop()


def test_every_advertised_port_is_in_the_range(vsftpd, tmp_path: Path) -> None:
    proxy = start(vsftpd, tmp_path, "20240-20242")
    try:
        ftp = login(proxy)
        seen = {pasv_port(ftp) for _ in range(20)}
        assert seen <= {20240, 20241, 20242}
        ftp.quit()
    finally:
        proxy.stop()
