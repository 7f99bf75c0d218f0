"""Brute force through ftpfix, and user names aimed at fail2ban, judged by the real fail2ban-regex.

The backend sees every session from ftpfix's address, so only ftpfix's own
"login failed" lines can tell fail2ban whom to ban (issue 10). These tests
run a real ftpfix in front of a real backend, log in through it, and run
Debian's fail2ban-regex with ``deploy/fail2ban/filter.d/ftpfix.conf`` on the
lines ftpfix wrote: as a file, JSON and console, and as fail2ban's journal
backend shows them.

The user name is the attacker's, and it lands on the very line fail2ban
parses. Each hostile name comes from its own loopback address, and the
contract is:

- every match is the address of a client that had a login refused, once per
  refusal: an attacker can neither get another address banned nor keep his
  own out of the count;
- every match has the time ftpfix wrote, not one named in a user name (a
  failure dated 2001 is outside any findtime: the attacker would be hidden).

ftpfix's passive ports in this file: 21400-21403 (no data connection is made).
"""

from __future__ import annotations

import ftplib
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import require, require_servers
from tests.harness import fail2ban, legacy
from tests.harness.proxy import ROOT, Ftpfix, config_text

from .transcript import Attacker

pytestmark = [pytest.mark.servers, pytest.mark.root]

FORMATS = ("json", "console")

#: The address fail2ban must never be made to ban, whatever a name says.
BYSTANDERS = ("198.51.100.9", "192.0.2.7")

#: User names that try to make fail2ban ban a bystander, or to hide their
#: sender. The line-ending ones (LF, CR, ESC) are split or refused by ftpfix's
#: command framing before they are user names at all.
HOSTILE_NAMES = {
    "quote_and_console_field": b'x" client=198.51.100.9 "',
    "json_keys": b'x", "client": "198.51.100.9:21", "event": "login failed", "y": "',
    "json_object": b'{"event": "login failed", "client": "198.51.100.9:21", "level": "warning"}',
    "console_line": b"login failed                   client=192.0.2.7:21 code=530 user=x",
    "newline_then_console_line": (
        b"x\n2026-01-01T00:00:00.000000Z [warning  ] login failed                   client=192.0.2.7:21 code=530"
    ),
    "newline_then_json_line": b'x\n{"event": "login failed", "client": "192.0.2.7:21", "level": "warning"}',
    "ansi_erase_line": b'\x1b[1A\x1b[2K\r{"event": "login failed", "client": "192.0.2.7:21"}',
    "unicode_line_breaks": 'x\u2028\u0085{"event": "login failed", "client": "192.0.2.7:21"}'.encode(),
    "bidi_override": "\u202e12:7.2.0.291=tneilc deliaf nigol".encode(),
    "invalid_utf8": b'\xfe\xc0", "client": "192.0.2.7:21',
    "backslash_quote": b'\\", "client": "192.0.2.7:21", "x": "\\',
    "mapped_address": b'x", "client": "::ffff:192.0.2.7:21',
    "journal_prefix": b'gateway ftpfix[1]: {"event": "login failed", "client": "192.0.2.7:21"}',
    "old_date_json": b'x", "timestamp": "2001-01-01T00:00:00.000000Z"}',
    "old_date_console": b"2001-01-01T00:00:00.000000Z [warning  ] login failed client=192.0.2.7:21",
    "long": b"a" * 100 + b' client=192.0.2.7:21 "client": "192.0.2.7:21"',
    "pass_in_name": b'PASS x", "client": "192.0.2.7:21',
}


