"""Arbitrary bytes from either side: only ftpfix's own errors may escape the core."""

from ipaddress import IPv4Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftpfix.protocol import FtpfixError, Policy, SendTo, Session, Side

# Bytes that make FTP interesting, so the search finds structure quickly.
FRAGMENTS = [b"\r\n", b"\n", b"\r", b"227 ", b"227-", b"(", b")", b",", b"192,168,1,1,4,1", b"PASV", b"P@SW", b"EPSV", b"RETR x", b"150 ", b"226 ", b"200 ", b"500 ", b"\xff\xf4", b"\x00", b"999", b"1,2,3,4,300,1"]
chunk = st.one_of(st.binary(max_size=64), st.sampled_from(FRAGMENTS), st.lists(st.sampled_from(FRAGMENTS), max_size=8).map(b"".join))
step = st.tuples(st.sampled_from([Side.CLIENT, Side.SERVER, "open", "fail", "close"]), chunk)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_only_own_errors_escape(steps: list) -> None:
    session = Session(Policy(max_line=128))
    for kind, data in steps:
        try:
            if kind == "open":
                if session.paused:
                    out = session.passive_opened(IPv4Address("203.0.113.1"), 50000)
                else:
                    continue
            elif kind == "fail":
                if session.paused:
                    out = session.passive_failed("no port")
                else:
                    continue
            elif kind == "close":
                out = session.connection_closed(Side.CLIENT if data[:1] < b"\x80" else Side.SERVER)
            else:
                out = session.receive_data(kind, data)
        except FtpfixError:
            return
        for command in out:
            if isinstance(command, SendTo):
                # Everything ftpfix writes is whole lines, ending in CRLF.
                assert command.data.endswith(b"\r\n")
