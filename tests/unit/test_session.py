"""The control-channel core, as transcripts: client says, server says, ftpfix does."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType

import pytest

from ftpfix.protocol import (
    AbortTransfer,
    AwaitQuiet,
    BackendError,
    CancelTransfer,
    Close,
    DataReceived,
    FinishTransfer,
    Note,
    OpenActive,
    OpenPassive,
    PassiveFailed,
    PassiveOpened,
    Policy,
    ReadOn,
    SendTo,
    Session,
    SettleTransfer,
    Side,
    TransferStarted,
)

from .transcript import (
    ActiveFailed,
    ActiveOpened,
    Client,
    ClientClosed,
    Expect,
    Failed,
    Finished,
    Lost,
    Opened,
    Quiet,
    Server,
    ServerClosed,
    Settled,
    Step,
    both_ways,
    merge,
    play,
    replay,
    to_client,
    to_server,
)

GREETING = Server(b"220 ProFTPD Server (ProFTPD) [192.168.123.1]\r\n")
#: The greeting, checked: for playbooks that say what ftpfix sends from the first byte on.
GREETED = GREETING >> to_client(GREETING.data)
LOGIN = [
    GREETING,
    Client(b"USER alice\r\n"),
    Server(b"331 Password required\r\n"),
    Client(b"PASS secret\r\n"),
    Server(b"230 Logged in\r\n"),
]
LOGIN_OUT = [
    to_client(b"220 ProFTPD Server (ProFTPD) [192.168.123.1]\r\n"),
    to_server(b"USER alice\r\n"),
    to_client(b"331 Password required\r\n"),
    to_server(b"PASS secret\r\n"),
    to_client(b"230 Logged in\r\n"),
]
PUBLIC_227 = b"227 Entering Passive Mode (203,0,113,1,195,80).\r\n"


def inputs(playbook: list[Step | Expect]) -> list[Step]:
    """A playbook's steps without what they expect, for checks play cannot make (that something never happens)."""
    return [item.step if isinstance(item, Expect) else item for item in playbook]


def test_login_is_relayed_unchanged() -> None:
    assert both_ways(LOGIN) == LOGIN_OUT


def test_pasv_227_is_rewritten_to_the_public_address_and_leased_port() -> None:
    play(
        [
            *LOGIN,
            Client(b"PASV\r\n") >> to_server(b"PASV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n")
            >> OpenPassive(advertised_host="192.168.123.1", backend_port=30000),
            Opened("203.0.113.1", 50000) >> to_client(PUBLIC_227),
        ]
    )


@pytest.mark.parametrize("spelling", [b"P@SW", b"p@sw", b"P@sw", b"pasv"])
def test_smc_mangled_pasv_reaches_the_backend_as_pasv(spelling: bytes) -> None:
    play([GREETING, Client(spelling + b"\r\n") >> to_server(b"PASV\r\n")])


def test_aliases_come_from_the_policy() -> None:
    policy = Policy(aliases=MappingProxyType({b"XPWD": b"PWD"}))
    play(
        [
            GREETING,
            Client(b"xpwd\r\nP@SW\r\n") >> to_server(b"PWD\r\n"),
            # Without the default alias, P@SW is no verb: ftpfix answers it itself.
            Server(b'257 "/"\r\n') >> to_client(b'257 "/"\r\n500 Syntax error, command unrecognized.\r\n'),
        ],
        policy=policy,
    )


def test_alias_keeps_the_argument() -> None:
    policy = Policy(aliases=MappingProxyType({b"XMKD": b"MKD"}))
    play([GREETING, Client(b"XMKD a b\r\n") >> to_server(b"MKD a b\r\n")], policy=policy)


@pytest.mark.parametrize(
    "reply",
    [
        b"227 Entering Passive Mode (192,168,123,1,117,48).",
        b"227 Entering Passive Mode (192,168,123,1,117,48)",
        b"227 Entering Passive Mode 192,168,123,1,117,48",
        b"227 =192,168,123,1,117,48",
        b"227 Passive mode on: 192,168,123,001,117,048 - have fun",
        b"227-Entering Passive Mode\r\n227 (192,168,123,1,117,48)",
        b"227-Some servers announce\r\n 192,168,123,1,117,48\r\n227 on a continuation line",
    ],
)
def test_every_227_form_of_rfc_1123_is_understood(reply: bytes) -> None:
    play(
        [
            GREETING,
            Client(b"PASV\r\n"),
            Server(reply + b"\r\n") >> OpenPassive("192.168.123.1", 30000),
            Opened("203.0.113.1", 50000) >> to_client(PUBLIC_227),
        ]
    )


@pytest.mark.parametrize(
    "reply",
    [
        b"227 Entering Passive Mode (192,168,123,300,117,48).",
        b"227 Entering Passive Mode (192,168,123,1,256,0)",
        b"227 no numbers at all",
        b"227 (1,2,3,4,0,0)",
        # Ports no server offers for PASV: privileged, or the control port.
        b"227 Entering Passive Mode (192,168,123,1,0,22).",
        b"227 Entering Passive Mode (192,168,123,1,0,21).",
        b"229 Entering Extended Passive Mode (|||80|)",
    ],
)
def test_an_unusable_227_gets_425_and_opens_nothing(reply: bytes) -> None:
    playbook = [
        GREETING,
        Client(b"PASV\r\nNOOP\r\n"),
        Server(reply + b"\r\n")
        >> [
            to_client(b"425 Can't open data connection: the server's passive reply was unusable.\r\n"),
            to_server(b"NOOP\r\n"),
        ],
        Server(b"200 NOOP ok\r\n") >> to_client(b"200 NOOP ok\r\n"),
    ]
    play(playbook)
    assert not any(isinstance(command, OpenPassive) for command in both_ways(inputs(playbook)))


