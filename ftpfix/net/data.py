"""Data connections: listen, accept only the expected peer, dial the other
side, relay.

Passive and active mode are the same thing seen from opposite ends:

- passive: ftpfix listens on a public port leased from the pool, the client
  connects, and ftpfix dials the port the backend advertised;
- active: ftpfix listens on an ephemeral port where the backend can reach it,
  the backend connects, and ftpfix dials the port the client named in PORT or
  EPRT.

One ``DataMapping`` lives per 227, 229 or PORT that ftpfix relays. Its task runs
in the session's nursery, so it can never outlive the session.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass, field

import trio
from structlog.typing import FilteringBoundLogger

from ..ports import PortPool
from .relay import RelayStats, TokenBucket, relay, reset_on_close

#: Seconds an aborted transfer's backend side is held open, unread, waiting
#: for the backend's reply to the aborted command. pure-ftpd and ProFTPD
#: answer within milliseconds; vsftpd answers only once its data connection
#: breaks, which closing it after this hold brings about.
ABORT_HOLD = 2.0

#: Connections a passive listener queues. One is expected; a few more let it
#: accept and close strangers while the real client's SYN waits its turn.
PASSIVE_BACKLOG = 8


def normalize_host(host: str) -> str:
    """The address as text, with IPv4-mapped IPv6 (::ffff:a.b.c.d) unwrapped."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


@dataclass(eq=False, slots=True)
class DataMapping:
    """A listener that relays one data connection to ``target``.

    ``peer_host`` is the only address that may connect. ``active`` says which
    end the accepted connection is: the client (passive mode) or the backend
    (active mode). ``pooled`` says whether ``port`` came from the port pool.

    Its outcome, for the reply to the transfer command: ``connected`` once
    both ends are joined, ``failure`` when it did not deliver everything, and
    ``delivered`` once it has delivered all it will (the backend's data
    passed on to the client, or the mapping ended).
    """

    port: int
    peer_host: str
    target: tuple[str, int]
    listener: socket.socket
    active: bool = False
    pooled: bool = True
    source_port: int | None = None
    upload_limit: TokenBucket | None = None
    download_limit: TokenBucket | None = None
    stats: RelayStats = field(default_factory=RelayStats)
    accepted: trio.Event = field(default_factory=trio.Event)
    delivered: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    connected: bool = False
    failure: str | None = None
    released: bool = False
    aborted: bool = False
    #: The backend has answered the transfer command: the transfer is over,
    #: and an ABOR's hold on the backend's side ends.
    answered: trio.Event = field(default_factory=trio.Event)

    def fail(self, reason: str) -> None:
        """Record the first reason the transfer did not deliver everything."""
        if self.failure is None:
            self.failure = reason

    def release(self, pool: PortPool) -> None:
        """Stop listening and give the port back, once.

        Idempotent, so the session can free a replaced mapping's port at once
        while its task's ``finally`` runs later and must not release the port
        again: by then a newer mapping may hold it.
        """
        if self.released:
            return
        self.released = True
        self.close_listener()
        if self.pooled:
            pool.release(self.port)

    def close_listener(self) -> None:
        """Stop accepting; a task waiting on the listener is woken first."""
        if self.listener.fileno() != -1:
            trio.lowlevel.notify_closing(self.listener)
            self.listener.close()

    def cancel(self, pool: PortPool, reason: str = "the data connection was closed") -> None:
        """End the mapping now: its task is cancelled and its port freed."""
        if not self.finished.is_set():
            self.fail(reason)
        self.cancel_scope.cancel()
        self.release(pool)

    def abort(self, pool: PortPool) -> None:
        """The client sent ABOR: stop relaying at once.

        The client's data connection is closed. The backend's is held open
        and unread until the backend answers the aborted command
        (``answered``): a server that finds its data connection reset
        before it reads the ABOR reports a failed transfer instead of
        answering the ABOR (pure-ftpd does), and one whose connection is
        drained finishes the transfer instead of aborting it.
        """
        if not self.accepted.is_set():
            self.cancel(pool, "aborted")
            return
        if not self.finished.is_set():
            self.fail("aborted")
        self.aborted = True
        self.cancel_scope.cancel()


