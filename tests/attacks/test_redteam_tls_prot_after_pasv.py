"""Red team: the protection level of a data connection is fixed when the port is opened, not when
the transfer command runs.

README, FTPS: "`mode = "required"`: ... a transfer with `PROT C` gets `521`"; `PROT P` / `PROT C` set
the level of the data connections that follow (RFC 4217 section 9: the level in force when the
transfer command is given). ftpfix decides TLS or plaintext when it answers PASV, EPSV or PORT and
never looks again. So in required mode a client sends ``PROT C``, ``PASV``, ``PROT P``, ``RETR``: the
transfer runs under ``PROT P``, so no 521, and the file is relayed in the clear on a plain TCP data
connection, answered 226. The same with EPSV and STOR (the backend stores what came in the clear)
and with PORT and LIST. The other way round, in optional mode, ``PROT P``, ``PASV``, ``PROT C``,
``RETR`` gets a client that asked for a clear data connection a TLS server and a 425.

Observed before the fix (vsftpd, pure-ftpd, ProFTPD alike)::

    PROT C -> 200, PASV -> 227, PROT P -> 200, RETR secret.txt -> 150, 226
    the plain TCP data connection receives the file's bytes in the clear

Now the transfer command carries the PROT level in force (``TransferStarted.protected``) and a
data connection relays nothing before it: TLS or plaintext is decided then.
"""

from __future__ import annotations

import socket

import pytest

from tests.attacks.transcript import Attacker, ReplyError, recv_all
from tests.harness import legacy
from tests.harness.ftps import Certificates, make_certificates, tls_section
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21500-21503"
SECRET = b"SECRET-PAYLOAD-THAT-MUST-NOT-TRAVEL-IN-THE-CLEAR\n" * 20


@pytest.fixture
def certs(tmp_path) -> Certificates:
    return make_certificates(tmp_path / "certs")


def proxy_with(mode: str, backend, tmp_path, certs, proxies):
    started = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(backend.host, backend.port),
            public_address="127.0.0.1",
            ports=PORTS,
            extra=tls_section(certs, mode=mode) + "\n[limits]\ndata_connect_timeout = 2\n",
        ),
    )
    proxies.append(started)
    return started


def tls_attacker(proxy, backend, certs: Certificates) -> Attacker:
    """Logged in over TLS, PBSZ 0 sent; the control socket is the TLS one."""
    attacker = Attacker(proxy)
    attacker.expect_after("AUTH TLS", "234")
    attacker.sock = certs.client_context().wrap_socket(attacker.sock, server_hostname="127.0.0.1")
    attacker.login(backend.user, backend.password)
    attacker.expect_after("PBSZ 0", "200")
    attacker.expect_after("TYPE I", "200")
    return attacker


def final_reply(attacker: Attacker) -> str:
    reply = attacker.reply(16)
    return attacker.reply(16) if reply.startswith("150") else reply


def read_some(sock: socket.socket, timeout: float = 4.0) -> bytes:
    try:
        return recv_all(sock, timeout)
    except OSError:
        return b""


def test_required_prot_c_pasv_then_prot_p_retr_is_never_sent_in_the_clear(backend, tmp_path, certs, proxies) -> None:
    legacy.put_file(backend, "secret.txt", SECRET)
    proxy = proxy_with("required", backend, tmp_path, certs, proxies)
    attacker = tls_attacker(proxy, backend, certs)
    attacker.expect_after("PROT C", "200")
    host, port = attacker.pasv()
    attacker.expect_after("PROT P", "200")
    data = attacker.data_connect(port, host)  # plain TCP, no TLS at all
    attacker.line("RETR secret.txt")
    received = read_some(data)
    reply = final_reply(attacker)
    # observed: received == SECRET (in the clear) and reply "226 Transfer complete."
    assert SECRET[:20] not in received, "required mode relayed a file over a plaintext data connection"
    assert not reply.startswith("2"), reply
    assert attacker.command("NOOP").startswith("200")


def test_required_prot_c_epsv_then_prot_p_stor_is_not_stored(backend, tmp_path, certs, proxies) -> None:
    proxy = proxy_with("required", backend, tmp_path, certs, proxies)
    attacker = tls_attacker(proxy, backend, certs)
    attacker.expect_after("PROT C", "200")
    port = attacker.epsv()
    attacker.expect_after("PROT P", "200")
    data = attacker.data_connect(port)
    attacker.line("STOR clear.bin")
    try:
        data.sendall(SECRET)
        data.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    read_some(data)
    reply = final_reply(attacker)
    stored = (backend.files / "clear.bin").read_bytes() if (backend.files / "clear.bin").exists() else b""
    # observed: reply "226 Transfer complete." and the backend holds SECRET
    assert SECRET[:20] not in stored, "required mode stored an upload that came in the clear"
    assert not reply.startswith("2"), reply


def test_required_prot_c_port_then_prot_p_list_is_never_sent_in_the_clear(backend, tmp_path, certs, proxies) -> None:
    legacy.put_file(backend, "secret-name-in-listing.txt", b"x")
    proxy = proxy_with("required", backend, tmp_path, certs, proxies)
    attacker = tls_attacker(proxy, backend, certs)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    attacker.expect_after("PROT C", "200")
    attacker.expect_after(f"PORT 127,0,0,1,{port >> 8},{port & 255}", "200")
    attacker.expect_after("PROT P", "200")
    attacker.line("LIST")
    received = b""
    try:
        conn, _ = listener.accept()
        received = read_some(conn)  # a plain TCP client: no ClientHello is ever sent
    except OSError:
        pass
    reply = final_reply(attacker)
    # observed: the listing arrives in the clear, reply "226 Directory send OK."
    assert b"secret-name-in-listing" not in received, "required mode sent a listing in the clear"
    assert not reply.startswith("2"), reply


def test_optional_prot_p_pasv_then_prot_c_retr_is_a_clear_transfer(backend, tmp_path, certs, proxies) -> None:
    """PROT C in force at RETR: a plaintext data connection, as asked for (RFC 4217 section 9)."""
    legacy.put_file(backend, "plain.txt", SECRET)
    proxy = proxy_with("optional", backend, tmp_path, certs, proxies)
    attacker = tls_attacker(proxy, backend, certs)
    attacker.expect_after("PROT P", "200")
    host, port = attacker.pasv()
    attacker.expect_after("PROT C", "200")
    data = attacker.data_connect(port, host)
    attacker.line("RETR plain.txt")
    received = read_some(data)
    try:
        reply = final_reply(attacker)
    except ReplyError as error:
        reply = str(error)
    # observed: received == b"", reply "425 Can't open data connection: the TLS handshake on the data
    # connection failed." (ftpfix waited for a ClientHello the client was never going to send)
    assert received == SECRET
    assert reply.startswith("226"), reply
