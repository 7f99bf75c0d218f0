"""The shell's PROXY header reader (ftpfix.net.proxied) over in-memory
streams, with trio's autojump clock: both balancer behaviours, the deadlines,
and the bytes after the header."""

from __future__ import annotations

import structlog
import trio
import trio.testing

from ftpfix.net.proxied import (
    NO_HEADER,
    OWN_GREETING,
    PROXY_HEADER_TIMEOUT,
    PROXY_HEADER_WAIT,
    Arrival,
    PrefixedStream,
    receive_proxy_header,
)
from ftpfix.protocol.proxyheader import V2_LOCAL, format_v1, format_v2

PEER = ("10.0.0.5", 33000)
CLIENT = ("198.51.100.7", 40000)
DIALED = ("192.0.2.1", 21)
LOGIN_TIMEOUT = 60.0


class Balancer:
    """The balancer's end: what it sends is the script's; what it hears is recorded."""

    def __init__(self, stream: trio.testing.MemoryStream) -> None:
        self.stream = stream
        self.heard = bytearray()

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_some(self) -> bytes:
        data = bytes(await self.stream.receive_some())
        self.heard.extend(data)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


def run(script, *, login_timeout: float = LOGIN_TIMEOUT, greet: bool = True) -> tuple[Arrival | None, bytes, float]:
    """Run the reader against ``script(balancer)``; return its result, all
    the balancer heard, and how long the reader took."""
    result: list = []

    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        balancer = Balancer(theirs)
        started = trio.current_time()

        async def play() -> None:
            try:
                await script(balancer)
            except trio.BrokenResourceError:
                pass  # ftpfix closed while the script still talked

        async with trio.open_nursery() as nursery:
            nursery.start_soon(play)
            arrival = await receive_proxy_header(ours, PEER, login_timeout, structlog.get_logger(), greet=greet)
            took = trio.current_time() - started
            await ours.aclose()
            nursery.cancel_scope.cancel()
        try:
            while await balancer.receive_some():
                pass
        except trio.ClosedResourceError:
            pass  # the script hung up itself
        result.extend([arrival, bytes(balancer.heard), took])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result[0], result[1], result[2]


def test_a_header_at_connect_is_read_before_any_greeting() -> None:
    async def script(stream) -> None:
        await stream.send_all(format_v2(CLIENT, DIALED))

    arrival, said, took = run(script)
    assert arrival == Arrival(client=CLIENT, dialed=DIALED, via=PEER[0], rest=b"", greeted=False)
    assert said == b"" and took < PROXY_HEADER_WAIT


def test_a_header_one_byte_at_a_time_and_the_bytes_after_it() -> None:
    async def script(stream) -> None:
        for byte in format_v1(CLIENT, DIALED) + b"USER a":
            await stream.send_all(bytes([byte]))

    arrival, said, _ = run(script)
    assert arrival is not None and arrival.client == CLIENT and said == b""
    assert b"USER a".startswith(arrival.rest)


def test_a_balancer_that_waits_for_the_client_gets_ftpfixs_greeting_first() -> None:
    async def script(stream) -> None:
        # The client reads the 220, then speaks; the balancer puts the header in front.
        assert await stream.receive_some() == OWN_GREETING
        await trio.sleep(20)  # a person typing a user name
        await stream.send_all(format_v2(CLIENT, DIALED) + b"USER alice\r\n")

    arrival, said, took = run(script)
    assert said == OWN_GREETING
    assert arrival == Arrival(client=CLIENT, dialed=DIALED, via=PEER[0], rest=b"USER alice\r\n", greeted=True)
    assert took >= 20 + PROXY_HEADER_WAIT


def test_on_the_implicit_port_ftpfix_never_greets_in_plain_text() -> None:
    """Implicit FTPS behind a balancer that holds its header until the client
    speaks: the client's first bytes are its ClientHello, after the header;
    a plain 220 meanwhile would break its handshake, so none is sent."""
    hello = b"\x16\x03\x01\x02\x00\x01"  # the start of a ClientHello

    async def script(stream) -> None:
        await trio.sleep(3)  # longer than PROXY_HEADER_WAIT
        await stream.send_all(format_v2(CLIENT, DIALED) + hello)

    arrival, said, _ = run(script, greet=False)
    assert said == b""
    assert arrival == Arrival(client=CLIENT, dialed=DIALED, via=PEER[0], rest=hello, greeted=False)

    async def silent(stream) -> None:
        await trio.sleep(1000)

    arrival, said, took = run(silent, login_timeout=30, greet=False)
    assert arrival is None and said == b"" and 30 <= took < 31


def test_no_header_within_the_login_timeout() -> None:
    async def script(stream) -> None:
        await trio.sleep(1000)

    arrival, said, took = run(script, login_timeout=30)
    assert arrival is None and said == OWN_GREETING and 30 <= took < 31


def test_a_header_that_trickles_is_cut_at_its_own_deadline() -> None:
    async def script(stream) -> None:
        for byte in format_v1(CLIENT, DIALED)[:20]:
            await stream.send_all(bytes([byte]))
            await trio.sleep(1)
        await trio.sleep(1000)

    arrival, said, took = run(script)
    assert arrival is None and said == b""
    assert took <= PROXY_HEADER_TIMEOUT + 1


def test_a_command_without_a_header_after_the_greeting_gets_421() -> None:
    async def script(stream) -> None:
        await stream.receive_some()
        await stream.send_all(b"USER alice\r\n")

    arrival, said, _ = run(script)
    assert arrival is None and said == OWN_GREETING + NO_HEADER


def test_garbage_before_the_greeting_gets_nothing() -> None:
    async def script(stream) -> None:
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")

    arrival, said, _ = run(script)
    assert arrival is None and said == b""


def test_local_is_the_balancer_itself() -> None:
    async def script(stream) -> None:
        await stream.send_all(V2_LOCAL)

    arrival, _, _ = run(script)
    assert arrival == Arrival(client=PEER, via=PEER[0])


def test_a_hang_up_before_anything() -> None:
    async def script(stream) -> None:
        await stream.aclose()

    arrival, _, took = run(script)
    assert arrival is None and took < PROXY_HEADER_WAIT


def test_prefixed_stream_reads_its_prefix_first() -> None:
    async def main() -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        stream = PrefixedStream(ours, b"USER alice\r\n")  # type: ignore[arg-type]
        assert await stream.receive_some(4) == b"USER"
        assert await stream.receive_some() == b" alice\r\n"
        await theirs.send_all(b"PASS x\r\n")
        assert await stream.receive_some() == b"PASS x\r\n"
        await stream.send_all(b"331 ok\r\n")
        assert await theirs.receive_some() == b"331 ok\r\n"

    trio.run(main)
