# What fails on the code this file was written against (e17c5df, run from a clean export), one line each.
# At 962464b ("truthful transfer replies") all 30 pass; pure-ftpd's active-mode case now and then
# xfails on that server's own missing final reply (see active_to_nothing).
# - test_an_aborted_upload_is_never_answered_226[all three]: ftpfix ends the backend's data
#   connection with a FIN after the client's RST, so the server stores a short file and says 226
#   (direct: vsftpd 426, pure-ftpd 451, ProFTPD 426).
# - test_a_backend_reset_during_retr_is_reported_426: the client gets half the file, a clean EOF
#   and the backend's lying 226 relayed as is.
# - test_active_mode_to_a_closed_port_is_not_answered_226[all three]: ftpfix accepts the backend's
#   data connection, fails to dial the client, closes quietly and relays the backend's 226
#   (pure-ftpd sometimes hangs instead; vsftpd now and then says 426 itself, so that case can pass).
# - test_a_failed_transfer_command_does_not_hang[vsftpd, pure-ftpd]: the 550 is held until the
#   relay ends, and these servers keep their passive socket open, so it never comes (ProFTPD passes).
# - test_a_stalled_download_times_out_and_frees_its_port[all three]: a relay with a data connection
#   counts as activity even when no byte moves, so the idle timeout never fires.
# - test_a_stalled_upload_times_out_and_frees_its_port[all three]: the same, for an upload.
# - test_a_stalled_upload_is_reset_at_the_backend_not_finished: the same; no reply ever comes.
# - test_running_out_of_descriptors_gets_clear_replies: EMFILE from socket() in PASV crashes the
#   session ("session crashed" in the log; the client sees EOF with no reply), and a LIST whose data
#   connection ftpfix cannot accept hangs after its 150.
# - test_sigterm_tells_idle_sessions_and_lets_a_transfer_finish: idle sessions hear nothing until the
#   grace period (30 s) ends.
# - test_a_second_sigterm_stops_at_once_with_a_failure_status: the forced stop exits 0.
# Passing at e17c5df too (regression guards): the clean scripted RETR, ProFTPD's failed RETR, every stage of
# test_a_reset_at_any_stage_leaves_ftpfix_serving, and test_a_stranger_cannot_steal_the_passive_port.

"""Attacks on the data path: resets, stalls, refusals and exhaustion around transfers.

Each test is a transcript of what an attacker, or a failing network, does to
ftpfix's data connections, and of what must come out: the final reply to a
transfer tells the truth (a transfer that did not arrive whole is never
answered 226), nothing hangs, passive ports come back, and one session's
trouble never touches another's. Data that arrives is checked by sha256.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.attacks.transcript import (
    Attacker,
    Listener,
    ReplyError,
    assert_healthy,
    crash_events,
    parse_227,
    recv_all,
    reset_socket,
)
from tests.conftest import require_programs
from tests.harness import legacy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

#: ftpfix's passive ports in this file; the attack suite keeps 21100-21199 for it.
PORTS = "21100-21139"
#: One-port ranges, for tests that prove a port came back.
ONE_PORT = {
    "failed": "21150-21150",
    "stall-down": "21151-21151",
    "stall-up": "21152-21152",
    "stall-up-scripted": "21153-21153",
    "slow-reader": "21154-21154",
}
EXHAUSTION_PORTS = "21160-21199"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- ftpfix and the backends -------------------------------------------------


def start(
    proxies: list[Ftpfix],
    backend: tuple[str, int],
    tmp_path: Path,
    *,
    limits: str = "",
    ports: str = PORTS,
    wrapper: tuple[str, ...] = (),
) -> Ftpfix:
    proxy = start_ftpfix(
        tmp_path / f"ftpfix-{time.monotonic_ns()}",
        config_text(
            listen=("127.0.0.1", 0),
            backend=backend,
            public_address="127.0.0.1",
            ports=ports,
            extra=f"[limits]\n{limits}\n" if limits else "",
        ),
        wrapper=wrapper,
    )
    proxies.append(proxy)
    return proxy


def address(server: legacy.LegacyServer) -> tuple[str, int]:
    return (server.host, server.port)


def logged_in(port: int, server: legacy.LegacyServer, **options) -> Attacker:
    attacker = Attacker(port, **options)
    attacker.login(server.user, server.password)
    return attacker


def final_reply(attacker: Attacker, timeout: float = 10.0) -> str:
    """Skip 1xx marks; the first reply of 200 or more, within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    while True:
        text = attacker.reply(max(deadline - time.monotonic(), 0.01))
        if not text.startswith("1"):
            return text


