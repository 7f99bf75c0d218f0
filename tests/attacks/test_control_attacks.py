"""Control-channel attacks on a real ftpfix process, as transcripts.

Each test is one attack: what a hostile client (or a hostile or broken
backend) sends, and what must come back. They encode the contract of the
hardened ftpfix; see the list below for what fails on the code of the day this
file was written.

Status against HEAD e17c5df (before the security fixes); a failure below is
expected until the matching fix lands:

  FAIL test_reset_before_the_greeting_twenty_times: the listener dies after
       about a dozen RSTs (connection refused; the process exits).
  FAIL test_nul_in_mkd_is_refused_and_never_forwarded: NUL forwarded, vsftpd
       answers 257 and creates the directory.
  FAIL test_forged_227_inside_a_stat_reply_is_fatal: the echoed 227 is paired
       with the pipelined PASV and mapped (to 2222); no 421.
  FAIL test_unsolicited_227_is_fatal: the unsolicited 227 is relayed, no 421.
  pass test_passive_command_waits_for_outstanding_replies.
  pass test_bare_lf_flood_before_login_keeps_memory_bounded (both): RSS grows
       ~5 MiB; ftpfix is CPU-bound at ~170k empty lines/s.
  FAIL test_fix_address_in_passthrough_*: the original PORT 127,0,0,2 line is
       forwarded (vsftpd answers "500 Illegal PORT command").
  pass test_bounce_to_other_host_or_privileged_port_refused (all modes).
  pass test_deny_anonymous_cannot_be_sidestepped (all five disguises).
  FAIL test_passwords_never_reach_the_log (both): "PASS\twonderland" and
       "ACCT\tsecretacct" are logged whole as the verb.
  FAIL test_epsv_fallback_keeps_replies_paired: replies are 200, 227.
  FAIL test_control_bytes_get_one_reply_each_pure_ftpd: forwarded, pure-ftpd
       never answers, NOOP's 200 goes to the bad line, the second reply never comes.
  FAIL test_thirty_bad_lines_get_thirty_replies[pure-ftpd]: 5 replies of 31
       (vsftpd and ProFTPD pass).
  FAIL test_pipelined_passive_commands (most, some flaky-pass): "session
       crashed" (ExceptionGroup from _serve_mapping) with a 2-port pool.
  FAIL test_config_rejects_non_finite_idle_timeout[nan|inf|1e400]: check says
       OK ("-1" passes: already refused).
  FAIL test_config_deeply_nested_toml_*: RecursionError traceback.
  FAIL test_sighup_with_deeply_nested_config_keeps_serving: ftpfix exits 1.
  FAIL test_implausible_backend_passive_port_refused (all): 227 mapped.
  FAIL test_backend_passive_ports_setting (both): [backend] passive_ports is an
       unknown key.
  pass test_user_name_cannot_forge_log_lines.
  FAIL test_one_session_cannot_hold_the_whole_passive_pool and
       test_active_mode_data_sockets_do_not_pile_up: the 226 is withheld while
       the client keeps its data socket open, so the session is stuck at round 1.

Against the uncommitted working tree with the fixes in progress (2026-11-24
23:45), all 44 pass in about 2.5 minutes.

Only ports 21000-21099 are used for ftpfix's passive range.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

from tests.conftest import require_servers
from tests.harness import legacy
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

from .transcript import (
    Attacker,
    Listener,
    ProcessProbe,
    ReplyError,
    RssSampler,
    assert_healthy,
    parse_227,
    recv_all,
    reset_socket,
)

pytestmark = [pytest.mark.servers, pytest.mark.root]

#: ftpfix's passive ports in this file: 21000-21099, a slice per test so a
#: port in TIME_WAIT from one test never bothers the next.
PORTS = {
    "reset": "21000-21003",
    "slip_vsftpd": "21004-21007",
    "slip_scripted": "21008-21011",
    "unsolicited": "21012-21015",
    "pipeline": "21016-21019",
    "memory": "21020-21023",
    "bounce": "21024-21027",
    "anon": "21028-21031",
    "secrets": "21032-21035",
    "pairing": "21036-21039",
    "badlines": "21040-21043",
    "multipasv": "21044-21045",
    "config": "21046-21049",
    "implausible": "21050-21053",
    "logjson": "21054-21057",
    "hold": "21058-21061",
    "active_hold": "21062-21065",
    "slip_split": "21066-21069",
}

#: 227 Entering Passive Mode (127,0,0,1,8,174): port 8*256+174.
SLIPPED_PORT = 2222
SLIPPED_227 = "227 Entering Passive Mode (127,0,0,1,8,174)"


# -- starting ftpfix ----------------------------------------------------------


def launch(
    proxies: list[Ftpfix],
    tmp_path: Path,
    backend: tuple[str, int],
    ports: str,
    *,
    extra: str = "",
    passive_extra: str = "",
) -> Ftpfix:
    proxy = start_ftpfix(
        tmp_path / f"ftpfix-{time.monotonic_ns()}",
        config_text(
            listen=("127.0.0.1", 0),
            backend=backend,
            public_address="127.0.0.1",
            ports=ports,
            passive_extra=passive_extra,
            extra=extra,
        ),
    )
    proxies.append(proxy)
    return proxy


def warnings_containing(proxy: Ftpfix, text: str) -> list[dict]:
    return [
        event
        for event in proxy.events()
        if text in str(event.get("event", "")) and event.get("level") in ("warning", "error")
    ]


def codes(replies: list[str]) -> list[str]:
    return [reply[:3] for reply in replies]


# -- a scripted backend -----------------------------------------------------------


@dataclass
class ScriptedSession:
    """One control connection to the scripted backend."""

    backend: ScriptedBackend
    conn: socket.socket
    data_listener: socket.socket | None = None
    active_target: tuple[str, int] | None = None

    def raw(self, data: bytes) -> None:
        self.backend.sent.append((time.monotonic(), data))
        self.conn.sendall(data)

    def say(self, text: str) -> None:
        """Send ``text``, every line ended by CRLF, in one segment."""
        self.raw(text.replace("\n", "\r\n").encode("latin-1") + b"\r\n")

    def open_data(self, template: str) -> None:
        if self.data_listener is not None:
            self.data_listener.close()
        self.data_listener = socket.create_server(("127.0.0.1", 0))
        port = self.data_listener.getsockname()[1]
        self.say(template.format(p=f"{port >> 8},{port & 255}", port=port, control=self.backend.port))

    def transfer(self, payload: bytes) -> None:
        if self.active_target is not None:
            self.say("150 Here it comes.")
            target, self.active_target = self.active_target, None
            with socket.create_connection(target, timeout=5) as data:
                data.sendall(payload)
            self.say("226 Transfer complete.")
            return
        if self.data_listener is None:
            self.say("425 Use PASV or PORT first.")
            return
        self.say("150 Here it comes.")
        self.data_listener.settimeout(5)
        try:
            data, _ = self.data_listener.accept()
        except OSError:
            self.say("425 No data connection.")
            return
        finally:
            self.data_listener.close()
            self.data_listener = None
        with data:
            data.sendall(payload)
        self.say("226 Transfer complete.")


Handler = Callable[[ScriptedSession, str], None]


@dataclass
class ScriptedBackend:
    """An FTP backend that answers as a test scripts it, and records what it got.

    ``replies`` maps an upper-case verb to a reply text (``{p}`` is the data
    port as "p1,p2", ``{port}`` the same as a number, ``{control}`` this
    backend's control port) or to a handler. PASV and EPSV open a real data
    listener, PORT is obeyed wherever it points (a promiscuous server, as old
    ones were), LIST/NLST/RETR send ``payload``. ``received`` and ``sent``
    hold (monotonic time, bytes) for every line in and every write out.
    """

    replies: dict[str, str | Handler] = field(default_factory=dict)
    greeting: str = "220 scripted backend"
    after_login: Callable[[ScriptedSession], None] | None = None
    payload: bytes = b"file-a\r\nfile-b\r\n"
    port: int = 0
    received: list[tuple[float, bytes]] = field(default_factory=list)
    sent: list[tuple[float, bytes]] = field(default_factory=list)

    def start(self) -> ScriptedBackend:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        self._listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def lines(self) -> list[bytes]:
        return [line for _, line in self.received]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        session = ScriptedSession(self, conn)
        try:
            with conn, conn.makefile("rb") as lines:
                session.say(self.greeting)
                for raw in lines:
                    self.received.append((time.monotonic(), raw))
                    verb, _, argument = raw.rstrip(b"\r\n").decode("latin-1").partition(" ")
                    verb = verb.upper()
                    scripted = self.replies.get(verb)
                    if callable(scripted):
                        scripted(session, argument)
                    elif scripted is not None:
                        if verb in ("PASV", "EPSV") and "{p" in scripted:
                            session.open_data(scripted)
                        else:
                            session.say(scripted.format(port=0, p="0,0", control=self.port))
                    elif verb == "QUIT":
                        session.say("221 Goodbye.")
                        return
                    else:
                        self._default(session, verb, argument)
                        if verb == "PASS" and self.after_login is not None:
                            self.after_login(session)
        except OSError:
            pass

    def _default(self, session: ScriptedSession, verb: str, argument: str) -> None:
        if verb == "USER":
            session.say("331 Password required.")
        elif verb == "PASS":
            session.say("230 Logged in.")
        elif verb in ("TYPE", "MODE", "STRU", "NOOP"):
            session.say("200 OK.")
        elif verb == "SYST":
            session.say("215 UNIX Type: L8")
        elif verb == "FEAT":
            session.say("211-Features:\n EPSV\n PASV\n211 End")
        elif verb == "PASV":
            session.open_data("227 Entering Passive Mode (127,0,0,1,{p}).")
        elif verb == "EPSV":
            session.open_data("229 Entering Extended Passive Mode (|||{port}|)")
        elif verb == "PORT":
            numbers = [int(n) for n in argument.split(",")]
            session.active_target = (".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5])
            session.say("200 PORT command successful.")
        elif verb in ("LIST", "NLST", "RETR"):
            session.transfer(self.payload)
        else:
            session.say(f"500 {verb} not understood.")


def slipped_listener() -> Listener:
    """The 'victim' a slipstreamed 227 points at: 127.0.0.1:2222."""
    try:
        return Listener("127.0.0.1", SLIPPED_PORT)
    except OSError as error:
        pytest.skip(f"cannot listen on 127.0.0.1:{SLIPPED_PORT}: {error}")


def no_mapping_to(proxy: Ftpfix, port: int) -> None:
    mappings = [
        event for event in proxy.events("passive mapping") if str(event.get("backend", "")).endswith(f":{port}")
    ]
    assert not mappings, f"ftpfix mapped a public port to backend port {port}: {mappings}"


# == 1. resets ======================================================================


def test_reset_before_the_greeting_twenty_times(vsftpd, tmp_path, proxies) -> None:
    """Attack: connect and abort with RST (SO_LINGER {1,0}) before anything, 20 times.

    Guards: an unhandled ECONNRESET on accept/getpeername/setsockopt that kills
    the whole server or other sessions.
    """
    proxy = launch(proxies, tmp_path, (vsftpd.host, vsftpd.port), PORTS["reset"])
    victim = Attacker(proxy)
    victim.login("anonymous", "x@example.org")

    for attempt in range(20):
        try:
            attacker = Attacker(proxy, greet=False)
        except OSError as error:
            pytest.fail(
                f"connection {attempt + 1} refused ({error}); ftpfix exit status {proxy.process.poll()}; log "
                f"tail:\n{proxy.log.read_text()[-1500:]}"
            )
        attacker.reset()

    time.sleep(0.5)
    assert proxy.process.poll() is None, "ftpfix died after 20 resets"
    assert victim.command("NOOP")[:3] == "200"
    assert Attacker(proxy).banner.startswith("220")
    assert_healthy(proxy)


# == 2. slipstreaming ============================================================


def test_nul_in_mkd_is_refused_and_never_forwarded(vsftpd, tmp_path, proxies) -> None:
    """Attack: slipstream a 227 through a name the server echoes: MKD x\\0213 y\\0227 ...

    Guards: NUL forwarded to the backend, whose echoed reply then carries a
    forged "227" line.
    """
    proxy = launch(proxies, tmp_path, (vsftpd.host, vsftpd.port), PORTS["slip_vsftpd"])
    with slipped_listener() as victim, Attacker(proxy) as attacker:
        attacker.login("anonymous", "x@example.org")
        attacker.send(b"MKD x\x00213 y\x00" + SLIPPED_227.encode() + b"\r\n")
        assert attacker.code() == "501"
        assert attacker.command("NOOP")[:3] == "200"
        time.sleep(0.3)
        assert victim.count == 0
    assert not [name for name in os.listdir(vsftpd.files) if name.startswith("x")], os.listdir(vsftpd.files)
    no_mapping_to(proxy, SLIPPED_PORT)
    assert_healthy(proxy)


def test_forged_227_inside_a_stat_reply_is_fatal(tmp_path, proxies) -> None:
    """Attack: a STAT reply whose echoed line "213 y" ends the reply early, and a
    "227 ..." line after it in the same segment, while PASV is pipelined.

    Guards: a reply that answers no command being taken for the pipelined
    PASV's answer, so the attacker's 227 opens a mapping to 127.0.0.1:2222.
    """
    stat = "213-Status of .:\n213 y\n" + SLIPPED_227 + "\n213-more lines\n213 End of status"
    with ScriptedBackend({"STAT": stat}) as backend, slipped_listener() as victim:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["slip_scripted"])
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        attacker.send(b"STAT .\r\nPASV\r\n")
        seen = []
        try:
            while True:
                seen.append(attacker.reply(timeout=5))
                if seen[-1].startswith("421"):
                    break
        except ReplyError:
            pass
        assert seen and seen[-1].startswith("421"), f"no 421 ends the session: {seen}"
        assert attacker.closed(5)
        for reply in seen:
            if reply.startswith("227"):
                assert parse_227(reply)[1] != SLIPPED_PORT
        time.sleep(0.3)
        assert victim.count == 0
        no_mapping_to(proxy, SLIPPED_PORT)
        assert warnings_containing(proxy, "answers no command")
        assert_healthy(proxy)


def test_unsolicited_227_is_fatal(tmp_path, proxies) -> None:
    """Attack: a backend sends a 227 when no command is outstanding.

    Guards: an unpaired reply relayed (or worse, taken for the next PASV's answer).
    """

    def unsolicited(session: ScriptedSession) -> None:
        time.sleep(0.3)
        session.say(SLIPPED_227)

    with ScriptedBackend(after_login=unsolicited) as backend, slipped_listener() as victim:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["unsolicited"])
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        # Nothing sent: whatever comes now answers no command.
        assert attacker.code(timeout=5) == "421"
        assert attacker.closed(5)
        assert victim.count == 0
        no_mapping_to(proxy, SLIPPED_PORT)
        assert_healthy(proxy)


def test_passive_command_waits_for_outstanding_replies(tmp_path, proxies) -> None:
    """Attack: NOOP and PASV pipelined while the backend is slow to answer NOOP.

    Guards: PASV sent to the backend while an earlier reply is outstanding, which
    lets a late or forged reply be paired with it.
    """

    def slow_noop(session: ScriptedSession, argument: str) -> None:
        time.sleep(0.5)
        session.say("200 NOOP ok.")

    with ScriptedBackend({"NOOP": slow_noop}) as backend:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["pipeline"])
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        attacker.send(b"NOOP\r\nPASV\r\n")
        assert attacker.code() == "200"
        assert attacker.code() == "227"
        noop_answered = next(at for at, data in backend.sent if data.startswith(b"200 NOOP"))
        pasv_arrived = next(at for at, line in backend.received if line.upper().startswith(b"PASV"))
        assert pasv_arrived >= noop_answered, (
            f"PASV reached the backend {noop_answered - pasv_arrived:.3f} s before NOOP's reply was sent"
        )
        assert attacker.command("NOOP")[:3] == "200"
        assert_healthy(proxy)


# == 3. memory =======================================================================


def drain(sock: socket.socket, stop: threading.Event) -> int:
    """Read and discard until ``stop`` or EOF, so ftpfix's replies never throttle it."""
    received = 0
    while not stop.is_set():
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += len(chunk)
    return received


def flood(sock: socket.socket, total: int, deadline: float, chunk: bytes = b"\n" * 65536) -> int:
    """Send up to ``total`` bytes of ``chunk`` until ``deadline``; bytes sent."""
    sent = 0
    view = memoryview(chunk)
    sock.settimeout(0.25)
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(view[: min(len(chunk), total - sent)])
        except TimeoutError:
            continue
        except OSError:
            break
    return sent


@pytest.mark.parametrize(
    ("kind", "mebibytes", "head"),
    [("pure-ftpd", 14, b"NOOP\x01\r\n"), ("pure-ftpd", 14, b""), ("vsftpd", 8, b"")],
    ids=["pure-ftpd-unanswered-head", "pure-ftpd", "vsftpd"],
)
def test_bare_lf_flood_before_login_keeps_memory_bounded(kind, mebibytes, head, server_dir, tmp_path, proxies) -> None:
    """Attack: megabytes of bare LFs before login, against a server that never answers them.

    With ``head``, a line pure-ftpd never answers goes first (it drops lines
    with a control byte), so every empty line after it used to queue a reply
    behind it: 14 MiB took ftpfix from 31 MB to 1.57 GB.

    Guards: unbounded queues of pending commands/replies (one entry per empty
    line), i.e. memory exhaustion without backpressure.
    """
    require_servers(kind)
    server = legacy.start(kind, server_dir / kind)
    try:
        proxy = launch(proxies, tmp_path, (server.host, server.port), PORTS["memory"])
        probe = ProcessProbe(proxy.process.pid)
        attacker = Attacker(proxy)
        baseline = probe.rss_kib()
        attacker.send(head)
        result: list[int] = []
        received: list[int] = []
        stop = threading.Event()
        deadline = time.monotonic() + 20
        sender = threading.Thread(
            target=lambda: result.append(flood(attacker.sock, mebibytes << 20, deadline)), daemon=True
        )
        reader = threading.Thread(target=lambda: received.append(drain(attacker.sock, stop)), daemon=True)
        with RssSampler(proxy.process.pid) as sampler:
            reader.start()
            sender.start()
            sender.join(25)
            time.sleep(1)
            stop.set()
            reader.join(5)
        print(
            f"{kind}: sent {result} bytes, got {received} bytes back, RSS baseline {baseline} KiB, peak "
            f"{sampler.peak} KiB"
        )
        assert sampler.peak < baseline + 64 * 1024, (
            f"RSS peaked at {sampler.peak} KiB from a baseline of {baseline} KiB (sent {result} bytes)"
        )
        attacker.reset()
        assert proxy.process.poll() is None
        assert Attacker(proxy).banner.startswith("220")
        assert_healthy(proxy)
    finally:
        server.stop()


# == 4. bounce ======================================================================


def test_fix_address_in_passthrough_never_forwards_the_original_port(vsftpd, tmp_path, proxies) -> None:
    """Attack: PORT naming another (private) host with [active] passthrough + fix_address.

    Guards: the address "fixed" and logged, but the original PORT line
    forwarded, so the backend connects to 127.0.0.2:8080 (FTP bounce).
    """
    legacy.put_file(vsftpd, "f.txt", b"hello\n")
    proxy = launch(
        proxies,
        tmp_path,
        (vsftpd.host, vsftpd.port),
        PORTS["bounce"],
        extra='[active]\nmode = "passthrough"\nfix_address = true\n',
    )
    with Listener("127.0.0.2", 8080) as elsewhere, Listener("127.0.0.1", 8080) as own:
        attacker = Attacker(proxy)
        attacker.login("anonymous", "x@example.org")
        port_reply = attacker.command("PORT 127,0,0,2,31,144")
        # vsftpd refuses a PORT to an address other than its peer with
        # "500 Illegal PORT command.": seeing it means the line was forwarded.
        assert "Illegal PORT" not in port_reply, f"the original PORT was forwarded: {port_reply!r}"
        assert port_reply[:3] in ("200", "501", "504", "502"), port_reply
        attacker.line("RETR f.txt")
        first = attacker.reply()
        if first.startswith("150"):
            attacker.expect("226")
            assert own.count == 1
        time.sleep(0.3)
        assert elsewhere.count == 0, "the backend connected to 127.0.0.2:8080"
    assert_healthy(proxy)


def test_fix_address_in_passthrough_sends_the_fixed_address(tmp_path, proxies) -> None:
    """Attack: as above, against a promiscuous backend that obeys any PORT.

    Guards: the original "PORT 127,0,0,2,..." line reaching the backend.
    """
    with ScriptedBackend() as backend, Listener("127.0.0.2", 8080) as elsewhere, Listener("127.0.0.1", 8080):
        proxy = launch(
            proxies,
            tmp_path,
            backend.address,
            PORTS["bounce"],
            extra='[active]\nmode = "passthrough"\nfix_address = true\n',
        )
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        assert attacker.command("PORT 127,0,0,2,31,144")[:3] in ("200", "501", "504", "502")
        attacker.line("RETR f")
        if attacker.reply().startswith("150"):
            attacker.expect("226")
        time.sleep(0.3)
        ports = [line for line in backend.lines() if line.upper().startswith(b"PORT")]
        assert all(b"127,0,0,2" not in line for line in ports), ports
        assert elsewhere.count == 0
    assert_healthy(proxy)


@pytest.mark.parametrize("mode", ["proxy", "passthrough", "deny"])
def test_bounce_to_other_host_or_privileged_port_refused(mode, vsftpd, tmp_path, proxies) -> None:
    """Attack: PORT/EPRT to another host (fix_address off) or to a port below 1024.

    Guards: FTP bounce (RFC 2577 section 3) in any active mode.
    """
    proxy = launch(
        proxies,
        tmp_path,
        (vsftpd.host, vsftpd.port),
        PORTS["bounce"],
        extra=f'[active]\nmode = "{mode}"\nfix_address = false\n',
    )
    with Listener("127.0.0.5", 8080) as other_host, Listener("127.0.0.1", 1000) as low_port:
        attacker = Attacker(proxy)
        attacker.login("anonymous", "x@example.org")
        for command in (
            "PORT 127,0,0,5,31,144",
            "EPRT |1|127.0.0.5|8080|",
            "PORT 127,0,0,1,3,232",
            "EPRT |1|127.0.0.1|1000|",
            "PORT 127,0,0,5,3,232",
        ):
            assert attacker.command(command)[:3] in ("501", "504", "502"), command
            attacker.line("LIST")
            assert attacker.code() != "150", f"a transfer started after {command}"
        time.sleep(0.5)
        assert other_host.count == 0
        assert low_port.count == 0
        assert attacker.command("NOOP")[:3] == "200"
    assert_healthy(proxy)


# == 5. anonymous bypass ================================================================

ANONYMOUS_DISGUISES = [
    b"USER\tanonymous",
    b"USER\x0banonymous",
    b"USER anonymous\x00",
    b"user  ANONYMOUS",
    b"USER ftp ",
]


@pytest.mark.parametrize("line", ANONYMOUS_DISGUISES, ids=repr)
def test_deny_anonymous_cannot_be_sidestepped(line, vsftpd, tmp_path, proxies) -> None:
    """Attack: anonymous login in disguise past [access] deny_anonymous.

    Guards: a user-name check that only matches "USER anonymous" exactly, while
    the server trims or splits differently and logs the attacker in.
    """
    proxy = launch(
        proxies, tmp_path, (vsftpd.host, vsftpd.port), PORTS["anon"], extra="[access]\ndeny_anonymous = true\n"
    )
    attacker = Attacker(proxy)
    attacker.send(line + b"\r\n")
    assert attacker.code() in ("530", "500", "501")
    attacker.line("PASS x@example.org")
    assert attacker.code() != "230"
    assert attacker.command("PWD")[:3] != "257"
    assert_healthy(proxy)


# == 6. secrets in logs ===================================================================


@pytest.mark.parametrize("kind", ["pure-ftpd", "proftpd"])
def test_passwords_never_reach_the_log(kind, server_dir, tmp_path, proxies) -> None:
    """Attack (on privacy): PASS/ACCT spelled with tabs, lower case, double spaces.

    Guards: a secret logged because the verb was not split on the same
    whitespace or case the redaction expects.
    """
    require_servers(kind)
    server = legacy.start(kind, server_dir / kind)
    try:
        proxy = launch(proxies, tmp_path, (server.host, server.port), PORTS["secrets"])
        logged_in: list[bool] = []
        for user_line, pass_line in (
            (b"USER\talice", b"PASS\twonderland"),
            (b"USER alice", b"pass wonderland"),
            (b"USER alice", b"PASS  wonderland"),
            (b"USER alice", b"PASS wonderland"),
        ):
            attacker = Attacker(proxy)
            user_code = pass_code = ""
            try:
                # Servers need not answer a line with a tab in it (pure-ftpd
                # ignores it): the secrets must stay out of the log anyway.
                attacker.send(user_line + b"\r\n")
                user_code = attacker.code(timeout=3)
                attacker.send(pass_line + b"\r\n")
                pass_code = attacker.code(timeout=5)  # pure-ftpd is slow to refuse
                attacker.send(b"ACCT\tsecretacct\r\n")
                attacker.reply(timeout=3)
                attacker.line("QUIT")
                attacker.reply(timeout=3)
            except ReplyError:
                pass
            attacker.reset()
            print(f"{user_line!r} -> {user_code or 'no reply'}, {pass_line!r} -> {pass_code or 'no reply'}")
            logged_in.append(user_code in ("331", "230") and pass_code == "230")
        proxy.wait_for("session closed", 4)
        text = proxy.log.read_text(errors="replace").lower()
        assert "wonderland" not in text
        assert "secretacct" not in text
        closed = proxy.events("session closed")
        for event, ok in zip(closed, logged_in, strict=True):
            if ok:
                assert event.get("user") == "alice", event
        assert any(logged_in), "no variant logged in at all"
        assert_healthy(proxy)
    finally:
        server.stop()


# == 7. reply pairing ====================================================================


def test_epsv_fallback_keeps_replies_paired(tmp_path, proxies) -> None:
    """Attack: EPSV and TYPE pipelined to a backend without EPSV ([passive] epsv = auto).

    Guards: the fallback PASV queued behind TYPE, so TYPE gets the 227 and EPSV
    gets 200 (replies shifted by one).
    """
    with ScriptedBackend({"EPSV": "500 EPSV not understood."}) as backend:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["pairing"], passive_extra='epsv = "auto"\n')
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        attacker.send(b"EPSV\r\nTYPE I\r\n")
        replies = attacker.replies(2)
        assert codes(replies) == ["229", "200"], replies
        assert attacker.command("NOOP")[:3] == "200"
        assert not [text for way, text in attacker.transcript if way == "<" and text.startswith(b"227")]
        assert_healthy(proxy)


#: A line with a control byte, then NOOP, in one segment: (line, codes allowed for it).
CONTROL_BYTE_PAIRS = [
    (b"NOOP\x01", ("500", "501")),
    (b"\tNOOP", ("500", "501")),
    (b"NO\rOP", ("500", "501")),
    (b"\x00NOOP", ("500", "501")),
    (b"NOOP\x7f", ("500", "501")),
]


def test_control_bytes_get_one_reply_each_pure_ftpd(server_dir, tmp_path, proxies) -> None:
    """Attack: a command with a control byte, then NOOP, in one segment (pure-ftpd).

    Guards: pure-ftpd never answering such a line, so NOOP's 200 is paired with
    the bad line and every later reply shifts by one.
    """
    require_servers("pure-ftpd")
    server = legacy.start("pure-ftpd", server_dir / "pure-ftpd")
    try:
        proxy = launch(proxies, tmp_path, (server.host, server.port), PORTS["pairing"])
        wrong = []
        for line, allowed in CONTROL_BYTE_PAIRS:
            attacker = Attacker(proxy)
            attacker.login(server.user, server.password)
            attacker.send(line + b"\r\nNOOP\r\n")
            try:
                got = codes(attacker.replies(2, timeout=2))
            except ReplyError as error:
                got = [f"no second reply: {str(error)[:60]}"]
            if len(got) != 2 or got[0] not in allowed or got[1] != "200":
                wrong.append((line, got))
            attacker.reset()
        assert not wrong, f"replies to <line> NOOP, expected (500|501, 200): {wrong}"
        assert_healthy(proxy)
    finally:
        server.stop()


#: 30 lines with control bytes or verbs that are not letters.
BAD_LINES = [
    b"NOOP\x01",
    b"\x01NOOP",
    b"\tNOOP",
    b"NOOP\t",
    b"NO\rOP",
    b"\rNOOP",
    b"N\x00OP",
    b"\x00",
    b"NOOP\x7f",
    b"\x7f",
    b"\x1b[31mNOOP",
    b"NOOP\x1b",
    b"\x08\x08NOOP",
    b"NO\x0bOP",
    b"\x0c",
    b"1234",
    b"N0OP",
    b"12 NOOP",
    b"@@@@",
    b"{}",
    b"-",
    b"N-OP",
    b"N.OP",
    b"*",
    b"!!",
    b"N\x80OP",
    b"\xe9\xe9",
    b"NOOP\x00x",
    b"PWD\x01",
    b"CWD\x02 /",
]
assert len(BAD_LINES) == 30


def test_thirty_bad_lines_get_thirty_replies(backend, tmp_path, proxies) -> None:
    """Attack: 30 lines with control bytes / non-letter verbs pipelined, then NOOP.

    Guards: lines a server silently ignores (or answers twice), shifting every
    later reply onto the wrong command.
    """
    proxy = launch(proxies, tmp_path, (backend.host, backend.port), PORTS["badlines"])
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.send(b"".join(line + b"\r\n" for line in BAD_LINES) + b"NOOP\r\n")
    replies = []
    try:
        while len(replies) < 31:
            replies.append(attacker.reply(timeout=3))
    except ReplyError:
        pytest.fail(f"only {len(replies)} replies to 31 commands: {codes(replies)}")
    assert replies[-1][:3] == "200", codes(replies)
    assert not [reply for reply in replies if reply.startswith(("227", "229"))], replies
    assert not attacker.closed(0.5), "ftpfix or the server closed the session"
    assert attacker.command("NOOP")[:3] == "200", "a 32nd reply arrived"
    assert_healthy(proxy)


# == 8. pipelined PASVs ====================================================================


@pytest.mark.parametrize("batch", ["PASV\r\n" * 5, "PASV\r\nEPSV\r\nPASV\r\n"], ids=["5xPASV", "PASV-EPSV-PASV"])
def test_pipelined_passive_commands(batch, backend, tmp_path, proxies) -> None:
    """Attack: several PASV/EPSV in one segment.

    Guards: crashes when an OpenPassive arrives while one is pending, replies
    out of order, and a session leasing a pool port per pipelined PASV.
    """
    proxy = launch(proxies, tmp_path, (backend.host, backend.port), PORTS["multipasv"])
    attacker = Attacker(proxy)
    attacker.login(backend.user, backend.password)
    attacker.send(batch.encode())
    verbs = batch.split()
    replies = attacker.replies(len(verbs), timeout=10)
    assert codes(replies) == ["227" if verb == "PASV" else "229" for verb in verbs], replies
    assert attacker.command("NOOP")[:3] == "200"
    # The first session holds at most one pending mapping: with a 2-port
    # pool a second session still gets a port.
    other = Attacker(proxy)
    other.login(backend.user, backend.password)
    assert other.command("PASV")[:3] == "227"
    assert_healthy(proxy)


# == 9. config ===========================================================================

BASE_CONFIG = """\
[listen]
address = "127.0.0.1"
port = 0

[backend]
address = "127.0.0.1"
port = {backend}

[passive]
public_address = "127.0.0.1"
ports = "{ports}"

[log]
level = "debug"
format = "json"
"""

DEEP = "a = " + "[" * 3000 + "]" * 3000 + "\n"


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftpfix", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e400"])
def test_config_rejects_non_finite_idle_timeout(value, tmp_path) -> None:
    """Attack: idle_timeout = nan/inf/-1/1e400 in the config.

    Guards: NaN comparisons that are always false (no timeout at all) or
    trio.fail_after raising at run time.
    """
    path = tmp_path / "ftpfix.toml"
    path.write_text(BASE_CONFIG.format(backend=2121, ports=PORTS["config"]) + f"\n[limits]\nidle_timeout = {value}\n")
    result = check(path)
    assert result.returncode != 0, result.stdout
    assert "idle_timeout" in result.stdout + result.stderr


