"""Transcript tests for the core, in the manner of mitmproxy's Playbook.

A script is a list of steps: what a side says, or how the shell answers a
command (``Opened`` for ``OpenPassive``, ``Finished`` for ``FinishTransfer``).

- ``play`` checks a playbook step by step: ``Client(b"PASV\\r\\n") >>
  to_server(b"PASV\\r\\n")`` says that this input, and nothing else, produces
  that output; it runs whole and one byte at a time.
- ``replay`` runs a script and returns everything the core asked for.

Consecutive writes to the same side are merged, so the same expectation holds
whether the bytes came in one piece or one byte at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from ftpfix.protocol import (
    ActiveFailed as ActiveFailedEvent,
)
from ftpfix.protocol import (
    ActiveOpened as ActiveOpenedEvent,
)
from ftpfix.protocol import (
    BackendQuiet,
    Command,
    ConnectionClosed,
    Count,
    DataFailed,
    DataReceived,
    Event,
    Level,
    Note,
    PassiveFailed,
    PassiveOpened,
    Policy,
    ReadOn,
    SendTo,
    Session,
    Side,
    TransferDone,
    TransferReplied,
    TransferSettled,
)


class _Step:
    """A step of a script; ``step >> expected`` says what it must make the core do."""

    def __rshift__(self, expected: Command | list[Command]) -> Expect:
        return Expect(self, expected if isinstance(expected, list) else [expected])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Client(_Step):
    data: bytes


@dataclass(frozen=True)
class Server(_Step):
    data: bytes


@dataclass(frozen=True)
class Opened(_Step):
    """The shell's answer to OpenPassive: it listens on host:port."""

    host: str
    port: int


@dataclass(frozen=True)
class Failed(_Step):
    """The shell's answer to OpenPassive: it could not listen."""

    reason: str


@dataclass(frozen=True)
class ActiveOpened(_Step):
    host: str
    port: int


@dataclass(frozen=True)
class ActiveFailed(_Step):
    reason: str


@dataclass(frozen=True)
class Finished(_Step):
    """The shell's answer to FinishTransfer: the relay's failure, if any."""

    failure: str | None = None
    connected: bool = True


@dataclass(frozen=True)
class Lost(_Step):
    """The shell says the newest mapping's data connection will never be made."""

    reason: str


@dataclass(frozen=True)
class Quiet(_Step):
    """The shell's answer to AwaitQuiet: the backend has gone quiet."""


@dataclass(frozen=True)
class Settled(_Step):
    """The shell's answer to SettleTransfer: the aborted transfer is over and the backend quiet."""


@dataclass(frozen=True)
class ClientClosed(_Step):
    pass


@dataclass(frozen=True)
class ServerClosed(_Step):
    pass


Step = (
    Client
    | Server
    | Opened
    | Failed
    | ActiveOpened
    | ActiveFailed
    | Finished
    | Lost
    | Quiet
    | Settled
    | ClientClosed
    | ServerClosed
)


@dataclass(frozen=True)
class Expect:
    """A step and everything the core must answer it with (Notes aside)."""

    step: Step
    expected: list[Command]


def events(step: Step, *, byte_at_a_time: bool = False) -> list[Event]:
    """The events the shell would feed the core for ``step``."""
    match step:
        case Client(data) | Server(data):
            side = Side.CLIENT if isinstance(step, Client) else Side.SERVER
            pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
            return [DataReceived(side, piece) for piece in pieces if piece]
        case Opened(host, port):
            return [PassiveOpened(IPv4Address(host), port)]
        case Failed(reason):
            return [PassiveFailed(reason)]
        case ActiveOpened(host, port):
            return [ActiveOpenedEvent(ip_address(host), port)]
        case ActiveFailed(reason):
            return [ActiveFailedEvent(reason)]
        case Finished(failure, connected):
            return [TransferDone(failure, connected=connected)]
        case Lost(reason):
            return [DataFailed(reason)]
        case Quiet():
            return [BackendQuiet()]
        case Settled():
            return [TransferSettled()]
        case ClientClosed():
            return [ConnectionClosed(Side.CLIENT)]
        case ServerClosed():
            return [ConnectionClosed(Side.SERVER)]
    raise TypeError(step)


def run_step(session: Session, step: Step, *, byte_at_a_time: bool = False) -> list[Command]:
    """Feed one step to ``session`` as the shell would, ReadOn included."""
    out: list[Command] = []
    for event in events(step, byte_at_a_time=byte_at_a_time):
        out += session.receive(event)
    while session.can_advance:
        out += session.receive(ReadOn())
    return out


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
        out += run_step(session, step, byte_at_a_time=byte_at_a_time)
    return merge(out, notes=notes)


def play(
    script: list[Step | Expect],
    *,
    policy: Policy | None = None,
    client: IPv4Address | IPv6Address | None = None,
    notes: bool = False,
    greeted: bool = False,
) -> Session:
    """Run a playbook: every ``step >> expected`` must produce exactly ``expected``.

    A bare step is run and its output not checked (a login, say). The script
    runs twice, whole and one byte at a time, and both must match. With
    ``notes``, the log lines above DEBUG are part of what a step must produce.
    Returns the session as the whole run left it.
    """
    for byte_at_a_time in (True, False):
        session = Session(policy, client=client, greeted=greeted)
        for number, item in enumerate(script):
            step = item.step if isinstance(item, Expect) else item
            out = merge(run_step(session, step, byte_at_a_time=byte_at_a_time), notes=notes, debug=False)
            if isinstance(item, Expect):
                expected = merge(item.expected, notes=notes, debug=False)
                how = "one byte at a time" if byte_at_a_time else "whole"
                assert out == expected, f"step {number} ({step!r}, {how}):\n  got      {out!r}\n  expected {expected!r}"
    return session


def merge(commands: list[Command], *, notes: bool = False, debug: bool = True, counts: bool = False) -> list[Command]:
    """``commands`` with consecutive writes to one side joined; Notes only with
    ``notes``, and DEBUG ones only with ``debug`` too; ``Count`` and
    ``TransferReplied`` (metrics and the transfer log) only with ``counts``."""
    merged: list[Command] = []
    for command in commands:
        if isinstance(command, Note) and not (notes and (debug or command.level is not Level.DEBUG)):
            continue
        if isinstance(command, Count | TransferReplied) and not counts:
            continue
        last = merged[-1] if merged else None
        if (
            isinstance(command, SendTo)
            and isinstance(last, SendTo)
            and last.side is command.side
            and not (last.urgent or command.urgent)
        ):
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
