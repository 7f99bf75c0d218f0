"""Attacks on the PROXY protocol listener (issue 12, "Bad input"): a header
from a peer that is not trusted, truncated and oversized headers, unknown v2
commands and families, garbage from a trusted balancer, a header that never
comes, a client that forges a second header behind the balancer's, and a LOCAL
health check. Each ends in a clean close (or the right behaviour) with a log
line, while a bystander session that came through the balancer goes on."""

from __future__ import annotations

import socket
import time

import pytest

from ftpfix.net.proxied import NO_HEADER, OWN_GREETING, PROXY_HEADER_TIMEOUT
from ftpfix.protocol.proxyheader import V2_LOCAL, V2_SIGNATURE, format_v1, format_v2
from tests.attacks.transcript import Attacker, assert_healthy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21200-21203"
BALANCER = "127.0.0.100"
LOGIN_TIMEOUT = 3


@pytest.fixture
def proxy(vsftpd, tmp_path, proxies) -> Ftpfix:
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=(vsftpd.host, vsftpd.port),
        public_address="127.0.0.1",
        ports=PORTS,
        extra=f"[limits]\nlogin_timeout = {LOGIN_TIMEOUT}\n",
    ).replace("[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1)
    started = start_ftpfix(tmp_path / "ftpfix", text)
    proxies.append(started)
    return started


@pytest.fixture
def bystander(proxy, vsftpd) -> Attacker:
    """A logged-in session that came through the balancer, for a real client at 127.0.0.50."""
    session = Attacker(proxy, source=BALANCER, greet=False)
    session.send(format_v1(("127.0.0.50", 40000), ("127.0.0.1", proxy.port)))
    session.expect("220")
    session.login(vsftpd.user, vsftpd.password)
    return session


def balancer(proxy: Ftpfix) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=15, source_address=(BALANCER, 0))


def closed_after(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything the peer sends until it closes; fails if it does not close in ``timeout``."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while chunk := sock.recv(4096):
            received += chunk
            assert time.monotonic() < deadline, f"still open after {timeout} s: {received!r}"
    except ConnectionResetError:
        pass
    sock.close()
    return received


def logged(proxy: Ftpfix, event: str, timeout: float = 10.0) -> dict:
    return proxy.wait_for(event, timeout=timeout)[-1]


def closed_reason(proxy: Ftpfix, client: str, timeout: float = 10.0) -> str:
    """The reason of the session closed for the client at ``client``, waiting for it."""
    deadline = time.monotonic() + timeout
    while not (closed := [e for e in proxy.events("session closed") if e["client"].startswith(client)]):
        assert time.monotonic() < deadline, f"no session closed for {client}"
        time.sleep(0.05)
    return closed[-1]["reason"]


def still_fine(proxy: Ftpfix, bystander: Attacker) -> None:
    assert bystander.command("NOOP").startswith("200")
    assert_healthy(proxy)


V2_TCP4 = format_v2(("198.51.100.7", 40000), ("127.0.0.1", 21))


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        # Oversized: no CRLF in 107 bytes; a v2 length over the bound (refused at byte 16).
        (b"PROXY TCP4 " + b"1" * 200, "no CRLF in its first 107 bytes"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff" + b"\x00" * 64, "length 65535 is over"),
        # Unknown v2 command, family, protocol; a version that does not exist.
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command 0x2"),
        (V2_SIGNATURE + b"\x21\x51\x00\x0c" + b"\x00" * 12, "unknown address family"),
        (V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"\x00" * 216, "AF_UNIX"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
        # Malformed v1.
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 21\r\n", "not a port"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 21\r\n", "not an IPv6 address"),
        # Garbage: HTTP, TLS, an FTP command before the greeting.
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "not a PROXY protocol header"),
        (b"USER alice\r\n", "not a PROXY protocol header"),
    ],
)
def test_a_bad_header_from_the_balancer_is_closed_with_a_log_line(proxy, bystander, sent: bytes, error: str) -> None:
    sock = balancer(proxy)
    sock.sendall(sent)
    assert closed_after(sock) == b"", "nothing is said to a balancer that speaks garbage before the greeting"
    line = logged(proxy, "bad PROXY header from a trusted proxy; closing")
    assert error in line["error"], line
    assert line["proxy"].startswith(f"{BALANCER}:")
    still_fine(proxy, bystander)


