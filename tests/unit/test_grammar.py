from ipaddress import IPv4Address

import pytest

from ftpfix.protocol.errors import BackendError
from ftpfix.protocol.grammar import AddressError, ReplyFramer, format_227, format_229, parse_227, split_command, telnet_text
from ftpfix.protocol.lines import TOO_LONG, LineBuffer


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"227 Entering Passive Mode (192,168,123,1,4,1).", ("192.168.123.1", 1025)),
        (b"227 Entering Passive Mode 192,168,123,1,4,1", ("192.168.123.1", 1025)),
        (b"227 =192,168,123,1,4,1", ("192.168.123.1", 1025)),
        (b"227 ok (010,000,000,001,004,001) trailing text 9,9,9,9,9,9", ("10.0.0.1", 1025)),
        (b"227 ok (10, 0, 0, 1, 4, 1)", ("10.0.0.1", 1025)),
        (b"227-\r\n 192,168,123,1,255,255\r\n227 end", ("192.168.123.1", 65535)),
    ],
)
def test_parse_227(text: bytes, expected: tuple[str, int]) -> None:
    host, port = parse_227(text)
    assert (str(host), port) == expected


@pytest.mark.parametrize("text", [b"227 (1,2,3,256,4,1)", b"227 (1,2,3,4,4,1000)", b"227 Entering Passive Mode", b"227 (1,2,3,4,5)", b"227 (1,2,3,4,0,0)"])
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


def test_split_command() -> None:
    assert split_command(b"retr my file.txt") == (b"RETR", b"my file.txt")
    assert split_command(b"NOOP") == (b"NOOP", b"")


def test_telnet_text() -> None:
    assert telnet_text(b"\xff\xf4\xff\xf2ABOR") == b"ABOR"
    assert telnet_text(b"\xff\xfb\x01NOOP") == b"NOOP"
    assert telnet_text(b"RETR a\xff\xffb") == b"RETR a\xffb"


def test_reply_framer() -> None:
    framer = ReplyFramer()
    lines = [framer.classify(line) for line in [b"211-Features:", b" EPSV", b"211-not the end", b"211 End", b"200", b"226 ok"]]
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
