"""Red team: a data connection refused for not resuming its control session
still walked away with a TLS session of its own, and the next transfer was
the thief's.

README, FTPS: "each control session has its own TLS context ... so a data
connection can only resume a session its own control connection was given"
and, for strangers held under ``accept_data_from``, "accepted only if it
resumes this control session's TLS session, which no thief can". But the
refused data connection finished a *full* handshake on that very context
before ftpfix looked at ``session_reused``, and a full handshake hands the
peer a session: a TLS 1.2 ticket (or session id), TLS 1.3 tickets. On the
next transfer the thief presents it, ``session_reused`` is True, and ftpfix
relays the victim's file to the thief.

The thief needs to win the race to the passive port once (it is behind the
victim's carrier-grade NAT address, or it is a held stranger and the victim
connects after its transfer command); the victim's first transfer gets a
425, its next one is stolen. Both were seen to steal under TLS 1.2 (the
``same-address`` and ``held-stranger`` cases); under TLS 1.3 the reset that
follows the refusal happened to beat the tickets, which is luck, not a
guarantee.

Observed before the fix (vsftpd behind ftpfix, victim and thief TLS 1.2)::

    victim: EPSV -> 229; thief connects first, full handshake; victim: RETR -> 150, 425
    victim: EPSV -> 229; thief connects first, resumes its round-1 session
        (session_reused True); victim: RETR -> 150, 226 Transfer complete.
    the thief reads all 1 MiB of secret.bin

Now, once the control connection's handshake is done, its context issues no
TLS 1.3 tickets and speaks only TLS 1.3 when the control connection does: a
TLS 1.3 victim is safe. OpenSSL still issues TLS 1.2 tickets per context,
not per connection (and a session cache by id instead, tried first, loses
the control session as soon as any data connection ends without
close_notify, as a failed transfer must), so a TLS 1.2 thief still leaves
with a ticket: but a resumed session keeps the time of the full handshake
that made it, and ftpfix accepts only the control handshake's
(``tls.SessionContext``), refusing every TLS 1.2 data connection of the
session if a refused one got its ticket in that same second.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.attacks.transcript import Attacker, recv_all
from tests.harness import legacy
from tests.harness.ftps import Certificates, make_certificates, tls_section
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21560-21569"
SECRET = b"victim's secret file\n" * 50000

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


def context(certs: Certificates, version: str) -> ssl.SSLContext:
    made = certs.client_context()
    made.maximum_version = VERSIONS[version]
    return made


def tls_login(proxy, vsftpd, control: ssl.SSLContext) -> Attacker:
    attacker = Attacker(proxy)
    attacker.expect_after("AUTH TLS", "234")
    attacker.sock = control.wrap_socket(attacker.sock, server_hostname="127.0.0.1")
    attacker.login(vsftpd.user, vsftpd.password)
    for command in ("PBSZ 0", "PROT P", "TYPE I"):
        attacker.expect_after(command, "200")
    return attacker


def final(attacker: Attacker) -> str:
    reply = attacker.reply(20)
    return attacker.reply(20) if reply.startswith("150") else reply


#: Where the thief connects from: the victim's own address (behind the same
#: carrier-grade NAT), or another one, held as a stranger until the victim's
#: transfer command went out with no data connection of its own yet.
THIEVES = {"same-address": "127.0.0.1", "held-stranger": "127.0.0.2"}


@pytest.mark.parametrize("thief_address", list(THIEVES))
@pytest.mark.parametrize(
    "version",
    [
        "TLSv1.2",
        "TLSv1.3",
    ],
)
def test_refused_data_connection_gets_no_session_to_steal_the_next_transfer(
    vsftpd, tmp_path, certs, proxies, version, thief_address
):
    legacy.put_file(vsftpd, "secret.bin", SECRET)
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports=PORTS,
            extra=tls_section(certs),
        ),
    )
    proxies.append(proxy)
    victim_context = context(certs, version)
    victim = tls_login(proxy, vsftpd, victim_context)
    thief = context(certs, version)

    # Round 1: the thief wins the race with a full handshake; ftpfix refuses it.
    port = victim.epsv()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(THIEVES[thief_address], 0))
    victim.line("RETR secret.bin")
    stolen = None
    try:
        tls = thief.wrap_socket(raw, server_hostname="127.0.0.1")
        try:
            while tls.recv(4096):  # TLS 1.3 tickets come after the handshake
                pass
        except OSError:
            pass
        stolen = tls.session
    except OSError:
        pass
    assert final(victim).startswith("425")

    # Round 2: the thief connects first again and presents what round 1 gave it.
    port = victim.epsv()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(THIEVES[thief_address], 0))
    victim.line("RETR secret.bin")
    got = b""
    try:
        tls = thief.wrap_socket(raw, server_hostname="127.0.0.1", session=stolen)
        got = recv_all(tls, 10)
    except OSError:
        pass
    reply = final(victim)
    # observed (TLS 1.2): got == SECRET, reply "226 Transfer complete."
    assert SECRET[:40] not in got, "a thief's data connection resumed a session ftpfix gave it when refusing it"
    assert reply.startswith("425"), reply

    # The victim's own data connections still resume, transfer after transfer.
    for _ in range(3):
        port = victim.epsv()
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        victim.line("RETR secret.bin")
        assert victim.reply(20).startswith("150")
        data = victim_context.wrap_socket(raw, server_hostname="127.0.0.1", session=victim.sock.session)
        assert data.session_reused
        assert recv_all(data, 20) == SECRET
        assert victim.reply(20).startswith("226")