def test_config_deeply_nested_toml_is_an_error_not_a_traceback(tmp_path) -> None:
    """Attack: a TOML value nested 3000 deep.

    Guards: RecursionError escaping tomllib as a traceback.
    """
    path = tmp_path / "ftpfix.toml"
    path.write_text(BASE_CONFIG.format(backend=2121, ports=PORTS["config"]) + DEEP)
    result = check(path)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]


def test_sighup_with_deeply_nested_config_keeps_serving(tmp_path, proxies) -> None:
    """Attack: the config file replaced by a 3000-deep TOML, then SIGHUP.

    Guards: a RecursionError in the reload handler taking the server down.
    """
    with ScriptedBackend() as backend:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["config"])
        config = proxy.log.parent / "ftpfix.toml"
        config.write_text(config.read_text() + DEEP)
        proxy.process.send_signal(signal.SIGHUP)
        _wait_event_prefix(proxy, "config reload failed")
        assert proxy.process.poll() is None
        assert Attacker(proxy).banner.startswith("220")
        assert_healthy(proxy)


def _wait_event_prefix(proxy: Ftpfix, prefix: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = [event for event in proxy.events() if str(event.get("event", "")).startswith(prefix)]
        except ValueError:
            found = []
        if found:
            return found
        if time.monotonic() > deadline or proxy.process.poll() is not None:
            status = proxy.process.poll()
            state = "runs" if status is None else f"exited {status}"
            raise AssertionError(f"no {prefix!r} event; ftpfix {state}; log:\n{proxy.log.read_text()[-3000:]}")
        time.sleep(0.05)


# == 10. implausible passive ports ==============================================================


@pytest.mark.parametrize("target", ["21", "control", "80"])
def test_implausible_backend_passive_port_refused(target, tmp_path, proxies) -> None:
    """Attack: a (compromised) backend's 227 naming port 21, its own control port or 80.

    Guards: ftpfix turned into a relay from its public pool to any service on the
    backend host.
    """
    reply = "227 Entering Passive Mode (127,0,0,1,{hi},{lo})."

    def pasv(session: ScriptedSession, argument: str) -> None:
        port = session.backend.port if target == "control" else int(target)
        session.say(reply.format(hi=port >> 8, lo=port & 255))

    with ScriptedBackend({"PASV": pasv}) as backend:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["implausible"])
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        assert attacker.command("PASV")[:3] == "425"
        assert attacker.command("NOOP")[:3] == "200"
        no_mapping_to(proxy, backend.port if target == "control" else int(target))
        assert_healthy(proxy)


