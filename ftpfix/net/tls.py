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

A separate context is not enough on its own: a data connection that does
*not* resume (a thief who won the race to a passive port) still completes a
full handshake on this context, and was handed TLS 1.3 tickets of its own
that resume on the next transfer. So once the control connection's
handshake is done (``accept_tls``), the context issues no more TLS 1.3
tickets, and speaks only TLS 1.3 when the control connection does. A TLS
1.2 full handshake still gets a ticket (OpenSSL issues them per context,
and a session cache by id instead would lose the session whenever a data
connection ends without close_notify, as a failed transfer must): session
binding against a thief is complete only with TLS 1.3.

Each context reads the certificate and key from their files, so new sessions
pick up a renewed certificate (a reload or not) without a restart.
"""

from __future__ import annotations

import socket
import ssl
import time

import trio

from ..config import TLS_VERSIONS, Tls

#: Seconds a client has to finish a TLS handshake, on the control
#: connection or a data connection: a client that opens one and stalls
#: (or sends nothing at all) must not hold the session or the port.
HANDSHAKE_TIMEOUT = 10.0

#: TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3's are all so).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


class SessionContext(ssl.SSLContext):
    """One control session's context, and what tells its own TLS session
    from another a data connection may resume.

    TLS 1.3 is simple: once the control handshake is done, the context
    issues no more tickets (``_seal``), so a data connection that resumes
    anything resumes the control connection's session. TLS 1.2 is not:
    OpenSSL gives every full handshake on the context a ticket, so a data
    connection refused for not resuming (a thief's) leaves with a ticket it
    can resume on the next transfer. Python cannot stop that per
    connection, but a resumed session keeps the time its full handshake
    happened (``SSLSession.time``, in seconds): the control connection's
    session has the control handshake's time, a thief's the time of its
    own refused handshake. So that no data connection's full handshake can
    fall in the control handshake's second, a data handshake waits for the
    next second (``settle``: at most 1 s, only in the first second after
    AUTH TLS). Should the clock step back into it anyway, the two cannot be
    told apart, and the session's TLS 1.2 data connections are refused from
    then on: a thief can then deny the transfer (as by racing the client to
    the port), never take it.
    """

    #: When the control connection's TLS 1.2 session was made (None: TLS 1.3).
    control_time: int | None = None
    #: A refused TLS 1.2 data connection got its ticket in that same second.
    ambiguous: bool = False

    def settle(self) -> float:
        """Seconds a data connection must wait before its handshake, so that
        a full one cannot share the control session's time."""
        if self.control_time is None:
            return 0.0
        return max(0.0, self.control_time + 1 - time.time())

    def resumes_control(self, tls: ssl.SSLObject | trio.SSLStream[trio.abc.Stream]) -> bool:
        """Whether a data connection's TLS resumed the control connection's own session."""
        if not tls.session_reused:
            return False
        if self.control_time is None:
            return True
        session = tls.session
        return session is not None and session.time == self.control_time and not self.ambiguous

    def refused(self, tls: ssl.SSLObject | trio.SSLStream[trio.abc.Stream]) -> None:
        """A data connection on this context was refused: note whether the
        ticket its full TLS 1.2 handshake got could pass for the control's."""
        if self.control_time is None or tls.session_reused:
            return
        session = tls.session
        if session is None or session.time == self.control_time:
            self.ambiguous = True


def server_context(tls: Tls) -> SessionContext:
    """A new server context for one control session and its data connections.

    Error handling: raises OSError or ssl.SSLError if the files became
    unreadable or mismatched since the configuration was checked.
    """
    context = SessionContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.set_ciphers(CIPHERS)
    # Renegotiation lets a client make the server work on demand and has a
    # history of attacks (CVE-2009-3555); FTPS never needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(tls.certificate, tls.key)
    return context


class HandshakeFailed(Exception):
    """A TLS handshake did not complete; the message says why, for the log."""


def failure_reason(error: BaseException) -> str:
    """Why a handshake or a TLS stream failed, as the log says it."""
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    cause = error.__cause__ or error
    if isinstance(cause, ssl.SSLError):
        return cause.reason or cause.strerror or str(cause)
    return str(cause) or type(cause).__name__


async def accept_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext, timeout: float = HANDSHAKE_TIMEOUT
) -> trio.SSLStream[trio.abc.Stream]:
    """``stream`` with a TLS handshake done, ftpfix as the TLS server.

    Error handling: raises HandshakeFailed if the peer sends something that
    is not TLS, closes or resets mid-handshake, or does not finish within
    ``timeout`` seconds. ``stream`` is left to the caller to close.
    """
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as error:
        raise HandshakeFailed(failure_reason(error)) from None
    _seal(context, tls)
    return tls


def _seal(context: ssl.SSLContext, control: trio.SSLStream[trio.abc.Stream]) -> None:
    """After the control connection's handshake: data connections made on
    ``context`` from now on may resume its session but get no TLS 1.3 tickets
    of their own, and speak TLS 1.3 when it does (no TLS 1.2 ticket either).
    Settings are copied into each connection as it is made, so the control
    connection keeps the tickets it was sent."""
    context.num_tickets = 0
    if control.version() == "TLSv1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    elif isinstance(context, SessionContext) and (session := control.session) is not None:
        context.control_time = session.time


#: Seconds a closing session may spend sending its close_notify.
CLOSE_NOTIFY_TIMEOUT = 0.5


async def send_close_notify(stream: trio.abc.Stream) -> None:
    """End a TLS control connection with close_notify, best effort, without
    waiting for the peer's: a client can then tell ftpfix's own close (after
    221 or 421) from a connection cut by someone on the path, and clients
    that check (GnuTLS: "the TLS connection was non-properly terminated")
    do not complain. Does nothing for a stream that is not TLS."""
    if not isinstance(stream, trio.SSLStream):
        await trio.lowlevel.checkpoint()
        return
    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
            pass


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