def test_a_227_outside_the_backends_passive_range_opens_nothing() -> None:
    policy = Policy(backend_passive_ports=range(40000, 40010))
    play(
        [
            GREETING,
            Client(b"PASV\r\n"),
            Server(b"227 (192,168,123,1,156,69)\r\n") >> OpenPassive("192.168.123.1", 40005),
        ],
        policy=policy,
    )
    play(
        [
            GREETING,
            Client(b"PASV\r\n"),
            Server(b"227 (192,168,123,1,156,164)\r\n")
            >> to_client(b"425 Can't open data connection: the server's passive reply was unusable.\r\n"),
        ],
        policy=policy,
    )


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"RETR 227 (10,0,0,1,0,22)", b"550 227 (10,0,0,1,0,22): No such file or directory"),
        (b"RETR 10,0,0,1,0,22", b"550 10,0,0,1,0,22: No such file or directory"),
        (b"SITE 227 (10,0,0,1,0,22)", b"227 (10,0,0,1,0,22)"),
        (b"CWD x", b"250-227 Entering Passive Mode (10,0,0,1,0,22)\r\n250 CWD ok"),
    ],
)
def test_an_injected_227_never_opens_a_mapping(command: bytes, reply: bytes) -> None:
    # A refused RETR also ends the data connection it would have used.
    refused_transfer = [CancelTransfer()] if command.startswith(b"RETR") else []
    playbook = [
        GREETING,
        Client(command + b"\r\n"),
        Server(reply + b"\r\n") >> [*refused_transfer, to_client(reply + b"\r\n")],
    ]
    play(playbook)
    assert not any(isinstance(item, OpenPassive) for item in both_ways(inputs(playbook)))


def test_a_banner_with_six_numbers_opens_nothing() -> None:
    out = both_ways([Server(b"220-Welcome 10,0,0,1,0,22\r\n227 (10,0,0,1,0,22)\r\n220 ready\r\n"), Client(b"NOOP\r\n")])
    assert not any(isinstance(item, OpenPassive) for item in out)


def test_pipelined_commands_keep_their_replies_in_order() -> None:
    play(
        [
            GREETING,
            Client(b"TYPE I\r\nNOOP\r\nPWD\r\n") >> to_server(b"TYPE I\r\nNOOP\r\nPWD\r\n"),
            Server(b'200 Type set to I\r\n200 NOOP ok\r\n257 "/"\r\n')
            >> to_client(b'200 Type set to I\r\n200 NOOP ok\r\n257 "/"\r\n'),
        ]
    )


def test_a_pasv_goes_out_alone_and_later_commands_wait_for_its_227() -> None:
    # Rule 3: nothing is outstanding when PASV goes out, and nothing follows
    # it until its reply is complete, so every 227 answers exactly one PASV.
    session = Session()
    session.receive(DataReceived(Side.SERVER, GREETING.data))
    assert merge(session.receive(DataReceived(Side.CLIENT, b"NOOP\r\nPASV\r\nNOOP\r\n"))) == [to_server(b"NOOP\r\n")]
    assert merge(session.receive(DataReceived(Side.SERVER, b"200 NOOP ok\r\n"))) == [
        to_client(b"200 NOOP ok\r\n"),
        to_server(b"PASV\r\n"),
    ]
    out = session.receive(DataReceived(Side.SERVER, b"227 (192,168,123,1,117,48)\r\n"))
    assert out == [OpenPassive("192.168.123.1", 30000)]
    assert session.paused
    assert merge(session.receive(PassiveOpened(IPv4Address("203.0.113.1"), 50000))) == [
        to_client(PUBLIC_227),
        to_server(b"NOOP\r\n"),
    ]


def test_a_pasv_waits_while_a_reply_line_is_half_read() -> None:
    session = Session()
    session.receive(DataReceived(Side.SERVER, GREETING.data))
    session.receive(DataReceived(Side.CLIENT, b"STAT .\r\nPASV\r\n"))
    # The STAT reply looks complete, but more of the stream is on its way.
    out = merge(session.receive(DataReceived(Side.SERVER, b"213-Status\r\n x\r\n213 y\r\n227 Entering")))
    assert to_server(b"PASV\r\n") not in out
    out = merge(session.receive(DataReceived(Side.SERVER, b" Passive Mode (127,0,0,1,8,174)\r\n")))
    assert not any(isinstance(command, OpenPassive) for command in out)
    assert out[-2:] == [
        to_client(b"421 Service not available: the server sent a reply to no command.\r\n"),
        Close("backend reply answered no command"),
    ]


def test_a_command_split_across_segments() -> None:
    play(
        [
            GREETING,
            Client(b"RE") >> [],
            Client(b"TR some") >> [],
            Client(b" file.bin\r") >> [],
            Client(b"\n") >> [to_server(b"RETR some file.bin\r\n"), TransferStarted(download=True)],
        ]
    )


def test_bare_lf_line_endings_become_crlf_both_ways() -> None:
    play(
        [
            Server(b"220 hi\n") >> to_client(b"220 hi\r\n"),
            Client(b"NOOP\n") >> to_server(b"NOOP\r\n"),
            Server(b"200-a\n200 b\n") >> to_client(b"200-a\r\n200 b\r\n"),
        ]
    )


def test_rfc_959_multi_line_reply_with_digits_on_a_continuation_line() -> None:
    reply = b"123-First line\r\nSecond line\r\n234 A line beginning with numbers\r\n123 The last line\r\n"
    play([GREETING, Client(b"HELP\r\nNOOP\r\n"), Server(reply + b"200 ok\r\n") >> to_client(reply + b"200 ok\r\n")])


