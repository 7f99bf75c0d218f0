"""Red team: ftpfix ended every TLS control connection with a bare TCP FIN,
never a close_notify, so a client cannot tell ftpfix's own close after its
221 (or 421) from a connection cut by someone on the path (a truncation),
and clients that check complain (GnuTLS, so lftp and FileZilla: "The TLS
connection was non-properly terminated").

Observed before the fix on an explicit (AUTH TLS) control connection (the
implicit port already sent one; both are checked)::

    > QUIT
    < 221 Goodbye.
    client's unwrap(): SSLEOFError UNEXPECTED_EOF_WHILE_READING (no close_notify)

Now a session that ends sends close_notify on its TLS control connection
(best effort, at most 0.5 s, without waiting for the client's).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.attacks.transcript import Attacker, assert_healthy
from tests.harness import legacy
from tests.harness.ftps import Certificates, make_certificates, tls_section
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21600-21603"


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


@pytest.mark.parametrize("how", ["explicit", "implicit"])
def test_quit_ends_the_tls_control_connection_with_close_notify(vsftpd, tmp_path, certs, proxies, how) -> None:
    implicit_port = legacy.free_port()
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports=PORTS,
            extra=tls_section(certs, implicit_port=implicit_port),
        ),
    )
    proxies.append(proxy)
    if how == "explicit":
        attacker = Attacker(proxy)
        attacker.expect_after("AUTH TLS", "234")
        attacker.sock = certs.client_context().wrap_socket(attacker.sock, server_hostname="127.0.0.1")
    else:
        attacker = Attacker(proxy, greet=False)
        attacker.sock.close()
        raw = socket.create_connection(("127.0.0.1", implicit_port), timeout=10)
        attacker.sock = certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        attacker.expect("220", 10)
    attacker.login(vsftpd.user, vsftpd.password)
    attacker.expect_after("QUIT", "221")
    tls: ssl.SSLSocket = attacker.sock  # type: ignore[assignment]
    tls.settimeout(10)
    try:
        tls.unwrap()  # sends ours, then reads theirs
    except ssl.SSLEOFError as error:
        pytest.fail(f"the control connection ended without close_notify: {error}")
    except OSError:
        pass  # ftpfix closed after its close_notify before reading ours: fine
    assert_healthy(proxy)
