"""The metrics the core reports (Count, TransferReplied), the label mappings,
and the xferlog format with hostile file names."""

from __future__ import annotations

import re
from pathlib import Path

from ftpfix.net.metrics import SESSION_ENDS, Metrics, session_end, transfer_result
from ftpfix.net.transferlog import XferLog, xferlog_line
from ftpfix.protocol import Count, DataReceived, PassiveOpened, Policy, Session, Side, Tally, TransferReplied
from ftpfix.protocol.session import MAX_PENDING

from .transcript import merge

GREETING = b"220 ready\r\n"


def logged_in(policy: Policy | None = None) -> Session:
    from ipaddress import IPv4Address

    session = Session(policy, client=IPv4Address("198.51.100.7"))
    session.receive(DataReceived(Side.SERVER, GREETING))
    return session


def counts(commands) -> list:
    return [command for command in merge(commands, counts=True) if isinstance(command, Count | TransferReplied)]


def test_an_alias_and_the_227_it_gets_are_counted() -> None:
    from ipaddress import IPv4Address

    session = logged_in()
    assert counts(session.receive(DataReceived(Side.CLIENT, b"P@SW\r\n"))) == [Count(Tally.ALIAS)]
    session.receive(DataReceived(Side.SERVER, b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n"))
    assert counts(session.receive(PassiveOpened(IPv4Address("203.0.113.1"), 50000))) == [Count(Tally.REWRITE_227)]


def test_bounce_and_long_lines_are_counted() -> None:
    session = logged_in()
    out = session.receive(DataReceived(Side.CLIENT, b"PORT 198,51,100,7,0,25\r\nPORT 10,9,9,9,200,1\r\n"))
    assert counts(out) == [Count(Tally.BOUNCE)]  # the private address is fixed, not refused
    out = logged_in(Policy(fix_address=False)).receive(DataReceived(Side.CLIENT, b"PORT 192,0,2,1,200,1\r\n"))
    assert counts(out) == [Count(Tally.BOUNCE)]
    out = logged_in(Policy(max_line=16)).receive(DataReceived(Side.CLIENT, b"NOOP " + b"x" * 40 + b"\r\n"))
    assert counts(out) == [Count(Tally.LONG_LINE)]
    assert MAX_PENDING  # the core bounds what it counts per event like everything else


def test_a_transfer_reply_names_verb_path_and_the_code_the_client_got() -> None:
    session = logged_in()
    session.receive(DataReceived(Side.CLIENT, b"RETR no such file\r\n"))
    out = session.receive(DataReceived(Side.SERVER, b"550 No such file.\r\n"))
    assert counts(out) == [TransferReplied("RETR", b"no such file", 550, relayed=False)]


def test_close_reasons_map_to_a_closed_set() -> None:
    reasons = {
        "quit": "quit",
        "client hung up": "client_hung_up",
        "client reset the connection": "client_hung_up",
        "idle timeout": "timeout",
        "login timeout": "timeout",
        "line timeout": "timeout",
        "client stopped reading": "timeout",
        "backend closed": "backend_down",
        "backend sent 421": "backend_down",
        "ftpfix is shutting down": "shutdown",
        "client kept sending over-long lines": "limit",
        "unknown": "other",
        "a reply line over 64 KiB from 10.0.0.1 about /etc/passwd": "error",
    }
    for reason, label in reasons.items():
        assert session_end(reason) == label, reason
        assert label in SESSION_ENDS
    assert [transfer_result(code) for code in (226, 250, 425, 426, 550, 451)] == [
        *("ok", "ok", "no_data_connection", "aborted", "refused", "refused")
    ]


def test_every_label_exists_before_its_first_event() -> None:
    text = Metrics().render()[0].decode()
    assert 'ftpfix_refusals_total{kind="stranger"} 0.0' in text
    assert 'ftpfix_sessions_ended_total{reason="backend_down"} 0.0' in text
    assert 'ftpfix_rewrites_total{kind="alias"} 0.0' in text


#: wu-ftpd's xferlog(5): ctime (5 fields), then 13 fields, none of them empty.
XFERLOG = re.compile(
    r"(?P<time>\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}) (?P<seconds>\d+) (?P<host>\S+) (?P<size>\d+)"
    r" (?P<name>\S+) (?P<type>[ab]) (?P<action>[_CUT]) (?P<direction>[oi]) (?P<access>[agr]) (?P<user>\S+)"
    r" (?P<service>ftp) (?P<method>[01]) (?P<userid>\S+) (?P<status>[ci])\n"
)

HOSTILE = [
    b"plain.bin",
    b"with space.bin",
    b"new\nline.bin",
    b"cr\rlf\r\n.bin",
    b"Thu Jan  1 00:00:00 1970 1 6.6.6.6 1 /forged b _ o r root ftp 0 * c",
    b"\x1b[31mred\x1b[0m",
    b"tab\tand\x00nul",
    b"back\\slash",
    b"\xff\xfe not utf-8",
    b"line\xe2\x80\xa8separator",
    b"",
    b" ",
    b"x" * 5000,
]


def test_xferlog_lines_parse_whatever_the_file_is_called(tmp_path: Path) -> None:
    log = XferLog()
    path = tmp_path / "xferlog"
    log.configure(path)
    for name in HOSTILE:
        line = xferlog_line(
            now=0, seconds=2.4, host="203.0.113.5", size=1234, path=name, verb="RETR", user="alice", complete=True
        )
        assert line is not None
        log.write(line)
    log.close()
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == len(HOSTILE)  # no name added a line
    for line, name in zip(lines, HOSTILE, strict=True):
        match = XFERLOG.fullmatch(line)
        assert match is not None, line
        assert match["seconds"] == "2" and match["size"] == "1234" and match["user"] == "alice"
        assert match["direction"] == "o" and match["access"] == "r" and match["status"] == "c"
        assert len(line.split()) == 18
        if name == b"with space.bin":
            assert match["name"] == "with\\x20space.bin"


def test_xferlog_fields_for_uploads_anonymous_users_and_listings() -> None:
    line = xferlog_line(now=0, seconds=0, host="h", size=0, path=b"f", verb="STOR", user="ftp", complete=False)
    assert line is not None
    fields = line.split()
    assert (fields[11], fields[12], fields[17]) == ("i", "a", "i")
    assert xferlog_line(now=0, seconds=0, host="h", size=0, path=b"", verb="LIST", user=None, complete=True) is None
    spaced = xferlog_line(now=0, seconds=0, host="h", size=0, path=b"f", verb="RETR", user="a b", complete=True)
    assert spaced is not None and len(spaced.split()) == 18


def test_the_xferlog_is_reopened_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "xferlog"
    log = XferLog()
    log.configure(path)
    log.write("one\n")
    path.rename(tmp_path / "xferlog.1")  # what logrotate does, then SIGHUP
    log.configure(path)
    log.write("two\n")
    log.close()
    assert (tmp_path / "xferlog.1").read_text() == "one\n"
    assert path.read_text() == "two\n"
    unwritable = XferLog()
    unwritable.configure(tmp_path / "missing" / "xferlog")
    assert unwritable.error is not None and "cannot open" in unwritable.error
    unwritable.write("dropped\n")  # no crash, nothing written