def test_a_locally_answered_command_waits_for_earlier_replies() -> None:
    play(
        [
            GREETING,
            Client(b"NOOP\r\n\r\nSYST\r\n") >> to_server(b"NOOP\r\nSYST\r\n"),
            Server(b"200 NOOP ok\r\n215 UNIX\r\n")
            >> to_client(b"200 NOOP ok\r\n500 Empty command line.\r\n215 UNIX\r\n"),
        ]
    )


def test_an_over_long_line_gets_500_and_the_session_goes_on() -> None:
    policy = Policy(max_line=64)
    play(
        [
            GREETED,
            Client(b"STOR " + b"x" * 100 + b"\r\nNOOP\r\n")
            >> [to_client(b"500 Command line too long (the limit is 64 bytes).\r\n"), to_server(b"NOOP\r\n")],
            Server(b"200 ok\r\n") >> to_client(b"200 ok\r\n"),
        ],
        policy=policy,
    )


def test_a_client_that_keeps_sending_over_long_lines_is_closed() -> None:
    policy = Policy(max_line=16, max_long_lines=3)
    play(
        [
            GREETED,
            Client((b"y" * 40 + b"\r\n") * 4)
            >> [
                to_client(b"500 Command line too long (the limit is 16 bytes).\r\n" * 3),
                Close("client kept sending over-long lines"),
            ],
        ],
        policy=policy,
    )


def test_a_line_that_never_ends_is_bounded() -> None:
    session = Session(Policy(max_line=1024))
    for _ in range(100):
        session.receive(DataReceived(Side.CLIENT, b"A" * 1000))
    assert session._client_lines.pending <= 2048


