"""Red team of ``ftpfix diagnose URL``, from the outside: what the existing hostile servers did not try.

Each test is an attack that once got through: a hostile server's terminal
escapes reaching the user's terminal, a URL path smuggling a second command,
a timeout the command line took but Python could not, a port the URL named
that was silently replaced, a truncated download counted as a good one.
The servers are small scripts on loopback (``hostile`` from the existing
file); the command runs through ``ftpfix.cli.main`` as a user would run it.
"""

from __future__ import annotations

import os
import socket
import threading
import unicodedata

import pytest

from ftpfix.cli import main
from ftpfix.config import load_config
from ftpfix.diagnose import parse_target, probe
from ftpfix.diagnose.checks import Status
from ftpfix.diagnose.host import backend_greeting
from ftpfix.diagnose.probe import Options, Target, diagnose
from tests.attacks.test_diagnose_hostile_servers import _guarded, hostile, run
from tests.harness.proxy import config_text

__all__ = ["hostile"]  # the fixture, imported for the tests below

OPTIONS = Options(timeout=1.0, port_timeout=0.5)

#: Passive ports named in the configs written here (never bound).
PORTS = "21640-21643"


def serving(listing: bytes, payload: bytes, seen: list[str]):
    """A server's answers after login: PASV and EPSV on loopback, ``listing`` for LIST, ``payload`` for RETR."""
    pending: list[socket.socket] = []

    def answer(conn: socket.socket, line: str) -> None:
        seen.append(line)
        verb = line.split(" ")[0].upper()
        if verb in ("PASV", "EPSV"):
            data = socket.create_server(("127.0.0.1", 0))
            data.settimeout(3)
            pending[:] = [data]
            port = data.getsockname()[1]
            if verb == "PASV":
                conn.sendall(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})\r\n".encode())
            else:
                conn.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
        elif verb in ("LIST", "RETR") and pending:
            data = pending.pop()
            with data:
                sock, _ = data.accept()
            conn.sendall(b"150 here\r\n")
            with sock:
                sock.sendall(listing if verb == "LIST" else payload)
            conn.sendall(b"226 done\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    return answer


def logged_in(conn: socket.socket, then, greeting: bytes = b"220 hostile\r\n") -> None:
    """Greet with ``greeting`` and accept any login; hand every later command to ``then``."""
    conn.sendall(greeting)
    with conn.makefile("rb") as lines:
        for raw in lines:
            line = raw.rstrip(b"\r\n").decode("latin-1")
            verb = line.split(" ")[0].upper()
            if verb == "USER":
                conn.sendall(b"230 in\r\n")
            elif verb in ("FEAT", "TYPE", "NOOP"):
                conn.sendall(b"200 ok\r\n")
            elif verb == "QUIT":
                return
            else:
                then(conn, line)


def _controls(text: str) -> list[str]:
    """Characters a terminal acts on rather than shows (bar the line ends between lines)."""
    return [ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf")]


def test_terminal_escapes_from_the_server_are_shown_not_obeyed(hostile, capsys) -> None:
    """A hostile server's greeting and file names hold escape sequences (clear the screen, set the
    title, a C1 CSI, a right-to-left override): none reaches the terminal as is."""
    seen: list[str] = []
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 evil\x1b[2Jname\r\n"
    answer = serving(listing, b"hello", seen)

    greeting = "220-\x1b]0;pwned\x07 \x9b31m \u202eright to left\r\n220 \x1b[31mred\r\n".encode()
    port = hostile(lambda conn: logged_in(conn, answer, greeting=greeting))
    status = main(["diagnose", f"ftp://127.0.0.1:{port}", "--timeout", "2", "--port-timeout", "1"])
    out = capsys.readouterr().out
    assert status in (0, 1)
    assert "greeting" in out and "RETR evil" in out
    assert _controls(out) == [], out


def test_a_url_path_cannot_smuggle_a_second_command(hostile, capsys) -> None:
    """``%0d%0a`` in the URL's path decodes to a line end: a usage error, and nothing reaches the server."""
    seen: list[str] = []
    port = hostile(lambda conn: logged_in(conn, serving(b"", b"", seen)))
    status = main(["diagnose", f"ftp://127.0.0.1:{port}/x%0d%0aDELE%20victim", "--timeout", "2"])
    assert status == 2
    assert "line ends" in capsys.readouterr().err
    assert not any(line.upper().startswith("DELE") for line in seen), seen


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "1e308"])
@pytest.mark.parametrize("option", ["--timeout", "--port-timeout"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_bad_usage(option: str, value: str, capsys) -> None:
    """``--timeout nan`` once ended in a Python traceback from deep in a thread (exit 1)."""
    assert main(["diagnose", "ftp://127.0.0.1:1", option, value]) == 2
    assert "ftpfix diagnose:" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "not-pem"])
def test_a_ca_file_that_is_no_ca_bundle_is_bad_usage(content: bytes | None, tmp_path, capsys) -> None:
    """``--ca`` once was read only at the TLS stage, and a missing or bogus file ended the run
    there in a FileNotFoundError or ssl.SSLError traceback."""
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_bytes(content)
    assert main(["diagnose", "ftps://127.0.0.1:1", "--ca", str(ca), "--timeout", "2"]) == 2
    assert f"--ca {ca}" in capsys.readouterr().err


def test_a_password_file_that_is_a_pipe_is_read(tmp_path) -> None:
    """``--password-file <(pass show ftp)``: a pipe has no size, and the password was read as empty
    (then a 530 blamed on the user and password)."""
    fifo = tmp_path / "password"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("w") as stream:
            stream.write("hunter2\n")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert parse_target("ftp://bob@h", password_file=fifo).password == "hunter2"
    finally:
        writer.join(5)


def test_a_password_file_without_end_is_bad_usage(capsys) -> None:
    """/dev/zero: read to a bound, then refused (NUL), never read for ever."""
    assert main(["diagnose", "ftp://bob@127.0.0.1:1", "--password-file", "/dev/zero"]) == 2
    assert "ftpfix diagnose:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url", ["ftp://bob:s3cret@h:70000", "http://bob:s3cret@h", "ftp://bob:s3cret@:21/x", "bob:s3cret@h:0"]
)
def test_a_usage_error_never_shows_the_password(url: str, capsys) -> None:
    """The usage errors quoted the URL as given, password and all, into scrollback and CI logs."""
    assert main(["diagnose", url]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "bob:***@" in err, err


def test_port_zero_is_bad_usage_not_port_21(capsys) -> None:
    """``ftp://host:0`` once tested port 21 instead, and said so only in passing."""
    assert main(["diagnose", "ftp://127.0.0.1:0", "--timeout", "2"]) == 2
    assert "port" in capsys.readouterr().err


def test_endless_preliminary_replies_end_the_run(hostile) -> None:
    """Each ``150`` is a whole reply, so no line or reply bound applied, and the wait for the final
    reply once started over with each: a server answering every command with 150s forever hung
    the run for good."""

    def flood(conn: socket.socket, line: str) -> None:
        while True:
            conn.sendall(b"150 wait\r\n" * 100)

    checks = run(hostile(lambda conn: logged_in(conn, flood)))
    stages = {check.stage: check for check in checks}
    assert stages["pasv integrity"].status is Status.FAIL, stages["pasv integrity"].summary
    assert "preliminary" in stages["pasv integrity"].summary


@pytest.mark.parametrize(
    "name", ["日本語.txt".encode(), b"caf\xe9.txt", "ünï.txt".encode()], ids=["utf-8", "latin-1", "utf-8-latin"]
)
def test_a_file_name_beyond_ascii_is_fetched_by_its_own_bytes(name: bytes, hostile) -> None:
    """The listing's names were decoded as UTF-8 (undecodable bytes replaced) and the RETR encoded
    as Latin-1: a name like 日本語.txt ended the run in a UnicodeEncodeError traceback, and a Latin-1
    name was asked for under another one. The RETR now names the very bytes the listing held."""
    seen: list[str] = []
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 " + name + b"\r\n"
    port = hostile(lambda conn: logged_in(conn, serving(listing, b"hello", seen)))
    checks = {check.stage: check for check in run(port)}
    assert checks["data (passive)"].status is Status.OK, checks["data (passive)"].summary
    assert ("RETR " + name.decode("latin-1")) in seen, seen


def test_a_url_path_beyond_ascii_is_sent_as_utf_8(hostile, capsys) -> None:
    seen: list[str] = []
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 other.txt\r\n"
    port = hostile(lambda conn: logged_in(conn, serving(listing, b"hello", seen)))
    status = main(["diagnose", f"ftp://127.0.0.1:{port}/%E6%97%A5.txt", "--timeout", "2", "--port-timeout", "1"])
    assert status == 0, capsys.readouterr().out
    assert ("RETR " + "日.txt".encode().decode("latin-1")) in seen, seen


def test_a_later_227_cannot_send_the_data_connection_to_another_host(hostile) -> None:
    """The first 227 names the address dialed (so the 227 address stage passes); every later one
    names another host (127.0.0.3 here: a LAN host of the diagnosing side) with a service on it.
    The data round trip once dialed it: a hostile server made the diagnosing host probe its LAN.
    Data connections go to the address dialed, whatever a 227 says (as curl's --ftp-skip-pasv-ip)."""
    victim = socket.create_server(("127.0.0.3", 0))
    victim.settimeout(0.2)
    victim_port = victim.getsockname()[1]
    pasvs: list[int] = []

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb == "PASV":
            pasvs.append(1)
            if len(pasvs) == 1:
                conn.sendall(b"227 Entering Passive Mode (127,0,0,1,0,1)\r\n")
            else:
                p1, p2 = victim_port >> 8, victim_port & 255
                conn.sendall(f"227 Entering Passive Mode (127,0,0,3,{p1},{p2})\r\n".encode())
        elif verb in ("LIST", "RETR"):
            conn.sendall(b"425 no\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    try:
        checks = {check.stage: check for check in run(hostile(lambda conn: logged_in(conn, answer)))}
        assert checks["227 address"].status is Status.OK
        assert len(pasvs) > 1
        with pytest.raises(TimeoutError):
            victim.accept()
    finally:
        victim.close()
    assert checks["data (passive)"].status is Status.FAIL


def test_a_120_before_the_220_is_a_greeting(hostile, tmp_path) -> None:
    """RFC 959 (4.2): a server may answer the connection with "120 Service ready in nnn minutes",
    then 220. Both the URL run and the --config run's backend check failed such a server."""

    def late(conn: socket.socket) -> None:
        conn.sendall(b"120 ready in a moment\r\n")
        logged_in(conn, serving(b"", b"", []))

    port = hostile(late)
    checks = {check.stage: check for check in run(port)}
    assert checks["greeting"].status is Status.OK, checks["greeting"].summary
    assert checks["login"].status is Status.OK
    config = tmp_path / "ftpfix.toml"
    config.write_text(
        config_text(listen=("127.0.0.1", 0), backend=("127.0.0.1", port), public_address="127.0.0.1", ports=PORTS)
    )
    assert backend_greeting(load_config(config), 2.0).status is Status.OK


def test_a_url_path_naming_a_folder_is_not_blamed_on_the_data_connection(hostile) -> None:
    """``ftp://host/pub/``: the LIST comes through, the RETR of a folder gets 550. The data path
    works, and the verdict once was "FAIL at data (passive) ... the server's log says why": it is a
    warning now, whose hint says to name a readable file."""
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 hello.txt\r\n"
    lister = serving(listing, b"hello", [])

    def answer(conn: socket.socket, line: str) -> None:
        if line.upper().startswith("RETR"):
            conn.sendall(b"550 Failed to open file.\r\n")
        else:
            lister(conn, line)

    port = hostile(lambda conn: logged_in(conn, answer))
    target = Target("127.0.0.1", port, "anonymous", "x@", "pub/")
    checks = {check.stage: check for check in diagnose(target, OPTIONS, lambda check: None)}
    for stage in ("data (passive)", "data (epsv)"):
        assert checks[stage].status is Status.WARN, checks[stage].summary
        assert "name a file" in checks[stage].hint


def test_passive_ports_forwarded_to_another_host_are_named_as_such(hostile) -> None:
    """The 227 names the address dialed and a port that accepts, but what accepts is another host
    (the router forwards the range to the wrong machine): the server answers LIST with 425. The hint
    once was "the server's log says why it refused"; it names the forwarding now."""
    other = socket.create_server(("127.0.0.1", 0))  # the wrong host: accepts, says nothing
    other_port = other.getsockname()[1]

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb == "PASV":
            conn.sendall(f"227 Entering Passive Mode (127,0,0,1,{other_port >> 8},{other_port & 255})\r\n".encode())
        elif verb == "EPSV":
            conn.sendall(f"229 Entering Extended Passive Mode (|||{other_port}|)\r\n".encode())
        elif verb in ("LIST", "RETR"):
            conn.sendall(b"425 Failed to establish connection.\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    try:
        checks = {check.stage: check for check in run(hostile(lambda conn: logged_in(conn, answer)))}
    finally:
        other.close()
    for stage in ("data (passive)", "data (epsv)"):
        assert checks[stage].status is Status.FAIL
        assert "forwards the passive ports to another host" in checks[stage].hint, checks[stage].hint


def test_over_ipv6_a_server_without_pasv_works(capsys) -> None:
    """Dialed over IPv6, clients use EPSV (RFC 2428): a 227 cannot name an IPv6 address. A server that
    refuses PASV there, but whose EPSV and round trip over it work, once got "FAIL at pasv integrity"
    (exit 1); it works, with a warning."""
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    port = listener.getsockname()[1]
    pending: list[socket.socket] = []

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb == "PASV":
            conn.sendall(b"500 PASV not allowed over IPv6, use EPSV\r\n")
        elif verb == "EPSV":
            data = socket.create_server(("::1", 0), family=socket.AF_INET6)
            data.settimeout(3)
            pending[:] = [data]
            conn.sendall(f"229 Entering Extended Passive Mode (|||{data.getsockname()[1]}|)\r\n".encode())
        elif verb in ("LIST", "RETR") and pending:
            with pending.pop() as data:
                sock, _ = data.accept()
            conn.sendall(b"150 here\r\n")
            with sock:
                sock.sendall(b"-rw-r--r-- 1 a a 5 Jan 1 00:00 f.txt\r\n" if verb == "LIST" else b"hello")
            conn.sendall(b"226 done\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_guarded, args=(lambda c: logged_in(c, answer), conn), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        status = main(["diagnose", f"ftp://[::1]:{port}", "--timeout", "2", "--port-timeout", "1"])
    finally:
        listener.close()
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"ftp://[::1]:{port}" in out
    assert "ok   data (epsv): LIST 38 bytes, RETR f.txt 5 bytes" in out
    assert "warn pasv integrity" in out


def test_after_a_data_connection_fails_the_replies_stay_in_step(hostile) -> None:
    """The LIST's data connection goes quiet; diagnose gives up on it and closes it, and the server
    answers the LIST with 426. That 426 was left unread, so the EPSV stage read it as EPSV's reply
    ("EPSV answered 426"), and every later command the reply before its own."""
    pending: list[socket.socket] = []

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb in ("PASV", "EPSV"):
            data = socket.create_server(("127.0.0.1", 0))
            data.settimeout(3)
            pending[:] = [data]
            port = data.getsockname()[1]
            if verb == "PASV":
                conn.sendall(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})\r\n".encode())
            else:
                conn.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
        elif verb == "LIST" and pending:
            with pending.pop() as data:
                sock, _ = data.accept()
            conn.sendall(b"150 here it comes (it does not)\r\n")
            with sock:
                sock.settimeout(10)
                sock.recv(1)  # until the client gives up and closes
            conn.sendall(b"426 Connection closed; transfer aborted.\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    checks = {check.stage: check for check in run(hostile(lambda conn: logged_in(conn, answer)))}
    assert checks["data (passive)"].status is Status.FAIL
    assert "went quiet" in checks["data (passive)"].summary
    assert checks["epsv"].summary.startswith("229 "), checks["epsv"].summary
    assert "went quiet" in checks["data (epsv)"].summary, checks["data (epsv)"].summary


def test_a_big_folder_is_no_data_failure(hostile, monkeypatch) -> None:
    """A login folder whose listing is over LIST_LIMIT (20,000 files in a real vsftpd made 2 MB): the
    data round trip failed with "sent over 1048576 bytes", verdict FAIL at data (passive), for a
    healthy server. The listing is cut there, the server's 426 for it accepted, and the RETR runs."""
    monkeypatch.setattr(probe, "LIST_LIMIT", 4096)
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 hello.txt\r\n" + b"-rw-r--r-- 1 a a 1 Jan 1 00:00 filler\r\n" * 5000
    pending: list[socket.socket] = []

    def answer(conn: socket.socket, line: str) -> None:
        verb = line.split(" ")[0].upper()
        if verb in ("PASV", "EPSV"):
            data = socket.create_server(("127.0.0.1", 0))
            data.settimeout(3)
            pending[:] = [data]
            port = data.getsockname()[1]
            if verb == "PASV":
                conn.sendall(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})\r\n".encode())
            else:
                conn.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
        elif verb in ("LIST", "RETR") and pending:
            with pending.pop() as data:
                sock, _ = data.accept()
            conn.sendall(b"150 here\r\n")
            try:
                with sock:
                    sock.sendall(listing if verb == "LIST" else b"hello")
            except OSError:
                conn.sendall(b"426 Connection closed; transfer aborted.\r\n")
            else:
                conn.sendall(b"226 done\r\n")
        else:
            conn.sendall(b"502 no\r\n")

    checks = {check.stage: check for check in run(hostile(lambda conn: logged_in(conn, answer)))}
    for stage in ("data (passive)", "data (epsv)"):
        assert checks[stage].status is Status.OK, checks[stage].summary
        assert "RETR hello.txt 5 bytes" in checks[stage].summary


@pytest.mark.parametrize("port", ["99999", "65536", "0"])
def test_a_229_naming_no_port_is_a_failure_not_a_traceback(port: str, hostile) -> None:
    """``229 (|||99999|)`` ended the run in an OverflowError traceback from connect()."""

    def answer(conn: socket.socket, line: str) -> None:
        if line.upper().startswith("EPSV"):
            conn.sendall(f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode())
        else:
            conn.sendall(b"502 no\r\n")

    checks = {check.stage: check for check in run(hostile(lambda conn: logged_in(conn, answer)))}
    assert checks["data (epsv)"].status is Status.FAIL, checks["data (epsv)"].summary
    assert f"|||{port}|" in checks["data (epsv)"].summary


def test_a_truncated_download_is_a_failure(hostile) -> None:
    """The listing says 5 bytes, the data connection closes after 3 and the server says 226:
    a router or proxy that cuts transfers short. Diagnose once said OK."""
    seen: list[str] = []
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 hello.txt\r\n"
    port = hostile(lambda conn: logged_in(conn, serving(listing, b"hel", seen)))
    checks = {check.stage: check for check in run(port)}
    assert checks["data (passive)"].status is Status.FAIL, checks["data (passive)"].summary
    assert "3 of the 5 bytes" in checks["data (passive)"].summary
    assert checks["data (epsv)"].status is Status.FAIL


def test_a_whole_download_still_passes(hostile) -> None:
    seen: list[str] = []
    listing = b"-rw-r--r-- 1 a a 5 Jan 1 00:00 hello.txt\r\n"
    port = hostile(lambda conn: logged_in(conn, serving(listing, b"hello", seen)))
    checks = {check.stage: check for check in run(port)}
    assert checks["data (passive)"].status is Status.OK, checks["data (passive)"].summary
    assert checks["data (epsv)"].status is Status.OK
    assert "RETR hello.txt" in seen
