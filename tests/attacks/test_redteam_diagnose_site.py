"""Red team of SITE FTPFIX through a real ftpfix in front of a real server.

What already held and is not repeated here (tried by hand against vsftpd):
``SITE  FTPFIX``, ``site ftpfix``, ``SITE<TAB>FTPFIX`` and trailing blanks
are all answered by ftpfix; ``SITE FTPFIXX`` goes to the server; an argument
is a 501; one session's P@SW never shows in another's ``last-pasv``. The
pipelined login broke; the transfer test guards what held.

ftpfix's passive ports in this file: 21620-21623.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.attacks.transcript import Attacker, assert_healthy, recv_all
from tests.harness import legacy
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21620-21623"


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


@pytest.mark.parametrize("server_kind", ["vsftpd"])
def test_pipelined_after_the_login_it_answers_as_logged_in(backend, proxy) -> None:
    """USER, PASS and SITE FTPFIX in one write: the SITE FTPFIX comes after a successful login, and its
    reply comes after the 230, so it is the 211. It was the 530 "Log in first": whether the client
    had logged in was decided when the line arrived, not in its turn."""
    attacker = Attacker(proxy)
    attacker.send(f"USER {backend.user}\r\nPASS {backend.password}\r\nSITE FTPFIX\r\nNOOP\r\n".encode())
    assert attacker.reply().startswith("331")
    assert attacker.reply().startswith("230")
    assert attacker.reply().startswith("211-ftpfix")
    assert attacker.reply().startswith("200")
    assert_healthy(proxy)


@pytest.mark.parametrize("server_kind", ["vsftpd"])
def test_pipelined_after_a_failed_login_it_still_says_log_in_first(backend, proxy) -> None:
    attacker = Attacker(proxy)
    attacker.send(b"USER nobody-here\r\nPASS wrong\r\nSITE FTPFIX\r\n")
    replies = [attacker.reply() for _ in range(3)]
    assert replies[-1] == "530 Log in first (SITE FTPFIX).", replies
    assert_healthy(proxy)


def test_during_a_transfer_it_waits_for_the_226_and_the_file_arrives_whole(backend, proxy) -> None:
    """RETR, SITE FTPFIX and NOOP in one write, in front of each server: ftpfix's own reply comes
    after the transfer's 226 and before the NOOP's 200, and the file's bytes are untouched."""
    payload = os.urandom(4 * 1024 * 1024)
    legacy.put_file(backend, "big.bin", payload)
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.command("TYPE I")
    _, port = attacker.pasv()
    with attacker.data_connect(port) as data:
        attacker.send(b"RETR big.bin\r\nSITE FTPFIX\r\nNOOP\r\n")
        received = recv_all(data, timeout=60)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    codes = [attacker.reply(timeout=30)[:3] for _ in range(4)]
    assert codes[0] in ("150", "125") and codes[1] == "226" and codes[2:] == ["211", "200"], codes
    assert_healthy(proxy)
