"""Red team: QUIT followed by a half-close while a transfer is outstanding.

README, "Faults stay local": "a client that sends QUIT and half-closes still gets its 221". It
held only when nothing was outstanding: with a transfer command outstanding, the half-close was
taken for a hang-up, so the client got no final reply for the transfer (neither the 226 of a
download it received whole, nor the 425 of one whose data connection it never made), no 221,
just EOF, and the "session closed" line said "client hung up" instead of "quit", on vsftpd,
pure-ftpd and ProFTPD alike. A QUIT now marks the end of file after it as a client that still
reads (``Session.quitting``); these sessions get 226/425 then 221, reason "quit", with or
without the half-close.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

from tests.attacks.transcript import Attacker, ReplyError, recv_all
from tests.harness import legacy
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PORTS = "21190-21193"


def replies_until_eof(attacker: Attacker, timeout: float = 6.0) -> list[str]:
    out = []
    try:
        while True:
            out.append(attacker.reply(timeout))
    except ReplyError:
        return out


@pytest.fixture
def proxy(backend, tmp_path, proxies):
    started = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(backend.host, backend.port),
            public_address="127.0.0.1",
            ports=PORTS,
            extra="[limits]\ndata_connect_timeout = 2\n",
        ),
    )
    proxies.append(started)
    return started


def last_close_reason(proxy) -> str:
    time.sleep(0.3)
    return proxy.events("session closed")[-1]["reason"]


@pytest.mark.parametrize("half_close", [False, True], ids=["quit", "quit-and-half-close"])
def test_quit_behind_a_running_download_gets_226_and_221(half_close, backend, proxy) -> None:
    payload = os.urandom(2_000_000)
    legacy.put_file(backend, "f.bin", payload)
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.expect_after("TYPE I", "200")
    host, port = attacker.pasv()
    data = attacker.data_connect(port, host)
    attacker.line("RETR f.bin")
    attacker.expect("150")
    attacker.send(b"QUIT\r\n")
    if half_close:
        attacker.sock.shutdown(socket.SHUT_WR)
    received = recv_all(data)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    codes = [reply[:3] for reply in replies_until_eof(attacker)]
    # observed with half_close: codes == [] and reason "client hung up"
    assert codes == ["226", "221"]
    assert last_close_reason(proxy) == "quit"


@pytest.mark.parametrize("half_close", [False, True], ids=["quit", "quit-and-half-close"])
def test_quit_behind_a_transfer_that_never_connects_gets_425_and_221(half_close, backend, proxy) -> None:
    legacy.put_file(backend, "f.bin", b"x" * 1000)
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.pasv()
    attacker.line("RETR f.bin")
    attacker.send(b"QUIT\r\n")
    if half_close:
        attacker.sock.shutdown(socket.SHUT_WR)
    codes = [reply[:3] for reply in replies_until_eof(attacker)]
    # observed with half_close: codes == [] (EOF at once) and reason "client hung up"
    assert codes == ["425", "221"]
    assert last_close_reason(proxy) == "quit"