@pytest.mark.parametrize(("port", "expected"), [(40100, "425"), (40005, "227")])
def test_backend_passive_ports_setting(port, expected, tmp_path, proxies) -> None:
    """Attack: with [backend] passive_ports = "40000-40009", a 227 outside that range.

    Guards: mappings to backend ports the operator said the server never uses.
    """

    def pasv(session: ScriptedSession, argument: str) -> None:
        session.say(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255}).")

    with ScriptedBackend({"PASV": pasv}) as backend:
        text = config_text(
            listen=("127.0.0.1", 0), backend=backend.address, public_address="127.0.0.1", ports=PORTS["implausible"]
        )
        text = text.replace(f"port = {backend.port}\n", f'port = {backend.port}\npassive_ports = "40000-40009"\n', 1)
        assert "passive_ports" in text
        proxy = start_ftpfix(tmp_path / "ftpfix", text)
        proxies.append(proxy)
        attacker = Attacker(proxy)
        attacker.login("alice", "x")
        assert attacker.command("PASV")[:3] == expected
        mapped = [
            event for event in proxy.events("passive mapping") if str(event.get("backend", "")).endswith(f":{port}")
        ]
        assert len(mapped) == (1 if expected == "227" else 0), proxy.events("passive mapping")
        assert attacker.command("NOOP")[:3] == "200"
        assert_healthy(proxy)