def test_the_final_reply_to_a_transfer_waits_for_the_data_relay() -> None:
    # A command pipelined behind a transfer waits for the transfer's reply:
    # ProFTPD would answer it first.
    play(
        [
            GREETING,
            Client(b"RETR f\r\nNOOP\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Server(b"150 Opening BINARY mode\r\n226 Transfer complete\r\n")
            >> [to_client(b"150 Opening BINARY mode\r\n"), FinishTransfer()],
            Finished() >> [to_client(b"226 Transfer complete\r\n"), to_server(b"NOOP\r\n")],
            Server(b"200 NOOP ok\r\n") >> to_client(b"200 NOOP ok\r\n"),
        ]
    )


def test_abor_after_the_backend_answered_is_answered_by_ftpfix() -> None:
    play(
        [
            GREETING,
            Client(b"RETR f\r\n"),
            Server(b"150 ok\r\n226 Transfer complete\r\n") >> [to_client(b"150 ok\r\n"), FinishTransfer()],
            # The backend is not asked: for it the transfer is over already.
            Client(b"ABOR\r\n") >> AbortTransfer(),
            Finished("aborted")
            >> to_client(b"426 Connection closed; transfer aborted: aborted.\r\n226 Abort successful.\r\n"),
        ]
    )


def test_a_server_that_skips_its_abor_reply_is_kept_in_step() -> None:
    # pure-ftpd answers the transfer, finishes it, and never answers ABOR.
    play(
        [
            GREETING,
            Client(b"RETR f\r\nABOR\r\n"),
            Server(b"150 ok\r\n426 Aborted\r\n"),
            Client(b"PWD\r\n") >> to_server(b"PWD\r\n"),
            Server(b'257 "/"\r\n') >> to_client(b'226 Abort successful.\r\n257 "/"\r\n'),
        ]
    )


def test_a_failed_relay_never_gets_a_2xx() -> None:
    # The backend saw a clean end (or wrote into a buffer) and says 226;
    # the relay knows better.
    play(
        [
            GREETING,
            Client(b"STOR f\r\n"),
            Server(b"150 ok\r\n226 Transfer complete\r\n"),
            Finished("upload: Connection reset by peer")
            >> to_client(b"426 Connection closed; transfer aborted: upload: Connection reset by peer.\r\n"),
        ]
    )
    play(
        [
            GREETING,
            Client(b"RETR f\r\n"),
            Server(b"150 ok\r\n226 Transfer complete\r\n"),
            Finished("cannot connect to the client", connected=False)
            >> to_client(b"425 Can't open data connection: cannot connect to the client.\r\n"),
        ]
    )


def test_a_refused_transfer_is_passed_on_at_once_and_ends_the_data_connection() -> None:
    play(
        [
            GREETING,
            Client(b"RETR missing.txt\r\n") >> [to_server(b"RETR missing.txt\r\n"), TransferStarted(download=True)],
            Server(b"550 Failed to open file.\r\n") >> [CancelTransfer(), to_client(b"550 Failed to open file.\r\n")],
        ]
    )


def test_a_non_transfer_reply_is_not_held() -> None:
    out = both_ways([GREETING, Client(b"SIZE f\r\n"), Server(b"213 42\r\n")])
    assert FinishTransfer() not in out


def test_epsv_is_answered_from_a_backend_pasv() -> None:
    play(
        [
            GREETING,
            Client(b"EPSV\r\n") >> to_server(b"PASV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n")
            >> OpenPassive("192.168.123.1", 30000, extended=True),
            Opened("203.0.113.1", 50001) >> to_client(b"229 Entering Extended Passive Mode (|||50001|)\r\n"),
        ],
        policy=Policy(epsv="translate"),
    )


def test_epsv_for_ipv6_gets_522_and_epsv_all_locks_out_pasv() -> None:
    play(
        [
            GREETED,
            Client(b"EPSV 2\r\nEPSV ALL\r\nPASV\r\nPORT 1,2,3,4,5,6\r\nEPSV\r\n")
            >> [
                to_client(
                    b"522 Network protocol not supported, use (1)\r\n"
                    b"200 EPSV ALL command successful.\r\n"
                    b"503 PASV not allowed after EPSV ALL.\r\n"
                    b"503 PORT not allowed after EPSV ALL.\r\n"
                ),
                to_server(b"EPSV\r\n"),
            ],
        ]
    )


def test_an_exhausted_pool_gets_425() -> None:
    play(
        [
            GREETING,
            Client(b"PASV\r\n"),
            Server(b"227 (192,168,123,1,117,48)\r\n"),
            Failed("no free passive port, try again later")
            >> to_client(b"425 Can't open data connection: no free passive port, try again later.\r\n"),
        ]
    )


def test_a_new_pasv_asks_for_a_new_mapping() -> None:
    reply = Server(b"227 (192,168,123,1,117,48)\r\n")
    out = both_ways(
        [
            GREETING,
            Client(b"PASV\r\n"),
            reply,
            Opened("203.0.113.1", 50000),
            Client(b"PASV\r\n"),
            reply,
            Opened("203.0.113.1", 50001),
        ]
    )
    assert [item for item in out if isinstance(item, OpenPassive)] == [OpenPassive("192.168.123.1", 30000)] * 2


def test_the_backend_dying_mid_session_gets_421() -> None:
    play(
        [
            *LOGIN,
            Client(b"RETR f\r\n"),
            Server(b"150 Opening\r\n") >> to_client(b"150 Opening\r\n"),
            ServerClosed()
            >> [
                to_client(b"421 Service not available, the server closed the connection.\r\n"),
                Close("backend closed"),
            ],
        ]
    )


def test_the_backend_closing_after_quit_is_a_normal_end() -> None:
    play(
        [
            *LOGIN,
            Client(b"QUIT\r\n") >> to_server(b"QUIT\r\n"),
            Server(b"221 Goodbye.\r\n") >> to_client(b"221 Goodbye.\r\n"),
            ServerClosed() >> Close("quit"),
        ]
    )


def test_a_client_that_half_closes_after_quit_still_gets_its_221() -> None:
    play(
        [
            *LOGIN,
            Client(b"QUIT\r\n") >> to_server(b"QUIT\r\n"),
            ClientClosed() >> [],
            Server(b"221 Goodbye.\r\n") >> [to_client(b"221 Goodbye.\r\n"), Close("quit")],
        ]
    )


def test_a_malformed_backend_line_is_a_backend_error_with_a_421() -> None:
    session = Session()
    with pytest.raises(BackendError) as caught:
        session.receive(DataReceived(Side.SERVER, b"HTTP/1.1 400 Bad Request\r\n"))
    assert caught.value.reply.startswith(b"421 ")


def test_invalid_utf8_passes_as_bytes_but_nul_never_reaches_the_backend() -> None:
    play(
        [
            GREETING,
            Client(b"DELE caf\xe9\xfe.bin\r\n") >> to_server(b"DELE caf\xe9\xfe.bin\r\n"),
            Server(b"550 caf\xe9\xfe.bin: nope\r\n") >> to_client(b"550 caf\xe9\xfe.bin: nope\r\n"),
        ]
    )
    # vsftpd turns NUL into LF in its replies: a name with NUL forges lines.
    play(
        [
            GREETED,
            Client(b"MKD x\x00213 y\x00227 Entering Passive Mode (127,0,0,1,8,174)\r\n")
            >> to_client(b"501 Syntax error in parameters: control characters are not allowed.\r\n"),
        ]
    )


def test_telnet_interrupt_before_abor_does_not_hide_the_verb() -> None:
    play(
        [
            GREETING,
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Client(b"\xff\xf4\xff\xf2ABOR\r\n")
            >> [
                to_server(b"\xff\xf4\xff"),
                SendTo(Side.SERVER, b"\xf2", urgent=True),
                to_server(b"ABOR\r\n"),
                AbortTransfer(),
            ],
            Server(b"150 ok\r\n426 aborted\r\n226 ABOR ok\r\n")
            >> [to_client(b"150 ok\r\n"), CancelTransfer(), to_client(b"426 aborted\r\n226 ABOR ok\r\n")],
        ]
    )


def test_the_password_is_never_in_a_note() -> None:
    out = replay([GREETING, Client(b"USER alice\r\nPASS hunter2\r\n")], notes=True)
    notes = [item for item in out if isinstance(item, Note)]
    assert notes and "hunter2" not in repr(notes)


def test_the_user_name_is_kept_for_the_session_summary() -> None:
    session = Session()
    session.receive(DataReceived(Side.CLIENT, b"USER alice\r\n"))
    assert session.user == "alice"


def test_passive_answers_without_a_pending_mapping_are_a_shell_bug() -> None:
    with pytest.raises(RuntimeError):
        Session().receive(PassiveOpened(IPv4Address("203.0.113.1"), 50000))
    with pytest.raises(RuntimeError):
        Session().receive(PassiveFailed("x"))


# -- EPSV -------------------------------------------------------------------

EPSV_229 = b"229 Entering Extended Passive Mode (|||50001|)\r\n"


@pytest.mark.parametrize(
    "reply",
    [
        b"229 Entering Extended Passive Mode (|||30000|)",
        b"229 Extended Passive mode OK (|||30000|)",
        b"229 EPSV ok (!!!30000!) have fun",
        b"229-Entering\r\n229 (###30000#)",
    ],
)
def test_epsv_passthrough_parses_any_229(reply: bytes) -> None:
    play(
        [
            GREETING,
            Client(b"EPSV\r\n") >> to_server(b"EPSV\r\n"),
            Server(reply + b"\r\n") >> OpenPassive("", 30000, extended=True),
            Opened("203.0.113.1", 50001) >> to_client(EPSV_229),
        ],
        policy=Policy(epsv="passthrough"),
    )


def test_epsv_auto_falls_back_to_pasv_when_the_backend_refuses() -> None:
    play(
        [
            GREETING,
            Client(b"EPSV\r\n") >> to_server(b"EPSV\r\n"),
            Server(b"500 EPSV not understood\r\n") >> to_server(b"PASV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48)\r\n")
            >> OpenPassive("192.168.123.1", 30000, extended=True),
            Opened("203.0.113.1", 50001) >> to_client(EPSV_229),
            # Learned: the next EPSV goes to the backend as PASV straight away.
            Client(b"EPSV\r\n") >> to_server(b"PASV\r\n"),
        ]
    )


def test_epsv_auto_learns_from_feat() -> None:
    feat = b"211-Features:\r\n MDTM\r\n SIZE\r\n211 End\r\n"
    play([GREETING, Client(b"FEAT\r\n"), Server(feat), Client(b"EPSV\r\n"), Quiet() >> to_server(b"PASV\r\n")])


def test_after_a_multi_line_reply_pasv_waits_until_the_backend_is_quiet() -> None:
    # pure-ftpd's STAT -1 lists names at the start of lines: a client can
    # forge the end of the reply, aligned to where ftpfix's read ends.
    session = Session()
    session.receive(DataReceived(Side.SERVER, GREETING.data))
    session.receive(DataReceived(Side.CLIENT, b"STAT -1\r\nPASV\r\n"))
    out = session.receive(DataReceived(Side.SERVER, b"213-Status\r\n a\r\n213 x\r\n"))
    assert out[-1] == AwaitQuiet()
    assert not session.can_advance
    # The rest of the real reply arrives: it answers nothing.
    out = session.receive(DataReceived(Side.SERVER, b"227-Entering Passive Mode (127,0,0,1,86,79)\r\n213 End.\r\n"))
    assert out[-2:] == [
        to_client(b"421 Service not available: the server sent a reply to no command.\r\n"),
        Close("backend reply answered no command"),
    ]


def test_the_quiet_backend_lets_pasv_go() -> None:
    play(
        [
            GREETING,
            Client(b"STAT -1\r\nPASV\r\n"),
            Server(b"213-Status\r\n a\r\n213 End\r\n") >> [to_client(b"213-Status\r\n a\r\n213 End\r\n"), AwaitQuiet()],
            Quiet() >> to_server(b"PASV\r\n"),
        ]
    )


def test_bytes_after_a_227_open_nothing() -> None:
    # Only when they arrive with it (the shell reads all the socket holds):
    # one byte at a time, the 227 opens a port and the bytes end the session.
    out = replay([GREETING, Client(b"PASV\r\n"), Server(b"227 (127,0,0,1,86,79)\r\n213 End.\r\n")])
    assert not any(isinstance(item, OpenPassive) for item in out)
    assert out[-2:] == [
        to_client(b"421 Service not available: the server sent a reply to no command.\r\n"),
        Close("backend reply answered no command"),
    ]


def test_a_server_that_answers_epsv_with_227_is_rewritten_by_code() -> None:
    play(
        [
            GREETING,
            Client(b"EPSV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48)\r\n"),
            Opened("203.0.113.1", 50001) >> to_client(EPSV_229),
        ]
    )


def test_a_server_that_answers_pasv_with_229_gives_the_client_a_227() -> None:
    play(
        [
            GREETING,
            Client(b"PASV\r\n"),
            Server(b"229 Entering Extended Passive Mode (|||30000|)\r\n") >> OpenPassive("", 30000),
            Opened("203.0.113.1", 50000) >> to_client(PUBLIC_227),
        ]
    )


def test_feat_lists_what_ftpfix_provides() -> None:
    feat = b"211-Extensions supported:\r\n UTF8\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n MDTM\r\n211 End.\r\n"
    play(
        [
            GREETING,
            Client(b"FEAT\r\n"),
            Server(feat) >> to_client(b"211-Extensions supported:\r\n UTF8\r\n MDTM\r\n EPRT\r\n EPSV\r\n211 End.\r\n"),
        ]
    )


def test_auth_tls_is_refused_so_ftpfix_can_read_the_control_channel() -> None:
    play(
        [
            GREETING,
            Client(b"AUTH TLS\r\n")
            >> to_client(b"502 AUTH is not available through this FTP proxy; use plain FTP.\r\n"),
        ]
    )


# -- active mode ---------------------------------------------------------------

CLIENT_IP = IPv4Address("198.51.100.10")


def active(script, policy: Policy | None = None):
    session_policy = policy or Policy()
    whole = replay(script, policy=session_policy, client=CLIENT_IP)
    assert replay(script, policy=session_policy, client=CLIENT_IP, byte_at_a_time=True) == whole
    return whole


def test_port_is_proxied_through_a_listener_of_ftpfix() -> None:
    play(
        [
            GREETING,
            Client(b"PORT 198,51,100,10,195,80\r\nRETR f\r\n") >> OpenActive("198.51.100.10", 50000),
            ActiveOpened("192.0.2.10", 40000) >> to_server(b"PORT 192,0,2,10,156,64\r\n"),
            Server(b"200 PORT ok\r\n")
            >> [to_client(b"200 PORT ok\r\n"), to_server(b"RETR f\r\n"), TransferStarted(download=True)],
        ],
        client=CLIENT_IP,
    )


def test_eprt_for_ipv4_and_ipv6() -> None:
    play(
        [
            GREETING,
            Client(b"EPRT |1|198.51.100.10|50000|\r\n") >> OpenActive("198.51.100.10", 50000),
            ActiveOpened("192.0.2.10", 40000) >> to_server(b"PORT 192,0,2,10,156,64\r\n"),
        ],
        client=CLIENT_IP,
    )
    play(
        [GREETING, Client(b"EPRT |3|x|50000|\r\n") >> to_client(b"522 Network protocol not supported, use (1,2)\r\n")],
        client=CLIENT_IP,
    )


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"PORT 203,0,113,99,195,80", b"501 PORT refused: the address must be your own (198.51.100.10).\r\n"),
        (b"EPRT |1|203.0.113.99|50000|", b"501 EPRT refused: the address must be your own (198.51.100.10).\r\n"),
        (b"PORT 198,51,100,10,0,25", b"504 PORT refused: port 25 is below 1024.\r\n"),
        (b"EPRT |1|198.51.100.10|21|", b"504 EPRT refused: port 21 is below 1024.\r\n"),
        (b"PORT 1,2,3", b"501 Syntax error in PORT: PORT takes six comma-separated numbers.\r\n"),
        (b"PORT 198,51,100,300,195,80", b"501 Syntax error in PORT: a number over 255 in PORT.\r\n"),
    ],
)
def test_bounce_attacks_are_refused_without_a_connection(command: bytes, reply: bytes) -> None:
    policy = Policy(fix_address=False) if b"203" in command else Policy()
    playbook = [GREETING, Client(command + b"\r\n") >> to_client(reply)]
    play(playbook, policy=policy, client=CLIENT_IP)
    assert not any(isinstance(item, OpenActive) for item in active(inputs(playbook), policy))


