"""The server: control listeners, admission, one session task per client,
reload and graceful shutdown."""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import signal
import socket
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from ..config import Config, ConfigError, load_config
from ..ports import PortPool, PortRange
from .control import MAX_MAPPINGS, handle_client
from .data import normalize_host
from .public import PublicAddress


class StartupError(Exception):
    """ftpfix cannot start with this config on this machine; the message says why."""


@dataclass(frozen=True, slots=True)
class Generation:
    """One version of the config and what was built from it.

    A session takes the generation current when it connects and keeps it to
    the end, so a reload never changes a session under its feet.
    """

    config: Config
    pool: PortPool
    public: PublicAddress


#: Descriptors one session may hold at its worst: its two control
#: connections, and per data mapping a listener, two data sockets and two
#: splice pipes (four descriptors).
FDS_PER_SESSION = 2 + MAX_MAPPINGS * 7

#: Descriptors kept free for everything else: listeners, logs, a health check,
#: the public address lookup.
FD_RESERVE = 16


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as servers do; return it.

    Each session needs up to ``FDS_PER_SESSION`` descriptors, and the soft
    limit is often 1024 while the hard one is far higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_descriptors() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class Admission:
    """Counts sessions, in all and per client address, and turns away the excess.

    ``descriptors`` is the process's descriptor limit. As long as every
    session fits at its worst case (``FDS_PER_SESSION``) beside what was open
    at start, nothing is measured. Past that, each new session is let in only
    if the descriptors open now leave room for one more at its worst case and
    the reserve, so a flood is refused with 421 before anything runs out
    (EMFILE), while idle sessions (two descriptors each) are not turned away
    for transfers they are not making.
    """

    def __init__(self, descriptors: int | None = None, in_use: int = 0) -> None:
        self.total = 0
        self.per_address: Counter[str] = Counter()
        self.descriptors = descriptors
        budget = None if descriptors is None else descriptors - in_use - FD_RESERVE
        #: Sessions that fit at their worst case; beyond, admission measures.
        self.max_by_descriptors = None if budget is None else max(budget // FDS_PER_SESSION, 0)

    def _out_of_descriptors(self) -> bool:
        if self.descriptors is None or self.max_by_descriptors is None or self.total < self.max_by_descriptors:
            return False
        return open_descriptors() + FDS_PER_SESSION + FD_RESERVE > self.descriptors

    def admit(self, host: str, config: Config) -> bytes | None:
        """Count the session in, or return the 421 that refuses it."""
        limits = config.limits
        if not config.access.permits(ipaddress.ip_address(host)):
            return b"421 Access denied for your address.\r\n"
        if self.total >= limits.max_sessions:
            return b"421 Too many users (%d at most), try again later.\r\n" % limits.max_sessions
        if self._out_of_descriptors():
            return b"421 Too many users for this server's resources, try again later.\r\n"
        if self.per_address[host] >= limits.max_sessions_per_ip:
            return b"421 Too many connections from your address (%d at most).\r\n" % limits.max_sessions_per_ip
        self.total += 1
        self.per_address[host] += 1
        return None

    def leave(self, host: str) -> None:
        self.total -= 1
        self.per_address[host] -= 1
        if not self.per_address[host]:
            del self.per_address[host]


class Server:
    """The state the listeners share: the current generation and the counts."""

    def __init__(self, config: Config, descriptors: int | None = None) -> None:
        self.log = structlog.get_logger("ftpfix")
        self.admission = Admission(descriptors, open_descriptors() if descriptors is not None else 0)
        #: Set on SIGTERM: idle sessions end at once, busy ones when idle.
        self.stopping = trio.Event()
        self._pools: dict[PortRange, PortPool] = {}
        self.generation = self._build(config)
        self._refresh_scope: trio.CancelScope | None = None

    def _build(self, config: Config) -> Generation:
        # Keep the pool of an unchanged range: its leases belong to live sessions.
        pool = self._pools.setdefault(config.passive.ports, PortPool(config.passive.ports))
        public = PublicAddress(config.passive.public_address, config.passive.public_address_ttl, self.log)
        return Generation(config, pool, public)

    async def keep_public_address_fresh(self, nursery: trio.Nursery) -> None:
        """(Re)start the lookups of the current generation's public address."""
        if self._refresh_scope is not None:
            self._refresh_scope.cancel()
        public = self.generation.public

        async def refresh(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self._refresh_scope = scope
                await public.keep_fresh(task_status=task_status)

        await nursery.start(refresh)

    async def reload(self, path: Path, nursery: trio.Nursery) -> None:
        """SIGHUP: new sessions get the new config; a bad file changes nothing.

        Error handling: any error while loading, not only a ConfigError (a
        file nested deep enough makes tomllib recurse without end), is logged
        and the running config stays.
        """
        try:
            config = load_config(path)
        except ConfigError as error:
            self.log.error("config reload failed; keeping the running config", error=str(error))
            return
        except Exception as error:  # noqa: BLE001 - the reload's edge: keep serving
            self.log.error("config reload failed; keeping the running config", error=f"{type(error).__name__}: {error}")
            return
        old = self.generation.config
        if (config.listen, config.active.source_port) != (old.listen, old.active.source_port):
            self.log.warning("[listen] and [active] source_port changes take effect only after a restart")
        self.generation = self._build(config)
        await self.keep_public_address_fresh(nursery)
        self.log.info("config reloaded", path=str(path), sessions=self.admission.total)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Admit one connection and serve it.

        Error handling: this is the failure boundary of one connection (trio's
        serve_listeners lets a handler's exception crash the server). A peer
        that reset before it could be looked at is closed quietly; anything
        else is logged, and ends this connection only.
        """
        try:
            peer = stream.socket.getpeername()
            host = normalize_host(peer[0])
        except (OSError, ValueError) as error:
            self.log.info("connection lost before it was served", error=str(error))
            await trio.aclose_forcefully(stream)
            return
        try:
            generation = self.generation
            refusal = self.admission.admit(host, generation.config)
            if refusal is not None:
                self.log.warning("session refused", client=host, reason=refusal[4:-2].decode())
                with trio.move_on_after(1):
                    try:
                        await stream.send_all(refusal)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                await trio.aclose_forcefully(stream)
                return
            try:
                await handle_client(stream, (host, peer[1]), generation.config, generation.pool, generation.public, self.stopping)
            finally:
                self.admission.leave(host)
        except Exception:
            self.log.exception("session crashed: this is a bug in ftpfix", client=host)
            await trio.aclose_forcefully(stream)


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


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def warn_if_ports_are_ephemeral(config: Config) -> None:
    """Warn when the passive range lies in the kernel's ephemeral range.

    Outgoing connections (ftpfix's own, to the backend) take their local
    port from that range, and a port one of them holds, or held a minute ago
    (TIME_WAIT), cannot be leased: ftpfix skips it, and with a small range
    the pool runs dry. Reserving the range keeps the kernel away from it.
    """
    try:
        low, high = (int(n) for n in EPHEMERAL_RANGE.read_text().split())
        reserved = RESERVED_PORTS.read_text().strip()
    except (OSError, ValueError):
        return
    ports = config.passive.ports
    if ports.last < low or ports.first > high:
        return
    spans = [part.split("-") for part in reserved.split(",") if part]
    if all(any(int(span[0]) <= port <= int(span[-1]) for span in spans) for port in ports):
        return
    structlog.get_logger("ftpfix").warning(
        "the passive ports overlap the kernel's ephemeral ports; reserve them",
        passive_ports=str(ports),
        ephemeral_ports=f"{low}-{high}",
        fix=f"sysctl -w net.ipv4.ip_local_reserved_ports={ports} (docker run --sysctl ...)",
    )


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


async def serve(
    config: Config,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until ``stop`` is set, then shut down gracefully.

    After ``stop`` the listeners close at once, and sessions get up to
    ``[limits] shutdown_grace`` seconds to finish before they are cancelled.
    ``task_status.started`` reports the Server, whose ``reload`` SIGHUP calls.

    Resource handling: every session runs in this function's nurseries, so
    when it returns, every session and every data connection is closed.

    Error handling: raises StartupError when the config cannot be served here.
    """
    log = structlog.get_logger("ftpfix")
    check_source_port(config)
    warn_if_ports_are_ephemeral(config)
    listeners = await open_control_listeners(config)
    descriptors = raise_descriptor_limit()
    server = Server(config, descriptors)
    if server.admission.max_by_descriptors is not None and server.admission.max_by_descriptors < config.limits.max_sessions:
        log.warning(
            "the descriptor limit may cap the sessions below max_sessions; raise it (ulimit -n, docker run --ulimit nofile=...)",
            descriptors=descriptors,
            sessions=server.admission.max_by_descriptors,
            max_sessions=config.limits.max_sessions,
        )
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    async with trio.open_nursery() as background:
        await server.keep_public_address_fresh(background)
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, server.handle, listeners, handler_nursery=sessions))
                log.info(
                    "listening",
                    control=[f"{host}:{port}" if ":" not in host else f"[{host}]:{port}" for host, port in bound],
                    backend=f"{config.backend.address}:{config.backend.port}",
                    public_address=config.passive.public_address,
                    passive_ports=str(config.passive.ports),
                )
                task_status.started(server)
                await stop.wait()
                server.stopping.set()
                accepting.cancel_scope.cancel()
            grace = server.generation.config.limits.shutdown_grace
            log.info("stopped accepting; sessions may finish", sessions=server.admission.total, grace=grace)
            sessions.cancel_scope.deadline = trio.current_time() + grace
        background.cancel_scope.cancel()
    log.info("stopped")


async def run(config: Config) -> int:
    """``serve`` in the foreground: SIGTERM or SIGINT stops it gracefully (a
    second one at once), SIGHUP reloads the config file.

    Returns the exit status: 0 after a graceful stop, 1 after a forced one,
    whose sessions were cut off.
    """
    log = structlog.get_logger("ftpfix")
    stop = trio.Event()
    forced = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_end(task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(config, stop, task_status=task_status)
                nursery.cancel_scope.cancel()  # the signal watcher ends with it

            server = await nursery.start(serve_then_end)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if config.path is not None:
                        await server.reload(config.path, nursery)
                elif stop.is_set():
                    log.warning("stopping now; sessions still open are cut off", signal=name, sessions=server.admission.total)
                    forced = True
                    nursery.cancel_scope.cancel()
                else:
                    log.info("stopping", signal=name)
                    stop.set()
    return 1 if forced else 0
