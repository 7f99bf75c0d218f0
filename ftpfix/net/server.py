"""The server: control listeners, one session task per client, and shutdown."""

from __future__ import annotations

import signal
from functools import partial

import structlog
import trio

from ..config import Config
from ..ports import PortPool
from .control import handle_client


async def serve(config: Config, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``config`` until cancelled.

    ``task_status.started`` reports the addresses the control listeners bound,
    so a caller (or a test) that asked for port 0 learns the real port.

    Resource handling: every session runs in this function's nursery, so
    cancelling ``serve`` closes every session and every data connection.
    """
    log = structlog.get_logger("ftpfix")
    listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.address)
    pool = PortPool(config.passive.ports)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    log.info(
        "listening",
        control=[f"{host}:{port}" for host, port in bound],
        backend=f"{config.backend.address}:{config.backend.port}",
        public_address=str(config.passive.public_address),
        passive_ports=str(config.passive.ports),
    )
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(partial(handle_client, config=config, pool=pool), listeners, handler_nursery=nursery)


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
