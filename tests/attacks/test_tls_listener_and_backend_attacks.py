"""Bad input for implicit FTPS and for TLS to the backend.

The implicit port (TLS from the first byte) meets what scanners and broken
clients send: plain text or HTTP instead of a ClientHello, a handshake that
never finishes, a client that leaves or resets mid-handshake. Each ends that
connection with a "TLS handshake failed" line (reason tls_handshake), and a
session that was already running, and one that starts afterwards, never
notice.

TLS to the backend meets backends that refuse it: a plain server that
answers AUTH TLS with 530 (vsftpd without ssl_enable), a scripted one that
answers 500, one that says 234 and then sends plain text instead of a
handshake, a plain server configured as implicit. The client always gets a
421 that says why, and the log names the backend.

Transcripts, observed on this branch::

    implicit port <- "GET / HTTP/1.0" CRLF CRLF -> TLS alert, close
        log: TLS handshake failed, error "wrong version number"
    implicit port <- nothing, or half a ClientHello, for 10 s -> close
        log: TLS handshake failed, error "timed out"
    implicit port <- 40 bytes of a ClientHello, then FIN or RST -> close at once
    client -> ftpfix -> vsftpd (plain), [backend] tls = "explicit":
        421 Service not available: TLS to the FTP server failed
            (the server refused AUTH: 530 Please login with USER and PASS.).
"""

from __future__ import annotations

import ftplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.attacks.transcript import Attacker, assert_healthy
from tests.harness import legacy
from tests.harness.ftps import Certificates, ImplicitFTP_TLS, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21510-21519"


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


def start(backend: tuple[str, int], tmp_path: Path, certs: Certificates, backend_keys: str = "") -> Ftpfix:
    implicit_port = legacy.free_port()
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=backend,
        public_address="127.0.0.1",
        ports=PORTS,
        extra=tls_section(certs, implicit_port=implicit_port),
    ).replace("\n[passive]", backend_keys + "\n[passive]", 1)
    ftpfix = start_ftpfix(tmp_path / "ftpfix", text)
    ftpfix.implicit_port = implicit_port  # type: ignore[attr-defined]
    return ftpfix


@pytest.fixture
def implicit_proxy(vsftpd, tmp_path: Path, certs: Certificates, proxies: list[Ftpfix]) -> Ftpfix:
    proxy = start((vsftpd.host, vsftpd.port), tmp_path, certs)
    proxies.append(proxy)
    return proxy


def implicit_session(proxy: Ftpfix, vsftpd, certs: Certificates) -> ImplicitFTP_TLS:
    ftp = ImplicitFTP_TLS(context=certs.client_context(), timeout=20)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.implicit_port)  # type: ignore[attr-defined]
    ftp.login(vsftpd.user, vsftpd.password)
    return ftp


def client_hello(certs: Certificates) -> bytes:
    """A real ClientHello, as the first flight of a TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = certs.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the peer sends until it closes, and how long that took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    said = b""
    try:
        while chunk := sock.recv(4096):
            said += chunk
    except ConnectionResetError:
        pass
    return said, time.monotonic() - started


def still_fine(ftp: ImplicitFTP_TLS, payload: bytes) -> None:
    """The bystander session: a NOOP and a small protected download."""
    assert ftp.sendcmd("NOOP").startswith("200")
    got: list[bytes] = []
    ftp.retrbinary("RETR bystander.bin", got.append)
    assert b"".join(got) == payload


PAYLOAD = b"bystander" * 10000


def test_plaintext_instead_of_client_hello(implicit_proxy, vsftpd, certs) -> None:
    legacy.put_file(vsftpd, "bystander.bin", PAYLOAD)
    bystander = implicit_session(implicit_proxy, vsftpd, certs)
    for garbage in (
        b"USER anonymous\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x00" * 64,
        b"\x16\x03\x01\xff\xff" + b"A" * 300,
    ):
        with socket.create_connection((implicit_proxy.host, implicit_proxy.implicit_port), timeout=5) as raw:
            raw.sendall(garbage)
            said, _ = read_to_end(raw, 15)
        # A TLS alert (content type 21) at most: never an FTP reply.
        assert said == b"" or said[0] == 21, said
    failures = implicit_proxy.wait_for("TLS handshake failed", count=4)
    assert all(failure["implicit"] is True for failure in failures)
    assert any(
        "wrong version number" in failure["error"] or "WRONG_VERSION" in failure["error"] for failure in failures
    )
    still_fine(bystander, PAYLOAD)
    bystander.quit()
    ended = [event for event in implicit_proxy.events("session closed") if event.get("implicit_tls") is None]
    assert len(ended) >= 4
    assert_healthy(implicit_proxy)


def test_handshake_that_never_finishes(implicit_proxy, vsftpd, certs) -> None:
    """Silence, and half a ClientHello: each is cut off at the handshake
    deadline (HANDSHAKE_TIMEOUT, 10 s); the bystander goes on meanwhile."""
    legacy.put_file(vsftpd, "bystander.bin", PAYLOAD)
    bystander = implicit_session(implicit_proxy, vsftpd, certs)
    hello = client_hello(certs)
    silent = socket.create_connection((implicit_proxy.host, implicit_proxy.implicit_port), timeout=5)
    partial = socket.create_connection((implicit_proxy.host, implicit_proxy.implicit_port), timeout=5)
    partial.sendall(hello[: len(hello) // 2])
    still_fine(bystander, PAYLOAD)  # while both stall
    for stalled in (silent, partial):
        said, waited = read_to_end(stalled, 30)
        stalled.close()
        assert said == b"" or said[0] == 21, said
        assert waited < 25
    failures = implicit_proxy.wait_for("TLS handshake failed", count=2)
    assert [failure["error"] for failure in failures] == ["timed out", "timed out"]
    still_fine(bystander, PAYLOAD)
    bystander.quit()
    assert_healthy(implicit_proxy)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_leaves_mid_handshake(implicit_proxy, vsftpd, certs, how: str) -> None:
    legacy.put_file(vsftpd, "bystander.bin", PAYLOAD)
    bystander = implicit_session(implicit_proxy, vsftpd, certs)
    hello = client_hello(certs)
    raw = socket.create_connection((implicit_proxy.host, implicit_proxy.implicit_port), timeout=5)
    raw.sendall(hello[:40])
    implicit_proxy.wait_for("session opened", count=2)  # the bystander's, then this one's
    if how == "reset":
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()
    [failure] = implicit_proxy.wait_for("TLS handshake failed")
    assert failure["error"] != "timed out"  # noticed at once, not at the deadline
    still_fine(bystander, PAYLOAD)
    bystander.quit()
    assert_healthy(implicit_proxy)


# -- backends that refuse TLS ---------------------------------------------------


def scripted_backend(script: Callable[[socket.socket], None]) -> tuple[tuple[str, int], Callable[[], None]]:
    """A TCP server that runs ``script`` on each connection, in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    script(conn)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[:2], listener.close


