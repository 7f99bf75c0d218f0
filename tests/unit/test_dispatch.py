"""The shell in process: a whole session over memory streams, no subprocess.

The dispatcher is typed against ``trio.abc.Stream``, so both control
connections here are ``trio.testing.memory_stream_pair`` ends, and a scripted
backend runs as a task beside the session. Data connections are real
loopback sockets, as the relay needs them.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

import pytest
import structlog
import trio
import trio.testing

from ftpfix.config import Config, parse_config
from ftpfix.net.addresses import Endpoints
from ftpfix.net.dataports import DataPorts
from ftpfix.net.dispatch import ControlChannel
from ftpfix.net.public import PublicAddress
from ftpfix.ports import PortPool

LOCAL = "127.0.0.1"


class Lines:
    """Reads CRLF-ended lines from a stream, for the scripted peers."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    async def reply(self) -> bytes:
        """One whole reply, multi-line or not."""
        first = await self.line()
        text = first
        if first[3:4] == b"-":
            while not ((line := await self.line())[:3] == first[:3] and line[3:4] == b" "):
                text += line
            text += line
        return text


def config(**passive: str) -> Config:
    ports = passive.pop("ports", "52300-52309")
    return parse_config(
        {
            "backend": {"address": LOCAL},
            "passive": {"public_address": "203.0.113.1", "ports": ports},
            "limits": {"idle_timeout": 30, "login_timeout": 30},
        }
    )


Backend = Callable[[Lines, trio.abc.Stream], Awaitable[None]]
Client = Callable[[Lines, trio.abc.Stream], Awaitable[None]]


def run_session(backend: Backend, client: Client, *, timeout: float = 10) -> ControlChannel:
    """Run one session between the scripted ``client`` and ``backend``; return its channel."""
    cfg = config()
    result: list[ControlChannel] = []

    async def main() -> None:
        client_end, proxy_client = trio.testing.memory_stream_pair()
        proxy_backend, backend_end = trio.testing.memory_stream_pair()
        log = structlog.get_logger("test")
        public = PublicAddress(cfg.passive.public_address, 300, log)
        endpoints = Endpoints(client=LOCAL, local=LOCAL, backend=LOCAL, backend_local=LOCAL)
        channel = ControlChannel(
            cfg, DataPorts(PortPool(cfg.passive.ports), log), public, proxy_client, proxy_backend, endpoints, log
        )
        result.append(channel)
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)

                async def backend_then_close() -> None:
                    await backend(Lines(backend_end), backend_end)
                    await backend_end.aclose()  # a server closes after 221

                nursery.start_soon(backend_then_close)
                await client(Lines(client_end), client_end)
                await client_end.send_all(b"QUIT\r\n")
                assert (await Lines(client_end).reply()).startswith(b"221")

    trio.run(main)
    return result[0]


def data_listener() -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen(1)
    listener.setblocking(False)
    return listener, listener.getsockname()[1]


def pasv_reply(port: int) -> bytes:
    return b"227 Entering Passive Mode (192,168,123,1,%d,%d).\r\n" % (port >> 8, port & 0xFF)


async def connect_data(reply: bytes) -> trio.SocketStream:
    """Dial the port of a 227 on loopback (its address is the public one)."""
    numbers = reply[reply.index(b"(") + 1 : reply.index(b")")].split(b",")
    assert numbers[:4] == [b"203", b"0", b"113", b"1"], reply
    return await trio.open_tcp_stream(LOCAL, int(numbers[4]) * 256 + int(numbers[5]))


async def serve_quit(lines: Lines, stream: trio.abc.Stream) -> None:
    assert await lines.line() == b"QUIT\r\n"
    await stream.send_all(b"221 Goodbye.\r\n")


def test_a_passive_download_end_to_end_in_process() -> None:
    """Login, PASV rewritten to the public address, RETR relayed byte for byte, then the held 226."""
    payload = bytes(range(256)) * 4096
    listener, port = data_listener()

    async def backend(lines: Lines, stream: trio.abc.Stream) -> None:
        await stream.send_all(b"220 ready\r\n")
        assert await lines.line() == b"USER alice\r\n"
        await stream.send_all(b"230 ok\r\n")
        assert await lines.line() == b"PASV\r\n"
        await stream.send_all(pasv_reply(port))
        assert await lines.line() == b"RETR f\r\n"
        await trio.lowlevel.wait_readable(listener)
        data, _ = listener.accept()
        await stream.send_all(b"150 here it comes\r\n")
        with trio.socket.from_stdlib_socket(data) as sock:
            view = memoryview(payload)
            while view:
                view = view[await sock.send(view) :]
        await stream.send_all(b"226 done\r\n")
        await serve_quit(lines, stream)

    async def client(lines: Lines, stream: trio.abc.Stream) -> None:
        assert (await lines.reply()).startswith(b"220")
        await stream.send_all(b"USER alice\r\n")
        assert await lines.reply() == b"230 ok\r\n"
        await stream.send_all(b"PASV\r\n")
        data = await connect_data(await lines.reply())
        await stream.send_all(b"RETR f\r\n")
        assert (await lines.reply()).startswith(b"150")
        received = bytearray()
        while chunk := await data.receive_some(65536):
            received += chunk
        assert bytes(received) == payload
        assert await lines.reply() == b"226 done\r\n"
        await data.aclose()

    try:
        channel = run_session(backend, client)
    finally:
        listener.close()
    assert channel.totals.download == len(payload)


