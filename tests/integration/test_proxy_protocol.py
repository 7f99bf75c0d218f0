"""The PROXY protocol with real parts: Debian's HAProxy in front of ftpfix
(send-proxy, send-proxy-v2) and behind it (accept-proxy, for
``[backend] proxy_protocol``), a balancer that sends its header only with the
client's first bytes (as AWS NLB does), and clients on different 127.0.0.x
source addresses. What ftpfix's log, its per-address limit and its access
lists see is the client's address, never the balancer's."""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ftpfix.config import Backend, BackendProxyProtocol
from ftpfix.net.proxied import OWN_GREETING
from ftpfix.net.readiness import greets
from ftpfix.protocol.proxyheader import format_v2
from tests.conftest import require, require_programs, require_servers
from tests.harness import haproxy, legacy
from tests.harness.clients import Endpoint, transfer
from tests.harness.ftps import ReusingFTP_TLS, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "20900-20919"
#: The balancer's own address: the only one ftpfix trusts a header from.
BALANCER = "127.0.0.100"
PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def started() -> Iterator[list]:
    running: list = []
    yield running
    for process in reversed(running):
        process.stop()


def require_haproxy() -> None:
    require(haproxy.installed(), "HAProxy is not unpacked or lacks its libraries (run ./tests/run)")


def start_proxy(
    tmp_path: Path, backend: tuple[str, int], *, extra: str = "", listen: str = "", backend_extra: str = ""
) -> Ftpfix:
    return start_ftpfix(
        tmp_path / f"ftpfix-{time.monotonic_ns()}",
        config_text(
            listen=("127.0.0.1", 0),
            backend=backend,
            public_address="127.0.0.1",
            ports=PORTS,
            extra=f"{extra}\n",
        )
        .replace("[listen]\n", f"[listen]\n{listen}\n", 1)
        .replace("[backend]\n", f"[backend]\n{backend_extra}\n", 1),
    )


def login(port: int, source: str, server: legacy.LegacyServer) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=20, source_address=(source, 0))
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect("127.0.0.1", port)
    ftp.login(server.user, server.password)
    return ftp


def download(ftp: ftplib.FTP, name: str) -> str:
    sink = io.BytesIO()
    ftp.retrbinary(f"RETR {name}", sink.write)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def first_reply(port: int, source: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline().decode()


def closed_for(proxy: Ftpfix, client: str, timeout: float = 15.0) -> dict:
    """The "session closed" line of the session from ``client``, waiting for it."""
    deadline = time.monotonic() + timeout
    while not (found := [e for e in proxy.events("session closed") if e["client"].startswith(client)]):
        assert time.monotonic() < deadline, proxy.log.read_text()
        time.sleep(0.05)
    return found[-1]


def clients_seen(proxy: Ftpfix) -> set[str]:
    return {event["client"].rsplit(":", 1)[0] for event in proxy.events("session opened")}


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_real_client_addresses_limits_and_access(send: str, vsftpd, tmp_path, started) -> None:
    require_haproxy()
    legacy.put_file(vsftpd, "payload.bin", PAYLOAD)
    proxy = start_proxy(
        tmp_path,
        (vsftpd.host, vsftpd.port),
        listen=f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]',
        extra='[limits]\nmax_sessions_per_ip = 2\n[access]\ndeny = ["127.0.0.4/32"]',
    )
    started.append(proxy)
    port = haproxy.free_port()
    balancer = haproxy.start(
        tmp_path / "haproxy",
        haproxy.config(port, ("127.0.0.1", proxy.port), server_options=f"{send} source {BALANCER}"),
        port,
    )
    started.append(balancer)

    # A transfer through the balancer (control) and straight to ftpfix (data),
    # whose peer check accepts the real client.
    ftp = login(balancer.port, "127.0.0.2", vsftpd)
    assert ftp.welcome != OWN_GREETING.decode().strip(), "HAProxy sends at connect: the backend's own 220"
    assert download(ftp, "payload.bin") == hashlib.sha256(PAYLOAD).hexdigest()

    # The per-address limit counts 127.0.0.2, not the balancer.
    second = login(balancer.port, "127.0.0.2", vsftpd)
    assert first_reply(balancer.port, "127.0.0.2").startswith("421 Too many connections from your address (2 at most)")
    assert first_reply(balancer.port, "127.0.0.3").startswith("220")
    # The access list judges the real address.
    assert first_reply(balancer.port, "127.0.0.4").startswith("421 Access denied for your address.")
    for each in (ftp, second):
        each.quit()

    proxy.wait_for("session closed", 4)
    assert {"127.0.0.2", "127.0.0.3"} <= clients_seen(proxy)
    assert BALANCER not in clients_seen(proxy)
    opened = proxy.events("session opened")
    assert all(event.get("proxy") == BALANCER for event in opened), opened
    refused = proxy.events("session refused")
    assert {(event["client"], event["reason"].split(" (")[0]) for event in refused} >= {
        ("127.0.0.2", "Too many connections from your address"),
        ("127.0.0.4", "Access denied for your address."),
    }
    assert not proxy.events("session crashed: this is a bug in ftpfix")


