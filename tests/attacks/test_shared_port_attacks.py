"""Attacks on shared passive ports ([passive] share_ports, on by default).

One public port serves several clients at once, each connection handed to the
mapping of its source address. What must hold: a connection goes only to the
mapping of its own address; a stranger gets nothing and takes nothing; one
address cannot pile mappings onto a port or crowd other clients out of the
range; a mapping served once serves no second connection.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from tests.attacks.transcript import Attacker, assert_healthy, recv_all, reset_socket
from tests.harness import legacy
from tests.harness.procstat import open_fds
from tests.harness.proxy import config_text, start_ftpfix
from tests.integration.test_shared_ports import free_range, knock_as_stranger, wait_fds

pytestmark = [pytest.mark.servers, pytest.mark.root]


def start(vsftpd, tmp_path, ports: str, proxies, accept_timeout: float = 20):
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports=ports,
            extra=f"[limits]\ndata_connect_timeout = {accept_timeout}\n",
        ),
    )
    proxies.append(proxy)
    return proxy


def retr(attacker: Attacker, conn: socket.socket, name: str) -> bytes:
    attacker.line(f"RETR {name}")
    attacker.expect("150")
    data = recv_all(conn, 20)
    conn.close()
    attacker.expect("226", 20)
    return data


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_a_stranger_flood_on_a_shared_port_takes_nothing(vsftpd, tmp_path, proxies) -> None:
    """Attacker: 60 connections from 30 addresses race for a port three clients wait on."""
    data = os.urandom(1024 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports, proxies)
    baseline = open_fds(proxy.process.pid)
    clients = [Attacker(proxy, source=f"127.0.0.{i}") for i in (2, 3, 4)]
    for client in clients:
        client.login(vsftpd.user, vsftpd.password)
        client.line("TYPE I")
        client.expect("200")
        assert client.pasv()[1] == port

    def flood(first: int) -> None:
        for i in range(first, first + 30, 2):
            knock_as_stranger(port, f"127.0.3.{i}")

    threads = [threading.Thread(target=flood, args=(first,)) for first in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    refusals = proxy.wait_for("data connection from a stranger refused", count=30)
    assert {event["peer"] for event in refusals} <= {f"127.0.3.{i}" for i in range(10, 40)}
    for client in clients:
        assert digest(retr(client, client.data_connect(port), "f.bin")) == digest(data)
        client.command("QUIT")
    assert wait_fds(proxy, baseline) <= baseline
    assert_healthy(proxy)


def test_a_second_connection_from_a_served_client_is_a_stranger(vsftpd, tmp_path, proxies) -> None:
    """Attacker: a client whose mapping has its connection dials the port again,
    hoping to be handed the neighbour's mapping: it is refused, and the
    neighbour gets its own data."""
    data = os.urandom(256 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports, proxies)
    attacker, neighbour = Attacker(proxy, source="127.0.0.2"), Attacker(proxy, source="127.0.0.3")
    for client in (attacker, neighbour):
        client.login(vsftpd.user, vsftpd.password)
        assert client.pasv()[1] == port
    first = attacker.data_connect(port)
    knock_as_stranger(port, "127.0.0.2")
    refusal = proxy.wait_for("data connection from a stranger refused")[-1]
    assert refusal["peer"] == "127.0.0.2"
    assert digest(retr(neighbour, neighbour.data_connect(port), "f.bin")) == digest(data)
    assert digest(retr(attacker, first, "f.bin")) == digest(data)
    assert_healthy(proxy)


def test_a_reset_before_accept_disturbs_no_waiting_mapping(vsftpd, tmp_path, proxies) -> None:
    """Attacker: a stranger connects to a shared port and resets at once, 20
    times, racing the accept: the waiting client is untouched and gets its data."""
    data = os.urandom(128 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    port, ports = free_range(1)
    proxy = start(vsftpd, tmp_path, ports, proxies)
    neighbour = Attacker(proxy, source="127.0.0.3")
    neighbour.login(vsftpd.user, vsftpd.password)
    assert neighbour.pasv()[1] == port
    for _ in range(20):
        with socket.socket() as sock:
            sock.bind(("127.0.0.9", 0))
            sock.connect(("127.0.0.1", port))
            reset_socket(sock)
    proxy.wait_for("data connection from a stranger refused", count=1)
    assert digest(retr(neighbour, neighbour.data_connect(port), "f.bin")) == digest(data)
    assert_healthy(proxy)


def test_one_address_cannot_crowd_others_out_of_the_range(vsftpd, tmp_path, proxies) -> None:
    """Attacker: ten sessions from one address ask PASV on a two-port range.
    It gets one pending mapping per port and 425 for the rest; a client at
    another address still gets a port, and its data."""
    data = os.urandom(64 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    first, ports = free_range(2)
    proxy = start(vsftpd, tmp_path, ports, proxies)
    sessions = [Attacker(proxy, source="127.0.0.2") for _ in range(10)]
    granted = []
    for session in sessions:
        session.login(vsftpd.user, vsftpd.password)
        session.line("PASV")
        reply = session.reply()
        if reply.startswith("227"):
            granted.append(reply)
        else:
            assert reply.startswith("425 Can't open data connection: no free passive port for your address")
    assert len(granted) == 2
    victim = Attacker(proxy, source="127.0.0.3")
    victim.login(vsftpd.user, vsftpd.password)
    port = victim.pasv()[1]
    assert port in (first, first + 1)
    assert digest(retr(victim, victim.data_connect(port), "f.bin")) == digest(data)
    assert_healthy(proxy)