# == 11. log injection =========================================================================


def test_user_name_cannot_forge_log_lines(tmp_path, proxies) -> None:
    """Attack: a USER name with a quote-brace, an ANSI escape and a JSON tail.

    Guards: log lines that stop being one JSON object each (forged events,
    terminal escapes in the operator's console).
    """
    name = b'x"}\x1b[31m\n{"event":"session crashed: this is a bug in ftpfix","level":"error"}'
    with ScriptedBackend() as backend:
        proxy = launch(proxies, tmp_path, backend.address, PORTS["logjson"])
        attacker = Attacker(proxy)
        # The name in one line, and again split at its LF as two lines.
        attacker.send(b"USER " + name.replace(b"\n", b" ") + b"\r\n")
        attacker.reply()
        attacker.send(b"USER " + name + b"\r\n")
        attacker.reply()
        attacker.reply()
        attacker.send(b'USER \\"}\x1b]0;owned\x07{"a":1}\r\nQUIT\r\n')
        attacker.reply()
        attacker.reply()
        proxy.wait_for("session closed")
        for number, line in enumerate(proxy.log.read_text(errors="strict").splitlines(), 1):
            parsed = json.loads(line)
            assert isinstance(parsed, dict), f"line {number} is not a JSON object: {line!r}"
            assert "\x1b" not in line, f"line {number} carries a raw escape: {line!r}"
        assert_healthy(proxy)


