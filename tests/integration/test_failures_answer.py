"""Every failure answers (issue 10): a data connection that is never made,
one that comes from the wrong address, one the client refuses, and a client
that hangs up mid-command, each against the three real servers.

The client must get a 425 within ``data_connect_timeout`` + 2 s and a working
session after it; a client that hangs up must free its per-address slot
within 2 s; and the session's closing line must say why it ended.
"""

from __future__ import annotations

import ftplib
import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from tests.harness import legacy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

#: data_connect_timeout in these tests, in seconds.
ACCEPT = 2.0

#: What "at once" may take on a loaded CI machine, in seconds.
SLACK = 2.0


def start(backend: legacy.LegacyServer, tmp_path: Path, *, passive_extra: str = "", limits: str = "") -> Ftpfix:
    return start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(backend.host, backend.port),
            public_address="127.0.0.1",
            ports="20300-20309",
            passive_extra=passive_extra,
            extra=f"[limits]\ndata_connect_timeout = {ACCEPT}\n{limits}",
        ),
    )


def login(proxy: Ftpfix, backend: legacy.LegacyServer) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=30)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.port)
    ftp.login(backend.user, backend.password)
    return ftp


def final_reply(ftp: ftplib.FTP) -> str:
    """The transfer command's final reply, whatever preliminary ones came first."""
    while True:
        line = ftp.getmultiline()
        if not line.startswith("1"):
            return line


def hang_up(ftp: ftplib.FTP) -> None:
    """Close the control connection as a client that exits does (ftplib's
    file object holds the socket open past ``sock.close()``)."""
    ftp.file.close()
    ftp.sock.close()


def assert_usable(ftp: ftplib.FTP) -> None:
    assert ftp.sendcmd("NOOP").startswith("200")
    assert ftp.sendcmd("PWD").startswith("257")


def test_a_data_connection_never_made_gets_425_and_the_session_goes_on(backend, tmp_path: Path) -> None:
    proxy = start(backend, tmp_path)
    try:
        ftp = login(proxy, backend)
        ftp.sendcmd("PASV")
        started = time.monotonic()
        ftp.putcmd("NLST")
        reply = final_reply(ftp)
        took = time.monotonic() - started
        assert reply.startswith("425 Can't open data connection: nobody connected within 2 s"), reply
        assert took < ACCEPT + SLACK, f"{took:.1f} s"
        assert_usable(ftp)
        proxy.wait_for("data port released: the client never connected")
        ftp.quit()
    finally:
        proxy.stop()


def test_a_strangers_data_connection_gets_the_client_425_and_the_log_names_it(backend, tmp_path: Path) -> None:
    proxy = start(backend, tmp_path)
    try:
        ftp = login(proxy, backend)
        port = ftplib.parse227(ftp.sendcmd("PASV"))[1]
        ftp.putcmd("NLST")
        started = time.monotonic()
        # The client's other address (carrier-grade NAT), or a port thief:
        # 127.0.0.2 is loopback, but not the address of the control connection.
        with socket.socket() as stranger:
            stranger.bind(("127.0.0.2", 0))
            stranger.settimeout(10)
            stranger.connect(("127.0.0.1", port))
            reply = final_reply(ftp)
        took = time.monotonic() - started
        assert reply.startswith("425 Can't open data connection: the data connection came from outside 127.0.0.1."), (
            reply
        )
        assert took < ACCEPT + SLACK, f"{took:.1f} s"
        assert_usable(ftp)
        (released,) = proxy.wait_for("data port released: only other addresses connected, never the client")
        assert released["refused"] == ["127.0.0.2"]
        assert "the client's network 127.0.0.0/24" in released["hint"]
        assert "same-network" in released["hint"]
        ftp.quit()
    finally:
        proxy.stop()


def test_a_transfer_after_the_data_port_expired_gets_425_at_once(backend, tmp_path: Path) -> None:
    proxy = start(backend, tmp_path)
    try:
        ftp = login(proxy, backend)
        ftp.sendcmd("PASV")
        proxy.wait_for("data port released: the client never connected")
        started = time.monotonic()
        with pytest.raises(ftplib.error_temp, match="^425 Can't open data connection: nobody connected"):
            ftp.sendcmd("NLST")
        assert time.monotonic() - started < SLACK
        assert_usable(ftp)
        ftp.quit()
    finally:
        proxy.stop()


def test_same_network_accepts_the_clients_other_address(backend, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    legacy.put_file(backend, "f.bin", data)
    proxy = start(backend, tmp_path, passive_extra='accept_data_from = "same-network"\n')
    try:
        ftp = login(proxy, backend)
        ftp.voidcmd("TYPE I")
        port = ftplib.parse227(ftp.sendcmd("PASV"))[1]
        with socket.socket() as conn:
            conn.bind(("127.0.0.2", 0))  # same /24 as the control connection's 127.0.0.1
            conn.settimeout(20)
            conn.connect(("127.0.0.1", port))
            ftp.sendcmd("RETR f.bin")
            received = bytearray()
            while chunk := conn.recv(1 << 16):
                received += chunk
        assert ftp.voidresp().startswith("226")
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        ftp.quit()
    finally:
        proxy.stop()


def test_an_active_data_connection_the_client_refuses_gets_425(backend, tmp_path: Path) -> None:
    proxy = start(backend, tmp_path)
    try:
        ftp = login(proxy, backend)
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        ftp.sendcmd(f"PORT 127,0,0,1,{port >> 8},{port & 255}")
        ftp.putcmd("NLST")
        reply = final_reply(ftp)
        assert reply.startswith("425 Can't open data connection: cannot connect to the client"), reply
        assert_usable(ftp)
        ftp.quit()
    finally:
        proxy.stop()


def test_a_client_that_hangs_up_mid_nlst_frees_its_slot_at_once(backend, tmp_path: Path) -> None:
    proxy = start(backend, tmp_path, limits="max_sessions_per_ip = 1\n")
    try:
        ftp = login(proxy, backend)
        ftp.sendcmd("PASV")
        ftp.putcmd("NLST")
        time.sleep(0.2)  # the NLST is at the backend, waiting for its data connection
        hang_up(ftp)
        hung_up = time.monotonic()
        (closed,) = proxy.wait_for("session closed", timeout=SLACK + 1)
        assert time.monotonic() - hung_up < SLACK
        assert closed["reason"] == "client hung up"
        again = login(proxy, backend)  # the per-address slot is free again
        assert_usable(again)
        again.quit()
    finally:
        proxy.stop()


def test_close_reasons_say_what_happened(backend, tmp_path: Path) -> None:
    proxy = start(backend, tmp_path)
    try:
        login(proxy, backend).quit()
        (closed,) = proxy.wait_for("session closed")
        assert closed["reason"] == "quit"
        ftp = login(proxy, backend)
        hang_up(ftp)
        closed = proxy.wait_for("session closed", count=2)[1]
        assert closed["reason"] == "client hung up"
    finally:
        proxy.stop()
