"""Passive data connections: listen on a leased public port, accept the right
client, dial the backend's real data port, relay.

One ``PassiveMapping`` lives per 227 that ftpfix sends. Its task runs in the
session's nursery, so it can never outlive the session.
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
from .relay import RelayStats, relay

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
class PassiveMapping:
    """A leased public port that relays one data connection to the backend."""

    public_port: int
    backend: tuple[str, int]
    client_host: str
    listener: socket.socket
    stats: RelayStats = field(default_factory=RelayStats)
    accepted: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    released: bool = False

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
        pool.release(self.public_port)

    def close_listener(self) -> None:
        """Stop accepting; a task waiting on the listener is woken first."""
        if self.listener.fileno() != -1:
            trio.lowlevel.notify_closing(self.listener)
            self.listener.close()

    def cancel(self, pool: PortPool) -> None:
        """End the mapping now: its task is cancelled and its port freed."""
        self.cancel_scope.cancel()
        self.release(pool)


def open_passive_listener(pool: PortPool, host: str) -> tuple[int, socket.socket] | None:
    """Lease a port from ``pool`` and listen on it, or None if none is free.

    Error handling: a port that another process holds (EADDRINUSE) is given
    back and the next one tried, so a stray listener in the range costs one
    port, not the service. Any other bind error is raised.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in pool.candidates():
        listener = socket.socket(family, socket.SOCK_STREAM)
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


async def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """A non-blocking socket connected to ``address``.

    Error handling: raises OSError if the connection is refused or fails, and
    TimeoutError after ``timeout`` seconds.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
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
    mapping: PassiveMapping,
    pool: PortPool,
    *,
    accept_timeout: float,
    connect_timeout: float,
    log: FilteringBoundLogger,
) -> None:
    """Accept the client's data connection on ``mapping`` and relay it.

    Only a peer whose address is the control connection's may connect: any
    other is closed at once and the listener keeps waiting, so a stranger who
    races for the port (port stealing, RFC 2577 section 5) gets nothing and
    the real client still gets its transfer.

    Resource handling: the listener, both data sockets and the port lease are
    released in a ``finally``, whether the transfer ends, fails, times out or
    is cancelled by a newer PASV or by the session's end. ``mapping.finished``
    is set last.
    """
    client = backend = None
    try:
        with mapping.cancel_scope:
            with trio.move_on_after(accept_timeout) as waiting:
                client = await _accept_client(mapping, log)
            if waiting.cancelled_caught:
                log.info("passive port released: the client never connected", public_port=mapping.public_port)
                return
            # One data connection per mapping: stop listening at once. The
            # port stays leased until the transfer ends.
            mapping.close_listener()
            mapping.accepted.set()
            try:
                backend = await connect(mapping.backend, connect_timeout)
            except (OSError, trio.TooSlowError) as error:
                log.warning("backend refused the data connection", backend=f"{mapping.backend[0]}:{mapping.backend[1]}", error=str(error) or "timed out")
                return
            await relay(client, backend, mapping.stats)
    finally:
        for sock in (client, backend):
            if sock is not None:
                sock.close()
        mapping.release(pool)
        mapping.stats.backend_done.set()
        mapping.finished.set()


async def _accept_client(mapping: PassiveMapping, log: FilteringBoundLogger) -> socket.socket:
    while True:
        await trio.lowlevel.wait_readable(mapping.listener)
        try:
            sock, peer = mapping.listener.accept()
        except BlockingIOError:
            continue  # the peer gave up between the wake-up and accept()
        except OSError as error:
            if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                continue
            raise
        if normalize_host(peer[0]) != mapping.client_host:
            log.warning("data connection from a stranger refused", peer=peer[0], public_port=mapping.public_port)
            sock.close()
            continue
        sock.setblocking(False)
        return sock
