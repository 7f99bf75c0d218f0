"""Data-connection sockets: the listeners ftpfix opens and the connections it dials.

These are raw non-blocking stdlib sockets, driven by trio's
``wait_readable`` and ``wait_writable``: the relay splices between them.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

#: Connections a data listener queues. One is expected; a few more let it
#: accept and close strangers while the real peer's SYN waits its turn.
LISTEN_BACKLOG = 8

#: errno values that mean "out of descriptors or memory": a failure of this
#: data connection, answered with 425, never a crash of the session.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_source_port(sock: socket.socket, port: int) -> None:
    """Bind ``sock`` to local ``port`` on every address, shared with other sockets.

    Several sessions may dial out from port 20 at once, to different
    clients: the 4-tuples differ, so they may share it. The start-up check
    (``preflight.check_source_port``) binds the same way, so it fails exactly
    when a real transfer would.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", port))


def open_active_listener(host: str) -> tuple[int, socket.socket]:
    """Listen on an ephemeral port of ``host`` for the backend's data connection."""
    listener = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind((host, 0))
        listener.listen(LISTEN_BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener.getsockname()[1], listener


async def connect(address: tuple[str, int], timeout: float, source_port: int | None = None) -> socket.socket:
    """A non-blocking socket connected to ``address``, from ``source_port`` if given.

    Error handling: raises OSError if the connection is refused or fails, or
    the source port cannot be bound, and trio.TooSlowError after ``timeout``
    seconds.
    """
    sock = socket.socket(family(address[0]), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source_port is not None:
            bind_source_port(sock, source_port)
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
