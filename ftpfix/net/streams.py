"""A control connection as the dispatcher sees it: any ``trio.abc.Stream``.

The dispatcher reads and writes through ``trio.abc.Stream`` alone, so a test
can run a whole session over ``trio.testing.memory_stream_pair`` and TLS can
wrap the control connection in a ``trio.SSLStream`` without touching it. What
FTP needs beyond a byte stream comes from the socket underneath, when there
is one (a ``trio.SocketStream``, directly or under layers that name it
``transport_stream``), and degrades gracefully when there is none:

- the urgent byte of RFC 959's ABOR synch (``send_urgent``);
- whether the peer hung up while ftpfix is not reading (``hung_up``);
- whether more bytes are already waiting (``readable_now``), so that a reply
  and whatever follows it are seen together.
"""

from __future__ import annotations

import select
import socket

import trio


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket at the bottom of ``stream``'s layers, if any."""
    layer: object = stream
    while layer is not None:
        if isinstance(layer, trio.SocketStream):
            return layer.socket
        layer = getattr(layer, "transport_stream", None)
    return None


def _poll(fd: int, events: int) -> int:
    poller = select.poll()
    poller.register(fd, events)
    return sum(found for _, found in poller.poll(0))


class ControlStream:
    """One control connection: a trio stream, plus its socket's extras."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.socket = _socket_of(stream)

    async def receive_some(self, max_bytes: int) -> bytes:
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_urgent(self, data: bytes) -> None:
        """Send ``data``, its last byte as TCP urgent data (MSG_OOB) where possible."""
        if not isinstance(self.stream, trio.SocketStream):
            # Urgent data would bypass any layer above the socket (TLS).
            await self.stream.send_all(data)
            return
        if len(data) > 1:
            await self.stream.send_all(data[:-1])
        # trio's streams have no flags; the socket's send has. One byte
        # always goes whole.
        await self.socket.send(data[-1:], socket.MSG_OOB)

    def hung_up(self) -> bool:
        """True if the peer closed or reset, even with unread bytes left."""
        if self.socket is None:
            return False
        return bool(
            _poll(self.socket.fileno(), select.POLLRDHUP) & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        )

    def readable_now(self) -> bool:
        """True if bytes (or the end) can be read without waiting.

        Through TLS (a backend spoken to in FTPS), only bytes already
        decrypted count: a readable socket may hold nothing but a TLS record
        without data (a TLS 1.3 session ticket), and reading it would wait
        for the next reply with this one held back.
        """
        layer = self.stream
        if getattr(layer, "waiting", False):
            return True  # the greeting read while TLS was set up (backend_tls.Prefixed)
        layer = getattr(layer, "transport_stream", layer) if hasattr(layer, "waiting") else layer
        if isinstance(layer, trio.SSLStream):
            return bool(layer.pending())
        if self.socket is None:
            return False
        return bool(_poll(self.socket.fileno(), select.POLLIN))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


#: Seconds a parting reply (a 421) may take to leave before the connection closes anyway.
PARTING_TIMEOUT = 1.0


async def say_last(stream: trio.abc.Stream, reply: bytes, timeout: float = PARTING_TIMEOUT) -> None:
    """Send a parting reply, best effort: a peer that is gone or does not read
    within ``timeout`` is not waited for, and nothing is raised. Shielded, so it
    is said even while the session is being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await stream.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass
