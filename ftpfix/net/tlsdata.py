"""Protected data connections towards a plain backend, driven by hand.

A PROT P data connection whose backend side is plain FTP is the case that
carries the bytes of almost every FTPS transfer through ftpfix, and the one
``tests/bench/ftps.py`` measures against mod_proxy + mod_tls. Here OpenSSL
works between two memory buffers (``ssl.SSLContext.wrap_bio``), not through
``trio.SSLStream``: the handshake is ``accept_data_tls``, and
``relay_tls_plain`` moves ciphertext with large reads and writes of its own.
Through trio's SSLStream (``relay.relay_tls``, which any other pairing of
plain and TLS sides still uses) the same transfers cost 1.67 CPU-s/GB for
RETR and 3.86 for STOR; here 0.9 for each. trio's SSLStream refills 32 KiB
at a time and copies and allocates every chunk twice more.

Kernel TLS would let splice(2) feed the client's socket as plain downloads
are fed; the kernel the benchmark ran on has none (CONFIG_TLS unset) and
Python 3.11 has no API for it, so it is not used.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio

from .relay import CLIENT_LINGER, STALL_SAMPLE, YIELD_BYTES, RelayStats, TokenBucket, reset_on_close


class TlsConnection:
    """One TLS connection driven by hand: the socket, OpenSSL's state, and
    the two memory buffers between them (``ssl.SSLContext.wrap_bio``).

    OpenSSL encrypts into ``outgoing`` and decrypts from ``incoming``; the
    owner moves ciphertext between them and ``sock``. Two tasks may use one
    connection (a relay's two directions: decrypting can also produce output,
    a TLS 1.3 KeyUpdate's answer), so ``flush`` takes the bytes out of
    ``outgoing`` and sends them under one lock: ciphertext leaves in the
    order OpenSSL made it.
    """

    __slots__ = ("_sending", "incoming", "outgoing", "sock", "tls")

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.sock, self.tls, self.incoming, self.outgoing = sock, tls, incoming, outgoing
        self._sending = trio.Lock()

    async def flush(self) -> None:
        """Send everything OpenSSL has encrypted so far.

        Error handling: raises OSError if the socket fails; a cancelled flush
        leaves the connection unusable (part of a record may have gone out).
        """
        if not self.outgoing.pending:
            return
        try:
            self._sending.acquire_nowait()  # the usual case, and no scheduling round
        except trio.WouldBlock:
            await self._sending.acquire()
        try:
            view = memoryview(self.outgoing.read())
            sock, sent, total = self.sock, 0, len(view)
            while sent < total:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
        finally:
            self._sending.release()

    def describe(self) -> tuple[str, str]:
        """The negotiated version and cipher, for the log."""
        cipher = self.tls.cipher()
        return self.tls.version() or "?", cipher[0] if cipher else "?"


#: Bytes read from a socket at once while a data connection's handshake runs:
#: a ClientHello and the client's second flight are a few hundred bytes each.
HANDSHAKE_READ = 64 * 1024


async def accept_data_tls(sock: socket.socket, context: ssl.SSLContext) -> TlsConnection:
    """The TLS server handshake on a data connection's non-blocking ``sock``.

    OpenSSL works on two memory buffers, not on the socket (``wrap_bio``):
    the relay then moves ciphertext with large reads and writes of its own
    (``relay_tls``), and the handshake needs no trio stream. Unlike
    ``trio.SSLStream`` this sends TLS 1.3's session tickets at once: a data
    connection's client never waits on them, and its kernel buffers them.

    Resource handling: the caller owns ``sock`` and closes it.

    Error handling: a client that sends garbage, fails the handshake or hangs
    up raises OSError (ssl.SSLError is one; a hang-up mid-handshake is
    ssl.SSLEOFError). The caller sets the deadline.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = TlsConnection(sock, context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)
    while True:
        try:
            connection.tls.do_handshake()
        except ssl.SSLWantReadError:
            await connection.flush()
            try:
                data = sock.recv(HANDSHAKE_READ)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            continue
        break
    await connection.flush()
    return connection


#: Bytes moved per system call on a TLS data connection: plaintext from the
#: backend (downloads), ciphertext from the client (uploads). A TLS record
#: carries at most 16 KiB, but OpenSSL encrypts and decrypts any number of
#: them between memory buffers, so one ``recv_into`` and one ``send`` move
#: dozens. Downloads cost ftpfix 0.9-1.0 CPU-s/GB with 512 KiB, 1.1 with
#: 256 KiB and 1.3 with 64 KiB (1 MiB: no better than 512); uploads cost
#: the same with 256 or 512 KiB (tests/bench/ftps.py, alternating runs).
TLS_DOWNLOAD_CHUNK = 512 * 1024
TLS_UPLOAD_CHUNK = 256 * 1024

#: What a TLS relay direction's buffers start at: one TLS record. A data
#: connection carries one file one way, so the other direction moves a
#: close_notify at most; a direction takes its full-size buffers only once a
#: read fills this one, and an idle direction never holds them.
TLS_FIRST_CHUNK = 16 * 1024


async def relay_tls_plain(
    client: TlsConnection,
    backend: socket.socket,
    stats: RelayStats,
    upload_limit: TokenBucket | None = None,
    download_limit: TokenBucket | None = None,
    *,
    stall_timeout: float = float("inf"),
    delivered: trio.Event | None = None,
) -> None:
    """Relay plaintext between a protected data connection (``client``, its
    handshake done) and the backend's plain ``backend`` socket, until both
    directions end.

    Splice cannot see into TLS (the kernel's own TLS, which would let it, is
    not built into every kernel: not into the one the benchmark ran on), so
    both directions go through ftpfix, as cheaply as Python allows: OpenSSL
    works between memory buffers (``TlsConnection``), each direction reads
    up to 512 KiB per system call into one reusable buffer and decrypts straight
    into another, and no trio stream sits in between. ``tests/bench/ftps.py``
    measured ``trio.SSLStream`` here at twice the CPU per GB: it refills 32
    KiB at a time, and copies and allocates every chunk twice more.

    TLS has no half-close, so the ends map this way:

    - the client's close_notify is its end of an upload: the backend gets a
      FIN. A TLS stream that ends without close_notify (a reset, or a TCP FIN
      alone, which an attacker can forge: the truncation attack) is a failure,
      so the backend gets a reset and never stores the fragment;
    - the backend's FIN is the end of a download: the client gets
      close_notify and a FIN (``delivered`` is set then), and has
      ``CLIENT_LINGER`` seconds to close its side.

    Resource handling and error handling: as ``relay``. The caller closes the
    sockets.
    """
    stats.last_progress = trio.current_time()
    tls, sock = client.tls, client.sock
    download_done = False
    upload_ended = False  # the client's close_notify has come

    def fail(reason: str, nursery: trio.Nursery) -> None:
        if stats.error is None:
            stats.error = reason
        reset_on_close(backend)
        reset_on_close(sock)
        nursery.cancel_scope.cancel()

    async def upload(nursery: trio.Nursery) -> None:
        nonlocal upload_ended
        full = TLS_UPLOAD_CHUNK if upload_limit is None else min(TLS_UPLOAD_CHUNK, upload_limit.burst)
        ciphertext = memoryview(bytearray(TLS_FIRST_CHUNK))
        plaintext = memoryview(bytearray(min(TLS_FIRST_CHUNK, full)))
        unyielded = 0
        try:
            while not upload_ended:
                # Decrypt whatever whole records are buffered, into one chunk.
                filled, size = 0, len(plaintext)
                while filled < size:
                    try:
                        count = tls.read(size - filled, plaintext[filled:])
                    except ssl.SSLWantReadError:
                        break
                    if count == 0:  # close_notify
                        upload_ended = True
                        break
                    filled += count
                if client.outgoing.pending:
                    await client.flush()  # what reading made: a KeyUpdate's answer, an alert
                if filled:
                    sent = 0
                    while sent < filled:
                        try:
                            sent += backend.send(plaintext[sent:filled])
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(backend)
                            unyielded = 0
                    stats.upload += filled
                    stats.last_progress = trio.current_time()
                    if filled == size < full:
                        plaintext = memoryview(bytearray(full))  # a real upload: full size now
                    if upload_limit is not None and (delay := upload_limit.take(filled, trio.current_time())):
                        await trio.sleep(delay)
                        unyielded = 0
                    elif (unyielded := unyielded + filled) >= YIELD_BYTES:
                        await trio.lowlevel.checkpoint()
                        unyielded = 0
                    continue
                if upload_ended:
                    break
                try:
                    received = sock.recv_into(ciphertext)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    unyielded = 0
                    continue
                if received:
                    client.incoming.write(ciphertext[:received])
                    if received == len(ciphertext) < TLS_UPLOAD_CHUNK:
                        ciphertext = memoryview(bytearray(TLS_UPLOAD_CHUNK))
                else:
                    # The next read raises SSLEOFError unless close_notify came.
                    client.incoming.write_eof()
        except ssl.SSLError as error:
            if download_done:
                return  # the client hung up after its download: nothing was lost
            if isinstance(error, ssl.SSLEOFError):
                fail("the client's TLS stream broke off without close_notify", nursery)
            else:
                fail(f"the client's TLS stream failed ({error.reason or error})", nursery)
            return
        except OSError as error:
            if download_done:
                return
            fail(f"client to server: {error.strerror or error}", nursery)
            return
        _shutdown_write(backend)

    async def download(nursery: trio.Nursery) -> None:
        nonlocal download_done
        full = TLS_DOWNLOAD_CHUNK if download_limit is None else min(TLS_DOWNLOAD_CHUNK, download_limit.burst)
        plaintext = memoryview(bytearray(min(TLS_FIRST_CHUNK, full)))
        unyielded = 0
        try:
            while True:
                try:
                    received = backend.recv_into(plaintext)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(backend)
                    unyielded = 0
                    continue
                if received == 0:
                    break
                tls.write(plaintext[:received])
                if received == len(plaintext) < full:
                    plaintext = memoryview(bytearray(full))  # a real download: full size now
                await client.flush()
                stats.download += received
                stats.last_progress = trio.current_time()
                if download_limit is not None and (delay := download_limit.take(received, trio.current_time())):
                    await trio.sleep(delay)
                    unyielded = 0
                elif (unyielded := unyielded + received) >= YIELD_BYTES:
                    await trio.lowlevel.checkpoint()
                    unyielded = 0
            # close_notify, then the TCP end: TLS's way of saying "that was all".
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()  # writes close_notify; the client's comes later, or never
            try:
                await client.flush()
            except OSError:
                # A client that ended its upload with close_notify may close
                # before the backend does (curl after a STOR): it has said
                # all, and needs nothing more from this side.
                if not upload_ended:
                    raise
            download_done = True
            _shutdown_write(sock)
        except (ssl.SSLError, OSError) as error:
            fail(f"server to client: {getattr(error, 'strerror', None) or error}", nursery)
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

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload, nursery)
        nursery.start_soon(download, nursery)
        if stall_timeout < float("inf"):
            nursery.start_soon(watch_for_stall, nursery)


def _shutdown_write(target: socket.socket) -> None:
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the target is gone already; nothing left to deliver