def test_a_public_third_party_address_is_refused_even_with_fix_address() -> None:
    play(
        [
            GREETING,
            Client(b"PORT 8,8,8,8,195,80\r\n")
            >> to_client(b"501 PORT refused: the address must be your own (198.51.100.10).\r\n"),
        ],
        client=CLIENT_IP,
    )


def test_a_client_behind_its_own_nat_gets_its_real_address_used() -> None:
    out = active(
        [GREETING, Client(b"PORT 10,0,0,5,195,80\r\n")],
        Policy(),
    )
    assert OpenActive("198.51.100.10", 50000) in out
    notes = replay([GREETING, Client(b"PORT 10,0,0,5,195,80\r\n")], client=CLIENT_IP, notes=True)
    assert Note("active mode address fixed", fields={"sent": "10.0.0.5", "used": "198.51.100.10"}) in notes


def test_active_mode_can_be_denied_or_passed_through() -> None:
    play(
        [
            GREETING,
            Client(b"PORT 198,51,100,10,195,80\r\n")
            >> to_client(b"502 PORT is disabled here; use passive mode (PASV or EPSV).\r\n"),
        ],
        policy=Policy(active="deny"),
        client=CLIENT_IP,
    )
    play(
        [GREETING, Client(b"PORT 198,51,100,10,195,80\r\n") >> to_server(b"PORT 198,51,100,10,195,80\r\n")],
        policy=Policy(active="passthrough"),
        client=CLIENT_IP,
    )