@pytest.mark.parametrize(
    "header", [format_v1(("198.51.100.7", 40000), ("127.0.0.1", 21)), V2_TCP4, b"PROXY UNKNOWN\r\n"]
)
def test_a_header_from_a_peer_that_is_not_trusted_is_never_believed(proxy, bystander, header: bytes) -> None:
    attacker = Attacker(proxy, source="127.0.0.2")  # served as itself: the backend's 220
    attacker.send(header + b"USER alice\r\n")
    assert attacker.closed(5.0)
    line = logged(
        proxy,
        "PROXY protocol header refused: only [listen] trusted_proxies may send one, with [listen] proxy_protocol on",
    )
    assert line["client"].startswith("127.0.0.2:")
    assert "from a peer that is not trusted" in closed_reason(proxy, "127.0.0.2:")
    assert not any(event["client"].startswith("198.51.100.7") for event in proxy.events("session opened"))
    still_fine(proxy, bystander)


def test_a_forged_second_header_behind_the_balancers_is_refused(proxy, bystander) -> None:
    sock = balancer(proxy)
    sock.sendall(format_v1(("127.0.0.60", 40000), ("127.0.0.1", 21)))
    assert sock.makefile("rb").readline().startswith(b"220")
    sock.sendall(format_v1(("10.9.9.9", 1), ("127.0.0.1", 21)) + b"USER alice\r\n")
    closed_after(sock)
    line = logged(
        proxy,
        "PROXY protocol header refused: only [listen] trusted_proxies may send one, with [listen] proxy_protocol on",
    )
    assert line["client"].startswith("127.0.0.60:")
    still_fine(proxy, bystander)


def test_a_truncated_header_that_stops_is_closed_at_the_deadline(proxy, bystander) -> None:
    sock = balancer(proxy)
    sock.sendall(b"PROXY TCP4 198.51.100.7 ")
    started = time.monotonic()
    assert closed_after(sock, PROXY_HEADER_TIMEOUT + 10) == b""
    assert time.monotonic() - started >= PROXY_HEADER_TIMEOUT - 1
    line = logged(proxy, "no complete PROXY header in time; closing")
    assert line["received"] == 24
    still_fine(proxy, bystander)


def test_a_truncated_header_then_the_end(proxy, bystander) -> None:
    sock = balancer(proxy)
    sock.sendall(V2_TCP4[:20])
    sock.shutdown(socket.SHUT_WR)
    assert closed_after(sock) == b""
    assert logged(proxy, "connection closed before its PROXY header was complete")["received"] == 20
    still_fine(proxy, bystander)


def test_a_header_that_never_comes(proxy, bystander) -> None:
    """ftpfix greets (the balancer may be waiting for the client's bytes),
    then waits login_timeout for the header and closes."""
    sock = balancer(proxy)
    started = time.monotonic()
    assert closed_after(sock, LOGIN_TIMEOUT + 10) == OWN_GREETING
    assert time.monotonic() - started >= LOGIN_TIMEOUT - 1
    assert logged(proxy, "no complete PROXY header in time; closing")["received"] == 0
    still_fine(proxy, bystander)


def test_a_command_without_a_header_after_ftpfixs_greeting_gets_421(proxy, bystander) -> None:
    sock = balancer(proxy)
    assert sock.makefile("rb").readline() == OWN_GREETING
    sock.sendall(b"USER alice\r\n")
    assert closed_after(sock) == NO_HEADER
    assert "not a PROXY protocol header" in logged(proxy, "bad PROXY header from a trusted proxy; closing")["error"]
    still_fine(proxy, bystander)


