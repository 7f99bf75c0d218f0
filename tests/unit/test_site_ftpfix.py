"""SITE FTPFIX: the subcommand ftpfix answers itself for ``ftpfix diagnose``.

Every transcript runs whole and one byte at a time (``play``). The backend
never sees the subcommand, and the reply carries nothing the client sent.
"""

from __future__ import annotations

import pytest

from ftpfix import __version__
from ftpfix.protocol import OpenPassive, Policy

from .test_session import GREETING, LOGIN, PUBLIC_227
from .transcript import Client, Opened, Server, both_ways, play, to_client, to_server

POLICY = Policy(passive_ports=range(50000, 50020))


def site_reply(last: str, ports: str = "50000-50019") -> bytes:
    return (
        f"211-ftpfix {__version__}\r\n passive-ports: {ports}\r\n last-pasv: {last}\r\n211 End of SITE FTPFIX.\r\n"
    ).encode()


def test_before_any_pasv_it_says_none() -> None:
    play([*LOGIN, Client(b"SITE FTPFIX\r\n") >> to_client(site_reply("none"))], policy=POLICY)


@pytest.mark.parametrize("spelling", [b"SITE FTPFIX", b"site ftpfix", b"SITE ftpfix ", b"Site FtpFix"])
def test_any_case_is_ftpfix_s_and_never_reaches_the_backend(spelling: bytes) -> None:
    play([*LOGIN, Client(spelling + b"\r\n") >> to_client(site_reply("none"))], policy=POLICY)


@pytest.mark.parametrize(("sent", "last"), [(b"PASV", "PASV"), (b"pasv", "PASV"), (b"P@SW", "P@SW (repaired)")])
def test_it_says_how_the_last_pasv_arrived(sent: bytes, last: str) -> None:
    play(
        [
            *LOGIN,
            Client(sent + b"\r\n") >> to_server(b"PASV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n")
            >> OpenPassive(advertised_host="192.168.123.1", backend_port=30000),
            Opened("203.0.113.1", 50000) >> to_client(PUBLIC_227),
            Client(b"SITE FTPFIX\r\n") >> to_client(site_reply(last)),
        ],
        policy=POLICY,
    )


def test_the_newest_pasv_counts() -> None:
    steps = [*LOGIN]
    for sent in (b"P@SW", b"PASV"):
        steps += [
            Client(sent + b"\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n"),
            Opened("203.0.113.1", 50000),
        ]
    steps.append(Client(b"SITE FTPFIX\r\n"))
    assert both_ways(steps, policy=POLICY)[-1].data.endswith(site_reply("PASV"))


def test_an_epsv_is_not_a_pasv() -> None:
    steps = [
        *LOGIN,
        Client(b"EPSV\r\n"),
        Server(b"229 Entering Extended Passive Mode (|||30000|)\r\n"),
        Opened("203.0.113.1", 50000),
        Client(b"SITE FTPFIX\r\n"),
    ]
    assert both_ways(steps, policy=POLICY)[-1].data.endswith(site_reply("none"))


def test_without_a_known_range_it_says_unknown() -> None:
    play([*LOGIN, Client(b"SITE FTPFIX\r\n") >> to_client(site_reply("none", ports="unknown"))])


def test_before_login_it_is_refused_and_not_forwarded() -> None:
    play(
        [
            GREETING >> to_client(GREETING.data),
            Client(b"SITE FTPFIX\r\n") >> to_client(b"530 Log in first (SITE FTPFIX).\r\n"),
        ]
    )


def test_other_site_commands_still_go_to_the_backend() -> None:
    play([*LOGIN, Client(b"SITE CHMOD 644 a\r\n") >> to_server(b"SITE CHMOD 644 a\r\n")])
    play([*LOGIN, Client(b"SITE FTPFIXER\r\n") >> to_server(b"SITE FTPFIXER\r\n")])
    play([*LOGIN, Client(b"SITE\r\n") >> to_server(b"SITE\r\n")])


NO_ARGUMENT = b"501 SITE FTPFIX takes no argument.\r\n"
CONTROL_BYTES = b"501 Syntax error in parameters: control characters are not allowed.\r\n"


@pytest.mark.parametrize(
    ("argument", "answer"),
    [
        (b"x", NO_ARGUMENT),
        (b"DELE x", NO_ARGUMENT),
        (b"A" * 3000, NO_ARGUMENT),
        (b"%s%n", NO_ARGUMENT),
        (b"\xff\xfe", CONTROL_BYTES),  # refused by the command grammar before SITE is looked at
        (b"\x1b[31m", CONTROL_BYTES),
    ],
    ids=["word", "dele", "long", "format", "binary", "ansi"],
)
def test_an_argument_is_refused_never_echoed_never_forwarded(argument: bytes, answer: bytes) -> None:
    play([*LOGIN, Client(b"SITE FTPFIX " + argument + b"\r\n") >> to_client(answer)], policy=POLICY)


def test_a_pipelined_command_after_it_is_a_command_of_its_own() -> None:
    """``SITE FTPFIX\\r\\nDELE x``: two commands, each answered in its turn; the
    DELE is forwarded as itself, and the SITE reply waits for nothing."""
    play(
        [
            *LOGIN,
            Client(b"SITE FTPFIX\r\nDELE x\r\n") >> [to_client(site_reply("none")), to_server(b"DELE x\r\n")],
            Server(b"250 DELE command successful\r\n") >> to_client(b"250 DELE command successful\r\n"),
        ],
        policy=POLICY,
    )


def test_its_reply_waits_its_turn_behind_a_forwarded_command() -> None:
    play(
        [
            *LOGIN,
            Client(b"NOOP\r\nSITE FTPFIX\r\n") >> to_server(b"NOOP\r\n"),
            Server(b"200 NOOP ok\r\n") >> to_client(b"200 NOOP ok\r\n" + site_reply("none")),
        ],
        policy=POLICY,
    )


@pytest.mark.parametrize(
    ("outcome", "answer"),
    [(b"230 Logged in\r\n", site_reply("none")), (b"530 Login incorrect\r\n", b"530 Log in first (SITE FTPFIX).\r\n")],
    ids=["logged-in", "refused"],
)
def test_pipelined_behind_a_login_it_is_answered_as_the_login_went(outcome: bytes, answer: bytes) -> None:
    """USER, PASS and SITE FTPFIX in one write: whether the client has logged in is decided in the
    SITE FTPFIX's turn, after the PASS's reply, not when its line arrived (it was a 530 either way)."""
    steps = [
        GREETING,
        Client(b"USER alice\r\nPASS secret\r\nSITE FTPFIX\r\n"),
        Server(b"331 Password required\r\n"),
        Server(outcome),
    ]
    assert both_ways(steps, policy=POLICY)[-1].data == b"331 Password required\r\n" + outcome + answer
