"""The server: control listeners, one session task per client, and shutdown."""

from __future__ import annotations

import errno
import signal
import socket
from functools import partial

import structlog
import trio

from ..config import Config
from ..ports import PortPool
from .control import handle_client
from .public import PublicAddress


class StartupError(Exception):
    """ftpfix cannot start with this config on this machine; the message says why."""


async def open_control_listeners(config: Config) -> list[trio.SocketListener]:
    """A listener on each ``[listen] address``.

    Error handling: an IPv6 address on a machine without IPv6 is skipped as
    long as another listener opened; any other failure raises StartupError.
    """
    log = structlog.get_logger("ftpfix")
    listeners: list[trio.SocketListener] = []
    for address in config.listen.address:
        try:
            listeners += await trio.open_tcp_listeners(config.listen.port, host=address)
        except OSError as error:
            if ":" in address and error.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                log.warning("IPv6 is not available; listening on IPv4 only", address=address, error=error.strerror)
                continue
            for listener in listeners:
                await listener.aclose()
            raise StartupError(f"cannot listen on [{address}]:{config.listen.port}: {error.strerror or error}") from None
    if not listeners:
        raise StartupError("no control listener could be opened")
    return listeners


def check_source_port(config: Config) -> None:
    """Fail now, not at the first transfer, if ``[active] source_port`` cannot be bound."""
    port = config.active.source_port
    if port is None or config.active.mode != "proxy":
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except PermissionError:
            raise StartupError(
                f"[active] source_port = {port} needs the right to bind privileged ports: run ftpfix with "
                "CAP_NET_BIND_SERVICE (the Docker image has it) or remove source_port"
            ) from None
        except OSError as error:
            raise StartupError(f"[active] source_port = {port} cannot be bound: {error.strerror or error}") from None


async def serve(config: Config, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``config`` until cancelled.

    ``task_status.started`` reports the addresses the control listeners bound,
    so a caller (or a test) that asked for port 0 learns the real port.

    Resource handling: every session runs in this function's nursery, so
    cancelling ``serve`` closes every session and every data connection.

    Error handling: raises StartupError when the config cannot be served here.
    """
    log = structlog.get_logger("ftpfix")
    check_source_port(config)
    listeners = await open_control_listeners(config)
    pool = PortPool(config.passive.ports)
    public = PublicAddress(config.passive.public_address, config.passive.public_address_ttl, log)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(public.keep_fresh)
        log.info(
            "listening",
            control=[f"{host}:{port}" if ":" not in host else f"[{host}]:{port}" for host, port in bound],
            backend=f"{config.backend.address}:{config.backend.port}",
            public_address=config.passive.public_address,
            passive_ports=str(config.passive.ports),
        )
        task_status.started(bound)
        await trio.serve_listeners(partial(handle_client, config=config, pool=pool, public=public), listeners, handler_nursery=nursery)


async def run(config: Config) -> None:
    """``serve`` in the foreground until SIGTERM or SIGINT."""
    log = structlog.get_logger("ftpfix")
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(serve, config)
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
