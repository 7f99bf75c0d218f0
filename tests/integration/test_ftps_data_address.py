"""accept_data_from with TLS (issue 10 left it to issue 11): a protected
data connection that resumes *this* control session's TLS session may come
from another address than the control connection (a client behind
carrier-grade NAT whose connections leave from several addresses); one that
does not resume it, or that is not protected, is still refused.

On loopback, 127.0.0.2 plays the client's other address: ftpfix's default
``accept_data_from = "same-address"`` calls it a stranger.
"""

from __future__ import annotations

import ftplib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import legacy
from tests.harness.ftps import Certificates, ReusingFTP_TLS, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PASSIVE_PORTS = "20200-20209"

#: The client's "other" address, from which its data connections leave.
OTHER = "127.0.0.2"

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


@pytest.fixture
def proxy(vsftpd: legacy.LegacyServer, tmp_path: Path, certs: Certificates) -> Iterator[Ftpfix]:
    ftpfix = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports=PASSIVE_PORTS,
            passive_extra="[limits]\ndata_connect_timeout = 5\n",
            extra=tls_section(certs),
        ),
    )
    legacy.put_file(vsftpd, "file.bin", PAYLOAD)
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


def login(proxy: Ftpfix, vsftpd: legacy.LegacyServer, certs: Certificates) -> ReusingFTP_TLS:
    """A TLS session whose control connection comes from 127.0.0.1 and
    whose data connections come from 127.0.0.2 (ftplib binds both to
    ``source_address``; it is set after the control connection is up)."""
    ftp = ReusingFTP_TLS(context=certs.client_context(), timeout=20)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.port, source_address=("127.0.0.1", 0))
    ftp.auth()
    ftp.login(vsftpd.user, vsftpd.password)
    ftp.prot_p()
    ftp.source_address = (OTHER, 0)
    return ftp


def test_resuming_data_connection_from_another_address_is_accepted(proxy, vsftpd, certs) -> None:
    ftp = login(proxy, vsftpd, certs)
    got = io.BytesIO()
    ftp.retrbinary("RETR file.bin", got.write)
    assert got.getvalue() == PAYLOAD
    ftp.storbinary("STOR up.bin", io.BytesIO(PAYLOAD))
    assert (vsftpd.files / "up.bin").read_bytes() == PAYLOAD
    ftp.quit()
    assert (
        len(
            proxy.events(
                "data connection from outside accept_data_from held: it must resume this session's TLS session"
            )
        )
        == 2
    )
    accepted = proxy.events(
        "data connection from outside accept_data_from accepted: it resumed this session's TLS session"
    )
    assert len(accepted) == 2
    assert not proxy.events("data connection from a stranger refused")


def test_non_resuming_data_connection_from_another_address_is_refused(proxy, vsftpd, certs) -> None:
    """Stock ftplib, which never resumes, from the other address: 425, and
    the session goes on (from its own address, still resuming nothing, it is
    refused too: reuse is required)."""
    ftp = login(proxy, vsftpd, certs)
    ftp.reuse = False
    with pytest.raises((OSError, EOFError)):
        ftp.retrbinary("RETR file.bin", lambda _: None)
    with pytest.raises(ftplib.error_temp, match="^425 .*must resume the TLS session"):
        ftp.getresp()
    [refused] = proxy.wait_for("data connection refused: it did not resume the control session's TLS session")
    assert refused["from_outside"] == "127.0.0.1/32"
    assert ftp.sendcmd("NOOP").startswith("200")
    ftp.quit()


def test_another_sessions_ticket_from_another_address_is_refused(proxy, vsftpd, certs) -> None:
    """The thief behind the same carrier-grade NAT: another address, a TLS
    session of its own from another control connection to ftpfix."""
    context = certs.client_context()
    thief = ReusingFTP_TLS(context=context, timeout=20)
    thief.connect(proxy.host, proxy.port)
    thief.auth()
    thief.login(vsftpd.user, vsftpd.password)
    thief.sendcmd("NOOP")  # TLS 1.3 tickets arrive after the handshake
    victim = login(proxy, vsftpd, certs)
    victim.context = context
    victim.foreign_session = thief.sock.session
    with pytest.raises((OSError, EOFError)):
        victim.retrbinary("RETR file.bin", lambda _: None)
    with pytest.raises(ftplib.error_temp, match="^425 .*must resume the TLS session"):
        victim.getresp()
    thief.quit()
    victim.quit()


def test_unprotected_data_connection_from_another_address_is_refused(proxy, vsftpd, certs) -> None:
    """PROT C: no TLS session to bind to, so the address check stands."""
    ftp = login(proxy, vsftpd, certs)
    ftp.prot_c()
    with pytest.raises(ftplib.error_temp, match="^425 .*came from outside 127.0.0.1"):
        ftp.retrbinary("RETR file.bin", lambda _: None)
    assert ftp.sendcmd("NOOP").startswith("200")
    ftp.quit()