def test_commands_wait_while_the_active_listener_opens() -> None:
    play(
        [
            GREETING,
            Client(b"PORT 198,51,100,10,195,80\r\nNOOP\r\n") >> OpenActive("198.51.100.10", 50000),
            ActiveFailed("no listener")
            >> [to_client(b"425 Can't open data connection: no listener.\r\n"), to_server(b"NOOP\r\n")],
        ],
        client=CLIENT_IP,
    )


def test_abor_tears_down_the_data_connection_first() -> None:
    play(
        [
            GREETING,
            Client(b"RETR f\r\n\xff\xf4\xff\xf2ABOR\r\n")
            >> [
                to_server(b"RETR f\r\n"),
                TransferStarted(download=True),
                to_server(b"\xff\xf4\xff"),
                SendTo(Side.SERVER, b"\xf2", urgent=True),
                to_server(b"ABOR\r\n"),
                AbortTransfer(),
            ],
        ]
    )


@pytest.mark.parametrize("abor", [b"ABOR", b"abor", b"\xff\xf4\xff\xf2ABOR", b"\xff\xf4ABOR"])
def test_every_way_of_sending_abor_reaches_the_backend_in_the_rfc_959_form(abor: bytes) -> None:
    play(
        [
            GREETING,
            Client(b"STOR f\r\n" + abor + b"\r\n")
            >> [
                to_server(b"STOR f\r\n"),
                TransferStarted(download=False),
                to_server(b"\xff\xf4\xff"),
                SendTo(Side.SERVER, b"\xf2", urgent=True),
                to_server(b"ABOR\r\n"),
                AbortTransfer(),
            ],
        ]
    )


def test_abor_with_no_transfer_is_answered_by_ftpfix() -> None:
    # pure-ftpd never answers it, which would leave every later reply
    # paired with the command before it.
    play(
        [
            GREETED,
            Client(b"ABOR\r\nNOOP\r\n") >> [to_client(b"225 No transfer to abort.\r\n"), to_server(b"NOOP\r\n")],
            Server(b"200 NOOP ok\r\n") >> to_client(b"200 NOOP ok\r\n"),
        ]
    )


def test_pasv_from_an_ipv6_client_is_refused_and_epsv_works() -> None:
    client = IPv6Address("2001:db8::10")
    play(
        [
            GREETING,
            Client(b"PASV\r\nEPSV 1\r\nEPSV 2\r\n")
            >> [
                to_client(
                    b"425 Can't open data connection: a 227 cannot carry an IPv6 address, use EPSV.\r\n"
                    b"522 Network protocol not supported, use (2)\r\n"
                ),
                to_server(b"EPSV\r\n"),
            ],
        ],
        client=client,
    )


# -- access --------------------------------------------------------------------


@pytest.mark.parametrize("user", [b"anonymous", b"ANONYMOUS", b"ftp", b"Ftp"])
def test_anonymous_logins_can_be_refused_without_the_backend(user: bytes) -> None:
    play(
        [GREETED, Client(b"USER " + user + b"\r\n") >> to_client(b"530 Anonymous logins are not allowed here.\r\n")],
        policy=Policy(deny_anonymous=True),
    )