#: errno values that mean "out of descriptors or memory": a failure of this
#: data connection, answered with 425, never a crash of the session.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_active_listener(host: str) -> tuple[int, socket.socket]:
    """Listen on an ephemeral port of ``host`` for the backend's data connection."""
    listener = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind((host, 0))
        listener.listen(PASSIVE_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener.getsockname()[1], listener


def open_passive_listener(pool: PortPool, host: str) -> tuple[int, socket.socket] | None:
    """Lease a port from ``pool`` and listen on it, or None if none is free.

    Error handling: a port that another process holds (EADDRINUSE) is given
    back and the next one tried, so a stray listener in the range costs one
    port, not the service. Any other error (an address that is not local,
    no descriptor left) gives the port back and is raised.
    """
    for port in pool.candidates():
        try:
            listener = socket.socket(_family(host), socket.SOCK_STREAM)
        except OSError:
            pool.release(port)
            raise
        try:
            # SO_REUSEADDR: the port of a transfer that just ended sits in
            # TIME_WAIT, and without it the next lease of that port would fail.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setblocking(False)
            listener.bind((host, port))
            listener.listen(PASSIVE_BACKLOG)
        except OSError as error:
            listener.close()
            pool.release(port)
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        return port, listener
    return None


async def connect(address: tuple[str, int], timeout: float, source_port: int | None = None) -> socket.socket:
    """A non-blocking socket connected to ``address``, from ``source_port`` if given.

    Error handling: raises OSError if the connection is refused or fails, or
    the source port cannot be bound, and trio.TooSlowError after ``timeout``
    seconds.
    """
    sock = socket.socket(_family(address[0]), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source_port is not None:
            # Several sessions may dial out from port 20 at once, to
            # different clients: the 4-tuples differ, so let them share it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", source_port))
        code = sock.connect_ex(address)
        if code == errno.EINPROGRESS:
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_mapping(
    mapping: DataMapping,
    pool: PortPool,
    *,
    accept_timeout: float,
    connect_timeout: float,
    stall_timeout: float,
    log: FilteringBoundLogger,
) -> None:
    """Accept the expected peer's data connection on ``mapping`` and relay it.

    Only ``mapping.peer_host`` may connect: any other peer is closed at once
    and the listener keeps waiting, so a stranger who races for the port (port
    stealing, RFC 2577 section 5) gets nothing and the real peer still gets
    its transfer.

    Resource handling: the listener, both data sockets and the port lease are
    released in a ``finally``, whether the transfer ends, fails, times out or
    is cancelled by a newer PASV, by ABOR or by the session's end.
    ``mapping.delivered`` and ``mapping.finished`` are set last.

    Error handling: every way this can go wrong (the peer never connects, the
    other side refuses, a reset, a stall, no descriptor left) is recorded in
    ``mapping.failure``, and a failed data connection is reset, never closed
    cleanly; nothing is raised.
    """
    accepted = dialed = None
    try:
        with mapping.cancel_scope:
            if mapping.released:
                return  # replaced before this task even started
            with trio.move_on_after(accept_timeout) as waiting:
                try:
                    accepted = await _accept(mapping, log)
                except trio.ClosedResourceError:
                    mapping.fail("the data port was closed")
                    return
            if waiting.cancelled_caught:
                who = "backend" if mapping.active else "client"
                log.info(f"data port released: the {who} never connected", port=mapping.port)
                mapping.fail(f"the {who} did not connect within {accept_timeout:g} s")
                return
            # One data connection per mapping: stop listening at once. A
            # passive port stays leased until the transfer ends.
            mapping.close_listener()
            mapping.accepted.set()
            try:
                dialed = await connect(mapping.target, connect_timeout, mapping.source_port)
            except (OSError, trio.TooSlowError) as error:
                who = "client" if mapping.active else "server"
                log.warning(f"{who} refused the data connection", target=f"{mapping.target[0]}:{mapping.target[1]}", error=str(error) or "timed out")
                mapping.fail(f"cannot connect to the {who}")
                return
            mapping.connected = True
            client, backend = (dialed, accepted) if mapping.active else (accepted, dialed)
            await relay(
                client,
                backend,
                mapping.stats,
                mapping.upload_limit,
                mapping.download_limit,
                stall_timeout=stall_timeout,
                delivered=mapping.delivered,
            )
            if mapping.stats.error is not None:
                mapping.fail(mapping.stats.error)
        if mapping.aborted and accepted is not None:
            client_side = accepted if not mapping.active else dialed
            if client_side is not None:
                reset_on_close(client_side)
                client_side.close()
            with trio.move_on_after(ABORT_HOLD):
                await mapping.answered.wait()
    except OSError as error:
        if error.errno not in RESOURCE_ERRORS:
            raise
        log.warning("data connection failed: out of resources", port=mapping.port, error=error.strerror)
        mapping.fail("ftpfix is out of resources, try again later")
    finally:
        for sock in (accepted, dialed):
            if sock is not None:
                if mapping.failure is not None:
                    reset_on_close(sock)
                sock.close()
        mapping.release(pool)
        mapping.delivered.set()
        mapping.finished.set()


async def _accept(mapping: DataMapping, log: FilteringBoundLogger) -> socket.socket:
    """The first connection on ``mapping.listener`` from ``mapping.peer_host``.

    Error handling: a peer that gave up before accept() is skipped; running
    out of descriptors raises OSError (see RESOURCE_ERRORS), since the waiting
    connection would otherwise wake this loop forever.
    """
    while True:
        if mapping.listener.fileno() == -1:
            raise trio.ClosedResourceError("the data port was closed")
        await trio.lowlevel.wait_readable(mapping.listener)
        try:
            sock, peer = mapping.listener.accept()
        except BlockingIOError:
            continue  # the peer gave up between the wake-up and accept()
        except OSError as error:
            if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue
            if error.errno == errno.EBADF:
                raise trio.ClosedResourceError("the data port was closed") from None
            raise
        try:
            host = normalize_host(peer[0])
        except ValueError:
            host = None
        if host != mapping.peer_host:
            log.warning("data connection from a stranger refused", peer=str(peer[0]), port=mapping.port)
            reset_on_close(sock)
            sock.close()
            continue
        sock.setblocking(False)
        return sock