def start(workdir: Path, backend: legacy.LegacyServer, log_format: str, *, extra: str = "") -> Ftpfix:
    """ftpfix on 127.0.0.1 and ::1 in front of ``backend``, logging in ``log_format`` at DEBUG.

    DEBUG on purpose: the "command" lines then carry every user name too.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = legacy.free_port("127.0.0.1")
    config = config_text(
        listen=(["127.0.0.1", "::1"], port),
        backend=(backend.host, backend.port),
        public_address="127.0.0.1",
        ports="21400-21403",
        extra=extra,
    ).replace('format = "json"', f'format = "{log_format}"')
    (workdir / "ftpfix.toml").write_text(config)
    log = workdir / "ftpfix.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ftpfix", "run", "--config", str(workdir / "ftpfix.toml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    proxy = Ftpfix(process, log, "127.0.0.1", port)
    try:
        legacy.wait_for_banner("127.0.0.1", port, process=process)  # type: ignore[arg-type]
    except Exception:
        proxy.stop()
        raise
    return proxy


def logged(proxy: Ftpfix, event: str) -> list[str]:
    """The lines of ``event`` in either format (the console pads an event to 30 characters)."""
    lines = proxy.log.read_text(errors="replace").splitlines()
    return [line for line in lines if f'"event": "{event}"' in line or f"] {event:<30} " in line]


def wait_logged(proxy: Ftpfix, event: str, count: int, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := logged(proxy, event)) < count:
        assert time.monotonic() < deadline, f"{event!r} logged {len(found)} times, not {count}"
        time.sleep(0.02)
    return found


def judged(proxy: Ftpfix, workdir: Path) -> dict[str, list[fail2ban.Match]]:
    """What fail2ban finds in ftpfix's log, read as a file and as from the journal."""
    journal = workdir / "journal.log"
    datepattern = fail2ban.as_journal(proxy.log, journal)
    return {"file": fail2ban.regex(proxy.log), "journal": fail2ban.regex(journal, datepattern=datepattern)}


def assert_judged(
    proxy: Ftpfix, workdir: Path, expected: Counter[str], started: float, *, context: object = ""
) -> None:
    for source, matches in judged(proxy, workdir).items():
        found = Counter(match.address for match in matches)
        assert found == expected, f"{source}: fail2ban counted {dict(found)}, not {dict(expected)} {context}"
        for match in matches:
            assert started - 2 <= match.time <= time.time() + 2, f"{source}: {match} is not dated now"
        assert not set(found) & set(BYSTANDERS)


@pytest.fixture
def f2b() -> None:
    require(fail2ban.installed(), "fail2ban is not unpacked (run ./tests/run, it calls tests/install-servers)")


# -- the ordinary case: real clients, every backend -------------------------------


@pytest.mark.parametrize("log_format", FORMATS)
@pytest.mark.parametrize("kind", legacy.SERVERS)
def test_failed_logins_are_counted_on_the_client_and_a_login_is_not(
    kind: str, log_format: str, f2b: None, server_dir: Path, tmp_path: Path
) -> None:
    require_servers(kind)
    backend = legacy.start(kind, server_dir / kind)
    proxy = start(tmp_path / "ftpfix", backend, log_format)
    started = time.time()
    try:
        # vsftpd here serves anonymous users only: it refuses any other name
        # at USER (530). pure-ftpd and ProFTPD refuse the password (530).
        user = "mallory" if kind == "vsftpd" else backend.user

        def fail(attempt: int) -> None:
            with ftplib.FTP() as ftp:
                ftp.connect("127.0.0.1", proxy.port, timeout=30, source_address=("127.0.0.21", 0))
                with pytest.raises(ftplib.error_perm, match="^530"):
                    ftp.login(user, f"wrong{attempt}")

        # At once: pure-ftpd makes each failed login wait seconds for its 530.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(fail, range(3)))
        with ftplib.FTP() as ftp:
            ftp.connect("127.0.0.1", proxy.port, timeout=30, source_address=("127.0.0.22", 0))
            ftp.login(backend.user, backend.password)
        failed = wait_logged(proxy, "login failed", 3)
        [login] = wait_logged(proxy, "login", 1)
        assert all("127.0.0.21:" in line for line in failed)
        assert "127.0.0.22:" in login
        assert not any(backend.password in line for line in logged(proxy, "login") + failed)
        assert_judged(proxy, tmp_path, Counter({"127.0.0.21": 3}), started)
    finally:
        proxy.stop()
        backend.stop()


