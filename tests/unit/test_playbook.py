"""The core as playbooks: each input, and exactly what it makes ftpfix do.

Every script runs twice, whole and one byte at a time (``transcript.play``).
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from ftpfix.protocol import (
    TRANSITIONS,
    AbortTransfer,
    AwaitQuiet,
    CancelTransfer,
    Close,
    FinishTransfer,
    OpenActive,
    OpenPassive,
    Policy,
    Session,
    SettleTransfer,
    TransferStarted,
    Waiting,
)

from .transcript import (
    ActiveOpened,
    Client,
    Finished,
    Opened,
    Quiet,
    Server,
    Settled,
    play,
    to_client,
    to_server,
)

CLIENT = IPv4Address("198.51.100.10")
GREETING = Server(b"220 ready\r\n") >> to_client(b"220 ready\r\n")
PASSIVE = [
    Client(b"PASV\r\n") >> to_server(b"PASV\r\n"),
    Server(b"227 Entering Passive Mode (192,168,123,1,117,48).\r\n") >> OpenPassive("192.168.123.1", 30000),
    Opened("203.0.113.1", 50000) >> to_client(b"227 Entering Passive Mode (203,0,113,1,195,80).\r\n"),
]


def test_pasv_is_rewritten_step_by_step() -> None:
    session = play([GREETING, *PASSIVE], client=CLIENT)
    assert session.waiting_for is Waiting.NOTHING


def test_a_download_holds_its_226_until_the_relay_delivered() -> None:
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Server(b"150 Opening\r\n") >> to_client(b"150 Opening\r\n"),
            Server(b"226 Transfer complete\r\n") >> FinishTransfer(),
            Finished() >> to_client(b"226 Transfer complete\r\n"),
        ],
        client=CLIENT,
    )


def test_a_transfer_that_failed_on_the_way_is_never_reported_complete() -> None:
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"STOR f\r\n") >> [to_server(b"STOR f\r\n"), TransferStarted(download=False)],
            Server(b"150 Ok\r\n226 Transfer complete\r\n") >> [to_client(b"150 Ok\r\n"), FinishTransfer()],
            Finished("upload: Connection reset by peer")
            >> to_client(b"426 Connection closed; transfer aborted: upload: Connection reset by peer.\r\n"),
        ],
        client=CLIENT,
    )


@pytest.mark.parametrize("abor", [b"ABOR\r\n", b"\xff\xf4\xff\xf2ABOR\r\n", b"\xff\xf4ABOR\r\n"])
def test_abor_during_a_relayed_transfer_breaks_it_and_is_answered_after_the_transfer(abor: bytes) -> None:
    """RFC 959 section 4.1.3: the transfer's reply first, then ABOR's; the backend never sees ABOR."""
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR big\r\n") >> [to_server(b"RETR big\r\n"), TransferStarted(download=True)],
            Server(b"150 Opening\r\n") >> to_client(b"150 Opening\r\n"),
            Client(abor) >> [AbortTransfer(), SettleTransfer()],
            Server(b"426 Failure writing network stream.\r\n")
            >> [CancelTransfer(), to_client(b"426 Failure writing network stream.\r\n226 Abort successful.\r\n")],
            Client(b"NOOP\r\n") >> to_server(b"NOOP\r\n"),
        ],
        client=CLIENT,
    )


def test_abor_after_the_transfer_finished_on_the_backend_turns_its_226_into_426() -> None:
    """The backend's 226 raced the ABOR: the client did not get everything, so it is told 426."""
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Client(b"ABOR\r\n") >> [AbortTransfer(), SettleTransfer()],
            # The client has aborted: a 150 now would be read as the first of its two replies.
            Server(b"150 Opening\r\n226 Transfer complete\r\n") >> FinishTransfer(),
            Finished("aborted")
            >> to_client(b"426 Connection closed; transfer aborted: aborted.\r\n226 Abort successful.\r\n"),
        ],
        client=CLIENT,
    )