def answers(*replies: bytes) -> Callable[[socket.socket], None]:
    """Greet, then answer each line read with the next reply; then wait for the end."""

    def script(conn: socket.socket) -> None:
        conn.settimeout(20)
        conn.sendall(b"220 scripted\r\n")
        for answer in replies:
            if not conn.recv(4096):
                return
            conn.sendall(answer)
        while conn.recv(4096):
            pass

    return script


def hangs_up_at_auth(conn: socket.socket) -> None:
    conn.sendall(b"220 scripted\r\n")
    conn.recv(4096)


@pytest.fixture
def plain_vsftpd_as_tls(vsftpd, tmp_path, certs, proxies: list[Ftpfix]) -> Ftpfix:
    proxy = start((vsftpd.host, vsftpd.port), tmp_path, certs, f'tls = "explicit"\ntls_ca = "{certs.ca}"\n')
    proxies.append(proxy)
    return proxy


def test_backend_that_refuses_auth_tls(plain_vsftpd_as_tls, vsftpd) -> None:
    """vsftpd without ssl_enable answers AUTH TLS with 530: the client gets
    a 421 that quotes it, whichever side it is on."""
    with Attacker(plain_vsftpd_as_tls, greet=False) as attacker:
        reply = attacker.reply()
        assert reply.startswith("421 Service not available: TLS to the FTP server failed (the server refused AUTH")
        assert "530" in reply
        assert attacker.closed(5)
    [failed] = plain_vsftpd_as_tls.wait_for("backend TLS failed")
    assert failed["backend"] == f"{vsftpd.host}:{vsftpd.port}"
    assert failed["error"].startswith("the backend refused AUTH TLS: 530")
    # The implicit client gets the same 421, inside its TLS.
    ftp = ImplicitFTP_TLS(context=ssl._create_unverified_context(), timeout=10)
    with pytest.raises(ftplib.error_temp, match="^421 .*refused AUTH"):
        ftp.connect(plain_vsftpd_as_tls.host, plain_vsftpd_as_tls.implicit_port)  # type: ignore[attr-defined]
    assert_healthy(plain_vsftpd_as_tls)


@pytest.mark.parametrize(
    ("case", "script", "said"),
    [
        ("500 to AUTH", answers(b"500 AUTH not understood\r\n"), "the server refused AUTH: 500 AUTH not understood"),
        ("plain text after 234", answers(b"234 go ahead\r\n" + b"230 surprise\r\n"), "plain text after 234"),
        ("garbage instead of a handshake", answers(b"234 go ahead\r\n", b"\x00garbage" * 100), ""),
        ("closes at AUTH TLS", hangs_up_at_auth, "the server closed the connection"),
        ("not a reply", answers(b"HTTP/1.1 400 Bad Request\r\n"), "malformed reply"),
    ],
)
def test_scripted_backends_that_break_tls(tmp_path, certs, proxies, case: str, script, said: str) -> None:
    address, stop = scripted_backend(script)
    try:
        proxy = start(address, tmp_path, certs, 'tls = "explicit"\n')
        proxies.append(proxy)
        with Attacker(proxy, greet=False) as attacker:
            reply = attacker.reply(timeout=30)
            assert reply.startswith("421 Service not available: TLS to the FTP server failed"), reply
            assert said in reply, reply
            assert attacker.closed(5)
        [failed] = proxy.wait_for("backend TLS failed")
        assert failed["backend"] == f"{address[0]}:{address[1]}"
        assert_healthy(proxy)
    finally:
        stop()


def test_plain_backend_configured_as_implicit(vsftpd, tmp_path, certs, proxies) -> None:
    """[backend] tls = "implicit" against a server that greets in plain text:
    the handshake fails on its 220, and the client is told so."""
    proxy = start((vsftpd.host, vsftpd.port), tmp_path, certs, 'tls = "implicit"\n')
    proxies.append(proxy)
    with Attacker(proxy, greet=False) as attacker:
        reply = attacker.reply(timeout=20)
        assert reply.startswith("421 Service not available: TLS to the FTP server failed"), reply
    [failed] = proxy.wait_for("backend TLS failed")
    assert "handshake" in failed["error"]
    assert_healthy(proxy)