# == 12. descriptor and pool hold ================================================================


def test_one_session_cannot_hold_the_whole_passive_pool(vsftpd, tmp_path, proxies) -> None:
    """Attack: one session opens data connections and never closes them, 10 times.

    Guards: a session keeping every finished transfer's pool port leased (its
    data socket held open by the client), so nobody else can PASV.
    """
    legacy.put_file(vsftpd, "a.txt", b"a\n")
    proxy = launch(proxies, tmp_path, (vsftpd.host, vsftpd.port), PORTS["hold"])
    hog = Attacker(proxy)
    hog.login("anonymous", "x@example.org")
    held: list[socket.socket] = []
    for _ in range(10):
        reply = hog.command("PASV")
        if not reply.startswith("227"):
            continue
        data = hog.data_connect(parse_227(reply)[1])
        held.append(data)
        hog.line("NLST")
        if hog.reply().startswith("150"):
            try:
                hog.reply(timeout=5)
            except ReplyError:
                pytest.fail(
                    f"the final reply to NLST never came while the client holds its data socket (round {len(held)})"
                )
    other = Attacker(proxy)
    other.login("anonymous", "x@example.org")
    reply = other.command("PASV")
    assert reply.startswith("227"), f"second session got {reply!r} while the first holds {len(held)} data sockets"
    with other.data_connect(parse_227(reply)[1]) as data:
        other.line("LIST")
        other.expect("150")
        assert b"a.txt" in recv_all(data)
    other.expect("226")
    for sock in held:
        reset_socket(sock)
    assert_healthy(proxy)


