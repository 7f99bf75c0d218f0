"""Login events, as playbooks: which reply makes which log line, and nothing else.

``play(..., notes=True)`` makes every Note above DEBUG part of what a step
must produce, so each test also says that no other line was written.
"""

from __future__ import annotations

import pytest

from ftpfix.protocol import Level, Note, Policy
from ftpfix.protocol.logins import CUT, MAX_LOGGED_USER, loggable

from .transcript import Client, Server, play, replay, to_client, to_server

GREETED = Server(b"220 ready\r\n") >> to_client(b"220 ready\r\n")


def login(user: str) -> Note:
    return Note("login", fields={"user": user})


def failed(user: str, code: int) -> Note:
    return Note("login failed", level=Level.WARNING, fields={"user": user, "code": code})


def failed_anonymous(user: str) -> Note:
    fields = {"user": user, "code": 530, "reason": "anonymous logins are refused"}
    return Note("login failed", level=Level.WARNING, fields=fields)


def user_331(name: bytes = b"alice") -> list:
    return [
        Client(b"USER " + name + b"\r\n") >> to_server(b"USER " + name + b"\r\n"),
        Server(b"331 Password required\r\n") >> to_client(b"331 Password required\r\n"),
    ]


def test_230_to_pass_is_a_login() -> None:
    session = play(
        [
            GREETED,
            *user_331(),
            Client(b"PASS secret\r\n") >> to_server(b"PASS secret\r\n"),
            Server(b"230 Logged in\r\n") >> [to_client(b"230 Logged in\r\n"), login("alice")],
        ],
        notes=True,
    )
    assert session.logged_in


def test_530_to_pass_is_a_failed_login_with_the_code() -> None:
    session = play(
        [
            GREETED,
            *user_331(),
            Client(b"PASS wrong\r\n") >> to_server(b"PASS wrong\r\n"),
            Server(b"530 Login incorrect.\r\n") >> [to_client(b"530 Login incorrect.\r\n"), failed("alice", 530)],
        ],
        notes=True,
    )
    assert not session.logged_in


def test_230_to_user_is_a_login() -> None:
    # RFC 959 section 5.4: a server may log a user in on USER alone
    # (pure-ftpd and vsftpd do for anonymous).
    play(
        [
            GREETED,
            Client(b"USER ftp\r\n") >> to_server(b"USER ftp\r\n"),
            Server(b"230 Anonymous user logged in\r\n")
            >> [to_client(b"230 Anonymous user logged in\r\n"), login("ftp")],
        ],
        notes=True,
    )


def test_331_then_a_multiline_530_is_one_failed_line() -> None:
    # The 331 says nothing yet; the 530 is one line however many it spans.
    play(
        [
            GREETED,
            *user_331(),
            Client(b"PASS wrong\r\n") >> to_server(b"PASS wrong\r\n"),
            Server(b"530-Login incorrect.\r\n530 Try again later.\r\n")
            >> [to_client(b"530-Login incorrect.\r\n530 Try again later.\r\n"), failed("alice", 530)],
        ],
        notes=True,
    )


def test_a_relogin_after_a_failure_logs_both() -> None:
    play(
        [
            GREETED,
            *user_331(),
            Client(b"PASS wrong\r\n") >> to_server(b"PASS wrong\r\n"),
            Server(b"530 Login incorrect.\r\n") >> [to_client(b"530 Login incorrect.\r\n"), failed("alice", 530)],
            *user_331(b"bob"),
            Client(b"PASS right\r\n") >> to_server(b"PASS right\r\n"),
            Server(b"230 Logged in\r\n") >> [to_client(b"230 Logged in\r\n"), login("bob")],
        ],
        notes=True,
    )


def test_pipelined_user_and_pass() -> None:
    play(
        [
            GREETED,
            Client(b"USER alice\r\nPASS secret\r\n") >> to_server(b"USER alice\r\nPASS secret\r\n"),
            Server(b"331 Password required\r\n230 Logged in\r\n")
            >> [to_client(b"331 Password required\r\n230 Logged in\r\n"), login("alice")],
        ],
        notes=True,
    )


def test_pipelined_logins_are_paired_with_their_own_user() -> None:
    # Each PASS is for the USER just before it, not for the last USER read.
    play(
        [
            GREETED,
            Client(b"USER mallory\r\nPASS guess\r\nUSER alice\r\nPASS secret\r\n")
            >> to_server(b"USER mallory\r\nPASS guess\r\nUSER alice\r\nPASS secret\r\n"),
            Server(b"331 Password required\r\n530 Login incorrect.\r\n331 Password required\r\n230 Logged in\r\n")
            >> [
                to_client(b"331 Password required\r\n530 Login incorrect.\r\n"),
                failed("mallory", 530),
                to_client(b"331 Password required\r\n230 Logged in\r\n"),
                login("alice"),
            ],
        ],
        notes=True,
    )


def test_acct_decides_after_a_332() -> None:
    play(
        [
            GREETED,
            *user_331(),
            Client(b"PASS secret\r\n") >> to_server(b"PASS secret\r\n"),
            Server(b"332 Need account\r\n") >> to_client(b"332 Need account\r\n"),
            Client(b"ACCT wrong\r\n") >> to_server(b"ACCT wrong\r\n"),
            Server(b"530 No such account\r\n") >> [to_client(b"530 No such account\r\n"), failed("alice", 530)],
            Client(b"ACCT right\r\n") >> to_server(b"ACCT right\r\n"),
            Server(b"230 Logged in\r\n") >> [to_client(b"230 Logged in\r\n"), login("alice")],
        ],
        notes=True,
    )