def test_haproxy_health_check_local_is_served_as_the_balancer(vsftpd, tmp_path, started) -> None:
    """HAProxy's check-send-proxy sends a v2 LOCAL header: served as the balancer's own connection."""
    require_haproxy()
    proxy = start_proxy(
        tmp_path,
        (vsftpd.host, vsftpd.port),
        listen=f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]',
    )
    started.append(proxy)
    port = haproxy.free_port()
    options = f"send-proxy-v2 source {BALANCER} check check-send-proxy inter 500ms"
    # A check that reads the 220, as a real FTP health check would.
    check = "    option tcp-check\n    tcp-check expect rstring ^220"
    text = haproxy.config(port, ("127.0.0.1", proxy.port), server_options=options, backend=check)
    balancer = haproxy.start(tmp_path / "haproxy", text, port)
    started.append(balancer)
    line = proxy.wait_for("PROXY header without a client: served as the balancer's own connection")[0]
    assert line["command"] == "local" and line["version"] == 2
    deadline = time.monotonic() + 15
    while not any(event["client"].startswith(f"{BALANCER}:") for event in proxy.events("session opened")):
        assert time.monotonic() < deadline, proxy.log.read_text()
        time.sleep(0.05)
    # Three checks in a row, and the server never went DOWN: HAProxy read
    # the backend's 220 through ftpfix each time.
    proxy.wait_for("PROXY header without a client: served as the balancer's own connection", 4)
    assert not [line for line in balancer.lines() if "DOWN" in line]


