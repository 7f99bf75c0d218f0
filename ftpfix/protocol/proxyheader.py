"""The PROXY protocol, versions 1 and 2: a load balancer's header naming the real client.

Spec: HAProxy's ``doc/proxy-protocol.txt`` ("The PROXY protocol, Versions 1 &
2"). A balancer that forwards TCP (HAProxy ``send-proxy``/``send-proxy-v2``,
AWS NLB, Kubernetes ingress controllers) opens its own connection to ftpfix,
so the socket's peer is the balancer; the header, sent before any byte of the
client's, says who the client really is. Section numbers below are the spec's.

This module is pure, like the rest of ``ftpfix.protocol``: ``parse`` takes the
bytes received so far and says "need more", "here is the header and how many
bytes it took", or raises ``ProxyHeaderError``; ``format_v1``/``format_v2``
build the header ftpfix sends to its own backend. Deciding *whom* to believe
(``[listen] trusted_proxies``) and *when* to read is the shell's job
(``ftpfix.net.proxied``).

What is accepted, and why:

- v1 ``TCP4`` and ``TCP6`` give the client's address and port (2.1).
- v1 ``UNKNOWN`` means the balancer does not know (2.1: "the receiver must
  ignore anything presented before the CRLF"): ``Header.client`` is None and
  the connection is served as the balancer's own.
- v2 ``LOCAL`` is a connection the balancer made on its own behalf, a health
  check (2.2: "the receiver must accept this connection as valid and must use
  the real connection endpoints"): ``client`` is None.
- v2 ``PROXY`` over ``AF_INET``/``AF_INET6`` and ``STREAM`` gives the client.
  ``AF_UNSPEC`` is treated as v1's UNKNOWN (2.2 lets the receiver "accept the
  connection anyway and use the real endpoint addresses"). ``AF_UNIX`` and
  ``DGRAM`` cannot carry an FTP client and are refused, as is any command,
  family or protocol the spec does not define.
- TLVs after the addresses (2.2.1 onwards: ALPN, authority, SSL, AWS's VPC
  endpoint id) are skipped; ftpfix needs none of them.

Bounds: a v1 line is at most 107 bytes with its CRLF (2.1, "a receiver can
always read 107 bytes"); a v2 header's length field may say up to 65535, but
ftpfix refuses more than ``MAX_V2_LENGTH`` so a peer cannot make it buffer
64 KiB before the first command.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from .errors import FtpfixError

#: The v2 signature, section 2.2: chosen so that no text protocol starts with it.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: v1's prefix, section 2.1 ("PROXY" and a single space).
V1_PREFIX = b"PROXY "

#: Longest v1 header including its CRLF (section 2.1: 107 for
#: "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n").
MAX_V1_LENGTH = 107

#: Largest v2 address-and-TLV block ftpfix reads (the 16-byte fixed part
#: comes on top). The addresses take at most 216 bytes (AF_UNIX); cloud
#: balancers add a few TLVs of tens of bytes (AWS's VPC endpoint id, Azure's
#: link id), HAProxy's SSL TLVs a few hundred. 4 KiB leaves room for all of
#: them while keeping a hostile length field from costing 64 KiB per connection.
MAX_V2_LENGTH = 4096

#: Bytes of the v2 fixed part: signature, version and command, family and
#: protocol, length.
V2_FIXED = 16

#: A complete v2 LOCAL header (section 2.2): a connection the sender makes
#: on its own behalf, such as a health check, with no addresses (AF_UNSPEC).
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"

#: Address block length by v2 family (section 2.2).
_V2_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}


class ProxyHeaderError(FtpfixError):
    """The bytes are not a PROXY header ftpfix accepts; the message says why."""


class Command(enum.Enum):
    """What the header says about the connection (v1 is always PROXY or UNKNOWN)."""

    PROXY = "proxy"  # relayed for a client, named in the header
    LOCAL = "local"  # v2: the balancer's own connection (a health check)
    UNKNOWN = "unknown"  # v1 UNKNOWN, v2 AF_UNSPEC: relayed, but the client is not known


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed PROXY header.

    ``client`` and ``dialed`` are (address, port): the client's end, and the
    address and port the client dialed on the balancer. Both are None unless
    ``command`` is PROXY: the connection is then served as the balancer's own.
    ``length`` is how many bytes the header took; what follows is the client's.
    """

    version: int
    command: Command
    client: tuple[str, int] | None
    dialed: tuple[str, int] | None
    length: int


def looks_like_header(data: bytes) -> bool | None:
    """Whether ``data`` (a connection's first bytes) starts a PROXY header:
    True, False, or None while too few bytes have come to tell."""
    for prefix in (V1_PREFIX, V2_SIGNATURE):
        if data[: len(prefix)] == prefix[: len(data)]:
            return True if len(data) >= len(prefix) else None
    return False


def parse(data: bytes) -> Header | None:
    """The header at the start of ``data``, or None if more bytes are needed.

    Error handling: raises ProxyHeaderError when ``data`` cannot start a
    header ftpfix accepts (garbage, an oversized or malformed header, an
    unsupported command, family or protocol). It never needs more than
    ``MAX_V1_LENGTH`` or ``V2_FIXED + MAX_V2_LENGTH`` bytes to decide.
    """
    match looks_like_header(data):
        case None:
            return None
        case False:
            raise ProxyHeaderError(f"not a PROXY protocol header: starts {data[:16]!r}")
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data)