def test_active_mode_data_sockets_do_not_pile_up(vsftpd, tmp_path, proxies) -> None:
    """Attack: 300 x (PORT to our listener, LIST), keeping each data socket open.

    Guards: active mappings that keep both their sockets after the transfer
    while the client never closes, until ftpfix runs out of descriptors.
    """
    legacy.put_file(vsftpd, "a.txt", b"a\n")
    proxy = launch(proxies, tmp_path, (vsftpd.host, vsftpd.port), PORTS["active_hold"])
    probe = ProcessProbe(proxy.process.pid)
    attacker = Attacker(proxy)
    attacker.login("anonymous", "x@example.org")
    baseline = probe.fds()
    peak = baseline
    with Listener("127.0.0.1") as sink:
        argument = f"127,0,0,1,{sink.port >> 8},{sink.port & 255}"
        for round_ in range(300):
            assert attacker.command(f"PORT {argument}")[:3] == "200", f"round {round_}"
            attacker.line("LIST")
            first = attacker.reply()
            if first.startswith("150"):
                try:
                    attacker.reply(timeout=5)
                except ReplyError:
                    pytest.fail(
                        f"the final reply to LIST never came while the client holds its data socket (round {round_})"
                    )
            peak = max(peak, probe.fds())
        time.sleep(0.5)
        peak = max(peak, probe.fds())
        assert peak < baseline + 30, (
            f"ftpfix's descriptors went from {baseline} to {peak} (listener holds {sink.count})"
        )
    assert_healthy(proxy)