def test_abor_while_the_226_is_held_is_answered_in_its_turn() -> None:
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Server(b"150 Opening\r\n226 Transfer complete\r\n") >> [to_client(b"150 Opening\r\n"), FinishTransfer()],
            Client(b"ABOR\r\n") >> AbortTransfer(),
            Finished() >> to_client(b"226 Transfer complete\r\n226 Abort successful.\r\n"),
        ],
        client=CLIENT,
    )


def test_abor_with_nothing_to_abort_is_answered_by_ftpfix() -> None:
    play([GREETING, Client(b"ABOR\r\n") >> to_client(b"225 No transfer to abort.\r\n")], client=CLIENT)


def test_commands_after_abor_wait_for_the_transfers_reply() -> None:
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR f\r\n") >> [to_server(b"RETR f\r\n"), TransferStarted(download=True)],
            Client(b"ABOR\r\nPWD\r\n") >> [AbortTransfer(), SettleTransfer()],
            Server(b"426 Aborted\r\n")
            >> [CancelTransfer(), to_client(b"426 Aborted\r\n226 Abort successful.\r\n"), to_server(b"PWD\r\n")],
        ],
        client=CLIENT,
    )


def test_active_mode_answers_come_back_as_events() -> None:
    play(
        [
            GREETING,
            Client(b"PORT 198,51,100,10,195,80\r\n") >> OpenActive("198.51.100.10", 50000),
            ActiveOpened("192.0.2.10", 40000) >> to_server(b"PORT 192,0,2,10,156,64\r\n"),
            Server(b"200 PORT ok\r\n") >> to_client(b"200 PORT ok\r\n"),
        ],
        client=CLIENT,
    )


def test_after_a_multi_line_reply_pasv_waits_until_the_backend_is_quiet() -> None:
    play(
        [
            GREETING,
            Client(b"STAT\r\nPASV\r\n") >> to_server(b"STAT\r\n"),
            Server(b"211-Status\r\n x\r\n211 End\r\n") >> [to_client(b"211-Status\r\n x\r\n211 End\r\n"), AwaitQuiet()],
            Quiet() >> to_server(b"PASV\r\n"),
        ],
        client=CLIENT,
    )


def test_a_forged_reply_end_closes_the_session() -> None:
    play(
        [
            GREETING,
            Client(b"NOOP\r\n") >> to_server(b"NOOP\r\n"),
            Server(b"200 ok\r\n200 and more\r\n")
            >> [
                to_client(b"200 ok\r\n421 Service not available: the server sent a reply to no command.\r\n"),
                Close("backend reply answered no command"),
            ],
        ],
        client=CLIENT,
    )


def test_every_state_can_be_left() -> None:
    """The transition table: every state but CLOSED leads back to NOTHING or to CLOSED."""
    for state, targets in TRANSITIONS.items():
        if state is Waiting.CLOSED:
            assert not targets
        else:
            assert Waiting.CLOSED in targets
            assert state is Waiting.NOTHING or Waiting.NOTHING in targets


def test_an_answer_in_the_wrong_state_is_a_shell_bug() -> None:
    from ftpfix.protocol import TransferDone

    with pytest.raises(RuntimeError, match="TransferDone while the core waits for nothing"):
        Session(Policy()).receive(TransferDone())


def test_pure_ftpd_leaves_an_aborted_transfer_unanswered_and_a_probe_proves_it() -> None:
    """pure-ftpd answers a broken data connection with a 150 and nothing more: the 150 is
    dropped, a NOOP asked once things settled, and its 200 stands for the missing 426."""
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR big\r\n") >> [to_server(b"RETR big\r\n"), TransferStarted(download=True)],
            Server(b"150-Accepted data connection\r\n150 64 MB to download\r\n")
            >> to_client(b"150-Accepted data connection\r\n150 64 MB to download\r\n"),
            Client(b"ABOR\r\nPWD\r\n") >> [AbortTransfer(), SettleTransfer()],
            Server(b"150 0.002 seconds (measured here), 2884.10 Mbytes per second\r\n") >> [],
            Settled() >> to_server(b"NOOP\r\n"),
            Server(b"200 Zzz...\r\n")
            >> [
                CancelTransfer(),
                to_client(b"426 Connection closed; transfer aborted: aborted.\r\n226 Abort successful.\r\n"),
                to_server(b"PWD\r\n"),
            ],
            Server(b'257 "/"\r\n') >> to_client(b'257 "/"\r\n'),
        ],
        client=CLIENT,
    )


