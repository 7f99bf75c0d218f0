"""The PROXY protocol parser and builder (ftpfix.protocol.proxyheader), fed
whole and one byte at a time, with the examples of HAProxy's
doc/proxy-protocol.txt."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftpfix.protocol.proxyheader import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    Command,
    Header,
    ProxyHeaderError,
    format_v1,
    format_v2,
    looks_like_header,
    parse,
)

AFTER = b"USER alice\r\n"


def parse_bytewise(data: bytes) -> Header:
    """Feed ``data`` one byte more at a time: every proper prefix of the
    header needs more, and the first complete one gives the header."""
    for end in range(len(data) + 1):
        header = parse(data[:end])
        if header is not None:
            assert header.length == end, "a header decided before its last byte"
            return header
    raise AssertionError("never complete")


def v2(command: int, family: int, block: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(block) if length is None else length) + block


def v2_inet(source: str, destination: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    import ipaddress

    block = ipaddress.ip_address(source).packed + ipaddress.ip_address(destination).packed
    family = 0x11 if len(block) == 8 else 0x21
    return v2(0x1, family, block + struct.pack("!HH", sport, dport) + tlvs)


# -- version 1 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "client", "dialed"),
    [
        # The spec's own examples (section 2.1).
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 21\r\n",
            ("2001:db8::1", 56324),
            ("2001:db8::11", 21),
        ),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
        # IPv4-mapped IPv6 is spelled as ftpfix spells it everywhere.
        (b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:10.0.0.2 1 2\r\n", ("10.0.0.1", 1), ("10.0.0.2", 2)),
    ],
)
def test_v1_tcp(line: bytes, client: tuple[str, int], dialed: tuple[str, int]) -> None:
    for data in (line, line + AFTER):
        header = parse(data)
        assert header == Header(1, Command.PROXY, client, dialed, len(line))
        assert data[header.length :] in (b"", AFTER)
    assert parse_bytewise(line + AFTER) == Header(1, Command.PROXY, client, dialed, len(line))


def test_v1_longest_line_fits() -> None:
    longest = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(longest) == 104 <= MAX_V1_LENGTH
    assert parse_bytewise(longest).client == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", b"PROXY UNKNOWN anything \xff at all\r\n"],
)
def test_v1_unknown_is_the_balancers_own_connection(line: bytes) -> None:
    assert parse_bytewise(line + AFTER) == Header(1, Command.UNKNOWN, None, None, len(line))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "four fields"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "TCP4|TCP6"),
        (b"PROXY UDP4 1.2.3.4 1.2.3.5 1 2\r\n", "TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4  1.2.3.5 1 2\r\n", "four fields"),
        (b"PROXY TCP4 1.2.3.256 1.2.3.5 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 01.2.3.4 1.2.3.5 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 ::1 ::2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 1.2.3.5 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IP address"),
        (b"PROXY TCP6 ::1 fe80::1%2 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 021 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 -1 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n", "without CRLF"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\rX", "without CRLF"),
        (b"PROXY " + b"A" * 200, "no CRLF in its first 107"),
        (b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15) + b"\r\n", "no CRLF in its first 107"),
        # Garbage: an FTP command, HTTP, TLS, a v1 spelled in lower case.
        (b"USER alice\r\n", "not a PROXY protocol header"),
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),
        (b"proxy TCP4 1.2.3.4 1.2.3.5 1 2\r\n", "not a PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c", "not a PROXY protocol header"),
    ],
)
def test_v1_and_garbage_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse_bytewise(data)


def test_v1_oversized_is_decided_at_107_bytes() -> None:
    data = b"PROXY TCP4 " + b"1" * 200
    assert parse(data[: MAX_V1_LENGTH - 1]) is None
    with pytest.raises(ProxyHeaderError, match="107"):
        parse(data[:MAX_V1_LENGTH])


def test_truncated_headers_need_more() -> None:
    """A header cut short never parses as something else: the shell's deadline ends it."""
    for header in (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        v2_inet("10.1.2.3", "10.0.0.1", 40000, 21, tlvs=b"\x04\x00\x02ab"),
    ):
        for end in range(len(header)):
            assert parse(header[:end]) is None


# -- version 2 -----------------------------------------------------------------


def test_v2_tcp4_and_tcp6() -> None:
    data = v2_inet("10.1.2.3", "203.0.113.7", 40000, 21)
    assert len(data) == 16 + 12
    assert parse_bytewise(data + AFTER) == Header(2, Command.PROXY, ("10.1.2.3", 40000), ("203.0.113.7", 21), len(data))
    data = v2_inet("2001:db8::5", "2001:db8::21", 1, 2121)
    assert len(data) == 16 + 36
    assert parse_bytewise(data + AFTER) == Header(2, Command.PROXY, ("2001:db8::5", 1), ("2001:db8::21", 2121), 52)


def test_v2_tlvs_are_skipped() -> None:
    # PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, and AWS's PP2_TYPE_AWS (0xEA) VPC endpoint id.
    tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\xea\x00\x17\x01vpce-08d2bf15fac5001c9"
    data = v2_inet("10.1.2.3", "10.0.0.1", 40000, 21, tlvs)
    header = parse_bytewise(data + AFTER)
    assert header.client == ("10.1.2.3", 40000)
    assert header.length == len(data)


