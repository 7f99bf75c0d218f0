"""Shared passive ports ([passive] share_ports) against a real vsftpd.

Clients bind distinct source addresses in 127.0.0.0/8, so one machine plays
many client hosts; every transfer is checked with sha256.
"""

from __future__ import annotations

import ftplib
import hashlib
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.harness import legacy
from tests.harness.procstat import open_fds
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]


def start(vsftpd: legacy.LegacyServer, tmp_path: Path, ports: str, passive: str = "", accept_timeout: float = 30):
    return start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports=ports,
            passive_extra=passive,
            extra=f"[limits]\ndata_connect_timeout = {accept_timeout}\n",
        ),
    )


def free_range(size: int) -> tuple[int, str]:
    """A block of ``size`` ports nobody listens on now (others run tests on this machine too)."""
    for _ in range(200):
        first = random.randrange(24000, 31000)
        socks = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return first, f"{first}-{first + size - 1}"
    raise RuntimeError("no free block of ports")


def login(proxy: Ftpfix, source: str) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=20, source_address=(source, 0))
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.port)
    ftp.login("anonymous", "x")
    ftp.voidcmd("TYPE I")
    return ftp


def pasv_port(ftp: ftplib.FTP) -> int:
    return ftplib.parse227(ftp.sendcmd("PASV"))[1]


def data_connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))


def download(ftp: ftplib.FTP, conn: socket.socket, name: str) -> bytes:
    """RETR over a data connection made already; the 226 checked."""
    ftp.sendcmd(f"RETR {name}")
    received = bytearray()
    with conn:
        while chunk := conn.recv(1 << 16):
            received += chunk
    assert ftp.voidresp().startswith("226")
    return bytes(received)


def knock_as_stranger(port: int, source: str) -> None:
    """Connect from ``source`` and see the connection closed or reset with nothing relayed."""
    try:
        with data_connect(port, source) as sock:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    except ConnectionResetError:
        pass  # refused with a reset (it may come before connect() returns)


def refused(port: int) -> bool:
    """True if nothing listens on ``port`` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_fds(proxy: Ftpfix, baseline: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (now := open_fds(proxy.process.pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def test_five_clients_download_at_once_through_one_port(vsftpd, tmp_path: Path) -> None:
    files = {f"c{i}.bin": os.urandom(2 * 1024 * 1024 + i) for i in range(2, 7)}
    for name, data in files.items():
        legacy.put_file(vsftpd, name, data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports)
    try:
        baseline = open_fds(proxy.process.pid)
        sources = [f"127.0.0.{i}" for i in range(2, 7)]
        sessions = [login(proxy, source) for source in sources]
        # Five mappings wait on the one port at once, one per client address.
        ports = [pasv_port(ftp) for ftp in sessions]
        assert ports == [port] * 5
        assert len(proxy.events("passive mapping")) == 5
        # They connect in the reverse order of their PASVs: each connection
        # goes to the mapping of its own address, whoever accepts it.
        conns = {source: data_connect(port, source) for source in reversed(sources)}
        results: dict[str, bytes] = {}

        def fetch(ftp: ftplib.FTP, source: str) -> None:
            results[source] = download(ftp, conns[source], f"c{source.rsplit('.', 1)[1]}.bin")

        threads = [threading.Thread(target=fetch, args=(ftp, s)) for ftp, s in zip(sessions, sources, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for source in sources:
            expected = files[f"c{source.rsplit('.', 1)[1]}.bin"]
            assert hashlib.sha256(results[source]).digest() == hashlib.sha256(expected).digest()
        # Every mapping had its connection: the listener is closed.
        assert refused(port)
        for ftp in sessions:
            ftp.quit()
        assert wait_fds(proxy, baseline) <= baseline
        assert not proxy.events("data connection from a stranger refused")
    finally:
        proxy.stop()


def test_a_second_pasv_from_the_same_address_gets_another_port_or_425(vsftpd, tmp_path: Path) -> None:
    port, ports = free_range(2)
    proxy = start(vsftpd, tmp_path, ports)
    try:
        first, second, third = (login(proxy, "127.0.0.2") for _ in range(3))
        other = login(proxy, "127.0.0.3")
        a = pasv_port(first)
        b = pasv_port(second)  # the same address never holds two pending mappings on one port
        assert {a, b} == {port, port + 1}
        with pytest.raises(ftplib.error_temp, match="425 Can't open data connection: no free passive port for your"):
            third.sendcmd("PASV")
        assert proxy.wait_for("passive port pool exhausted for this client")[-1]["accepted"] == "127.0.0.2/32"
        # Another address still gets a port: the range is full for 127.0.0.2 only.
        assert pasv_port(other) in (port, port + 1)
        for ftp in (first, second, third, other):
            ftp.quit()
    finally:
        proxy.stop()


def test_a_stranger_on_a_shared_port_is_refused_and_the_clients_still_get_their_data(vsftpd, tmp_path: Path) -> None:
    data = os.urandom(1024 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports)
    try:
        a, b = login(proxy, "127.0.0.2"), login(proxy, "127.0.0.3")
        assert pasv_port(a) == pasv_port(b) == port
        knock_as_stranger(port, "127.0.0.9")
        refusal = proxy.wait_for("data connection from a stranger refused")[-1]
        assert (refusal["peer"], refusal["port"]) == ("127.0.0.9", port)
        for ftp, source in ((a, "127.0.0.2"), (b, "127.0.0.3")):
            received = download(ftp, data_connect(port, source), "f.bin")
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        a.quit()
        b.quit()
    finally:
        proxy.stop()


def test_a_mapping_that_goes_away_leaves_the_others_and_then_the_port(vsftpd, tmp_path: Path) -> None:
    """The first PASV's transfer accepts for everyone on the port; its session
    ends while the others wait: another takes over accepting, the gone
    client's address becomes a stranger, and the port closes with the last."""
    data = os.urandom(512 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports)
    try:
        baseline = open_fds(proxy.process.pid)
        gone, stays = login(proxy, "127.0.0.2"), login(proxy, "127.0.0.3")
        assert pasv_port(gone) == pasv_port(stays) == port
        gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        gone.close()  # a reset: the session ends, its mapping with it
        proxy.wait_for("session closed")
        knock_as_stranger(port, "127.0.0.2")
        proxy.wait_for("data connection from a stranger refused")
        received = download(stays, data_connect(port, "127.0.0.3"), "f.bin")
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert refused(port)
        stays.quit()
        assert wait_fds(proxy, baseline) <= baseline
    finally:
        proxy.stop()


