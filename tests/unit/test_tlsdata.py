"""The TLS data relay in process: ``accept_data_tls`` and ``relay_tls_plain`` between a
trio.SSLStream client and a plain backend, over real loopback socket pairs.

How each end of a protected data connection maps to the other: close_notify
to FIN and back; a TLS stream that just stops (the truncation attack) to a
reset the backend cannot mistake for an end; garbage instead of a
ClientHello to a handshake error.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from pathlib import Path

import pytest
import trio

from ftpfix.net.relay import RelayStats
from ftpfix.net.tlsdata import accept_data_tls, relay_tls_plain
from tests.harness.ftps import Certificates, make_certificates

#: Bigger than the relay's chunks and the socket buffers, not a multiple of a TLS record.
PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(Path(tmp_path_factory.mktemp("certs")))


def _pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback: a reset must be TCP's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        two, _ = listener.accept()
    for sock in (one, two):
        sock.setblocking(False)
    return one, two


def _server_context(certs: Certificates) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.certificate, certs.key)
    return context


async def _client(certs: Certificates, sock: socket.socket) -> trio.SSLStream[trio.SocketStream]:
    stream = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(sock)), certs.client_context(), server_hostname="127.0.0.1"
    )
    await stream.do_handshake()
    return stream


async def _read_all(sock: trio.socket.SocketType) -> bytes:
    received = bytearray()
    while data := await sock.recv(1 << 20):
        received += data
    return bytes(received)


def test_a_download_arrives_whole_and_ends_with_close_notify(certs: Certificates) -> None:
    async def main() -> None:
        client_end, relay_end = _pair()
        backend, backend_peer = _pair()
        stats, delivered = RelayStats(), trio.Event()
        got = b""
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def relay_side() -> None:
                    connection = await accept_data_tls(relay_end, _server_context(certs))
                    await relay_tls_plain(connection, backend, stats, delivered=delivered)

                nursery.start_soon(relay_side)
                client = await _client(certs, client_end)
                peer = trio.socket.from_stdlib_socket(backend_peer)

                async def serve() -> None:
                    view = memoryview(PAYLOAD)
                    while view:
                        view = view[await peer.send(view) :]
                    peer.shutdown(socket.SHUT_WR)

                nursery.start_soon(serve)
                while data := await client.receive_some(1 << 20):  # b"" only after close_notify
                    got += data
                await client.aclose()
        assert hashlib.sha256(got).digest() == hashlib.sha256(PAYLOAD).digest()
        assert stats.error is None and stats.download == len(PAYLOAD) and delivered.is_set()

    trio.run(main)


def test_an_upload_ends_with_close_notify_as_a_fin(certs: Certificates) -> None:
    async def main() -> None:
        client_end, relay_end = _pair()
        backend, backend_peer = _pair()
        stats = RelayStats()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def relay_side() -> None:
                    connection = await accept_data_tls(relay_end, _server_context(certs))
                    await relay_tls_plain(connection, backend, stats)

                nursery.start_soon(relay_side)
                client = await _client(certs, client_end)

                async def upload() -> None:
                    await client.send_all(PAYLOAD)
                    await client.aclose()  # close_notify: the end of the upload

                nursery.start_soon(upload)
                got = await _read_all(trio.socket.from_stdlib_socket(backend_peer))
                backend_peer.close()  # the backend's end: the relay finishes
        assert got == PAYLOAD
        assert stats.error is None and stats.upload == len(PAYLOAD)

    trio.run(main)


def test_a_truncated_upload_is_reset_not_ended(certs: Certificates) -> None:
    """A TCP FIN without close_notify (anyone on the path can forge one) must
    not reach the backend as a FIN, or it would store the fragment."""

    async def main() -> None:
        client_end, relay_end = _pair()
        backend, backend_peer = _pair()
        stats = RelayStats()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def relay_side() -> None:
                    connection = await accept_data_tls(relay_end, _server_context(certs))
                    try:
                        await relay_tls_plain(connection, backend, stats)
                    finally:
                        backend.close()  # as Transfer does: reset, since the relay failed

                nursery.start_soon(relay_side)
                client = await _client(certs, client_end)
                await client.send_all(PAYLOAD[: 1 << 20])
                client.transport_stream.socket.shutdown(socket.SHUT_WR)  # FIN, no close_notify
                peer = trio.socket.from_stdlib_socket(backend_peer)
                with pytest.raises(ConnectionResetError):
                    await _read_all(peer)
        assert stats.error == "the client's TLS stream broke off without close_notify"

    trio.run(main)


def test_garbage_instead_of_a_client_hello_fails_the_handshake(certs: Certificates) -> None:
    async def main() -> None:
        client_end, relay_end = _pair()
        client_end.send(b"USER anonymous\r\n" * 10)
        with trio.fail_after(10), pytest.raises(ssl.SSLError):
            await accept_data_tls(relay_end, _server_context(certs))

    trio.run(main)


def test_a_client_that_hangs_up_mid_handshake_fails_it(certs: Certificates) -> None:
    async def main() -> None:
        client_end, relay_end = _pair()
        client_end.close()
        with trio.fail_after(10), pytest.raises(OSError):
            await accept_data_tls(relay_end, _server_context(certs))

    trio.run(main)
