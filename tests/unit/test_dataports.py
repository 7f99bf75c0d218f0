"""Shared data ports in process, over real loopback sockets: who accepts, who gets
which connection, and that nothing is left open (net/dataports.py)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import structlog
import trio

from ftpfix.net.dataports import DataPorts
from ftpfix.ports import PortPool, PortRange
from tests.integration.test_shared_ports import free_range

HOST = "127.0.0.1"


def peers(host: str):
    return ipaddress.ip_network(host)


def make_ports() -> tuple[DataPorts, int]:
    first, _ = free_range(1)
    return DataPorts(PortPool(PortRange(first, first)), structlog.get_logger("test")), first


async def dial(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        sock.connect((HOST, port))
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
    return sock


def test_each_connection_goes_to_its_own_claim_whoever_accepts() -> None:
    ports, port = make_ports()
    sources = [f"127.0.0.{i}" for i in range(2, 6)]

    async def main() -> None:
        claims = [ports.claim(HOST, peers(source), share=True) for source in sources]
        assert all(claim is not None and claim.port == port for claim in claims)
        assert ports.listening == 1
        got: dict[str, str] = {}

        async def wait(claim) -> None:
            sock = await claim.accept()
            got[str(claim.peers.network_address)] = sock.getpeername()[0]
            sock.close()
            claim.release()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for claim in claims:
                    nursery.start_soon(wait, claim)
                await trio.sleep(0.05)
                dialed = [await dial(port, source) for source in reversed(sources)]
        for sock in dialed:
            sock.close()
        assert got == {source: source for source in sources}
        assert ports.listening == 0 and ports.pool.leases == 0

    trio.run(main)


def test_the_acceptor_cancelled_passes_the_turn_and_its_address_becomes_a_stranger() -> None:
    ports, port = make_ports()

    async def main() -> None:
        first = ports.claim(HOST, peers("127.0.0.2"), share=True)
        second = ports.claim(HOST, peers("127.0.0.3"), share=True)
        result: list[str] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                first_scope = trio.CancelScope()

                async def accept_first() -> None:
                    with first_scope:
                        await first.accept()

                nursery.start_soon(accept_first)
                await trio.sleep(0.05)  # first is the acceptor now

                async def accept_second() -> None:
                    sock = await second.accept()
                    result.append(sock.getpeername()[0])
                    sock.close()
                    second.release()

                nursery.start_soon(accept_second)
                await trio.sleep(0.05)
                first_scope.cancel()
                first.release()
                stranger = await dial(port, "127.0.0.2")
                await trio.sleep(0.05)
                assert second.strangers == ["127.0.0.2"]
                friend = await dial(port, "127.0.0.3")
        assert result == ["127.0.0.3"]
        # The stranger was reset.
        with pytest.raises(ConnectionResetError):
            stranger.recv(1)
        stranger.close()
        friend.close()
        assert ports.listening == 0 and ports.pool.leases == 0

    trio.run(main)


def test_a_connection_handed_to_a_claim_that_left_is_reset() -> None:
    ports, port = make_ports()

    async def main() -> None:
        taker = ports.claim(HOST, peers("127.0.0.2"), share=True)
        leaver = ports.claim(HOST, peers("127.0.0.3"), share=True)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def accept_taker() -> None:
                    (await taker.accept()).close()

                nursery.start_soon(accept_taker)
                await trio.sleep(0.05)
                late = await dial(port, "127.0.0.3")
                while leaver.connection is None:
                    await trio.sleep(0.01)  # handed over, never taken
                leaver.release()
                (await dial(port, "127.0.0.2")).close()
        with pytest.raises(ConnectionResetError):
            late.setblocking(True)
            late.settimeout(5)
            late.recv(1)
        late.close()
        taker.release()
        assert ports.listening == 0 and ports.pool.leases == 0

    trio.run(main)


def test_a_released_claim_frees_its_port_for_the_same_address() -> None:
    ports, _ = make_ports()

    async def main() -> None:
        claim = ports.claim(HOST, peers("127.0.0.2"), share=True)
        assert ports.claim(HOST, peers("127.0.0.2"), share=True) is None
        claim.release()
        claim.release()  # twice: nothing more
        again = ports.claim(HOST, peers("127.0.0.2"), share=True)
        assert again is not None
        again.release()
        assert ports.listening == 0

    trio.run(main)