class HeaderWithFirstBytes:
    """A balancer that sends its PROXY v2 header only together with the
    client's first bytes, as AWS's Network Load Balancer does: it relays the
    server's 220 at once and holds the header back until the client speaks."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, address = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target), source_address=(BALANCER, 0))
            header = format_v2(address, ("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(client, upstream, header), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, b""), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, header: bytes) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(header + data)
                header = b""
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop = True
        self.listener.close()


def test_a_balancer_that_sends_the_header_with_the_first_bytes(vsftpd, tmp_path, started) -> None:
    require_servers("vsftpd")
    legacy.put_file(vsftpd, "payload.bin", PAYLOAD)
    proxy = start_proxy(
        tmp_path,
        (vsftpd.host, vsftpd.port),
        listen=f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]',
        extra="[limits]\nmax_sessions_per_ip = 1",
    )
    started.append(proxy)
    nlb = HeaderWithFirstBytes(proxy.port)
    started.append(nlb)
    ftp = login(nlb.port, "127.0.0.6", vsftpd)
    # ftpfix greeted, since the header could not come first; the backend's 220 was dropped.
    assert ftp.welcome == OWN_GREETING.decode().strip()
    assert download(ftp, "payload.bin") == hashlib.sha256(PAYLOAD).hexdigest()
    assert ftp.pwd()  # the session goes on in step: no stray 220
    # Admission waited for the header: the limit's 421 answers the first command.
    second = ftplib.FTP(timeout=20, source_address=("127.0.0.6", 0))
    second.connect("127.0.0.1", nlb.port)
    with pytest.raises(ftplib.error_temp, match="421 Too many connections from your address"):
        second.login(vsftpd.user, vsftpd.password)
    second.close()
    ftp.quit()
    proxy.wait_for("session closed")
    assert "127.0.0.6" in clients_seen(proxy)
    assert proxy.events("session refused")[0]["client"] == "127.0.0.6"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_out_to_haproxy_accept_proxy(version: str, vsftpd, tmp_path, started) -> None:
    """ftpfix tells its backend the real client: HAProxy with accept-proxy in
    front of vsftpd logs the client's address, not ftpfix's."""
    require_haproxy()
    legacy.put_file(vsftpd, "payload.bin", PAYLOAD)
    port = haproxy.free_port()
    consumer = haproxy.start(
        tmp_path / "haproxy",
        haproxy.config(port, (vsftpd.host, vsftpd.port), bind_options="accept-proxy"),
        port,
    )
    started.append(consumer)
    proxy = start_proxy(tmp_path, ("127.0.0.1", port), backend_extra=f'proxy_protocol = "{version}"')
    started.append(proxy)
    ftp = login(proxy.port, "127.0.0.7", vsftpd)
    assert download(ftp, "payload.bin") == hashlib.sha256(PAYLOAD).hexdigest()
    ftp.quit()
    # tcplog: "127.0.0.7:40522 [25/Nov/2026:08:00:00.000] ftp servers/s1 ..." once the session ends.
    line = consumer.wait_for(" ftp servers/s1 ")
    assert line.startswith("127.0.0.7:"), line
    # /readyz's backend check opens with a header too (v1 UNKNOWN, v2 LOCAL);
    # without one, a backend that expects it never greets.
    mode = BackendProxyProtocol(version)
    assert trio.run(greets, Backend(address="127.0.0.1", port=port, proxy_protocol=mode)) is None
    assert trio.run(greets, Backend(address="127.0.0.1", port=port, connect_timeout=2.0)) == "no greeting within 2 s"


def test_haproxy_forwards_the_passive_ports_too(vsftpd, tmp_path, started) -> None:
    """Control and passive ports both through HAProxy with send-proxy-v2: the
    data connection's header names the client, so the peer check passes; an
    upload's first bytes behind the header are kept. Split horizon judges the
    real client and answers with the address it dialed (the balancer's)."""
    require_haproxy()
    legacy.put_file(vsftpd, "payload.bin", PAYLOAD)
    inside = "127.0.0.200"  # ftpfix's own address; HAProxy holds the public ports on 127.0.0.1
    passive = "20920-20929"
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=(inside, 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="203.0.113.1",
            ports=passive,
            passive_extra='internal_networks = ["127.0.0.8/32"]\n',
        ).replace("[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1),
    )
    started.append(proxy)
    port = haproxy.free_port()
    text = haproxy.config(port, (inside, proxy.port), server_options=f"send-proxy-v2 source {BALANCER}") + (
        f"\nfrontend passive\n    bind 127.0.0.1:{passive}\n    default_backend passive_ports\n\n"
        f"backend passive_ports\n    server p1 {inside} send-proxy-v2 source {BALANCER}\n"
    )
    started.append(haproxy.start(tmp_path / "haproxy", text, port))
    ftp = login(port, "127.0.0.8", vsftpd)
    assert download(ftp, "payload.bin") == hashlib.sha256(PAYLOAD).hexdigest()
    ftp.storbinary("STOR back.bin", io.BytesIO(PAYLOAD))
    assert (vsftpd.files / "back.bin").read_bytes() == PAYLOAD
    ftp.quit()
    # Not in internal_networks: the public address.
    outsider = login(port, "127.0.0.9", vsftpd)
    assert outsider.sendcmd("PASV").startswith("227 Entering Passive Mode (203,0,113,1,")
    outsider.close()
    proxy.wait_for("session closed", 2)
    assert not proxy.events("data connection from a stranger refused")
    mappings = [event for event in proxy.events("passive mapping") if event["client"].startswith("127.0.0.8:")]
    assert mappings and all(event["public"].startswith("127.0.0.1:") for event in mappings)


@pytest.mark.parametrize("balancer_kind", ["haproxy", "first-bytes"])
def test_ftps_through_a_balancer(balancer_kind: str, vsftpd, tmp_path, started) -> None:
    """AUTH TLS after a PROXY header (at connect, or in front of the first
    command): the bytes after the header are the client's, TLS included."""
    require_haproxy()
    legacy.put_file(vsftpd, "payload.bin", PAYLOAD)
    certs = make_certificates(tmp_path / "certs")
    proxy = start_proxy(
        tmp_path,
        (vsftpd.host, vsftpd.port),
        listen=f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]',
        extra=tls_section(certs),
    )
    started.append(proxy)
    if balancer_kind == "haproxy":
        port = haproxy.free_port()
        text = haproxy.config(port, ("127.0.0.1", proxy.port), server_options=f"send-proxy-v2 source {BALANCER}")
        started.append(haproxy.start(tmp_path / "haproxy", text, port))
    else:
        nlb = HeaderWithFirstBytes(proxy.port)
        started.append(nlb)
        port = nlb.port
    ftp = ReusingFTP_TLS(context=certs.client_context(), timeout=30, source_address=("127.0.0.9", 0))
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect("127.0.0.1", port)
    ftp.auth()
    ftp.login(vsftpd.user, vsftpd.password)
    ftp.prot_p()
    assert download(ftp, "payload.bin") == hashlib.sha256(PAYLOAD).hexdigest()
    ftp.quit()
    assert closed_for(proxy, "127.0.0.9:")["tls_version"].startswith("TLSv1.")


