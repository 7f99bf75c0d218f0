from ipaddress import IPv4Address

import pytest

from ftpfix.protocol.errors import BackendError
from ftpfix.protocol.grammar import (
    AddressError,
    CommandRejected,
    ReplyFramer,
    format_227,
    format_229,
    format_command,
    parse_227,
    parse_command,
)

ALIASES = {b"P@SW": b"PASV"}
from ftpfix.protocol.lines import TOO_LONG, LineBuffer


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"227 Entering Passive Mode (192,168,123,1,4,1).", ("192.168.123.1", 1025)),
        (b"227 Entering Passive Mode 192,168,123,1,4,1", ("192.168.123.1", 1025)),
        (b"227 =192,168,123,1,4,1", ("192.168.123.1", 1025)),
        (b"227 ok (010,000,000,001,004,001) trailing text", ("10.0.0.1", 1025)),
        (b"227 ok (10, 0, 0, 1, 4, 1)", ("10.0.0.1", 1025)),
        (b"227-\r\n 192,168,123,1,255,255\r\n227 end", ("192.168.123.1", 65535)),
    ],
)
def test_parse_227(text: bytes, expected: tuple[str, int]) -> None:
    host, port = parse_227(text)
    assert (str(host), port) == expected


@pytest.mark.parametrize(
    "text",
    [
        # Two addresses: text the server echoed became part of the reply.
        b"227 ok (010,000,000,001,004,001) trailing text 9,9,9,9,9,9",
        b"227-Entering Passive Mode (127,0,0,1,86,79)\r\n213 End.\r\n227 Entering Passive Mode (127,0,0,1,97,190).",
        # A number of 5000 digits: no address, and no crash converting it.
        b"227 Entering Passive Mode (127,0,0,1,4," + b"9" * 5000 + b")",
        b"227 (1,2,3,4,1234,5)",
    ],
)
def test_parse_227_refuses_what_no_server_sends(text: bytes) -> None:
    with pytest.raises(AddressError):
        parse_227(text)


@pytest.mark.parametrize(
    "text",
    [
        b"227 (1,2,3,256,4,1)",
        b"227 (1,2,3,4,4,1000)",
        b"227 Entering Passive Mode",
        b"227 (1,2,3,4,5)",
        b"227 (1,2,3,4,0,0)",
    ],
)
def test_parse_227_rejects(text: bytes) -> None:
    with pytest.raises(AddressError):
        parse_227(text)


def test_the_code_is_never_read_as_a_number() -> None:
    # "227,1,2,3,4,5" would otherwise scan as 227.1.2.3 port 4*256+5.
    with pytest.raises(AddressError):
        parse_227(b"227,1,2,3,4,5")


def test_format() -> None:
    assert format_227(IPv4Address("203.0.113.1"), 50000) == b"227 Entering Passive Mode (203,0,113,1,195,80).\r\n"
    assert format_229(50000) == b"229 Entering Extended Passive Mode (|||50000|)\r\n"


def test_parse_command_upper_cases_the_verb_and_keeps_the_argument() -> None:
    assert parse_command(b"retr my file.txt", ALIASES) == (b"RETR", b"my file.txt")
    assert parse_command(b"NOOP", ALIASES) == (b"NOOP", b"")
    assert parse_command(b"p@sw", ALIASES) == (b"P@SW", b"")
    assert parse_command(b"RETR caf\xc3\xa9 \xe9\xfe", ALIASES) == (b"RETR", b"caf\xc3\xa9 \xe9\xfe")


@pytest.mark.parametrize("separator", [b" ", b"\t", b"\x0b", b"\x0c"])
def test_any_separator_a_server_splits_on_is_a_separator(separator: bytes) -> None:
    # ProFTPD splits on any white space: USER<TAB>anonymous is anonymous there.
    assert parse_command(b"USER" + separator + b"anonymous", ALIASES) == (b"USER", b"anonymous")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"", b"500"),
        (b"   ", b"500"),
        (b"\tNOOP", b"500"),
        (b"NO\x01OP", b"500"),
        (b"NO\rOP", b"500"),
        (b"N0OP", b"500"),
        (b"\xc3\xa9", b"500"),
        (b"USER anonymous\x00", b"501"),
        (b"MKD x\x00213 y", b"501"),
        (b"RETR a\rb", b"501"),
        (b"RETR a\x7fb", b"501"),
    ],
)
def test_lines_a_server_could_read_differently_are_rejected(line: bytes, code: bytes) -> None:
    with pytest.raises(CommandRejected) as caught:
        parse_command(line, ALIASES)
    assert caught.value.reply.startswith(code) and caught.value.reply.endswith(b"\r\n")


def test_format_command_is_canonical() -> None:
    assert format_command(b"USER", b"alice") == b"USER alice\r\n"
    assert format_command(b"NOOP") == b"NOOP\r\n"


def test_telnet_commands_before_the_verb_are_dropped() -> None:
    assert parse_command(b"\xff\xf4\xff\xf2ABOR", ALIASES) == (b"ABOR", b"")
    assert parse_command(b"\xff\xfb\x01NOOP", ALIASES) == (b"NOOP", b"")
    # An escaped IAC is data, and stays escaped for the backend; a lone one is
    # a Telnet command that ProFTPD would act on and vsftpd would not.
    assert parse_command(b"RETR a\xff\xffb", ALIASES) == (b"RETR", b"a\xff\xffb")
    with pytest.raises(CommandRejected):
        parse_command(b"RETR a\xff\xfeb", ALIASES)


def test_reply_framer() -> None:
    framer = ReplyFramer()
    lines = [
        framer.classify(line)
        for line in [b"211-Features:", b" EPSV", b"211-not the end", b"211 End", b"200", b"226 ok"]
    ]
    assert [(line.code, line.first, line.last) for line in lines] == [
        (211, True, False),
        (211, False, False),
        (211, False, False),
        (211, False, True),
        (200, True, True),
        (226, True, True),
    ]
    with pytest.raises(BackendError):
        framer.classify(b"hello")
    with pytest.raises(BackendError):
        framer.classify(b"099 too low")


def test_line_buffer() -> None:
    lines = LineBuffer(max_length=8)
    lines.feed(b"NOOP\r\nPWD\nXXXXXXXXXXXXXXXXXXXX")
    assert lines.next_line() == b"NOOP"
    assert lines.next_line() == b"PWD"
    assert lines.next_line() is TOO_LONG
    assert lines.next_line() is None
    lines.feed(b"XXXX\r\nSYST\r\n")
    assert lines.next_line() == b"SYST"
    assert lines.pending == 0