def test_v2_local_is_a_health_check_served_as_the_balancer() -> None:
    # HAProxy's check-send-proxy sends LOCAL with AF_UNSPEC and no addresses;
    # a LOCAL that carries addresses anyway must ignore them (section 2.2).
    for data in (v2(0x0, 0x00, b""), v2(0x0, 0x11, b"\x01" * 12)):
        assert parse_bytewise(data) == Header(2, Command.LOCAL, None, None, len(data))


def test_v2_unspec_family_is_unknown() -> None:
    assert parse_bytewise(v2(0x1, 0x00, b"")) == Header(2, Command.UNKNOWN, None, None, 16)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "version 3"),
        (v2(0x2, 0x11, b"\x00" * 12), "unknown command 0x2"),
        (v2(0xF, 0x11, b"\x00" * 12), "unknown command 0xf"),
        (v2(0x1, 0x41, b"\x00" * 12), "unknown address family"),
        (v2(0x1, 0x13, b"\x00" * 12), "unknown address family"),
        (v2(0x1, 0x31, b"\x00" * 216), "AF_UNIX"),
        (v2(0x1, 0x12, b"\x00" * 12), "DGRAM"),
        (v2(0x1, 0x10, b"\x00" * 12), "UNSPEC protocol"),
        (v2(0x1, 0x11, b"\x00" * 8), "too short"),
        (v2(0x1, 0x21, b"\x00" * 12), "too short"),
        (v2(0x1, 0x11, b"", length=MAX_V2_LENGTH + 1), "over"),
        (v2(0x1, 0x11, b"", length=0xFFFF), "over"),
    ],
)
def test_v2_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse_bytewise(data)


def test_v2_oversized_length_is_refused_before_its_body() -> None:
    """A length field over the bound is refused at the 16th byte, not after 64 KiB."""
    with pytest.raises(ProxyHeaderError, match="over"):
        parse(v2(0x1, 0x11, b"", length=0xFFFF))


def test_v2_largest_accepted() -> None:
    data = v2_inet(
        "10.0.0.1", "10.0.0.2", 1, 2, tlvs=b"\xee" + struct.pack("!H", MAX_V2_LENGTH - 15) + b"x" * (MAX_V2_LENGTH - 15)
    )
    assert len(data) == 16 + MAX_V2_LENGTH
    assert parse(data).length == len(data)


# -- telling a header from FTP, for peers that are not trusted -----------------------


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", None),
        (b"PRO", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4", True),
        (b"PROT P\r\n", False),
        (b"USER x", False),
        (b"\r\n", None),  # an empty line could still become the v2 signature
        (b"\r\n\r\n\x00", None),
        (V2_SIGNATURE, True),
        (b"\r\nUSER", False),
    ],
)
def test_looks_like_header(data: bytes, verdict: bool | None) -> None:
    assert looks_like_header(data) is verdict


# -- building, for [backend] proxy_protocol ---------------------------------------


def test_format_round_trips() -> None:
    for client, dialed in (
        (("198.51.100.7", 40000), ("192.0.2.1", 21)),
        (("2001:db8::7", 1), ("2001:db8::1", 21)),
    ):
        for build, version in ((format_v1, 1), (format_v2, 2)):
            data = build(client, dialed)
            assert parse_bytewise(data + AFTER) == Header(version, Command.PROXY, client, dialed, len(data))


def test_format_exact_bytes() -> None:
    assert format_v1(("198.51.100.7", 40000), ("192.0.2.1", 21)) == b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 21\r\n"
    assert format_v2(("1.2.3.4", 258), ("5.6.7.8", 21)) == (
        V2_SIGNATURE + b"\x21\x11\x00\x0c" + b"\x01\x02\x03\x04\x05\x06\x07\x08\x01\x02\x00\x15"
    )


def test_format_unknown_when_families_differ_or_unknown() -> None:
    assert format_v1(("1.2.3.4", 1), ("::1", 21)) == b"PROXY UNKNOWN\r\n"
    assert format_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert parse(format_v2(("1.2.3.4", 1), ("::1", 21))).command is Command.UNKNOWN


@given(st.binary(max_size=300))
def test_only_proxy_header_errors_escape(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    assert header is None or header.length <= len(data)


@given(st.binary(max_size=200))
def test_only_proxy_header_errors_escape_after_a_signature(data: bytes) -> None:
    for prefix in (V2_SIGNATURE, b"PROXY "):
        try:
            parse(prefix + data)
        except ProxyHeaderError:
            pass


def test_v1_exactly_107_bytes_fits() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(line) == MAX_V1_LENGTH
    assert parse_bytewise(line).command is Command.UNKNOWN


def test_v2_local_constant() -> None:
    from ftpfix.protocol.proxyheader import V2_LOCAL

    assert parse(V2_LOCAL) == Header(2, Command.LOCAL, None, None, 16)