def test_named_users_pass_when_anonymous_is_refused() -> None:
    play([GREETING, Client(b"USER alice\r\n") >> to_server(b"USER alice\r\n")], policy=Policy(deny_anonymous=True))


def test_logged_in_follows_the_230() -> None:
    session = Session()
    session.receive(DataReceived(Side.SERVER, GREETING.data))
    session.receive(DataReceived(Side.CLIENT, b"USER alice\r\nPASS wrong\r\n"))
    session.receive(DataReceived(Side.SERVER, b"331 Password required\r\n530 Login incorrect\r\n"))
    assert not session.logged_in
    session.receive(DataReceived(Side.CLIENT, b"SITE 230\r\n"))
    session.receive(DataReceived(Side.SERVER, b"230 tricked you\r\n"))
    assert not session.logged_in
    session.receive(DataReceived(Side.CLIENT, b"PASS right\r\n"))
    session.receive(DataReceived(Side.SERVER, b"230 Logged in\r\n"))
    assert session.logged_in


# -- hostile input: the attack suite's defects, at the core ---------------------


def test_a_flood_of_empty_lines_is_held_back_not_buffered() -> None:
    # While the backend has not answered, each "\n" would queue a local 500:
    # past MAX_PENDING the core reads no more, and past CLIENT_BACKLOG the
    # shell stops reading the socket.
    from ftpfix.protocol.session import CLIENT_BACKLOG, MAX_PENDING

    session = Session()
    session.receive(DataReceived(Side.CLIENT, b"\n" * (CLIENT_BACKLOG + MAX_PENDING + 10)))
    assert len(session._pending) == MAX_PENDING
    assert not session.wants_data(Side.CLIENT)
    # Once answered, the backlog drains in batches the shell writes one by one.
    out = merge(session.receive(DataReceived(Side.SERVER, GREETING.data)))
    assert out == [to_client(GREETING.data + b"500 Empty command line.\r\n" * (2 * MAX_PENDING - 1))]
    batches = 0
    while session.can_advance:
        out = merge(session.receive(ReadOn()))
        assert len(out) == 1 and out[0].data.count(b"\r\n") <= MAX_PENDING
        batches += 1
    assert batches >= CLIENT_BACKLOG // MAX_PENDING - 2
    assert session.wants_data(Side.CLIENT)


@pytest.mark.parametrize(
    "user", [b"USER\tanonymous", b"USER\x0banonymous", b"user  ANONYMOUS", b"USER ftp ", b"USER\x0cftp"]
)
def test_anonymous_is_refused_however_it_is_separated(user: bytes) -> None:
    play(
        [GREETING, Client(user + b"\r\n") >> to_client(b"530 Anonymous logins are not allowed here.\r\n")],
        policy=Policy(deny_anonymous=True),
    )


def test_a_nul_after_anonymous_is_refused_before_the_backend_sees_it() -> None:
    play(
        [
            GREETED,
            Client(b"USER anonymous\x00\r\n")
            >> to_client(b"501 Syntax error in parameters: control characters are not allowed.\r\n"),
        ],
        policy=Policy(deny_anonymous=True),
    )


def test_a_password_separated_by_a_tab_is_masked_and_sent_canonical() -> None:
    out = replay([GREETING, Client(b"USER\talice\r\nPASS\twonderland\r\n")], notes=True)
    assert to_server(b"USER alice\r\nPASS wonderland\r\n") in merge(out)
    assert not any(b"wonderland" in repr(item.fields).encode() for item in out if isinstance(item, Note))
    session = Session()
    session.receive(DataReceived(Side.CLIENT, b"USER\talice\r\n"))
    assert session.user == "alice"


def test_epsv_auto_fallback_is_not_fooled_by_pipelining() -> None:
    # The backend knows no EPSV: its 500 is swallowed and PASV sent. Had
    # TYPE I gone out behind EPSV, its 200 would answer the PASV.
    play(
        [
            GREETING,
            Client(b"EPSV\r\nTYPE I\r\n") >> to_server(b"EPSV\r\n"),
            Server(b"500 EPSV not understood\r\n") >> to_server(b"PASV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n")
            >> OpenPassive("192.168.123.1", 30000, extended=True),
            Opened("203.0.113.1", 50000)
            >> [to_client(b"229 Entering Extended Passive Mode (|||50000|)\r\n"), to_server(b"TYPE I\r\n")],
            Server(b"200 Type set to I\r\n") >> to_client(b"200 Type set to I\r\n"),
        ]
    )


def test_an_unsolicited_421_is_passed_on_and_ends_the_session() -> None:
    play([GREETED, Server(b"421 Timeout.\r\n") >> [to_client(b"421 Timeout.\r\n"), Close("backend sent 421")]])


def test_fix_address_in_passthrough_sends_the_fixed_address_not_the_line() -> None:
    policy = Policy(active="passthrough")
    play(
        [GREETING, Client(b"PORT 127,0,0,2,31,144\r\n") >> to_server(b"PORT 198,51,100,10,31,144\r\n")],
        policy=policy,
        client=CLIENT_IP,
    )


def test_several_pipelined_pasvs_each_get_their_own_mapping_in_turn() -> None:
    session = Session()
    session.receive(DataReceived(Side.SERVER, GREETING.data))
    out = merge(session.receive(DataReceived(Side.CLIENT, b"PASV\r\nPASV\r\nPASV\r\n")))
    assert out == [to_server(b"PASV\r\n")]
    for port in (50000, 50001, 50002):
        out = session.receive(DataReceived(Side.SERVER, b"227 (192,168,123,1,117,48)\r\n"))
        assert out == [OpenPassive("192.168.123.1", 30000)]
        out = merge(session.receive(PassiveOpened(IPv4Address("203.0.113.1"), port)))
        assert out[0].data.startswith(b"227 ")
    assert session.idle