# -- version 1: one text line (section 2.1) ----------------------------------


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"v1 header has no CRLF in its first {MAX_V1_LENGTH} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("v1 header ends without CRLF")
        return None
    line = data[:end]
    length = end + 2
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        # 2.1: "the receiver must ignore anything presented before the CRLF".
        return Header(1, Command.UNKNOWN, None, None, length)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1 header is not PROXY TCP4|TCP6|UNKNOWN with four fields: {line[:MAX_V1_LENGTH]!r}")
    version = 4 if fields[1] == b"TCP4" else 6
    source = _v1_address(fields[2], version)
    destination = _v1_address(fields[3], version)
    source_port, destination_port = _v1_port(fields[4]), _v1_port(fields[5])
    return Header(1, Command.PROXY, (source, source_port), (destination, destination_port), length)


def _v1_address(text: bytes, version: int) -> str:
    # 2.1: addresses as inet_ntop writes them. Python also takes an IPv6 scope
    # ("fe80::1%eth0"), which would make one client many: refused.
    try:
        if b"%" in text:
            raise ValueError(text)
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"v1 header: {text[:48]!r} is not an IP address") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 header: {address} is not an IPv{version} address, as TCP{version} says")
    return _canonical(address)


def _v1_port(text: bytes) -> int:
    # 2.1: a port is a decimal 0-65535; a leading zero is not allowed.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header: {text[:8]!r} is not a port")
    return int(text)


# -- version 2: binary (section 2.2) ----------------------------------------------


def _parse_v2(data: bytes) -> Header | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header: version {version_command >> 4} (only 2 exists)")
    command = version_command & 0x0F
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"v2 header: unknown command {command:#x} (0 LOCAL and 1 PROXY exist)")
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"v2 header: length {length} is over ftpfix's {MAX_V2_LENGTH}")
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if family > 0x3 or protocol > 0x2:
        raise ProxyHeaderError(f"v2 header: unknown address family or protocol {family_protocol:#04x}")
    if len(data) < V2_FIXED + length:
        return None
    total = V2_FIXED + length
    if command == 0x0:
        # 2.2: LOCAL "must use the real connection endpoints and discard the
        # protocol block including the family", whatever it says.
        return Header(2, Command.LOCAL, None, None, total)
    if family == 0x0:
        return Header(2, Command.UNKNOWN, None, None, total)
    if family == 0x3 or protocol != 0x1:
        kind = "AF_UNIX" if family == 0x3 else ("DGRAM" if protocol == 0x2 else "UNSPEC protocol")
        raise ProxyHeaderError(f"v2 header: {kind} cannot carry an FTP client (only TCP over IPv4 or IPv6)")
    needed = _V2_ADDRESS_LENGTH[family]
    if length < needed:
        raise ProxyHeaderError(f"v2 header: length {length} is too short for its {needed}-byte addresses")
    block = data[V2_FIXED : V2_FIXED + needed]
    size = 4 if family == 0x1 else 16
    source = _canonical(ipaddress.ip_address(block[:size]))
    destination = _canonical(ipaddress.ip_address(block[size : 2 * size]))
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
    # The rest of ``length`` is TLVs (2.2.1 onwards): skipped, unread.
    return Header(2, Command.PROXY, (source, source_port), (destination, destination_port), total)


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """As ftpfix spells addresses everywhere: IPv4-mapped IPv6 unwrapped."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# -- building headers, for ``[backend] proxy_protocol`` ------------------------


def format_v1(client: tuple[str, int] | None, dialed: tuple[str, int] | None) -> bytes:
    """A v1 header for a connection from ``client`` to ``dialed``; UNKNOWN when
    either is None or their families differ."""
    addresses = _pair(client, dialed)
    if addresses is None:
        return b"PROXY UNKNOWN\r\n"
    source, destination = addresses
    family = b"TCP4" if source.version == 4 else b"TCP6"
    assert client is not None and dialed is not None
    return b"PROXY %s %s %s %d %d\r\n" % (family, str(source).encode(), str(destination).encode(), client[1], dialed[1])


def format_v2(client: tuple[str, int] | None, dialed: tuple[str, int] | None) -> bytes:
    """A v2 header for a connection from ``client`` to ``dialed``; a PROXY
    command over AF_UNSPEC when either is None or their families differ."""
    addresses = _pair(client, dialed)
    if addresses is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x00, 0)
    source, destination = addresses
    assert client is not None and dialed is not None
    family = 0x11 if source.version == 4 else 0x21  # AF_INET or AF_INET6, STREAM
    block = source.packed + destination.packed + struct.pack("!HH", client[1], dialed[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(block)) + block


def _pair(
    client: tuple[str, int] | None, dialed: tuple[str, int] | None
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    if client is None or dialed is None:
        return None
    source, destination = ipaddress.ip_address(client[0]), ipaddress.ip_address(dialed[0])
    if source.version != destination.version:
        return None
    return source, destination
