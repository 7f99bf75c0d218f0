"""Transcript tests for the core, in the manner of mitmproxy's Playbook.

A script is a list of steps: what a side says, or how the shell answers an
``OpenPassive``. ``replay`` runs it and returns what the core asked for, with
consecutive writes to the same side merged, so the same expectation holds
whether the bytes came in one piece or one byte at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from ftpfix.protocol import Command, Note, Policy, SendTo, Session, Side


@dataclass(frozen=True)
class Client:
    data: bytes


@dataclass(frozen=True)
class Server:
    data: bytes


@dataclass(frozen=True)
class Opened:
    host: str
    port: int


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class ActiveOpened:
    host: str
    port: int


@dataclass(frozen=True)
class ActiveFailed:
    reason: str


@dataclass(frozen=True)
class Finished:
    """The shell's answer to FinishTransfer: the relay's failure, if any."""

    failure: str | None = None
    connected: bool = True


@dataclass(frozen=True)
class Quiet:
    """The shell's answer to AwaitQuiet: the backend has gone quiet."""


@dataclass(frozen=True)
class ClientClosed:
    pass


@dataclass(frozen=True)
class ServerClosed:
    pass


Step = Client | Server | Opened | Failed | ActiveOpened | ActiveFailed | Finished | Quiet | ClientClosed | ServerClosed


def replay(
    script: list[Step],
    *,
    byte_at_a_time: bool = False,
    policy: Policy | None = None,
    client: IPv4Address | IPv6Address | None = None,
    notes: bool = False,
) -> list[Command]:
    session = Session(policy, client=client)
    out: list[Command] = []
    for step in script:
        match step:
            case Client(data) | Server(data):
                side = Side.CLIENT if isinstance(step, Client) else Side.SERVER
                pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
                for piece in pieces:
                    out += session.receive_data(side, piece)
            case Opened(host, port):
                out += session.passive_opened(IPv4Address(host), port)
            case Failed(reason):
                out += session.passive_failed(reason)
            case ActiveOpened(host, port):
                out += session.active_opened(ip_address(host), port)
            case ActiveFailed(reason):
                out += session.active_failed(reason)
            case Finished(failure, connected):
                out += session.transfer_finished(failure, connected=connected)
            case Quiet():
                out += session.quiet_confirmed()
            case ClientClosed():
                out += session.connection_closed(Side.CLIENT)
            case ServerClosed():
                out += session.connection_closed(Side.SERVER)
        while session.can_advance:
            out += session.advance()
    return merge(out, notes=notes)


def merge(commands: list[Command], *, notes: bool = False) -> list[Command]:
    merged: list[Command] = []
    for command in commands:
        if isinstance(command, Note) and not notes:
            continue
        last = merged[-1] if merged else None
        if isinstance(command, SendTo) and isinstance(last, SendTo) and last.side is command.side and not (last.urgent or command.urgent):
            merged[-1] = SendTo(command.side, last.data + command.data)
        else:
            merged.append(command)
    return merged


def both_ways(script: list[Step], **kwargs) -> list[Command]:
    """Replay whole and one byte at a time; the results must agree."""
    whole = replay(script, **kwargs)
    assert replay(script, byte_at_a_time=True, **kwargs) == whole
    return whole


def to_client(data: bytes) -> SendTo:
    return SendTo(Side.CLIENT, data)


def to_server(data: bytes) -> SendTo:
    return SendTo(Side.SERVER, data)
