"""SITE FTPFIX against a hostile client, through a real ftpfix in front of every server.

``SITE FTPFIX`` is answered by ftpfix and never forwarded (``verbs._site``).
What an attacker might try with it: smuggle a second command to the backend
inside it (an argument, a bare CR, a NUL), flood it, make it echo something,
or ask it before logging in. None of it reaches the backend: the file the
smuggled DELE names is still there, every reply comes from ftpfix, and the
session goes on answering in order.

ftpfix's passive ports in this file: 21480-21483.
"""

from __future__ import annotations

import pytest

from tests.attacks.transcript import Attacker, assert_healthy
from tests.harness import legacy
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21480-21483"

#: The smuggling attempts never reach a backend, so one server shows it;
#: the reply itself is checked in front of all three.
ONE_SERVER = pytest.mark.parametrize("server_kind", ["vsftpd"])


@pytest.fixture
def proxy(backend, tmp_path, proxies):
    started = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0), backend=(backend.host, backend.port), public_address="127.0.0.1", ports=PORTS
        ),
    )
    proxies.append(started)
    return started


def test_it_answers_with_the_range_and_how_pasv_arrived(backend, proxy) -> None:
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    assert attacker.command("SITE FTPFIX").splitlines()[1:3] == [" passive-ports: 21480-21483", " last-pasv: none"]
    attacker.pasv()
    assert " last-pasv: PASV" in attacker.command("SITE FTPFIX")
    attacker.pasv()
    attacker.line("P@SW")
    assert attacker.reply().startswith("227 ")
    assert " last-pasv: P@SW (repaired)" in attacker.command("site ftpfix")


@ONE_SERVER
@pytest.mark.parametrize(
    "smuggled",
    [
        b"SITE FTPFIX DELE victim.txt\r\n",
        b"SITE FTPFIX\rDELE victim.txt\r\n",
        b"SITE FTPFIX\x00DELE victim.txt\r\n",
        b"SITE FTPFIX\xff\xf4DELE victim.txt\r\n",
        b"SITE FTPFIX \r\n\r\n",
        b"SITE FTPFIX " + b"A" * 5000 + b"\r\nDELE\r\n",
    ],
    ids=["argument", "bare-cr", "nul", "telnet-ip", "empty-line", "overlong"],
)
def test_nothing_rides_along_to_the_backend(smuggled: bytes, backend, proxy) -> None:
    legacy.put_file(backend, "victim.txt", b"still here")
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.send(smuggled)
    first = attacker.reply()
    assert first[:3] in ("211", "500", "501"), first
    # Whatever else the line held was answered by ftpfix too, and the session is in step.
    reply = attacker.command("NOOP")
    while not reply.startswith("200"):
        assert reply[:3] in ("500", "501", "550"), reply
        reply = attacker.reply()
    assert (backend.files / "victim.txt").read_bytes() == b"still here"
    assert "211-ftpfix" in attacker.command("SITE FTPFIX")
    assert_healthy(proxy)


@ONE_SERVER
def test_before_login_it_says_nothing(backend, proxy) -> None:
    attacker = Attacker(proxy)
    assert attacker.command("SITE FTPFIX") == "530 Log in first (SITE FTPFIX)."


@ONE_SERVER
def test_a_flood_is_answered_in_order(backend, proxy) -> None:
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.send(b"SITE FTPFIX\r\nNOOP\r\n" * 200)
    for _ in range(200):
        assert attacker.reply().startswith("211-ftpfix")
        assert attacker.reply().startswith("200")
    assert_healthy(proxy)