def test_a_client_that_never_connects_gets_425_while_its_neighbour_transfers(vsftpd, tmp_path: Path) -> None:
    data = os.urandom(256 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports, accept_timeout=2)
    try:
        idle, busy = login(proxy, "127.0.0.2"), login(proxy, "127.0.0.3")
        assert pasv_port(idle) == pasv_port(busy) == port
        received = download(busy, data_connect(port, "127.0.0.3"), "f.bin")
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        proxy.wait_for("data port released: the client never connected")
        with pytest.raises(ftplib.error_temp, match="425"):
            idle.sendcmd("RETR f.bin")
        assert idle.sendcmd("NOOP").startswith("200")
        # Both gone: the port is free, and serves again.
        assert refused(port)
        assert pasv_port(idle) == port
        idle.quit()
        busy.quit()
    finally:
        proxy.stop()


def test_share_ports_off_gives_each_port_to_one_client(vsftpd, tmp_path: Path) -> None:
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports, passive="share_ports = false")
    try:
        a, b = login(proxy, "127.0.0.2"), login(proxy, "127.0.0.3")
        assert pasv_port(a) == port
        with pytest.raises(ftplib.error_temp, match="425 Can't open data connection: no free passive port, try"):
            b.sendcmd("PASV")
        a.quit()
        b.quit()
    finally:
        proxy.stop()


def test_same_network_mappings_share_only_across_networks(vsftpd, tmp_path: Path) -> None:
    """accept_data_from = "same-network": two clients in one /24 would both
    match a connection from that /24, so they never share a port; clients in
    different /24s do."""
    data = os.urandom(128 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports, passive='accept_data_from = "same-network"')
    try:
        a, near, far = login(proxy, "127.0.0.2"), login(proxy, "127.0.0.3"), login(proxy, "127.0.1.2")
        assert pasv_port(a) == port
        with pytest.raises(ftplib.error_temp, match="no free passive port for your address"):
            near.sendcmd("PASV")
        assert pasv_port(far) == port
        # a's network partner may make a's data connection (that is what
        # same-network means); far's comes from its own network.
        for ftp, source in ((a, "127.0.0.77"), (far, "127.0.1.2")):
            received = download(ftp, data_connect(port, source), "f.bin")
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        for ftp in (a, near, far):
            ftp.quit()
    finally:
        proxy.stop()
