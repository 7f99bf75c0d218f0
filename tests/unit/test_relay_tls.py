"""relay_tls with TLS on the backend's side: how each end maps to the other.

Real sockets (socketpairs) and real TLS (trustme certificates), no servers:
the "backend" is a trio TLS server on one end of a socketpair, the
"client" a plain or TLS peer on another; ftpfix's relay sits between.
"""

from __future__ import annotations

import functools
import socket
import ssl

import pytest
import trio
import trustme

from ftpfix.net.relay import RelayStats, relay_tls

PAYLOAD = bytes(range(256)) * 2048  # 512 KiB


def in_trio(test):  # type: ignore[no-untyped-def]
    """Run an async test under trio.run, as the other unit tests do."""

    @functools.wraps(test)
    def run(contexts):  # type: ignore[no-untyped-def]
        trio.run(test, contexts)

    return run


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.test").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected TCP pair on loopback (a Unix socketpair has no reset)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))


async def tls_pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[trio.SSLStream[trio.SocketStream], trio.SSLStream[trio.SocketStream]]:
    """(the backend's TLS end, ftpfix's TLS end towards it), handshake done."""
    server_context, client_context = contexts
    raw_backend, raw_ftpfix = pair()
    backend = trio.SSLStream(raw_backend, server_context, server_side=True)
    ftpfix = trio.SSLStream(raw_ftpfix, client_context, server_hostname="backend.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.do_handshake)
        nursery.start_soon(ftpfix.do_handshake)
    return backend, ftpfix


async def read_all(stream: trio.abc.Stream) -> tuple[bytes, str | None]:
    """Everything ``stream`` delivers, and how it ended: None for a clean end."""
    got = b""
    try:
        while data := await stream.receive_some(65536):
            got += data
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        return got, type(error).__name__
    return got, None


@in_trio
async def test_download_from_a_tls_backend_to_a_plain_client(contexts) -> None:
    """The backend's close_notify is the end: the plain client gets every
    byte and a FIN, and the relay reports no error."""
    backend, ftpfix_backend = await tls_pair(contexts)
    client, ftpfix_client = pair()
    stats = RelayStats()
    delivered = trio.Event()
    received: list[tuple[bytes, str | None]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: relay_tls(ftpfix_client, ftpfix_backend, stats, delivered=delivered, download=True)
            )

            async def serve() -> None:
                await backend.send_all(PAYLOAD)
                await backend.aclose()

            async def receive() -> None:
                received.append(await read_all(client))
                await client.aclose()

            nursery.start_soon(serve)
            nursery.start_soon(receive)
    assert received == [(PAYLOAD, None)]
    assert stats.error is None and stats.download == len(PAYLOAD)
    assert delivered.is_set()


@in_trio
async def test_truncated_download_from_a_tls_backend_is_a_failure(contexts) -> None:
    """A TCP FIN without close_notify (forgeable: the truncation attack) is
    not the end of the file: the client gets a reset, never a clean end,
    and the relay records the failure."""
    backend, ftpfix_backend = await tls_pair(contexts)
    client, ftpfix_client = pair()
    stats = RelayStats()
    received: list[tuple[bytes, str | None]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def run_relay() -> None:
                await relay_tls(ftpfix_client, ftpfix_backend, stats, download=True)
                # The transfer closes the sockets after a failure; they reset.
                ftpfix_client.socket.close()
                ftpfix_backend.transport_stream.socket.close()

            nursery.start_soon(run_relay)

            async def serve() -> None:
                await backend.send_all(PAYLOAD[:100000])
                await backend.transport_stream.send_eof()  # a bare FIN

            async def receive() -> None:
                received.append(await read_all(client))

            nursery.start_soon(serve)
            nursery.start_soon(receive)
    assert stats.error is not None and "without close_notify" in stats.error
    data, ending = received[0]
    assert ending == "BrokenResourceError", "a truncated file must not end cleanly"
    assert len(data) <= 100000


@in_trio
async def test_upload_from_a_plain_client_ends_with_close_notify(contexts) -> None:
    """The client's FIN is the end of its upload: the TLS backend gets every
    byte and then close_notify (a clean end, so it stores the file)."""
    backend, ftpfix_backend = await tls_pair(contexts)
    client, ftpfix_client = pair()
    stats = RelayStats()
    stored: list[tuple[bytes, str | None]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay_tls(ftpfix_client, ftpfix_backend, stats, download=False))

            async def upload() -> None:
                await client.send_all(PAYLOAD)
                await client.send_eof()

            async def store() -> None:
                stored.append(await read_all(backend))

            nursery.start_soon(upload)
            nursery.start_soon(store)
    assert stored == [(PAYLOAD, None)]
    assert stats.error is None and stats.upload == len(PAYLOAD)


@in_trio
async def test_upload_cut_off_by_a_client_reset_never_ends_cleanly(contexts) -> None:
    """A plain client that resets mid-upload: the backend's TLS stream must
    not get close_notify (it would store the fragment as the whole file)."""
    backend, ftpfix_backend = await tls_pair(contexts)
    client, ftpfix_client = pair()
    stats = RelayStats()
    stored: list[tuple[bytes, str | None]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def run_relay() -> None:
                await relay_tls(ftpfix_client, ftpfix_backend, stats, download=False)
                ftpfix_client.socket.close()
                ftpfix_backend.transport_stream.socket.close()

            nursery.start_soon(run_relay)

            async def upload() -> None:
                await client.send_all(PAYLOAD[:50000])
                await trio.sleep(0.1)
                client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.socket.close()

            async def store() -> None:
                stored.append(await read_all(backend))

            nursery.start_soon(upload)
            nursery.start_soon(store)
    assert stats.error is not None
    _, ending = stored[0]
    assert ending is not None, "a cut-off upload must not end with close_notify"
