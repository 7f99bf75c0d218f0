"""The server: control listeners, one session task per client, reload and
graceful shutdown. Who gets in is ``admission.py``; start-up checks are
``preflight.py``; one session is ``edge.py``."""

from __future__ import annotations

import errno
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from ..config import Config, ConfigError, load_config, render
from ..ports import PortPool, PortRange
from ..protocol.grammar import SHUTTING_DOWN
from .addresses import normalize_host
from .admission import Admission, open_descriptors, raise_descriptor_limit
from .dataports import DataPorts
from .edge import handle_client
from .health import Response, open_health_listeners, probe_routes, serve_health
from .metrics import METRICS, config_hash
from .preflight import StartupError, refuse_or_warn
from .proxied import receive_proxy_header, trusted
from .public import PublicAddress
from .readiness import Readiness, keep_checking
from .stopping import Stopping
from .streams import say_last
from .tls import HandshakeFailed, accept_tls, server_context
from .transferlog import XFERLOG

__all__ = ["Server", "StartupError", "run", "serve"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One version of the config and what was built from it.

    A session takes the generation current when it connects and keeps it to
    the end, so a reload never changes a session under its feet.
    """

    config: Config
    ports: DataPorts
    public: PublicAddress


class Server:
    """The state the listeners share: the current generation and the counts."""

    def __init__(self, config: Config, descriptors: int | None = None) -> None:
        self.log = structlog.get_logger("ftpfix")
        self.admission = Admission(descriptors, open_descriptors() if descriptors is not None else 0)
        #: Connections from trusted balancers whose PROXY header is not read
        #: yet (at most ``[limits] max_sessions``; see ``proxied.py``).
        self.awaiting_headers = 0
        #: Refused implicit FTPS connections in their refusal handshake (at
        #: most ``REFUSAL_HANDSHAKES``; see ``_refusal_channel``).
        self.refusing_tls = 0
        #: Set on SIGTERM: idle sessions end at once, busy ones when idle.
        self.stopping = Stopping()
        self._pools: dict[PortRange, DataPorts] = {}
        self.generation = self._build(config)
        self._refresh_scope: trio.CancelScope | None = None
        METRICS.watch(
            sessions=lambda: self.admission.total,
            pool_size=lambda: len(self.generation.ports.pool.ports),
            leased=lambda: self.generation.ports.pool.leased,
        )
        self._observe(config)

    def _observe(self, config: Config) -> None:
        """Name the running config in the metrics and (re)open its xferlog."""
        METRICS.config.info({"hash": config_hash(render(config)), "path": str(config.path or "")})
        XFERLOG.configure(config.log.xferlog)
        if XFERLOG.error is not None:
            self.log.error("xferlog is off", error=XFERLOG.error)

    def _build(self, config: Config) -> Generation:
        # Keep the pool of an unchanged range (this replica's slice of it):
        # its leases and shared listeners belong to live sessions.
        leased = config.passive.leased_ports
        ports = self._pools.get(leased)
        if ports is None:
            ports = self._pools[leased] = DataPorts(PortPool(leased), self.log)
        public = PublicAddress(config.passive.public_address, config.passive.public_address_ttl, self.log)
        return Generation(config, ports, public)

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
            METRICS.config_reloads.labels("failed").inc()
            self.log.error("config reload failed; keeping the running config", error=str(error))
            XFERLOG.configure(self.generation.config.log.xferlog)  # logrotate sends SIGHUP too
            return
        except Exception as error:  # noqa: BLE001 - the reload's edge: keep serving
            METRICS.config_reloads.labels("failed").inc()
            self.log.error("config reload failed; keeping the running config", error=f"{type(error).__name__}: {error}")
            XFERLOG.configure(self.generation.config.log.xferlog)
            return
        old = self.generation.config
        if (
            config.listen.address,
            config.listen.port,
            config.active.source_port,
            config.metrics.listen,
            config.tls.implicit_port,
        ) != (
            old.listen.address,
            old.listen.port,
            old.active.source_port,
            old.metrics.listen,
            old.tls.implicit_port,
        ):
            self.log.warning(
                "[listen] address and port, [active] source_port, [metrics] listen and [tls] implicit_port "
                "changes take effect only after a restart"
            )
        self.generation = self._build(config)
        METRICS.config_reloads.labels("ok").inc()
        self._observe(config)
        await self.keep_public_address_fresh(nursery)
        self.log.info("config reloaded", path=str(path), sessions=self.admission.total)

    async def handle(self, stream: trio.SocketStream, *, implicit: bool = False) -> None:
        """Admit one connection and serve it; ``implicit``: it came in on the
        implicit FTPS port, and speaks TLS from its first byte.

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
            arrival = None
            if trusted(generation.config, host):
                if self.awaiting_headers >= generation.config.limits.max_sessions:
                    # Not admitted yet, so not counted by max_sessions: bound them too.
                    METRICS.refusals.labels("limit").inc()
                    self.log.warning(
                        "too many connections waiting for a PROXY header; closing",
                        proxy=host,
                        waiting=self.awaiting_headers,
                    )
                    await trio.aclose_forcefully(stream)
                    return
                self.awaiting_headers += 1
                try:
                    # SIGTERM ends the wait: nothing is in flight yet, so the
                    # connection is idle and gets its 421 at once, like a session.
                    with trio.CancelScope() as waiting, self.stopping.waking(waiting.cancel):
                        if self.stopping.is_set():
                            waiting.cancel()
                        arrival = await receive_proxy_header(
                            stream,
                            (host, peer[1]),
                            generation.config.limits.login_timeout,
                            self.log,
                            greet=not implicit,
                        )
                finally:
                    self.awaiting_headers -= 1
                if waiting.cancelled_caught or (arrival is not None and self.stopping.is_set()):
                    self.log.info(
                        "shutting down: closing a connection that was waiting for its PROXY header", proxy=host
                    )
                    if not implicit:  # a client of the implicit port expects TLS, not a plain 421
                        await say_last(stream, SHUTTING_DOWN)
                    await trio.aclose_forcefully(stream)
                    return
                if arrival is None:
                    METRICS.refusals.labels("proxy_header").inc()
                    await trio.aclose_forcefully(stream)
                    return
                host = arrival.client[0]
                peer = arrival.client
            refusal = self.admission.admit(host, generation.config)
            if refusal is not None:
                METRICS.refusals.labels("access" if refusal.startswith(b"421 Access") else "limit").inc()
                self.log.warning("session refused", client=host, reason=refusal[4:-2].decode())
                if implicit and self.refusing_tls >= REFUSAL_HANDSHAKES:
                    # A flood past the per-address limit: no TLS context, no
                    # handshake, no descriptor held for it (red team).
                    await trio.aclose_forcefully(stream)
                    return
                self.refusing_tls += implicit
                try:
                    channel = await self._refusal_channel(stream, generation.config) if implicit else stream
                    await say_last(channel, refusal)
                finally:
                    self.refusing_tls -= implicit
                await trio.aclose_forcefully(stream)
                return
            try:
                await handle_client(
                    stream,
                    (host, peer[1]),
                    generation.config,
                    generation.ports,
                    generation.public,
                    self.stopping,
                    arrival,
                    implicit=implicit,
                )
            finally:
                self.admission.leave(host)
        except Exception:
            self.log.exception("session crashed: this is a bug in ftpfix", client=host)
            await trio.aclose_forcefully(stream)

    async def _refusal_channel(self, stream: trio.SocketStream, config: Config) -> trio.abc.Stream:
        """Where an implicit FTPS client can read its 421: a TLS stream, after
        a handshake that may take only ``REFUSAL_HANDSHAKE_TIMEOUT`` seconds
        (a refused client must not hold ftpfix as long as an admitted one).
        Plain text, which the client cannot read, if that fails."""
        try:
            return await accept_tls(stream, server_context(config.tls), REFUSAL_HANDSHAKE_TIMEOUT)
        except (HandshakeFailed, OSError, ssl.SSLError):
            return stream


#: Seconds a refused implicit FTPS client has to finish its handshake and
#: be told why (a 421) over TLS.
REFUSAL_HANDSHAKE_TIMEOUT = 2.0

#: Refused implicit FTPS clients told why over TLS at once; more are closed
#: unanswered. Each costs a TLS context (its certificate and key read and
#: parsed) and a descriptor for up to ``REFUSAL_HANDSHAKE_TIMEOUT``: without
#: a bound, one address past its ``max_sessions_per_ip`` made ftpfix do that
#: for every connect it opened (3,000 silent connects held 937
#: descriptors at once and kept port 990 busy for seconds), where port 21 answers a
#: refusal with one write.
REFUSAL_HANDSHAKES = 64


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
            raise StartupError(
                f"cannot listen on [{address}]:{config.listen.port}: {error.strerror or error}"
            ) from None
    if not listeners:
        raise StartupError("no control listener could be opened")
    return listeners


async def open_implicit_listeners(config: Config) -> list[trio.SocketListener]:
    """A listener on ``[tls] implicit_port`` of each ``[listen] address``, or
    none if the port is 0. As ``open_control_listeners``, errors included.
    """
    port = config.tls.implicit_port
    if not port:
        return []
    log = structlog.get_logger("ftpfix")
    listeners: list[trio.SocketListener] = []
    for address in config.listen.address:
        try:
            listeners += await trio.open_tcp_listeners(port, host=address)
        except OSError as error:
            if ":" in address and error.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                log.warning("IPv6 is not available; implicit FTPS on IPv4 only", address=address)
                continue
            for listener in listeners:
                await listener.aclose()
            hint = " (a port below 1024 needs CAP_NET_BIND_SERVICE)" if error.errno == errno.EACCES else ""
            raise StartupError(
                f"cannot listen on [{address}]:{port} ([tls] implicit_port): {error.strerror or error}{hint}"
            ) from None
    if not listeners:
        raise StartupError("no implicit FTPS listener could be opened ([tls] implicit_port)")
    return listeners


def _names(listeners: list[trio.SocketListener]) -> list[str]:
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    return [f"{host}:{port}" if ":" not in host else f"[{host}]:{port}" for host, port in bound]


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
    await refuse_or_warn(config)
    listeners = await open_control_listeners(config)
    try:
        implicit_listeners = await open_implicit_listeners(config)
    except StartupError:
        for listener in listeners:
            await listener.aclose()
        raise
    probe_listeners = []
    if config.metrics.listen is not None:
        try:
            probe_listeners = await open_health_listeners(config.metrics.listen)
        except OSError as error:
            for listener in listeners + implicit_listeners:
                await listener.aclose()
            raise StartupError(
                f"cannot listen on [metrics] listen = {config.metrics.listen}: {error.strerror or error}"
            ) from None
    server = Server(config, raise_descriptor_limit())
    probes: list[str] = []
    async with trio.open_nursery() as background:
        await server.keep_public_address_fresh(background)
        if probe_listeners:
            # In the background nursery, so /healthz and /readyz (503) still
            # answer while sessions drain after SIGTERM.
            readiness = Readiness(server.stopping)
            background.start_soon(keep_checking, readiness, lambda: server.generation.config, log)
            routes = probe_routes(readiness, lambda: server.generation.config)
            routes["/metrics"] = partial(scrape, readiness, lambda: server.generation.config)
            probes = await background.start(serve_health, probe_listeners, routes)
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, server.handle, listeners, handler_nursery=sessions))
                if implicit_listeners:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            partial(server.handle, implicit=True),
                            implicit_listeners,
                            handler_nursery=sessions,
                        )
                    )
                log.info(
                    "listening",
                    control=_names(listeners),
                    **({"implicit_tls": _names(implicit_listeners)} if implicit_listeners else {}),
                    backend=f"{config.backend.address}:{config.backend.port}",
                    public_address=config.passive.public_address,
                    passive_ports=str(config.passive.leased_ports),
                    share_ports=config.passive.share_ports,
                    **({"slice": f"{config.passive.slice} of {config.passive.ports}"} if config.passive.slice else {}),
                    **({"probes": probes} if probes else {}),
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


def scrape(readiness: Readiness, current: Callable[[], Config]) -> Response:
    """/metrics: every series, rendered by prometheus_client."""
    config = current()
    ready, _ = readiness.verdict(trio.current_time(), config.metrics.ready_interval, config.backend.connect_timeout)
    METRICS.backend_up.set(1 if ready else 0)
    body, content_type = METRICS.render()
    return Response(200, body, content_type)


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
                    log.warning(
                        "stopping now; sessions still open are cut off", signal=name, sessions=server.admission.total
                    )
                    forced = True
                    nursery.cancel_scope.cancel()
                else:
                    log.info("stopping", signal=name)
                    stop.set()
    return 1 if forced else 0