# -- every failure answers: a data connection that is never made ------------

PASSIVE_READY = [
    *LOGIN,
    Client(b"PASV\r\n"),
    Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n"),
    Opened("203.0.113.1", 50000),
]


def test_a_data_connection_never_made_turns_the_servers_failure_into_425() -> None:
    # The shell made the waiting server give up (it dialed its data port and
    # reset): its 150 and 426 are about that connection, not the client's.
    play(
        [
            *PASSIVE_READY,
            Client(b"NLST\r\n") >> [to_server(b"NLST\r\n"), TransferStarted(download=True)],
            Lost("nobody connected within 30 s") >> SettleTransfer(),
            Server(b"150 Here comes the directory listing.\r\n") >> [],
            Server(b"426 Failure writing network stream.\r\n")
            >> [CancelTransfer(), to_client(b"425 Can't open data connection: nobody connected within 30 s.\r\n")],
            Client(b"NOOP\r\n") >> to_server(b"NOOP\r\n"),
            Server(b"200 NOOP ok.\r\n") >> to_client(b"200 NOOP ok.\r\n"),
        ]
    )


def test_a_data_connection_never_made_with_a_2xx_from_the_server_is_still_425() -> None:
    play(
        [
            *PASSIVE_READY,
            Client(b"LIST\r\n"),
            Lost("nobody connected within 30 s") >> SettleTransfer(),
            Server(b"150 Opening\r\n") >> [],
            Server(b"226 Transfer complete\r\n") >> FinishTransfer(),
            Finished("nobody connected within 30 s", connected=False)
            >> to_client(b"425 Can't open data connection: nobody connected within 30 s.\r\n"),
        ]
    )


def test_a_server_silent_after_the_reset_is_probed_and_the_client_gets_425() -> None:
    # pure-ftpd: a second 150, and no final reply to the transfer at all.
    play(
        [
            *PASSIVE_READY,
            Client(b"RETR f\r\n"),
            Lost("nobody connected within 30 s") >> SettleTransfer(),
            Server(b"150 Accepted data connection\r\n") >> [],
            Settled() >> to_server(b"NOOP\r\n"),
            Server(b"200 Zzz...\r\n")
            >> [CancelTransfer(), to_client(b"425 Can't open data connection: nobody connected within 30 s.\r\n")],
        ]
    )


def test_a_transfer_command_after_the_data_port_expired_is_answered_425_by_ftpfix() -> None:
    # Asking the backend would leave it waiting for a connection no one makes.
    play(
        [
            *PASSIVE_READY,
            Lost("nobody connected within 30 s") >> [],
            Client(b"RETR f\r\n") >> to_client(b"425 Can't open data connection: nobody connected within 30 s.\r\n"),
            Client(b"PASV\r\n") >> to_server(b"PASV\r\n"),
            Server(b"227 Entering Passive Mode (192,168,123,1,117,49).\r\n"),
            Opened("203.0.113.1", 50001),
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
        ]
    )


def test_an_aborted_transfer_stays_426_when_its_data_connection_is_also_lost() -> None:
    play(
        [
            *PASSIVE_READY,
            Client(b"RETR f\r\n"),
            Client(b"ABOR\r\n") >> [AbortTransfer(), SettleTransfer()],
            Lost("aborted") >> [],
            Server(b"426 Transfer aborted\r\n")
            >> [
                CancelTransfer(),
                to_client(b"426 Transfer aborted\r\n226 Abort successful.\r\n"),
            ],
        ]
    )


# -- the session ends with its client -----------------------------------------


def test_a_client_that_hangs_up_during_a_transfer_ends_the_session_at_once() -> None:
    play([*PASSIVE_READY, Client(b"NLST\r\n"), ClientClosed() >> Close("client hung up")])


def test_a_client_that_hangs_up_with_a_reply_outstanding_still_gets_it() -> None:
    play(
        [
            *LOGIN,
            Client(b"STAT\r\n"),
            ClientClosed() >> [],
            Server(b"211 ok\r\n") >> [to_client(b"211 ok\r\n"), Close("client hung up")],
        ]
    )


def test_a_client_that_sends_quit_and_half_closes_during_a_transfer_gets_both_replies() -> None:
    # It still reads: the transfer's reply, then the 221 (red team: it used
    # to be taken for a hang-up and got nothing).
    play(
        [
            *PASSIVE_READY,
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Server(b"150 Opening\r\n") >> to_client(b"150 Opening\r\n"),
            Client(b"QUIT\r\n") >> [],
            ClientClosed() >> [],
            Server(b"226 Done\r\n") >> FinishTransfer(),
            Finished() >> [to_client(b"226 Done\r\n"), to_server(b"QUIT\r\n")],
            Server(b"221 Bye\r\n") >> [to_client(b"221 Bye\r\n"), Close("quit")],
        ]
    )


def test_a_greeting_not_yet_sent_leaves_the_session_idle() -> None:
    """SIGTERM's drain ends idle sessions at once: one whose backend has not
    greeted yet is idle (nothing of the client's is cut short), one with a
    command pipelined behind the greeting is not."""
    session = Session()
    assert session.idle
    session.receive(DataReceived(Side.CLIENT, b"NOO"))
    assert session.idle
    session.receive(DataReceived(Side.CLIENT, b"P\r\n"))
    assert not session.idle
    session.receive(DataReceived(Side.SERVER, GREETING.data))
    assert not session.idle
    session.receive(DataReceived(Side.SERVER, b"200 NOOP ok.\r\n"))
    assert session.idle
