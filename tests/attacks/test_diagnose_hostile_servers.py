"""``ftpfix diagnose`` against hostile and broken servers: it never hangs and never buffers without bound.

The diagnosing client dials arbitrary hosts. Each server here misbehaves one
way (silence, a line without end, a reply without end, a trickle, a data
connection that never ends, nonsense where numbers should be), and the run
must end with a FAIL verdict that says what was seen. The hang guard is
pytest's timeout and ``fail_after``-style bounds on the run, never a speed
assertion.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ftpfix.diagnose import probe
from ftpfix.diagnose.checks import Check, Status, verdict
from ftpfix.diagnose.probe import Options, Target, diagnose

Behaviour = Callable[[socket.socket], None]


@pytest.fixture
def hostile() -> Iterator[Callable[[Behaviour], int]]:
    """A server on loopback that runs ``behaviour`` on every connection; its port."""
    listeners: list[socket.socket] = []

    def start(behaviour: Behaviour) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=_guarded, args=(behaviour, conn), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.close()


def _guarded(behaviour: Behaviour, conn: socket.socket) -> None:
    try:
        with conn:
            behaviour(conn)
    except OSError:
        pass  # the client hung up on us, as it should


def run(port: int) -> list[Check]:
    options = Options(timeout=1.0, port_timeout=0.5)
    return diagnose(Target("127.0.0.1", port, "anonymous", "x@"), options, lambda check: None)


def logged_in(conn: socket.socket, then: Callable[[socket.socket, str], None]) -> None:
    """Greet and accept any login; hand every later command to ``then``."""
    conn.sendall(b"220 hostile\r\n")
    buffer = b""
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buffer += data
        while b"\r\n" in buffer:
            line, buffer = buffer.split(b"\r\n", 1)
            verb = line.split(b" ")[0].upper()
            if verb == b"USER":
                conn.sendall(b"230 in\r\n")
            elif verb in (b"FEAT", b"TYPE", b"NOOP"):
                conn.sendall(b"200 ok\r\n")
            elif verb == b"QUIT":
                return
            else:
                then(conn, line.decode("latin-1"))


def failed_at(checks: list[Check], stage: str) -> str:
    result = verdict(checks)
    assert result.status is Status.FAIL and result.stage == stage, result.text
    return result.text


def test_silence_after_connect(hostile) -> None:
    port = hostile(lambda conn: time.sleep(5))
    assert "no reply in time" in failed_at(run(port), "greeting")


def test_a_greeting_line_without_end(hostile) -> None:
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"220 ")
        for _ in range(10_000):
            conn.sendall(b"A" * 4096)

    assert "reply line of over 8192 bytes" in failed_at(run(hostile(endless)), "greeting")


def test_a_reply_without_end(hostile) -> None:
    def endless(conn: socket.socket) -> None:
        for _ in range(100_000):
            conn.sendall(b"220-more\r\n")

    assert "over 512 lines" in failed_at(run(hostile(endless)), "greeting")


def test_a_trickle_is_held_to_one_deadline(hostile) -> None:
    def trickle(conn: socket.socket) -> None:
        for _ in range(100):
            conn.sendall(b"2")
            time.sleep(0.2)

    assert "no reply in time" in failed_at(run(hostile(trickle)), "greeting")


def test_not_ftp_at_all(hostile) -> None:
    port = hostile(lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n"))
    assert "not an FTP reply" in failed_at(run(port), "greeting")


def test_nonsense_in_the_227(hostile) -> None:
    def answer(conn: socket.socket, line: str) -> None:
        if line.upper().startswith("PASV"):
            conn.sendall(b"227 Entering Passive Mode (999,1,2,3,4,5)\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    checks = run(hostile(lambda conn: logged_in(conn, answer)))
    stages = {check.stage: check for check in checks}
    assert stages["227 address"].status is Status.FAIL
    assert verdict(checks).status is Status.FAIL


def test_a_data_connection_that_never_ends(hostile) -> None:
    data_listener = socket.create_server(("127.0.0.1", 0))
    data_port = data_listener.getsockname()[1]

    def flood() -> None:
        try:
            conn, _ = data_listener.accept()
            with conn:
                while True:
                    conn.sendall(b"-rw-r--r-- 1 a a 1 Jan 1 00:00 x\r\n" * 1000)
        except OSError:
            pass

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb == "PASV":
            threading.Thread(target=flood, daemon=True).start()
            conn.sendall(f"227 ok (127,0,0,1,{data_port >> 8},{data_port & 255})\r\n".encode())
        elif verb == "LIST":
            conn.sendall(b"150 here it comes\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    try:
        checks = run(hostile(lambda conn: logged_in(conn, answer)))
    finally:
        data_listener.close()
    texts = " ".join(check.summary for check in checks)
    assert "sent over" in texts or "went quiet" in texts or "LIST:" in texts
    assert verdict(checks).status is Status.FAIL


def test_a_server_that_hangs_up_mid_session(hostile) -> None:
    def answer(conn: socket.socket, line: str) -> None:
        conn.close()
        raise OSError("gone")

    checks = run(hostile(lambda conn: logged_in(conn, answer)))
    assert verdict(checks).status is Status.FAIL
    assert any(check.status is Status.SKIP for check in checks)


def test_implicit_tls_against_a_plain_server(hostile) -> None:
    port = hostile(lambda conn: (conn.sendall(b"220 plain text, no TLS\r\n"), time.sleep(2)))
    target = Target("127.0.0.1", port, "anonymous", "x@", tls="implicit")
    checks = diagnose(target, Options(timeout=1.0, port_timeout=0.5), lambda check: None)
    assert failed_at(checks, "tls").startswith("FAIL at tls: TLS handshake failed")
    assert {check.stage: check.status for check in checks}["greeting"] is Status.SKIP


def test_a_listing_that_trickles_is_held_to_the_data_deadline(hostile, monkeypatch) -> None:
    monkeypatch.setattr(probe, "DATA_DEADLINE", 2.0)
    data_listener = socket.create_server(("127.0.0.1", 0))
    data_port = data_listener.getsockname()[1]

    def trickle() -> None:
        try:
            conn, _ = data_listener.accept()
            with conn:
                for _ in range(1000):
                    conn.sendall(b"x")
                    time.sleep(0.3)  # always inside the 1 s silence timeout
        except OSError:
            pass

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb == "PASV":
            threading.Thread(target=trickle, daemon=True).start()
            conn.sendall(f"227 ok (127,0,0,1,{data_port >> 8},{data_port & 255})\r\n".encode())
        elif verb == "LIST":
            conn.sendall(b"150 here it comes, slowly\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    try:
        checks = run(hostile(lambda conn: logged_in(conn, answer)))
    finally:
        data_listener.close()
    assert verdict(checks).status is Status.FAIL


def test_a_fake_ftpfix_claiming_every_port(hostile, monkeypatch) -> None:
    """A server may claim to be ftpfix with a range of thousands of ports: only MAX_SCAN are dialed."""
    monkeypatch.setattr(probe, "MAX_SCAN", 10)
    dialed: list[int] = []
    real_scan = probe.scan

    def counting_scan(host, ports, timeout):
        dialed.extend(ports)
        return real_scan(host, ports, timeout)

    monkeypatch.setattr(probe, "scan", counting_scan)

    def answer(conn: socket.socket, line: str) -> None:
        if line.upper().startswith("SITE FTPFIX"):
            conn.sendall(b"211-ftpfix 9.9\r\n passive-ports: 60100-65535\r\n last-pasv: none\r\n211 End\r\n")
        elif line.upper().startswith("PASV"):
            conn.sendall(b"227 Entering Passive Mode (127,0,0,1,234,196)\r\n")  # 60100: nobody there
        else:
            conn.sendall(b"502 no\r\n")

    checks = run(hostile(lambda conn: logged_in(conn, answer)))
    assert len(dialed) == 10
    assert verdict(checks).status is Status.FAIL  # and the run ended