# -- hostile user names ------------------------------------------------------------


def try_login(proxy: Ftpfix, source: str, name: bytes) -> int:
    """USER ``name`` (raw bytes) and a wrong PASS from ``source``; how many logins were refused."""
    host = "::1" if ":" in source else "127.0.0.1"
    with Attacker(proxy, host=host, source=source, timeout=30) as attacker:
        sent = b"USER " + name + b"\r\n"
        attacker.send(sent)
        # ftpfix ends a command at LF: each line gets its own reply.
        replies = attacker.replies(sent.count(b"\n"))
        refused = int(replies[0].startswith("530"))
        if replies[0].startswith("331"):
            refused += int(attacker.command("PASS wrong").startswith("530"))
        attacker.command("QUIT")
    return refused


@pytest.mark.parametrize("log_format", FORMATS)
def test_hostile_user_names_get_no_one_else_banned_and_do_not_hide_their_sender(
    log_format: str, f2b: None, server_dir: Path, tmp_path: Path
) -> None:
    require_servers("proftpd")
    # ProFTPD asks a password of any name and refuses it with 530.
    backend = legacy.start("proftpd", server_dir / "proftpd")
    proxy = start(tmp_path / "ftpfix", backend, log_format)
    started = time.time()
    expected: Counter[str] = Counter()
    try:
        for number, (case, name) in enumerate(HOSTILE_NAMES.items()):
            source = f"127.0.0.{40 + number}"
            expected[source] += try_login(proxy, source, name)
        # IPv6: the client field is "::1:port", the port after the last colon.
        expected["::1"] += try_login(proxy, "::1", HOSTILE_NAMES["json_keys"])
        expected += Counter()  # drop the attackers whose names never reached a password
        # Only the ESC line is refused by ftpfix before it is a USER at all.
        assert sum(expected.values()) >= len(HOSTILE_NAMES) - 1, f"too few attempts reached the backend: {expected}"
        wait_logged(proxy, "login failed", sum(expected.values()))
        assert_judged(proxy, tmp_path, expected, started, context=f"for {list(HOSTILE_NAMES)}")
    finally:
        proxy.stop()
        backend.stop()


@pytest.mark.parametrize("log_format", FORMATS)
def test_refused_anonymous_counts_on_the_client(log_format: str, f2b: None, server_dir: Path, tmp_path: Path) -> None:
    # ftpfix refuses anonymous itself ([backend] deny_anonymous): the backend
    # never hears of it, so ftpfix's line is the only trace.
    require_servers("vsftpd")
    backend = legacy.start("vsftpd", server_dir / "vsftpd")
    proxy = start(tmp_path / "ftpfix", backend, log_format, extra="\n[access]\ndeny_anonymous = true\n")
    started = time.time()
    try:
        for _ in range(2):
            with Attacker(proxy, source="127.0.0.31") as attacker:
                assert attacker.command("USER anonymous").startswith("530")
        wait_logged(proxy, "login failed", 2)
        assert_judged(proxy, tmp_path, Counter({"127.0.0.31": 2}), started)
    finally:
        proxy.stop()
        backend.stop()


def test_the_jail_loads_with_the_filter(f2b: None, tmp_path: Path) -> None:
    # fail2ban-client reads Debian's config with deploy/fail2ban/ in it, as an
    # installed fail2ban would, and says what it would start.
    log = tmp_path / "ftpfix.log"
    log.touch()
    dump = "\n".join(fail2ban.load_jail(tmp_path / "fail2ban", log))
    assert "['add', 'ftpfix', 'auto']" in dump
    assert "login failed" in dump and "<ADDR>" in dump
    assert f"['set', 'ftpfix', 'addlogpath', '{log}', 'head']" in dump
    assert "['set', 'ftpfix', 'maxretry', 5]" in dump
