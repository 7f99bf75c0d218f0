"""Byte pumping between two connected data sockets: the hot loop of ftpfix.

The relay works on raw non-blocking stdlib sockets, driven by
``trio.lowlevel.wait_readable`` and ``wait_writable``, rather than on
``trio.SocketStream``, whose ``receive_some`` allocates a fresh bytes object
for every read and whose ``send_all`` copies again.

Each direction moves its bytes the way that costs the whole path least:

- Downloads (backend to client) go kernel to kernel with splice(2), socket
  to pipe to socket: ftpfix never touches the bytes.
- Uploads (client to backend) are copied through one reusable buffer with
  ``recv_into`` and ``send``. Splicing them costs ftpfix less (0.2 against
  0.35 CPU-seconds per GB) but the backend more. Splice hands the backend the
  very bytes the client's kernel wrote, after they have waited behind
  megabytes of socket and pipe buffers, long out of the CPU caches; copied,
  they are fresh from ftpfix's send. A server that stores them in its page
  cache then spends half as long again per byte (vsftpd writing to tmpfs:
  0.9 against 0.6 CPU-s/GB). Its socket reads cost the same either way, and
  the difference vanishes when it writes to /dev/null, or when every buffer
  on the path is cut to 128 KiB (but a receive buffer that small would
  throttle distant clients). Where the backend shares ftpfix's CPUs, as
  in ``tests.bench.bench``, the copy is the cheaper whole: the path takes
  1.4 CPU-s/GB instead of 1.6, and uploads run 5-30 % faster, the more the
  busier the CPUs (``tests.bench.upload --baseline`` measures it).
- A rate-limited direction is always copied: the limit must see every chunk.

Half-close follows TCP: when one side ends its stream (EOF), ftpfix shuts
down writing towards the other side and keeps relaying the opposite direction
until it ends too. A file is therefore never cut short: the backend's FIN
reaches the client only after the last byte before it.

A failure is passed on as a failure: when either side resets, or the relay
stalls, both sockets are reset (``SO_LINGER`` zero), never closed with a FIN.
A FIN is how a sender says "that was all", and a backend that got one for a
broken upload would store the fragment and answer 226.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass, field

import trio

#: Bytes read per ``recv_into``. Large reads amortise the per-call cost; past
#: 256 KiB the gain is lost in the noise (128 KiB to 1 MiB measured alike for
#: uploads), while each active direction holds one such buffer, and a buffer
#: that fits in the CPU's L2 cache is still there when ``send`` reads it back.
CHUNK_SIZE = 256 * 1024

#: Bytes the copy loop may move without waiting before it yields to other
#: tasks anyway: a sender faster than the receiver never blocks in
#: ``recv_into``, and without a checkpoint nothing else would run and no
#: cancellation (ABOR, the stall deadline) would arrive. Each yield costs a
#: trio scheduling round and an ``epoll_wait``; yielding after every 256 KiB
#: chunk cost an upload 0.1 CPU-s/GB of ftpfix's 0.45. At 1 GB/s, 1 MiB is a
#: yield every millisecond.
YIELD_BYTES = 1024 * 1024

#: Whether uploads (client to backend) are spliced like downloads. They are
#: copied, for the backend's sake (see the module docstring). A backend on
#: another machine does not pay for stale bytes, since its NIC delivers them
#: into fresh buffers; there splicing would save ftpfix 0.15 CPU-s/GB.
SPLICE_UPLOADS = False

#: Pipe capacity asked for a splice relay: one megabyte moves per pair of
#: system calls. An unprivileged process may raise a pipe up to
#: /proc/sys/fs/pipe-max-size (1 MiB by default); if the kernel says no, the
#: default 64 KiB still works.
PIPE_SIZE = 1024 * 1024

#: Whether splice(2) works here; set to False the first time it does not.
_splice_works = hasattr(os, "splice")

#: Seconds between looks at a relay's send queues for the stall deadline.
STALL_SAMPLE = 1.0

#: Seconds the client may keep its side of a data connection open once the
#: backend has closed its own: long enough for any client to read the tail and
#: close, short enough that a passive port is not held by a forgotten socket.
CLIENT_LINGER = 30.0


class TokenBucket:
    """A byte-rate limit: ``rate`` bytes per second, bursts of ``burst`` bytes.

    One bucket per session and direction, shared by the session's transfers,
    as pure-ftpd's -T caps a session. The burst is a tenth of a second's worth,
    so over any five seconds the rate is kept within a few percent.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.burst = max(rate // 10, 1)
        self._tokens = float(self.burst)
        self._stamp = now

    def take(self, count: int, now: float) -> float:
        """Spend ``count`` bytes; the seconds to wait before going on."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= count
        return -self._tokens / self.rate if self._tokens < 0 else 0.0


@dataclass(slots=True)
class RelayStats:
    """What one relay moved, updated as it runs.

    ``last_progress`` is the trio time a byte last moved, for the stall
    deadline and the session's idle clock: a data connection that moves
    nothing is not activity.
    """

    upload: int = 0  # client to backend
    download: int = 0  # backend to client
    error: str | None = None
    last_progress: float = field(default=0.0)


class _Direction:
    __slots__ = ("bucket", "source", "splice", "stats", "target", "upload")

    def __init__(
        self, source: socket.socket, target: socket.socket, stats: RelayStats, upload: bool, bucket: TokenBucket | None
    ) -> None:
        self.source, self.target, self.stats, self.upload, self.bucket = source, target, stats, upload, bucket
        self.splice = bucket is None and (SPLICE_UPLOADS or not upload)

    def _count(self, received: int) -> None:
        if self.upload:
            self.stats.upload += received
        else:
            self.stats.download += received
        self.stats.last_progress = trio.current_time()

    async def pump(self) -> None:
        global _splice_works
        if _splice_works and self.splice:
            try:
                await self._splice()
            except _SpliceUnavailable:
                _splice_works = False
            else:
                return
        await self._copy()

    async def _splice(self) -> None:
        """Move bytes kernel to kernel: socket to pipe to socket, no copy.

        With both sides drained alternately, an EAGAIN from the first
        splice always means "socket empty" (the pipe is empty then) and from
        the second "socket full".
        """
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            # Out of descriptors for a pipe: this transfer copies instead.
            await self._copy()
            return
        try:
            try:
                capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                capacity = 64 * 1024
            source, target = self.source, self.target
            source_fd, target_fd = source.fileno(), target.fileno()
            flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
            while True:
                try:
                    received = os.splice(source_fd, write_end, capacity, flags=flags)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(source)
                    continue
                except OSError as error:
                    if error.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise _SpliceUnavailable from error
                    raise
                if received == 0:
                    break
                pending = received
                while pending:
                    try:
                        pending -= os.splice(read_end, target_fd, pending, flags=flags)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(target)
                self._count(received)
                await trio.lowlevel.checkpoint()
        finally:
            os.close(read_end)
            os.close(write_end)
        _shutdown_write(target)

    async def _copy(self) -> None:
        """Move bytes through one reusable buffer: uploads, the rate-limited
        path, which must see every chunk to meter it, and the fallback where
        splice(2) is refused."""
        bucket = self.bucket
        size = CHUNK_SIZE if bucket is None else min(CHUNK_SIZE, bucket.burst)
        buffer = memoryview(bytearray(size))
        source, target = self.source, self.target
        unyielded = 0  # bytes moved since this loop last let other tasks run
        while True:
            try:
                received = source.recv_into(buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(source)
                unyielded = 0
                continue
            if received == 0:
                break
            sent = 0
            while sent < received:
                try:
                    sent += target.send(buffer[sent:received])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(target)
                    unyielded = 0
            self._count(received)
            if bucket is not None and (delay := bucket.take(received, trio.current_time())):
                await trio.sleep(delay)
                unyielded = 0
            elif (unyielded := unyielded + received) >= YIELD_BYTES:
                await trio.lowlevel.checkpoint()
                unyielded = 0
        _shutdown_write(target)


class _SpliceUnavailable(Exception):
    """splice(2) refused these descriptors; fall back to copying."""


def _shutdown_write(target: socket.socket) -> None:
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the target is gone already; nothing left to deliver


def _unsent(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return -1


#: ``struct linger`` with l_onoff 1 and l_linger 0: close() sends a reset.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def reset_on_close(sock: socket.socket) -> None:
    """Make ``sock``'s close() a TCP reset, so the peer sees a failure, not an end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    except OSError:
        pass  # already closed or reset by the peer


async def relay(
    client: socket.socket,
    backend: socket.socket,
    stats: RelayStats,
    upload_limit: TokenBucket | None = None,
    download_limit: TokenBucket | None = None,
    *,
    stall_timeout: float = float("inf"),
    delivered: trio.Event | None = None,
) -> None:
    """Relay between ``client`` and ``backend`` until both directions end.

    ``upload_limit`` and ``download_limit`` cap the byte rate each way.
    ``delivered`` is set once everything the backend sent has been written
    towards the client and its end passed on (FIN), which is when the
    backend's 226 may follow.

    Resource handling: the caller owns both sockets and closes them after this
    returns; they must be non-blocking.

    Error handling: a reset or any other socket error in either direction,
    or ``stall_timeout`` seconds without a byte moving either way, ends both,
    is recorded in ``stats.error`` rather than raised (for a data connection an
    abrupt end is an outcome, not a fault of ftpfix), and makes both sockets
    reset when closed.
    """
    stats.last_progress = trio.current_time()

    async def run(direction: _Direction, nursery: trio.Nursery) -> None:
        try:
            await direction.pump()
        except OSError as error:
            fail(f"{'upload' if direction.upload else 'download'}: {error.strerror or error}", nursery)
            return
        if not direction.upload:
            if delivered is not None:
                delivered.set()
            # The backend has finished; give the client a while to finish too.
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + CLIENT_LINGER)
        running.remove(direction)
        if not running:
            nursery.cancel_scope.cancel()

    async def watch_for_stall(nursery: trio.Nursery) -> None:
        # A slow reader drains the send queue long before a write wakes up
        # (the kernel signals room only once a third of the buffer is free),
        # so progress is also read off the queues themselves.
        queued = (_unsent(client), _unsent(backend))
        # Once the download is delivered, CLIENT_LINGER bounds the rest.
        while download in running:
            now = trio.current_time()
            if (current := (_unsent(client), _unsent(backend))) != queued:
                queued = current
                stats.last_progress = now
            deadline = stats.last_progress + stall_timeout
            if now >= deadline:
                fail(f"no data moved for {stall_timeout:g} s", nursery)
                return
            await trio.sleep_until(min(deadline, now + STALL_SAMPLE))

    def fail(reason: str, nursery: trio.Nursery) -> None:
        if stats.error is None:
            stats.error = reason
        reset_on_close(client)
        reset_on_close(backend)
        nursery.cancel_scope.cancel()

    upload = _Direction(client, backend, stats, True, upload_limit)
    download = _Direction(backend, client, stats, False, download_limit)
    running = [upload, download]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, upload, nursery)
        nursery.start_soon(run, download, nursery)
        if stall_timeout < float("inf"):
            nursery.start_soon(watch_for_stall, nursery)


