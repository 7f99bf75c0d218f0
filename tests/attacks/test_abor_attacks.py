"""Attacks on ABOR, as transcripts: what a client sends around an ABOR, and what must come back.

During a transfer it relays, ftpfix breaks the data connection instead of
forwarding ABOR, answers ABOR itself after the transfer's own reply, and asks
the backend a NOOP when the backend leaves the transfer unanswered (pure-ftpd).
Each test here tries to make one of those steps pair a reply with the wrong
command, on every backend; the session must stay in step and ftpfix whole.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.attacks.test_data_attacks import address, logged_in, passive_download, start
from tests.attacks.transcript import assert_healthy, parse_227, recv_all
from tests.harness import legacy

pytestmark = [pytest.mark.servers, pytest.mark.root]

#: A file no socket buffer holds: the backend is still sending when ABOR comes.
BIG = 32 * 1024 * 1024


def running_download(attacker, commands: bytes = b"RETR big.bin\r\n"):
    """TYPE I, PASV, connect, send ``commands`` (a RETR first), read its 150 and a little data."""
    attacker.expect_after("TYPE I", "200")
    host, port = attacker.pasv()
    data = attacker.data_connect(port, host)
    attacker.send(commands)
    attacker.expect("150")
    data.recv(1 << 16)
    return data


@pytest.fixture
def files(backend: legacy.LegacyServer) -> bytes:
    small = os.urandom(200_000)
    legacy.put_file(backend, "big.bin", os.urandom(BIG))
    legacy.put_file(backend, "small.bin", small)
    return small


def test_a_clients_own_noop_after_abor_is_never_taken_for_the_probe(backend, files, tmp_path, proxies) -> None:
    """ABOR and NOOP in one segment while the data connection is held: the client's
    NOOP must get its own 200, after the 426 and ABOR's 226, whoever probes what."""
    proxy = start(proxies, address(backend), tmp_path)
    with logged_in(proxy.port, backend) as attacker:
        data = running_download(attacker)
        attacker.send(b"ABOR\r\nNOOP\r\n")
        assert attacker.code() == "426"
        assert attacker.code() == "226"
        assert attacker.code() == "200"
        data.close()
        assert hashlib.sha256(passive_download(attacker, "RETR small.bin")).digest() == hashlib.sha256(files).digest()
    assert_healthy(proxy)


def test_abor_pipelined_with_pasv_and_retr_keeps_every_reply_in_its_place(backend, files, tmp_path, proxies) -> None:
    """ABOR, PASV and RETR at once: 426, 226, then the PASV's 227 and the RETR's 150 and 226."""
    proxy = start(proxies, address(backend), tmp_path)
    with logged_in(proxy.port, backend) as attacker:
        data = running_download(attacker)
        attacker.send(b"ABOR\r\nPASV\r\n")
        assert attacker.code() == "426"
        assert attacker.code() == "226"
        reply = attacker.expect("227")
        data.close()
        host, port = parse_227(reply)
        with attacker.data_connect(port, host) as second:
            attacker.line("RETR small.bin")
            attacker.expect("150")
            assert recv_all(second) == files
        attacker.expect("226")
        attacker.expect_after("QUIT", "221")
    assert_healthy(proxy)


def test_abor_after_the_download_was_read_whole_gets_both_replies(backend, files, tmp_path, proxies) -> None:
    """The client read the file to EOF but sent ABOR before the 226: two replies,
    the transfer's and ABOR's, and the next command is answered in its turn."""
    proxy = start(proxies, address(backend), tmp_path)
    with logged_in(proxy.port, backend) as attacker:
        attacker.expect_after("TYPE I", "200")
        host, port = attacker.pasv()
        data = attacker.data_connect(port, host)
        attacker.line("RETR small.bin")
        attacker.expect("150")
        assert recv_all(data) == files
        attacker.send(b"ABOR\r\nPWD\r\n")
        assert attacker.code() in ("226", "426")
        assert attacker.code() in ("225", "226")
        attacker.expect("257")
        data.close()
    assert_healthy(proxy)


def test_abor_before_the_data_connection_then_quit(backend, files, tmp_path, proxies) -> None:
    """ABOR while the backend waits for a data connection nobody makes, then QUIT at once:
    the backend is released now (ftpfix dials and resets its port), and QUIT gets its 221."""
    proxy = start(proxies, address(backend), tmp_path)
    with logged_in(proxy.port, backend) as attacker:
        attacker.expect_after("TYPE I", "200")
        attacker.pasv()
        attacker.send(b"RETR big.bin\r\nABOR\r\nQUIT\r\n")
        # The backends send their 150 once the knock connects: after the ABOR,
        # so ftpfix drops it, and the client reads exactly three replies.
        assert [attacker.code(timeout=5) for _ in range(3)] == ["426", "226", "221"]
    assert_healthy(proxy)


def test_a_download_the_client_cuts_short_never_hangs_the_session(backend, files, tmp_path, proxies) -> None:
    """No ABOR at all: the client reads a little and closes its data socket (`curl | head`).
    pure-ftpd then sends a second 150 and no final reply; ftpfix must not wait for one
    forever (each such session held a slot for pure-ftpd's 15-minute idle timeout, and
    twenty of them locked the client's address out). The next command is answered."""
    proxy = start(proxies, address(backend), tmp_path)
    with logged_in(proxy.port, backend) as attacker:
        data = running_download(attacker)
        data.close()
        final = final_reply_after_preliminaries(attacker)
        assert final[:3] in ("426", "451"), final
        assert attacker.command("NOOP").startswith("200")
        assert hashlib.sha256(passive_download(attacker, "RETR small.bin")).digest() == hashlib.sha256(files).digest()
    assert_healthy(proxy)


def final_reply_after_preliminaries(attacker, timeout: float = 5.0) -> str:
    while (text := attacker.reply(timeout)).startswith("1"):
        pass
    return text


def test_an_abor_queued_behind_a_command_still_stops_the_transfer(backend, files, tmp_path, proxies) -> None:
    """NOOP pipelined after RETR waits for the transfer; an ABOR sent after it must still
    stop the transfer at once (it used to wait behind the NOOP, and the transfer ran on),
    and the replies keep the order of the commands."""
    proxy = start(proxies, address(backend), tmp_path)
    with logged_in(proxy.port, backend) as attacker:
        data = running_download(attacker, b"RETR big.bin\r\nNOOP\r\n")
        attacker.send(b"\xff\xf4\xff\xf2ABOR\r\n")
        assert attacker.code(timeout=3) == "426"
        assert attacker.code(timeout=3) == "200"
        assert attacker.code(timeout=3) == "226"
        data.close()
        assert attacker.command("PWD").startswith("257")
    assert_healthy(proxy)