def passive_download(attacker: Attacker, command: str, timeout: float = 20.0) -> bytes:
    """TYPE I, PASV, connect, ``command``; the bytes, after asserting the 150 and the 226."""
    attacker.expect_after("TYPE I", "200")
    host, port = attacker.pasv()
    with attacker.data_connect(port, host) as data:
        attacker.line(command)
        attacker.expect("1", timeout)
        received = recv_all(data, timeout)
    attacker.expect("226", timeout)
    return received


def passive_list(attacker: Attacker) -> bytes:
    host, port = attacker.pasv()
    with attacker.data_connect(port, host) as data:
        attacker.line("LIST")
        attacker.expect("150")
        listing = recv_all(data)
    attacker.expect("226")
    return listing


def assert_serves(proxy: Ftpfix, server: legacy.LegacyServer, name: str, payload: bytes) -> None:
    """A fresh session logs in and downloads ``name`` whole (sha256)."""
    with logged_in(proxy.port, server) as healthy:
        assert sha(passive_download(healthy, f"RETR {name}")) == sha(payload)
        healthy.expect_after("QUIT", "221")


def port_command(port: int, host: str = "127.0.0.1") -> str:
    return f"PORT {host.replace('.', ',')},{port >> 8},{port & 255}"


def dead_port() -> int:
    """A client port where nothing listens: bound, noted, closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ScriptedBackend:
    """A backend that misbehaves on the data connection exactly as told.

    ``retr`` is "whole" (send the payload, close normally, 226),
    "half-then-reset" (send half, close with RST, and answer 226 anyway, as a
    careless server would) or "never-answer" (send it all, close, and never
    send the final reply). A STOR is answered 226 if the upload ended with an
    orderly EOF and 426 if it was reset, like real servers; how each upload
    ended is recorded in ``upload_ends`` ("eof" or "reset").
    """

    payload: bytes
    retr: str = "whole"
    host: str = "127.0.0.1"
    port: int = 0
    uploads: dict[str, bytes] = field(default_factory=dict)
    upload_ends: list[str] = field(default_factory=list)
    upload_ended: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ScriptedBackend:
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        data_listener: socket.socket | None = None
        try:
            with conn, conn.makefile("rb") as lines:

                def say(text: str) -> None:
                    conn.sendall(text.encode() + b"\r\n")

                say("220 scripted legacy FTP server")
                for raw in lines:
                    verb, _, argument = raw.strip().decode("latin-1").partition(" ")
                    verb = verb.upper()
                    if verb == "USER":
                        say("331 Password required.")
                    elif verb == "PASS":
                        say("230 Logged in.")
                    elif verb in ("TYPE", "NOOP"):
                        say("200 OK.")
                    elif verb == "PASV":
                        data_listener = socket.create_server((self.host, 0))
                        port = data_listener.getsockname()[1]
                        say(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255}).")
                    elif verb in ("RETR", "STOR") and data_listener is not None:
                        say("150 Opening BINARY mode data connection.")
                        data, _ = data_listener.accept()
                        data_listener.close()
                        data_listener = None
                        say(self._retr(data) if verb == "RETR" else self._stor(data, argument))
                    elif verb == "QUIT":
                        say("221 Goodbye.")
                        return
                    else:
                        say(f"500 {verb} not understood.")
        except OSError:
            pass

    def _retr(self, data: socket.socket) -> str:
        if self.retr == "whole":
            with data:
                data.sendall(self.payload)
            return "226 Transfer complete."
        if self.retr == "never-answer":
            with data:
                data.sendall(self.payload)
            time.sleep(3600)  # the final reply never comes
        data.sendall(self.payload[: len(self.payload) // 2])
        reset_socket(data)
        return "226 Transfer complete."  # a lie: the client cannot have it all

    def _stor(self, data: socket.socket, name: str) -> str:
        chunks = []
        with data:
            try:
                while chunk := data.recv(1 << 16):
                    chunks.append(chunk)
                end = "eof"
            except OSError:
                end = "reset"
        self.uploads[name] = b"".join(chunks)
        self.upload_ends.append(end)
        self.upload_ended.set()
        return "226 Transfer complete." if end == "eof" else "426 Connection closed; transfer aborted."


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedBackend]]:
    started: list[ScriptedBackend] = []

    def make(payload: bytes, **options) -> ScriptedBackend:
        backend = ScriptedBackend(payload, **options).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


# -- 1. an upload the client aborts -------------------------------------------


def aborted_upload(port: int, server: legacy.LegacyServer) -> str:
    """STOR up.bin, 300 KB, then the data connection reset: the final reply."""
    with logged_in(port, server) as attacker:
        attacker.expect_after("TYPE I", "200")
        host, data_port = attacker.pasv()
        data = attacker.data_connect(data_port, host)
        attacker.line("STOR up.bin")
        attacker.expect("150")
        data.sendall(os.urandom(300_000))
        reset_socket(data)
        return final_reply(attacker)


def test_an_aborted_upload_is_never_answered_226(backend, tmp_path, proxies) -> None:
    """Attack: the client resets its data connection in the middle of a STOR.

    Straight to the server, the server says the transfer failed (vsftpd 426,
    pure-ftpd 451, ProFTPD 426). Through ftpfix the client must hear the same:
    a 4xx, never a 226 for a file that did not arrive.
    """
    direct = aborted_upload(backend.port, backend)
    assert direct[:1] == "4", f"the server itself answered {direct!r}"
    proxy = start(proxies, address(backend), tmp_path)
    proxied = aborted_upload(proxy.port, backend)
    assert proxied[:1] == "4", f"direct: {direct!r}; through ftpfix: {proxied!r}"
    assert_healthy(proxy)


# -- 2. a backend that resets the data connection -----------------------------


def test_a_backend_reset_during_retr_is_reported_426(scripted, tmp_path, proxies) -> None:
    """Fault: the backend sends half the file, resets the data connection, and
    still answers 226. The client must see the break (a reset or a short
    read) and a final 426 (425 if the reset came first), never 226."""
    payload = os.urandom(4 * 1024 * 1024)
    backend = scripted(payload, retr="half-then-reset")
    proxy = start(proxies, (backend.host, backend.port), tmp_path)
    with Attacker(proxy.port) as attacker:
        attacker.login("alice", "x")
        attacker.expect_after("TYPE I", "200")
        host, port = attacker.pasv()
        with attacker.data_connect(port, host) as data:
            attacker.line("RETR half.bin")
            first = attacker.reply()
            try:
                received = recv_all(data)
            except OSError:
                received = None  # the break reached the client as a reset: fine
        assert received is None or len(received) < len(payload), "the client got the whole file?"
        # 426; or 425 when the reset beat ftpfix's dial to the backend, so no
        # data connection was made at all, and then perhaps before the
        # backend's 150 got through (ftpfix drops a 1xx about a data
        # connection that failed). Never a 2xx.
        final = first if first.startswith("425") else final_reply(attacker)
        assert first[:3] in ("150", "425"), f"first reply to a broken RETR: {first!r}"
        assert final[:3] in ("425", "426"), f"final reply to a broken RETR: {final!r}"
        attacker.expect_after("NOOP", "200")
    assert_healthy(proxy)


def test_a_clean_retr_from_the_scripted_backend_is_whole(scripted, tmp_path, proxies) -> None:
    """Control: the same backend sending the whole file and closing normally
    gets a 226 and a file with the right sha256 through ftpfix."""
    payload = os.urandom(4 * 1024 * 1024)
    backend = scripted(payload, retr="whole")
    proxy = start(proxies, (backend.host, backend.port), tmp_path)
    with Attacker(proxy.port) as attacker:
        attacker.login("alice", "x")
        assert sha(passive_download(attacker, "RETR whole.bin")) == sha(payload)
    assert_healthy(proxy)


# -- 3. active mode towards a port where nothing listens ----------------------


def active_to_nothing(port: int, server: legacy.LegacyServer) -> tuple[str, str]:
    """PORT to a closed client port, RETR big.bin: (final reply, NOOP's reply)."""
    with logged_in(port, server, timeout=15) as attacker:
        attacker.expect_after("TYPE I", "200")
        attacker.expect_after(port_command(dead_port()), "200")
        attacker.line("RETR big.bin")
        while True:
            try:
                final = attacker.reply(15)
            except ReplyError:
                if server.kind == "pure-ftpd" and port != server.port:
                    # The same quirk, seen from further off: pure-ftpd wrote
                    # the whole file into its socket before ftpfix's reset
                    # reached it, and then answered nothing at all.
                    pytest.xfail("pure-ftpd sent no final reply to RETR")
                raise
            if not final.startswith("1"):
                break
            if server.kind == "pure-ftpd" and "(measured here)" in final:
                # pure-ftpd 1.0.50 sometimes finishes writing the file into the
                # socket before the reset arrives, then answers with only its
                # timing line under the code 150 and no final reply at all (the
                # quirk test_modes.py's ABOR tests mark too): no client,
                # direct or proxied, gets a final reply then.
                pytest.xfail(f"pure-ftpd sent no final reply to RETR, only {final!r}")
        return final, attacker.command("NOOP")


def test_active_mode_to_a_closed_port_is_not_answered_226(backend, tmp_path, proxies) -> None:
    """Attack: PORT names a client port where nothing listens, then RETR of a
    1 MiB file. No data connection to the client was ever made, so the final
    reply is 425 or 426 (as the server says when asked directly), never 226;
    and the session stays usable."""
    legacy.put_file(backend, "big.bin", os.urandom(1024 * 1024))
    final, noop = active_to_nothing(backend.port, backend)
    assert final[:3] in ("425", "426"), f"the server itself answered {final!r}"
    proxy = start(proxies, address(backend), tmp_path)
    final, noop = active_to_nothing(proxy.port, backend)
    assert final[:3] in ("425", "426"), f"through ftpfix, RETR with no data connection got {final!r}"
    assert noop.startswith("200")
    assert_healthy(proxy)


# -- 4. a transfer command that fails ------------------------------------------


def test_a_failed_transfer_command_does_not_hang(backend, tmp_path, proxies) -> None:
    """Attack (or just ftplib): PASV, connect the data socket at once, then
    RETR a file that does not exist. The 550 must arrive within 5 s, the
    session must go on, and the one passive port must come back."""
    legacy.put_file(backend, "here.txt", b"present\n")
    proxy = start(proxies, address(backend), tmp_path, ports=ONE_PORT["failed"])
    with logged_in(proxy.port, backend) as attacker:
        host, port = attacker.pasv()
        data = attacker.data_connect(port, host)
        attacker.line("RETR missing.txt")
        started = time.monotonic()
        try:
            refusal = attacker.reply(timeout=5)
        except ReplyError as error:
            pytest.fail(f"no reply to RETR missing.txt within 5 s: {error}")
        assert refusal[:1] in ("4", "5") and time.monotonic() - started < 5, refusal
        data.close()  # as ftplib does on an error reply
        attacker.expect_after("NOOP", "200")
        # With a one-port range, this PASV works only if the port came back.
        assert b"here.txt" in passive_list(attacker)
    assert_healthy(proxy)


# -- 5. a transfer that stalls --------------------------------------------------

#: Seconds of [limits] idle_timeout in the stall tests. pure-ftpd takes 1-2 s to
#: check a password (argon2), and ftpfix's idle clock runs while PASS waits.
IDLE = 5


def test_a_stalled_download_times_out_and_frees_its_port(backend, tmp_path, proxies) -> None:
    """Attack: RETR of a 64 MiB file, and the data socket is never read. Within
    idle_timeout + 10 s the client gets a final 426 (or the session a 421), and
    the only passive port serves another session again."""
    legacy.put_file(backend, "huge.bin", os.urandom(64 * 1024 * 1024))
    proxy = start(proxies, address(backend), tmp_path, limits=f"idle_timeout = {IDLE}", ports=ONE_PORT["stall-down"])
    with logged_in(proxy.port, backend) as attacker:
        attacker.expect_after("TYPE I", "200")
        host, port = attacker.pasv()
        data = attacker.data_connect(port, host)
        attacker.line("RETR huge.bin")
        attacker.expect("150")
        try:
            outcome = final_reply(attacker, IDLE + 10)
        except ReplyError as error:
            pytest.fail(f"a stalled download got no final reply within {IDLE + 10} s: {error}")
        assert outcome[:1] == "4", outcome  # 426 from ftpfix, or the server's own failure (pure-ftpd: 451)
        with logged_in(proxy.port, backend) as other:
            assert b"huge.bin" in passive_list(other)
        data.close()
    assert_healthy(proxy)


def stalled_upload(port: int, user: str, password: str) -> tuple[Attacker, socket.socket]:
    """STOR up.bin, 100 KB, then neither more data nor a close."""
    attacker = Attacker(port)
    attacker.login(user, password)
    attacker.expect_after("TYPE I", "200")
    host, data_port = attacker.pasv()
    data = attacker.data_connect(data_port, host)
    attacker.line("STOR up.bin")
    attacker.expect("150")
    data.sendall(os.urandom(100_000))
    return attacker, data


def test_a_stalled_upload_times_out_and_frees_its_port(backend, tmp_path, proxies) -> None:
    """Attack: STOR, 100 KB, then silence on both connections. Within
    idle_timeout + 10 s the client gets a final 426 (or a 421), never a 226,
    and the only passive port serves another session again."""
    proxy = start(proxies, address(backend), tmp_path, limits=f"idle_timeout = {IDLE}", ports=ONE_PORT["stall-up"])
    attacker, data = stalled_upload(proxy.port, backend.user, backend.password)
    with attacker, data:
        try:
            outcome = final_reply(attacker, IDLE + 10)
        except ReplyError as error:
            pytest.fail(f"a stalled upload got no final reply within {IDLE + 10} s: {error}")
        assert outcome[:1] == "4", outcome  # 426 from ftpfix, or the server's own failure (pure-ftpd: 451)
        with logged_in(proxy.port, backend) as other:
            passive_list(other)
    assert_healthy(proxy)


def test_a_stalled_upload_is_reset_at_the_backend_not_finished(scripted, tmp_path, proxies) -> None:
    """Attack: the same stalled STOR, watched from the backend. When ftpfix gives
    up on it, the backend's data connection must end with a reset, not an
    orderly EOF: an EOF makes a real server keep a truncated file and answer
    226."""
    backend = scripted(b"")
    limits = f"idle_timeout = {IDLE}"
    proxy = start(proxies, (backend.host, backend.port), tmp_path, limits=limits, ports=ONE_PORT["stall-up-scripted"])
    attacker, data = stalled_upload(proxy.port, "alice", "x")
    with attacker, data:
        try:
            outcome = final_reply(attacker, IDLE + 10)
        except ReplyError as error:
            pytest.fail(f"a stalled upload got no final reply within {IDLE + 10} s: {error}")
        assert outcome[:1] == "4", outcome  # 426 from ftpfix, or the server's own failure (pure-ftpd: 451)
        assert backend.upload_ended.wait(5), "the backend's data connection was never ended"
        stored = len(backend.uploads["up.bin"])
        assert backend.upload_ends == ["reset"], (
            f"the upload ended at the backend with {backend.upload_ends} ({stored} bytes)"
        )
    assert_healthy(proxy)


# -- 6. resets at every stage -----------------------------------------------------


def reset_after_greeting(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    Attacker(proxy.port).reset()


def reset_after_user(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = Attacker(proxy.port)
    attacker.command(f"USER {server.user}")
    attacker.reset()


def reset_in_a_command_line(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = logged_in(proxy.port, server)
    attacker.send(b"RE")
    time.sleep(0.1)
    attacker.reset()


def reset_after_pasv(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = logged_in(proxy.port, server)
    attacker.pasv()
    attacker.reset()


def running_retr(attacker: Attacker) -> socket.socket:
    attacker.expect_after("TYPE I", "200")
    host, port = attacker.pasv()
    data = attacker.data_connect(port, host)
    attacker.line("RETR big.bin")
    attacker.expect("150")
    data.recv(1 << 16)
    return data


def reset_control_then_data_during_retr(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = logged_in(proxy.port, server)
    data = running_retr(attacker)
    attacker.reset()
    time.sleep(0.1)
    reset_socket(data)


def reset_data_during_stor(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = logged_in(proxy.port, server)
    attacker.expect_after("TYPE I", "200")
    host, port = attacker.pasv()
    data = attacker.data_connect(port, host)
    attacker.line("STOR up.bin")
    attacker.expect("150")
    data.sendall(os.urandom(200_000))
    reset_socket(data)
    final_reply(attacker)
    attacker.close()


def reset_client_data_during_active_retr(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = logged_in(proxy.port, server)
    attacker.expect_after("TYPE I", "200")
    with Listener("127.0.0.1") as listener:
        attacker.expect_after(port_command(listener.port), "200")
        attacker.line("RETR big.bin")
        accepted = listener.wait(1)
        accepted.recv(1 << 16)
        reset_socket(accepted)
    final_reply(attacker)
    attacker.close()


def reset_during_abor(proxy: Ftpfix, server: legacy.LegacyServer) -> None:
    attacker = logged_in(proxy.port, server)
    data = running_retr(attacker)
    attacker.line("ABOR")
    attacker.reset()
    reset_socket(data)


STAGES = {
    "after greeting": reset_after_greeting,
    "after USER": reset_after_user,
    "in a command line": reset_in_a_command_line,
    "after PASV": reset_after_pasv,
    "control then data during RETR": reset_control_then_data_during_retr,
    "data during STOR": reset_data_during_stor,
    "client data during active RETR": reset_client_data_during_active_retr,
    "during ABOR": reset_during_abor,
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_reset_at_any_stage_leaves_ftpfix_serving(stage: str, vsftpd, tmp_path, proxies) -> None:
    """Attack (or a flaky network): a connection reset at one stage of a
    session. The session ends quietly; the next session still downloads a
    file whole, and ftpfix logs no crash."""
    payload = os.urandom(1024 * 1024)
    legacy.put_file(vsftpd, "big.bin", os.urandom(8 * 1024 * 1024))
    legacy.put_file(vsftpd, "f.bin", payload)
    proxy = start(proxies, address(vsftpd), tmp_path)
    STAGES[stage](proxy, vsftpd)
    proxy.wait_for("session closed", timeout=10)
    assert_serves(proxy, vsftpd, "f.bin", payload)
    assert_healthy(proxy)


# -- 7. running out of descriptors ------------------------------------------------


@dataclass
class Outcome:
    steps: list[str] = field(default_factory=list)
    failure: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def crowd_member(
    index: int, port: int, server: legacy.LegacyServer, outcome: Outcome, release: threading.Event
) -> None:
    """One of the crowd: connect, log in, PASV, and every third also LIST.

    Every step must get a reply within 10 s: a 220 or a 421 at connect, a 227
    or a 425 to PASV, a listing or a 425/426 to LIST. A reset or EOF without
    a reply, or silence, is a failure. The session is then held open until
    ``release``, so the crowd holds its descriptors all at once.
    """
    attacker: Attacker | None = None
    try:
        attacker = Attacker(port, greet=False)
        greeting = attacker.reply(10)
        outcome.steps.append(greeting[:3])
        if greeting.startswith("421"):
            return
        assert greeting.startswith("220"), greeting
        attacker.login(server.user, server.password)
        pasv = attacker.command("PASV", 10)
        outcome.steps.append(pasv[:3])
        if pasv.startswith("425"):
            return
        assert pasv.startswith("227"), pasv
        if index % 3 == 0:
            data = attacker.data_connect(parse_227(pasv)[1], timeout=10)
            attacker.line("LIST")
            final = attacker.reply(10)
            if final.startswith("150"):
                try:
                    recv_all(data, 10)
                except OSError:
                    pass
                final = attacker.reply(10)
            outcome.steps.append(final[:3])
            assert final[:3] in ("226", "425", "426"), final
            data.close()
    except (ReplyError, AssertionError, OSError) as error:
        outcome.failure = f"after {outcome.steps}: {error}"
    finally:
        outcome.done.set()
        release.wait(60)
        if attacker is not None:
            attacker.close()


def test_running_out_of_descriptors_gets_clear_replies(vsftpd, tmp_path, proxies) -> None:
    """Attack: 40 sessions at once against an ftpfix allowed 64 descriptors,
    each logging in and opening a passive port, every third also listing.
    Each client hears a clear answer (421 at connect, 425 to PASV or LIST)
    within 10 s, never a bare reset or silence; nothing crashes, and once the
    crowd is gone a new session works end to end."""
    require_programs("prlimit")
    payload = os.urandom(1024 * 1024)
    legacy.put_file(vsftpd, "f.bin", payload)
    # Lift the per-address cap (20): descriptors, not admission, must be what runs out.
    limits = "max_sessions_per_ip = 100"
    wrapper = ("prlimit", "--nofile=64:64", "--")
    proxy = start(proxies, address(vsftpd), tmp_path, limits=limits, ports=EXHAUSTION_PORTS, wrapper=wrapper)
    outcomes = [Outcome() for _ in range(40)]
    release = threading.Event()
    crowd = [
        threading.Thread(target=crowd_member, args=(index, proxy.port, vsftpd, outcome, release), daemon=True)
        for index, outcome in enumerate(outcomes)
    ]
    for member in crowd:
        member.start()
    deadline = time.monotonic() + 45  # each member takes at most 10 s a step
    for outcome in outcomes:
        outcome.done.wait(max(deadline - time.monotonic(), 0.01))
    release.set()
    for member in crowd:
        member.join(10)
    failures = {
        index: outcome.failure or "still waiting"
        for index, outcome in enumerate(outcomes)
        if outcome.failure or not outcome.done.is_set()
    }
    assert not failures, f"{len(failures)} of 40 sessions got no clear reply: {failures}"
    assert not crash_events(proxy), crash_events(proxy)
    # The crowd is gone: every session ftpfix opened has closed.
    deadline = time.monotonic() + 10
    while len(proxy.events("session closed")) < len(proxy.events("session opened")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_serves(proxy, vsftpd, "f.bin", payload)
    assert_healthy(proxy)


# -- 8. SIGTERM -----------------------------------------------------------------


def slow_retr(attacker: Attacker, name: str) -> tuple[threading.Thread, list[bytes]]:
    """Start a RETR; a thread reads the data socket to its end."""
    attacker.expect_after("TYPE I", "200")
    host, port = attacker.pasv()
    data = attacker.data_connect(port, host)
    attacker.line(f"RETR {name}")
    attacker.expect("150")
    received: list[bytes] = []

    def read() -> None:
        with data:
            try:
                received.append(recv_all(data, 30))
            except OSError:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, received


def test_sigterm_tells_idle_sessions_and_lets_a_transfer_finish(vsftpd, tmp_path, proxies) -> None:
    """Operator: SIGTERM with two idle sessions and one slow download. The
    idle ones get 421 within 2 s; the download completes (sha256) with its
    226 and then gets 421; ftpfix exits 0 once the sessions are gone."""
    payload = os.urandom(2_000_000)
    legacy.put_file(vsftpd, "slow.bin", payload)
    proxy = start(proxies, address(vsftpd), tmp_path, limits="shutdown_grace = 30\ndownload_rate = 200000")
    idle = [logged_in(proxy.port, vsftpd), logged_in(proxy.port, vsftpd)]
    downloader = logged_in(proxy.port, vsftpd, timeout=30)
    reader, received = slow_retr(downloader, "slow.bin")
    time.sleep(0.5)
    proxy.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    for attacker in idle:
        attacker.expect("421", timeout=max(2 - (time.monotonic() - signalled), 0.01))
        attacker.close()
    reader.join(30)
    assert received and sha(received[0]) == sha(payload)
    downloader.expect("226", timeout=5)
    downloader.expect("421", timeout=5)
    downloader.close()
    assert proxy.process.wait(10) == 0


def test_a_second_sigterm_stops_at_once_with_a_failure_status(vsftpd, tmp_path, proxies) -> None:
    """Operator: SIGTERM, then SIGTERM again while a transfer runs. ftpfix stops
    at once and says so with a non-zero exit status."""
    legacy.put_file(vsftpd, "slow.bin", os.urandom(2_000_000))
    proxy = start(proxies, address(vsftpd), tmp_path, limits="shutdown_grace = 30\ndownload_rate = 200000")
    downloader = logged_in(proxy.port, vsftpd, timeout=30)
    reader, _ = slow_retr(downloader, "slow.bin")
    time.sleep(0.5)
    proxy.process.send_signal(signal.SIGTERM)
    proxy.wait_for("stopped accepting; sessions may finish")
    proxy.process.send_signal(signal.SIGTERM)
    status = proxy.process.wait(5)
    downloader.close()
    reader.join(5)
    assert status != 0, "a forced stop with a transfer cut short exited 0"


# -- 9. port stealing -------------------------------------------------------------


def test_a_stranger_cannot_steal_the_passive_port(vsftpd, tmp_path, proxies) -> None:
    """Attack (RFC 2577 section 5): a stranger at 127.0.0.2 connects to the
    passive port before the client. The stranger is closed without a byte; the
    real client at 127.0.0.1 still gets its file whole."""
    payload = os.urandom(3 * 1024 * 1024)
    legacy.put_file(vsftpd, "f.bin", payload)
    proxy = start(proxies, address(vsftpd), tmp_path)
    with logged_in(proxy.port, vsftpd) as client:
        client.expect_after("TYPE I", "200")
        host, port = client.pasv()
        try:
            with socket.create_connection((host, port), timeout=10, source_address=("127.0.0.2", 0)) as stranger:
                assert stranger.recv(1) == b"", "the stranger was sent data"
        except ConnectionResetError:
            pass  # refused with a reset, which can land before connect() returns
        with client.data_connect(port, host) as data:
            client.line("RETR f.bin")
            client.expect("150")
            received = recv_all(data)
        client.expect("226")
        assert sha(received) == sha(payload)
    assert proxy.events("data connection from a stranger refused")
    assert_healthy(proxy)


def test_a_slow_but_steady_reader_is_not_a_stall(vsftpd, tmp_path, proxies) -> None:
    """Found by the red team: a client that reads 64 KiB every 0.25 s (about
    256 KB/s) with ``idle_timeout = 4`` was cut off at 4 s. The kernel wakes a
    blocked writer only once a third of its send buffer is free, so writes
    alone looked like a stall. Progress is now read off the send queues: the
    transfer goes on and its bytes arrive intact."""
    data = os.urandom(4 * 1024 * 1024)
    legacy.put_file(vsftpd, "slow.bin", data)
    proxy = start(proxies, address(vsftpd), tmp_path, limits="idle_timeout = 4", ports=ONE_PORT["slow-reader"])
    with logged_in(proxy.port, vsftpd) as attacker:
        attacker.expect_after("TYPE I", "200")
        host, port = attacker.pasv()
        data_socket = socket.create_connection((host, port))
        data_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        attacker.line("RETR slow.bin")
        attacker.expect("150")
        received = bytearray()
        started = time.monotonic()
        while time.monotonic() - started < 8:  # twice the idle timeout
            chunk = data_socket.recv(65536)
            assert chunk, "the data connection ended early"
            received += chunk
            time.sleep(0.25)
        while chunk := data_socket.recv(1 << 20):
            received += chunk
        data_socket.close()
        assert attacker.reply(timeout=10).startswith("226")
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    assert_healthy(proxy)


def test_a_backend_that_never_sends_the_final_reply_cannot_hold_the_session(scripted, tmp_path, proxies) -> None:
    """Found by the second red team: the backend sends the whole file, closes
    the data connection, and never sends its 226, while the client keeps its
    data socket open. The session used to wait out the relay's 30 s linger
    before its idle clock ran; now the clock runs from the last byte, and
    the client gets 421 after ``idle_timeout``."""
    backend = scripted(os.urandom(1000), retr="never-answer")
    proxy = start(proxies, (backend.host, backend.port), tmp_path, limits="idle_timeout = 3")
    with Attacker(proxy.port) as attacker:
        attacker.login("alice", "x")
        host, port = attacker.pasv()
        with attacker.data_connect(port, host):
            attacker.line("RETR f.bin")
            attacker.expect("150")
            started = time.monotonic()
            assert attacker.reply(timeout=10).startswith("421 Idle timeout")
            assert time.monotonic() - started < 6
    assert_healthy(proxy)
