"""Coverage-guided fuzzing of the protocol core with atheris (libFuzzer).

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.bench.fuzz_core -runs=1000000

Each input is a script: the first byte of every step picks what happens
(client bytes, backend bytes, the shell's answer to a pending OpenPassive or
OpenActive, a close), the next byte its length. The core may raise its own
FtpfixError subclasses; anything else is a crash, and so is a write that does
not end in CRLF or a session that emits a command it should not.
"""

from __future__ import annotations

import sys
from ipaddress import IPv4Address

import atheris

with atheris.instrument_imports():
    from ftpfix.protocol import (
        ActiveFailed,
        ActiveOpened,
        ConnectionClosed,
        DataReceived,
        FinishTransfer,
        FtpfixError,
        OpenActive,
        OpenPassive,
        PassiveFailed,
        PassiveOpened,
        Policy,
        SendTo,
        Session,
        Side,
        TransferDone,
    )

POLICIES = [
    Policy(max_line=64),
    Policy(epsv="translate", active="passthrough", deny_anonymous=True),
    Policy(epsv="passthrough", active="deny", fix_address=False),
]
CLIENT = IPv4Address("198.51.100.10")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    session = Session(POLICIES[fdp.ConsumeIntInRange(0, len(POLICIES) - 1)], client=CLIENT)
    waiting_passive = waiting_active = waiting_transfer = False
    while fdp.remaining_bytes():
        action = fdp.ConsumeIntInRange(0, 7)
        try:
            if action <= 2:
                out = session.receive(DataReceived(Side.CLIENT, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 96))))
            elif action <= 5:
                out = session.receive(DataReceived(Side.SERVER, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 96))))
            elif action == 6:
                if waiting_passive:
                    out = (
                        session.receive(PassiveOpened(IPv4Address("203.0.113.1"), 50000))
                        if fdp.ConsumeBool()
                        else session.receive(PassiveFailed("x"))
                    )
                    waiting_passive = False
                elif waiting_active:
                    out = (
                        session.receive(ActiveOpened(IPv4Address("192.0.2.10"), 40000))
                        if fdp.ConsumeBool()
                        else session.receive(ActiveFailed("x"))
                    )
                    waiting_active = False
                elif waiting_transfer:
                    out = session.receive(
                        TransferDone(None if fdp.ConsumeBool() else "reset", connected=fdp.ConsumeBool())
                    )
                    waiting_transfer = False
                else:
                    continue
            else:
                out = session.receive(ConnectionClosed(Side.CLIENT if fdp.ConsumeBool() else Side.SERVER))
        except FtpfixError:
            return
        for side in Side:
            # Whole lines only: what one call writes to a side ends in CRLF
            # (the ABOR sequence is three writes, the last one ending it).
            written = b"".join(command.data for command in out if isinstance(command, SendTo) and command.side is side)
            assert not written or written.endswith(b"\r\n"), (side, written[-80:])
        for command in out:
            if isinstance(command, OpenPassive):
                assert not waiting_passive, "a second OpenPassive before the first was answered"
                waiting_passive = True
            elif isinstance(command, OpenActive):
                assert int(command.port) >= 1024 and command.host == str(CLIENT), command
                waiting_active = True
            elif isinstance(command, FinishTransfer):
                assert not waiting_transfer, "a second FinishTransfer before the first was answered"
                waiting_transfer = True
            elif isinstance(command, SendTo) and command.side is Side.SERVER:
                # Only canonical lines reach the backend: no control byte but
                # the line's end (the ABOR sequence's Telnet bytes aside).
                line = command.data.rstrip(b"\r\n")
                assert (
                    command.urgent or line.startswith(b"\xff") or not any(byte < 32 or byte == 127 for byte in line)
                ), line


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