@pytest.mark.parametrize("code", [421, 450, 500, 501, 550])
def test_other_refusals_of_pass_are_failed_logins(code: int) -> None:
    text = b"%d No.\r\n" % code
    play(
        [
            GREETED,
            *user_331(),
            Client(b"PASS x\r\n") >> to_server(b"PASS x\r\n"),
            Server(text) >> [to_client(text), failed("alice", code)],
        ],
        notes=True,
    )


def test_530_to_user_is_a_failed_login() -> None:
    # vsftpd refuses a name on its userlist at USER, before any password.
    play(
        [
            GREETED,
            Client(b"USER root\r\n") >> to_server(b"USER root\r\n"),
            Server(b"530 Permission denied.\r\n") >> [to_client(b"530 Permission denied.\r\n"), failed("root", 530)],
        ],
        notes=True,
    )


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        (b"USER alice", b"331 Password required"),
        (b"USER alice", b"501 Bad user name"),  # a syntax error, not a verdict
        (b"PASS x", b"503 Login with USER first."),  # says nothing of the password
        (b"PASS x", b"202 Already logged in."),
        (b"PASS x", b"332 Need account for login."),
        (b"SITE 230", b"230 Not a login at all"),
        (b"NOOP", b"530 Please login with USER and PASS."),
    ],
)
def test_replies_that_decide_no_login_write_no_line(command: bytes, answer: bytes) -> None:
    play(
        [
            GREETED,
            Client(command + b"\r\n") >> to_server(command + b"\r\n"),
            Server(answer + b"\r\n") >> to_client(answer + b"\r\n"),
        ],
        notes=True,
    )


def test_refused_anonymous_is_a_failed_login() -> None:
    play(
        [
            GREETED,
            Client(b"USER Anonymous\r\n")
            >> [failed_anonymous("Anonymous"), to_client(b"530 Anonymous logins are not allowed here.\r\n")],
        ],
        policy=Policy(deny_anonymous=True),
        notes=True,
    )


def test_a_pass_after_refused_anonymous_is_for_the_user_the_backend_knows() -> None:
    # The backend never saw "USER ftp": the PASS goes with its last USER.
    play(
        [
            GREETED,
            *user_331(),
            Client(b"USER ftp\r\n")
            >> [failed_anonymous("ftp"), to_client(b"530 Anonymous logins are not allowed here.\r\n")],
            Client(b"PASS x\r\n") >> to_server(b"PASS x\r\n"),
            Server(b"530 Login incorrect.\r\n") >> [to_client(b"530 Login incorrect.\r\n"), failed("alice", 530)],
        ],
        policy=Policy(deny_anonymous=True),
        notes=True,
    )


def test_the_password_is_in_no_login_line() -> None:
    out = replay(
        [
            Server(b"220 ready\r\n"),
            Client(b"USER alice\r\nPASS hunter2\r\nUSER alice\r\nPASS hunter3\r\n"),
            Server(b"331 Password required\r\n530 Login incorrect.\r\n331 Password required\r\n230 Logged in\r\n"),
        ],
        notes=True,
    )
    notes = [item for item in out if isinstance(item, Note)]
    assert [note.event for note in notes if note.level is not Level.DEBUG] == ["login failed", "login"]
    assert "hunter" not in repr(notes)


# -- the user name is the client's: safe for a log line ---------------------------


def test_a_hostile_user_name_is_escaped_in_the_line() -> None:
    # Control bytes and a lone IAC never get this far (parse_command refuses
    # them); what does: invalid UTF-8, C1 controls, line separators, bidi
    # overrides.
    name = b"x\xfe\xc2\x85\xe2\x80\xa8\xe2\x80\xae\\y"
    play(
        [
            GREETED,
            *user_331(name),
            Client(b"PASS x\r\n") >> to_server(b"PASS x\r\n"),
            Server(b"530 No\r\n") >> [to_client(b"530 No\r\n"), failed("x\\xfe\\x85\\u2028\\u202e\\\\y", 530)],
        ],
        notes=True,
    )


@pytest.mark.parametrize(
    ("name", "logged"),
    [
        (b"alice", "alice"),
        ("j\u00fcrgen".encode(), "j\u00fcrgen"),  # printable UTF-8 stays as it is
        (b'x" client=198.51.100.9 "', 'x" client=198.51.100.9 "'),  # printable: JSON and fail2ban's anchor handle it
        (b"a\nb\r\x1b[31mc\x00", "a\\x0ab\\x0d\\x1b[31mc\\x00"),
        (b"\\x0a", "\\\\x0a"),  # a literal backslash never passes for an escape
        (b"\xed\xb2\x80", "\\xed\\xb2\\x80"),  # an encoded surrogate is not UTF-8
        ("\U0001f600\U000e0041".encode(), "\U0001f600\\U000e0041"),  # a tag character is not printable
    ],
)
def test_loggable(name: bytes, logged: str) -> None:
    assert loggable(name) == logged


def test_loggable_is_bounded_and_never_cuts_an_escape() -> None:
    assert loggable(b"a" * 1000) == "a" * MAX_LOGGED_USER + CUT
    assert loggable(b"a" * MAX_LOGGED_USER) == "a" * MAX_LOGGED_USER
    cut = loggable(b"a" * (MAX_LOGGED_USER - 2) + b"\xff")
    assert cut == "a" * (MAX_LOGGED_USER - 2) + CUT
    assert len(loggable(b"\xff" * 1000)) == MAX_LOGGED_USER + len(CUT)