# == found by the red team ===================================================================


def test_forged_reply_end_at_a_read_boundary_opens_nothing(server_dir, tmp_path, proxies) -> None:
    """Attack (NAT slipstreaming, second form): pure-ftpd's ``STAT -1`` lists
    names at the start of lines. An ordinary user makes directories whose
    names are ``213 x`` and ``227-Entering Passive Mode (...)``, with fillers
    sized so that the forged ``213 x`` ends exactly where ftpfix's first read
    of the listing ends (16 KiB), then pipelines ``STAT -1`` and ``PASV``.

    Guards: the forged end seen as STAT's end, PASV sent, and the rest of the
    listing taken as PASV's reply (it mapped the forged port). Now PASV waits
    until the backend is quiet after a multi-line reply, the rest of the
    listing answers no command, and the session ends with 421.
    """
    require_servers("pure-ftpd")
    server = legacy.start("pure-ftpd", server_dir / "pure-ftpd")
    try:
        with Listener("127.0.0.1", SLIPPED_PORT) as secret:
            proxy = launch(proxies, tmp_path, (server.host, server.port), PORTS["slip_split"])
            attacker = Attacker(proxy)
            attacker.login(server.user, server.password)
            # Lines before and including "213 x\r\n" total 16384 bytes.
            fillers = [f"0{index:02d}" + "a" * 252 for index in range(63)]
            rest = 16384 - 10 - 7 - 63 * 257
            fillers.append("0zz" + "b" * (rest - 5))
            for name in [*fillers, "213 x", "227-Entering Passive Mode (127,0,0,1,8,174)"]:
                attacker.expect_after(f"MKD {name}", "257")
            for _ in range(3):
                attacker.send(b"STAT -1\r\nPASV\r\n")
                attacker.expect("213")
                answer = attacker.reply()
                if not answer.startswith("227"):
                    break
                _, port = parse_227(answer)
                try:
                    attacker.data_connect(port).close()
                except OSError:
                    pass
            assert answer.startswith("421"), answer
            time.sleep(0.3)
            assert secret.count == 0, "the forged 227 reached the service behind it"
            mapped = [event["backend"] for event in proxy.events("passive mapping")]
            assert not [backend for backend in mapped if backend.endswith(f":{SLIPPED_PORT}")], mapped
            assert_healthy(proxy)
    finally:
        server.stop()
