"""Arbitrary bytes from either side: only ftpfix's own errors may escape the core."""

from ipaddress import IPv4Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftpfix.protocol import (
    ActiveFailed,
    ActiveOpened,
    BackendQuiet,
    ConnectionClosed,
    DataReceived,
    FtpfixError,
    PassiveFailed,
    PassiveOpened,
    Policy,
    ReadOn,
    SendTo,
    Session,
    Side,
    TransferDone,
    Waiting,
)

# Bytes that make FTP interesting, so the search finds structure quickly.
FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"227 ",
    b"227-",
    b"(",
    b")",
    b",",
    b"192,168,1,1,4,1",
    b"PASV",
    b"P@SW",
    b"EPSV",
    b"ABOR",
    b"STAT .",
    b"213-",
    b"213 ",
    b"\t",
    b"USER\tanonymous",
    b"PORT 198,51,100,10,195,80",
    b"FEAT",
    b"211-",
    b" EPSV",
    b"RETR x",
    b"150 ",
    b"226 ",
    b"200 ",
    b"500 ",
    b"\xff\xf4",
    b"\x00",
    b"999",
    b"1,2,3,4,300,1",
]
chunk = st.one_of(
    st.binary(max_size=64), st.sampled_from(FRAGMENTS), st.lists(st.sampled_from(FRAGMENTS), max_size=8).map(b"".join)
)
step = st.tuples(st.sampled_from([Side.CLIENT, Side.SERVER, "open", "fail", "close"]), chunk)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_only_own_errors_escape(steps: list) -> None:
    session = Session(Policy(max_line=128), client=IPv4Address("198.51.100.10"))
    for kind, data in steps:
        try:
            if kind == "open":
                match session.waiting_for:
                    case Waiting.PASSIVE:
                        out = session.receive(PassiveOpened(IPv4Address("203.0.113.1"), 50000))
                    case Waiting.ACTIVE:
                        out = session.receive(ActiveOpened(IPv4Address("192.0.2.10"), 40000))
                    case Waiting.TRANSFER:
                        out = session.receive(TransferDone())
                    case Waiting.QUIET:
                        out = session.receive(BackendQuiet())
                    case _:
                        continue
            elif kind == "fail":
                match session.waiting_for:
                    case Waiting.PASSIVE:
                        out = session.receive(PassiveFailed("no port"))
                    case Waiting.ACTIVE:
                        out = session.receive(ActiveFailed("no port"))
                    case Waiting.TRANSFER:
                        out = session.receive(TransferDone("reset", connected=data[:1] < b"\x80"))
                    case _:
                        continue
            elif kind == "close":
                out = session.receive(ConnectionClosed(Side.CLIENT if data[:1] < b"\x80" else Side.SERVER))
            else:
                out = session.receive(DataReceived(kind, data))
            while session.can_advance:
                out += session.receive(ReadOn())
        except FtpfixError:
            return
        for side in Side:
            # Everything ftpfix writes is whole lines, ending in CRLF (the ABOR
            # sequence is three writes, and the last one ends the line).
            written = b"".join(command.data for command in out if isinstance(command, SendTo) and command.side is side)
            assert not written or written.endswith(b"\r\n")