#: Plaintext bytes read from a TLS stream at once: TLS records carry at
#: most 16 KiB, and trio's SSLStream decrypts whatever arrived up to this.
TLS_CHUNK_SIZE = 256 * 1024


def _bottom_socket(stream: trio.abc.Stream) -> trio.socket.SocketType:
    layer: object = stream
    while not isinstance(layer, trio.SocketStream):
        layer = layer.transport_stream  # type: ignore[attr-defined]
    return layer.socket


async def relay_tls(
    client: trio.abc.Stream,
    backend: socket.socket | trio.abc.Stream,
    stats: RelayStats,
    upload_limit: TokenBucket | None = None,
    download_limit: TokenBucket | None = None,
    *,
    stall_timeout: float = float("inf"),
    delivered: trio.Event | None = None,
    download: bool = True,
) -> None:
    """Relay plaintext between two data connections of which at least one is
    TLS, until both directions end: ``client`` (a ``trio.SSLStream`` with its
    handshake done, or a ``trio.SocketStream``) and ``backend`` (a plain
    socket, or a ``trio.SSLStream`` when ftpfix speaks TLS to the backend).
    ``download`` says which way the transfer goes: TLS has no half-close, so
    only an upload's end from the client ends the backend's stream.

    Splice cannot see into TLS, so both directions go through trio streams.
    The ends map this way:

    - the client's end of an upload (close_notify, or a FIN from a plain
      client) is passed on as the backend's kind of end: a FIN to a plain
      backend, close_notify and a close to a TLS one. A TLS stream that ends
      without close_notify (a reset, or a TCP FIN alone, which an attacker
      can forge: the truncation attack) is a failure, so the other side gets
      a reset and never stores the fragment;
    - the backend's end of a download (its FIN, or close_notify) becomes the
      client's: close_notify and a close for a TLS client, a FIN for a plain
      one (``delivered`` is set then).

    Resource handling and error handling: as ``relay``. The caller closes the
    sockets; the streams' transports may be closed here once their side ended.
    """
    stats.last_progress = trio.current_time()
    backend_stream = (
        backend if isinstance(backend, trio.abc.Stream) else trio.SocketStream(trio.socket.from_stdlib_socket(backend))
    )
    client_tls = isinstance(client, trio.SSLStream)
    backend_tls = isinstance(backend_stream, trio.SSLStream)
    raw = (_bottom_socket(client), _bottom_socket(backend_stream))
    download_done = False
    upload_done = False
    download_scope = trio.CancelScope()

    def fail(reason: str, nursery: trio.Nursery) -> None:
        if stats.error is None:
            stats.error = reason
        for sock in raw:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        nursery.cancel_scope.cancel()

    async def pace(bucket: TokenBucket | None, count: int) -> None:
        if bucket is not None and (delay := bucket.take(count, trio.current_time())):
            await trio.sleep(delay)

    async def upload(nursery: trio.Nursery) -> None:
        nonlocal upload_done
        try:
            while data := await client.receive_some(TLS_CHUNK_SIZE):
                await backend_stream.send_all(data)
                stats.upload += len(data)
                stats.last_progress = trio.current_time()
                await pace(upload_limit, len(data))
        except trio.ClosedResourceError:
            if not download_done:
                raise
            return  # the download closed the stream: the normal end of a download
        except trio.BrokenResourceError as error:
            if download_done:
                return  # the client hung up after its download: nothing was lost
            side = "client's TLS stream" if client_tls else "client's data connection"
            fail(
                f"the {side} broke off{' without close_notify' if client_tls else ''} ({error.__cause__ or error})",
                nursery,
            )
            return
        except OSError as error:
            fail(f"client to server: {error.strerror or error}", nursery)
            return
        upload_done = True
        if not backend_tls:
            _shutdown_write(raw[1])  # type: ignore[arg-type]
            return
        if download:
            return  # a client that half-closes during a download: the backend's stream goes on
        # TLS cannot half-close: the upload's end is close_notify and the
        # connection's end; the backend sends nothing on an upload's
        # connection, so the other direction stops first.
        download_scope.cancel()
        try:
            await backend_stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            fail(f"client to server: the server's TLS stream broke off ({error.__cause__ or error})", nursery)
            return
        # And the client, which waits for the other direction's end (ftplib's
        # unwrap() waits for close_notify), gets it now.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await send_end_to_client()
        if delivered is not None:
            delivered.set()
        nursery.cancel_scope.cancel()

    async def send_end_to_client() -> None:
        if client_tls:
            # close_notify, then the TCP end: TLS's way of saying "that was all".
            await client.aclose()
        else:
            await client.send_eof()

    async def download_task(nursery: trio.Nursery) -> None:
        nonlocal download_done
        with download_scope:
            try:
                while data := await backend_stream.receive_some(TLS_CHUNK_SIZE):
                    await client.send_all(data)
                    stats.download += len(data)
                    stats.last_progress = trio.current_time()
                    await pace(download_limit, len(data))
                download_done = True
                if backend_tls and download:
                    # The backend's close_notify ended the file. It waits for
                    # ours (or the close) before it sends 226 (vsftpd's
                    # SSL_shutdown), so it gets both now, not when the client
                    # gets round to closing its end.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await backend_stream.aclose()
                await send_end_to_client()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                cause = error.__cause__ or error
                what = "the server's TLS stream broke off without close_notify: " if backend_tls else ""
                fail(f"server to client: {what}{getattr(cause, 'strerror', None) or cause}", nursery)
                return
            if delivered is not None:
                delivered.set()
            # The backend has finished; give the client a while to finish too.
            nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + CLIENT_LINGER)

    async def watch_for_stall(nursery: trio.Nursery) -> None:
        while not download_done:
            now = trio.current_time()
            deadline = stats.last_progress + stall_timeout
            if now >= deadline:
                fail(f"no data moved for {stall_timeout:g} s", nursery)
                return
            await trio.sleep_until(min(deadline, now + STALL_SAMPLE))

    async def both(nursery: trio.Nursery) -> None:
        # Once both directions are over, the relay is: the stall watch sleeps
        # up to STALL_SAMPLE and must not hold the sockets open meanwhile (a
        # TLS backend sends its 226 only once its data connection closed).
        async with trio.open_nursery() as directions:
            directions.start_soon(upload, nursery)
            directions.start_soon(download_task, nursery)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(both, nursery)
        if stall_timeout < float("inf"):
            nursery.start_soon(watch_for_stall, nursery)