def test_a_balancer_that_hangs_up_at_once_is_a_tcp_health_check(proxy, bystander) -> None:
    balancer(proxy).close()
    logged(proxy, "balancer closed before sending a PROXY header (a TCP health check?)")
    still_fine(proxy, bystander)


def test_local_is_served_as_the_balancers_own_connection(proxy, bystander, vsftpd) -> None:
    session = Attacker(proxy, source=BALANCER, greet=False)
    session.send(V2_LOCAL)
    session.expect("220")
    session.login(vsftpd.user, vsftpd.password)
    assert logged(proxy, "PROXY header without a client: served as the balancer's own connection")["command"] == "local"
    opened = proxy.events("session opened")[-1]
    assert opened["client"].startswith(f"{BALANCER}:") and opened["proxy"] == BALANCER
    session.command("QUIT")
    still_fine(proxy, bystander)


def test_a_bad_header_opens_no_session(proxy, bystander) -> None:
    for garbage in (b"junk\r\n", V2_SIGNATURE + b"\x2f\x11\x00\x00"):
        sock = balancer(proxy)
        sock.sendall(garbage)
        closed_after(sock)
    proxy.wait_for("bad PROXY header from a trusted proxy; closing", 2)
    # No session opened for them, so the backend was never dialed: only the bystander's.
    assert len(proxy.events("session opened")) == 1
    still_fine(proxy, bystander)


def test_a_passive_port_forwarded_by_the_balancer(proxy, bystander) -> None:
    """On a data port, the balancer's header names the peer the check judges:
    garbage, and a header naming someone else, are refused; the client's own gets the listing."""
    host, port = bystander.pasv()

    def from_balancer(data: bytes) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=15, source_address=(BALANCER, 0))
        sock.sendall(data)
        return sock

    assert closed_after(from_balancer(b"garbage\r\n")) == b""
    assert "not a PROXY protocol header" in logged(proxy, "bad PROXY header on a data connection; closing")["error"]
    assert closed_after(from_balancer(format_v1(("127.0.0.66", 1), ("127.0.0.1", port)))) == b""
    assert logged(proxy, "data connection from a stranger refused")["peer"] == "127.0.0.66"
    data = from_balancer(format_v2(("127.0.0.50", 2), ("127.0.0.1", port)))
    bystander.line("LIST")
    bystander.expect("150")
    closed_after(data)  # the listing, then the end
    bystander.expect("226")
    still_fine(proxy, bystander)


def test_connections_waiting_for_a_header_are_bounded(vsftpd, tmp_path, proxies) -> None:
    """Not admitted yet, so max_sessions does not count them: a separate bound
    of max_sessions keeps a silent flood through the balancer from holding
    descriptors without end."""
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=(vsftpd.host, vsftpd.port),
        public_address="127.0.0.1",
        ports=PORTS,
        extra="[limits]\nmax_sessions = 2\nlogin_timeout = 30\n",
    ).replace("[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1)
    proxy = start_ftpfix(tmp_path / "ftpfix", text)
    proxies.append(proxy)
    silent = [balancer(proxy) for _ in range(2)]
    for sock in silent:
        assert sock.makefile("rb").readline() == OWN_GREETING  # waiting for the header, greeted
    assert closed_after(balancer(proxy), 5) == b""
    assert logged(proxy, "too many connections waiting for a PROXY header; closing")["waiting"] == 2
    # One of them sends its header: it is served, and a newcomer may wait again.
    silent[0].sendall(format_v1(("127.0.0.70", 1), ("127.0.0.1", proxy.port)) + b"NOOP\r\n")
    assert silent[0].makefile("rb").readline().startswith((b"200", b"530"))  # vsftpd: 530 before login
    late = balancer(proxy)
    assert late.makefile("rb").readline() == OWN_GREETING
    for sock in [*silent, late]:
        sock.close()
    assert_healthy(proxy)