@pytest.mark.parametrize("form", [b"ABOR\r\n", b"\xff\xf4\xff\xf2ABOR\r\n"])
def test_abor_breaks_the_data_connection_and_replies_come_in_rfc_order(form: bytes) -> None:
    """ABOR during a download that the client does not read: ftpfix resets the
    data connection, never sends ABOR to the backend, and the client reads the
    transfer's 426 and then ABOR's 226, and its next command works."""
    listener, port = data_listener()
    seen: list[bytes] = []

    async def backend(lines: Lines, stream: trio.abc.Stream) -> None:
        await stream.send_all(b"220 ready\r\n")
        assert await lines.line() == b"PASV\r\n"
        await stream.send_all(pasv_reply(port))
        assert await lines.line() == b"RETR big\r\n"
        await trio.lowlevel.wait_readable(listener)
        data, _ = listener.accept()
        await stream.send_all(b"150 here it comes\r\n")
        with trio.socket.from_stdlib_socket(data) as sock:
            try:
                while True:
                    await sock.send(b"x" * 65536)
            except OSError as error:
                assert error.errno in (errno.ECONNRESET, errno.EPIPE)
        await stream.send_all(b"426 Failure writing network stream.\r\n")
        while (line := await lines.line()) != b"QUIT\r\n":
            seen.append(line)
            await stream.send_all(b"200 NOOP ok\r\n")
        await stream.send_all(b"221 Goodbye.\r\n")

    async def client(lines: Lines, stream: trio.abc.Stream) -> None:
        assert (await lines.reply()).startswith(b"220")
        await stream.send_all(b"PASV\r\n")
        data = await connect_data(await lines.reply())
        await stream.send_all(b"RETR big\r\n")
        assert (await lines.reply()).startswith(b"150")
        await data.receive_some(1)  # the transfer runs; nothing more is read
        await stream.send_all(form)
        assert (await lines.reply()).startswith(b"426")
        assert (await lines.reply()).startswith(b"226")
        await stream.send_all(b"NOOP\r\n")
        assert await lines.reply() == b"200 NOOP ok\r\n"
        await data.aclose()

    try:
        run_session(backend, client)
    finally:
        listener.close()
    assert seen == [b"NOOP\r\n"]  # no ABOR, in any form, reached the backend


def test_abor_before_the_client_connected_ends_the_backends_wait() -> None:
    """The backend waits for a data connection the client never made: ABOR
    makes ftpfix dial it and reset, so the backend answers at once."""
    listener, port = data_listener()

    async def backend(lines: Lines, stream: trio.abc.Stream) -> None:
        await stream.send_all(b"220 ready\r\n")
        assert await lines.line() == b"PASV\r\n"
        await stream.send_all(pasv_reply(port))
        assert await lines.line() == b"RETR f\r\n"
        await trio.lowlevel.wait_readable(listener)  # until ftpfix knocks
        data, _ = listener.accept()
        data.close()
        await stream.send_all(b"425 Failed to establish connection.\r\n")
        await serve_quit(lines, stream)

    async def client(lines: Lines, stream: trio.abc.Stream) -> None:
        assert (await lines.reply()).startswith(b"220")
        await stream.send_all(b"PASV\r\n")
        assert (await lines.reply()).startswith(b"227")
        await stream.send_all(b"RETR f\r\nABOR\r\n")
        # The backend's 425 comes out as RFC 959's 426 for an aborted transfer.
        assert (await lines.reply()).startswith(b"426")
        assert (await lines.reply()).startswith(b"226")

    try:
        run_session(backend, client)
    finally:
        listener.close()


def test_a_reply_that_answers_no_command_ends_the_session_with_421() -> None:
    """Rule 2, through the dispatcher: the client is told, and the session ends."""

    async def backend(lines: Lines, stream: trio.abc.Stream) -> None:
        await stream.send_all(b"220 ready\r\n200 nobody asked\r\n")
        await trio.sleep_forever()

    async def client(lines: Lines, stream: trio.abc.Stream) -> None:
        assert (await lines.reply()).startswith(b"220")
        assert (await lines.reply()).startswith(b"421")
        with pytest.raises(EOFError):
            await lines.reply()

    async def main() -> None:
        cfg = config()
        client_end, proxy_client = trio.testing.memory_stream_pair()
        proxy_backend, backend_end = trio.testing.memory_stream_pair()
        log = structlog.get_logger("test")
        public = PublicAddress(cfg.passive.public_address, 300, log)
        endpoints = Endpoints(client=LOCAL, local=LOCAL, backend=LOCAL, backend_local=LOCAL)
        channel = ControlChannel(
            cfg, DataPorts(PortPool(cfg.passive.ports), log), public, proxy_client, proxy_backend, endpoints, log
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend, Lines(backend_end), backend_end)

                async def session() -> None:
                    await channel.run()
                    await proxy_client.aclose()

                nursery.start_soon(session)
                await client(Lines(client_end), client_end)
                nursery.cancel_scope.cancel()
        assert channel.close_reason == "backend reply answered no command"

    trio.run(main)