def test_a_server_that_answers_the_aborted_transfer_late_is_still_paired_right() -> None:
    """The probe went out, then the 426 came after all: it answers the transfer, the 200 the probe."""
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR big\r\n") >> [to_server(b"RETR big\r\n"), TransferStarted(download=True)],
            Client(b"ABOR\r\n") >> [AbortTransfer(), SettleTransfer()],
            Settled() >> to_server(b"NOOP\r\n"),
            Server(b"426 Failure writing network stream.\r\n")
            >> [CancelTransfer(), to_client(b"426 Failure writing network stream.\r\n226 Abort successful.\r\n")],
            Server(b"200 NOOP ok.\r\n") >> [],
            Client(b"NOOP\r\n") >> to_server(b"NOOP\r\n"),
        ],
        client=CLIENT,
    )


def test_no_probe_once_the_transfer_is_answered() -> None:
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR big\r\n") >> [to_server(b"RETR big\r\n"), TransferStarted(download=True)],
            Client(b"ABOR\r\n") >> [AbortTransfer(), SettleTransfer()],
            Server(b"426 Aborted\r\n") >> [CancelTransfer(), to_client(b"426 Aborted\r\n226 Abort successful.\r\n")],
            Settled() >> [],
        ],
        client=CLIENT,
    )


def test_a_broken_transfer_pure_ftpd_leaves_unanswered_is_answered_426_without_abor() -> None:
    """No ABOR: the client closed its data socket early. pure-ftpd's second 150 is the sign;
    once things settle a probe proves no reply is coming, and the session goes on."""
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR big\r\n") >> [to_server(b"RETR big\r\n"), TransferStarted(download=True)],
            Server(b"150-Accepted data connection\r\n150 64 MB to download\r\n")
            >> to_client(b"150-Accepted data connection\r\n150 64 MB to download\r\n"),
            Server(b"150 0.101 seconds (measured here), 95.19 Mbytes per second\r\n")
            >> [SettleTransfer(), to_client(b"150 0.101 seconds (measured here), 95.19 Mbytes per second\r\n")],
            Client(b"NOOP\r\n") >> [],
            Settled() >> to_server(b"NOOP\r\n"),
            Server(b"200 Zzz...\r\n")
            >> [
                CancelTransfer(),
                to_client(b"426 Connection closed; transfer aborted: the server sent no final reply.\r\n"),
                to_server(b"NOOP\r\n"),
            ],
            Server(b"200 Zzz...\r\n") >> to_client(b"200 Zzz...\r\n"),
        ],
        client=CLIENT,
    )


def test_an_abor_behind_a_waiting_command_acts_at_once_and_is_answered_in_its_turn() -> None:
    """NOOP waits for the transfer; the ABOR after it must not: the transfer breaks at once,
    and the replies keep the order of the commands: 426, NOOP's 200, ABOR's 226."""
    play(
        [
            GREETING,
            *PASSIVE,
            Client(b"RETR big\r\nNOOP\r\n") >> [to_server(b"RETR big\r\n"), TransferStarted(download=True)],
            Server(b"150 Opening\r\n") >> to_client(b"150 Opening\r\n"),
            Client(b"\xff\xf4\xff\xf2ABOR\r\n") >> [AbortTransfer(), SettleTransfer()],
            Server(b"426 Failure writing network stream.\r\n")
            >> [CancelTransfer(), to_client(b"426 Failure writing network stream.\r\n"), to_server(b"NOOP\r\n")],
            Server(b"200 NOOP ok.\r\n") >> to_client(b"200 NOOP ok.\r\n226 Abort successful.\r\n"),
            Client(b"PWD\r\n") >> to_server(b"PWD\r\n"),
        ],
        client=CLIENT,
    )
