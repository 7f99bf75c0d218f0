"""The core's side of the PROXY protocol: a header the shell did not read is
refused, never relayed; and a session that ftpfix greeted itself (a balancer
that sends its header only with the client's first bytes) does not pass on
the backend's 220 a second time. Each playbook runs whole and byte by byte."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from ftpfix.protocol import Close, Level, Note
from ftpfix.protocol.proxyheader import format_v1, format_v2

from .transcript import Client, ClientClosed, Server, play, to_client, to_server

CLIENT = IPv4Address("198.51.100.10")
GREETING = Server(b"220 ready\r\n") >> to_client(b"220 ready\r\n")
ADDRESSES = (("203.0.113.9", 40000), ("192.0.2.1", 21))


@pytest.mark.parametrize(
    ("header", "version"), [(format_v1(*ADDRESSES), "v1"), (format_v2(*ADDRESSES), "v2"), (b"PROXY UNKNOWN\r\n", "v1")]
)
def test_a_header_from_an_untrusted_peer_closes_the_session(header: bytes, version: str) -> None:
    refused = Note(
        "PROXY protocol header refused: only [listen] trusted_proxies may send one, with [listen] proxy_protocol on",
        level=Level.WARNING,
        fields={"version": version},
    )
    # Nothing of it reaches the backend: the v2 signature's "QUIT" line included.
    play(
        [
            GREETING,
            Client(header + b"USER alice\r\n")
            >> [refused, Close(f"PROXY protocol {version} header from a peer that is not trusted")],
        ],
        client=CLIENT,
        notes=True,
    )


def test_a_spoofed_header_after_the_balancers_is_refused_too() -> None:
    """The shell consumed the balancer's header; a second one is the client's own."""
    play(
        [GREETING, Client(format_v1(*ADDRESSES)) >> Close("PROXY protocol v1 header from a peer that is not trusted")],
        client=CLIENT,
    )


@pytest.mark.parametrize("command", [b"PROT P\r\n", b"PWD\r\n", b"USER PROXY\r\n", b"\r\nNOOP\r\n"])
def test_commands_that_start_like_a_header_are_commands(command: bytes) -> None:
    out = play([GREETING, Client(command)], client=CLIENT)
    assert not out.quit


def test_an_empty_line_waits_until_it_cannot_be_the_v2_signature() -> None:
    play(
        [
            GREETING,
            Client(b"\r\n") >> [],
            Client(b"NOOP\r\n") >> [to_client(b"500 Empty command line.\r\n"), to_server(b"NOOP\r\n")],
        ],
        client=CLIENT,
    )


def test_an_empty_line_then_the_end() -> None:
    play(
        [
            GREETING,
            Client(b"\r\n") >> [],
            ClientClosed() >> [to_client(b"500 Empty command line.\r\n"), Close("client hung up")],
        ],
        client=CLIENT,
    )


def test_greeted_session_drops_the_backends_220() -> None:
    """ftpfix sent its own 220; the client's USER came with the header and is already on its way."""
    play(
        [
            Client(b"USER alice\r\n") >> to_server(b"USER alice\r\n"),
            Server(b"220-Welcome\r\n220 ready\r\n") >> [],
            Server(b"331 Password please\r\n") >> to_client(b"331 Password please\r\n"),
        ],
        client=CLIENT,
        greeted=True,
    )


def test_greeted_session_passes_on_a_refusing_greeting() -> None:
    """A backend that refuses the session (421 too many users) is heard: its 421 answers the first command."""
    play(
        [
            Client(b"USER alice\r\n") >> to_server(b"USER alice\r\n"),
            Server(b"421 Too many users\r\n") >> to_client(b"421 Too many users\r\n"),
        ],
        client=CLIENT,
        greeted=True,
    )
