"""TLS towards the client: one server context per control session.

Binding data connections to their control session (issue 11, item 4) rests
on this: each control session gets its *own* ``ssl.SSLContext``. OpenSSL
keeps the session cache (TLS 1.2 session ids) and the keys that encrypt
session tickets (TLS 1.2 and 1.3) per context, and makes fresh random ticket
keys for every new context. A data connection that resumes a session on
this context therefore resumes one that this control session's handshakes
issued, and a ticket from another session (a thief behind the same
carrier-grade NAT who got one of their own) cannot be decrypted: its
handshake is a full one, ``session_reused`` is False, and the data
connection is refused. vsftpd's ``require_ssl_reuse`` makes the same demand.

Each context reads the certificate and key from their files, so new sessions
pick up a renewed certificate (a reload or not) without a restart.
"""

from __future__ import annotations

import socket
import ssl

import trio

from ..config import TLS_VERSIONS, Tls

#: Seconds a client has to finish a TLS handshake, on the control
#: connection or a data connection: a client that opens one and stalls
#: (or sends nothing at all) must not hold the session or the port.
HANDSHAKE_TIMEOUT = 10.0

#: TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3's are all so).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


def server_context(tls: Tls) -> ssl.SSLContext:
    """A new server context for one control session and its data connections.

    Error handling: raises OSError or ssl.SSLError if the files became
    unreadable or mismatched since the configuration was checked.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.set_ciphers(CIPHERS)
    # Renegotiation lets a client make the server work on demand and has a
    # history of attacks (CVE-2009-3555); FTPS never needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(tls.certificate, tls.key)
    return context


def describe(stream: trio.SSLStream[trio.abc.Stream]) -> tuple[str, str]:
    """The negotiated version and cipher, for the log."""
    cipher = stream.cipher()
    return stream.version() or "?", cipher[0] if cipher else "?"


def acknowledge_now(sock: socket.socket | trio.socket.SocketType | None) -> None:
    """Send the ACK of what ``sock`` has received now, not at the delayed-ACK timer.

    Called once a TLS handshake is done. trio's SSLStream holds a TLS 1.3
    server's session tickets back until the first write (trio issue 819,
    OpenSSL issue 7948), and on FTP's control connection the client speaks
    next, so nothing carries the ACK of the client's Finished. A client with
    Nagle on (TCP_NODELAY off: Python's ftplib, many others) holds its first
    command until that ACK comes: 40 ms per session on Linux, which capped
    control-port TLS sessions at a sixth of vsftpd's (tests/bench/ftps.py).
    Setting TCP_QUICKACK sends a pending ACK at once (tcp(7)).
    """
    if sock is None or not hasattr(socket, "TCP_QUICKACK"):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:
        pass  # not TCP, or already gone: nothing to acknowledge


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


async def accept_tls(sock: socket.socket, context: ssl.SSLContext) -> TlsConnection:
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