@pytest.mark.parametrize("client", ["curl", "lftp"])
@pytest.mark.parametrize("balancer_kind", ["haproxy", "first-bytes"])
def test_real_clients_through_either_balancer(client: str, balancer_kind: str, vsftpd, tmp_path, started) -> None:
    """curl and lftp download and upload through HAProxy (header at connect)
    and through a balancer that sends it with the client's first bytes."""
    require_haproxy()
    require_programs(client)
    legacy.put_file(vsftpd, "payload.bin", PAYLOAD)
    proxy = start_proxy(
        tmp_path,
        (vsftpd.host, vsftpd.port),
        listen=f'proxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]',
    )
    started.append(proxy)
    if balancer_kind == "haproxy":
        port = haproxy.free_port()
        text = haproxy.config(port, ("127.0.0.1", proxy.port), server_options=f"send-proxy-v2 source {BALANCER}")
        started.append(haproxy.start(tmp_path / "haproxy", text, port))
    else:
        nlb = HeaderWithFirstBytes(proxy.port)
        started.append(nlb)
        port = nlb.port
    endpoint = Endpoint("127.0.0.1", port, vsftpd.user, vsftpd.password)
    got = tmp_path / "got.bin"
    result = transfer(client, "get", endpoint, "payload.bin", got)
    assert result.returncode == 0, result.stderr
    assert got.read_bytes() == PAYLOAD
    sent = tmp_path / "sent.bin"
    sent.write_bytes(PAYLOAD[::-1])
    result = transfer(client, "put", endpoint, f"{client}-{balancer_kind}.bin", sent)
    assert result.returncode == 0, result.stderr
    assert (vsftpd.files / f"{client}-{balancer_kind}.bin").read_bytes() == PAYLOAD[::-1]
    opened = proxy.wait_for("session opened", 2)
    assert all(event["proxy"] == BALANCER and event["client"].startswith("127.0.0.1:") for event in opened[-2:])
