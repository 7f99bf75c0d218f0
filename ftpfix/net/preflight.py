"""Start-up checks, one set for ``ftpfix run`` and ``ftpfix check``.

What would otherwise fail at the first transfer, quietly starve the passive
port pool, or tell clients an address they cannot reach, is said before
anything is served. ``preflight`` finds every problem and raises nothing;
``check`` prints them all, and ``run`` (through ``refuse_or_warn``) logs the
warnings and refuses to start on an error.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from ..config import Config
from ..protocol import ActiveMode
from .addresses import is_address
from .admission import Admission, open_descriptors, raise_descriptor_limit
from .dial import bind_source_port, family


class StartupError(Exception):
    """ftpfix cannot start with this config on this machine; the message says why."""


class Severity(enum.StrEnum):
    #: ftpfix cannot work so: ``run`` refuses to start, ``check`` exits 1.
    ERROR = "error"
    #: It runs, but likely not as meant: ``check`` exits 0, or 1 with --strict.
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: the key it is about, what is wrong, and what to do."""

    severity: Severity
    key: str
    #: The value the text is about, as TOML writes it, or None.
    value: str | None
    text: str
    fix: str

    @property
    def finding(self) -> str:
        """``[active] source_port = 20 needs ...``, or ``[passive] ports: 50000 read as ...``."""
        return f"{self.key} = {self.value} {self.text}" if self.value is not None else f"{self.key}: {self.text}"

    def __str__(self) -> str:
        return f"{self.severity}: {self.finding}; {self.fix}"


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")

#: Python's ipaddress counts the documentation networks (RFC 5737) as
#: private, but they are what examples and tests write for "the router's
#: public address", so the public-address warning lets them pass. Loopback
#: passes too: it only reaches this machine, which is what the demo and the
#: local tests mean by it, and nobody types it for the router's address.
PUBLIC_LOOKING = tuple(
    ipaddress.IPv4Network(network) for network in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "127.0.0.0/8")
)


def preflight(config: Config, *, dry_run: bool) -> list[Problem]:
    """Every problem with ``config`` on this machine, errors and warnings.

    ``dry_run`` is for ``check``, after which nothing binds the control port:
    it also tests the ``[listen]`` keys, binding port 0 on each address and
    refusing port 0. ``run`` binds them for real next and needs neither (its
    tests listen on port 0 and read the port from the "listening" line).

    Resource handling: every socket it binds to test an address is closed
    before it returns. It blocks on DNS lookups; ``run`` calls it in a thread.
    """
    problems = [_normalised(note) for note in config.notes]
    if dry_run:
        problems += _control_listeners(config)
        problems += _implicit_listeners(config)
    problems += _backend(config)
    problems += _public_address(config)
    problems += _passive_listen_address(config)
    problems += _ephemeral_ports(config)
    problems += check_source_port(config)
    problems += _descriptors(config)
    problems += _proxy_protocol(config)
    return problems


async def refuse_or_warn(config: Config) -> None:
    """``run``'s side of the preflight: log each warning, and raise
    StartupError naming every error, one line each."""
    problems = await trio.to_thread.run_sync(partial(preflight, config, dry_run=False))
    log = structlog.get_logger("ftpfix")
    for problem in problems:
        if problem.severity is Severity.WARNING:
            log.warning(problem.finding, key=problem.key, fix=problem.fix)
    errors = [f"{problem.finding}; {problem.fix}" for problem in problems if problem.severity is Severity.ERROR]
    if errors:
        raise StartupError("\n".join(errors))


def _normalised(note: str) -> Problem:
    key, _, text = note.partition(": ")
    read = text.rpartition(" read as ")[2]
    return Problem(Severity.WARNING, key, None, text, f"write {read} if that is what you mean")


def _bind_error(host: str) -> OSError | None:
    """Why port 0 on ``host`` cannot be bound, or None if it can."""
    try:
        with socket.socket(family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError as error:
        return error
    return None


def _control_listeners(config: Config) -> Iterator[Problem]:
    """What ``open_control_listeners`` would say, short of binding the port."""
    if config.listen.port == 0:
        yield Problem(
            Severity.ERROR,
            "[listen] port",
            "0",
            "makes the kernel pick another port at every start, and the router cannot forward to it",
            "set the port the router forwards, e.g. 21",
        )
    failures = {address: error for address in config.listen.address if (error := _bind_error(address)) is not None}
    for address, error in failures.items():
        # As open_control_listeners does: a machine without IPv6 skips "::"
        # as long as another address can be listened on.
        ipv6_missing = ":" in address and error.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
        if ipv6_missing and len(failures) < len(config.listen.address):
            yield Problem(
                Severity.WARNING,
                "[listen] address",
                f'"{address}"',
                "is IPv6, which this machine lacks: ftpfix will listen on IPv4 only",
                f'remove "{address}" to say so',
            )
            continue
        yield Problem(
            Severity.ERROR,
            "[listen] address",
            f'"{address}"',
            f"cannot be listened on: {_why(error)}",
            "name addresses of this machine, or 0.0.0.0 and :: for all",
        )


def _implicit_listeners(config: Config) -> Iterator[Problem]:
    """``[tls] implicit_port`` can be bound on each address: a port below 1024
    needs the right to bind it, and another server may hold 990 already."""
    port = config.tls.implicit_port
    if not port:
        return
    for address in config.listen.address:
        try:
            with socket.socket(family(address), socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
        except PermissionError:
            yield Problem(
                Severity.ERROR,
                "[tls] implicit_port",
                str(port),
                f"cannot be bound on {address}: it needs the right to bind privileged ports",
                f"run ftpfix with CAP_NET_BIND_SERVICE or net.ipv4.ip_unprivileged_port_start <= {port}",
            )
        except OSError as error:
            if ":" in address and error.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # as for the control port: IPv6 is missing here
            severity = Severity.WARNING if error.errno == errno.EADDRINUSE else Severity.ERROR
            yield Problem(
                severity,
                "[tls] implicit_port",
                str(port),
                f"cannot be bound on {address}: {_why(error)}",
                "stop what holds it (is ftpfix running already?) or pick another port"
                if severity is Severity.WARNING
                else "name addresses of this machine in [listen] address",
            )


def _backend(config: Config) -> Iterator[Problem]:
    backend = config.backend
    if backend.port == 0:
        yield Problem(Severity.ERROR, "[backend] port", "0", "can never be dialed", "set the backend's control port")
    if not is_address(backend.address):
        try:
            # The family the dial uses (dial.connect), so the verdict is the dial's.
            socket.getaddrinfo(backend.address, backend.port, family=family(backend.address))
        except OSError as error:
            yield Problem(
                Severity.WARNING,
                "[backend] address",
                f'"{backend.address}"',
                f"does not resolve ({_why(error)}): every session gets 421 until it does",
                "fix the name or write the backend's IP address",
            )


def _public_address(config: Config) -> Iterator[Problem]:
    setting = config.passive.public_address
    if setting == "auto":
        return
    said = "is"
    if not is_address(setting):
        # As PublicAddress.refresh looks it up: IPv4 only, the first answer.
        try:
            infos = socket.getaddrinfo(setting, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError as error:
            yield Problem(
                Severity.WARNING,
                "[passive] public_address",
                f'"{setting}"',
                f"does not resolve ({_why(error)}): PASV fails until it does",
                "fix the name, or write the router's public IPv4 address",
            )
            return
        said = f"resolves to {infos[0][4][0]}, which is"
        address = ipaddress.IPv4Address(infos[0][4][0])
    else:
        address = ipaddress.IPv4Address(setting)
    if not address.is_global and not any(address in network for network in PUBLIC_LOOKING):
        yield Problem(
            Severity.WARNING,
            "[passive] public_address",
            f'"{setting}"',
            f"{said} not a public address: clients on the internet cannot reach it",
            'write the router\'s public IPv4 address or DNS name (or "auto" when there is no NAT)',
        )


def _passive_listen_address(config: Config) -> Iterator[Problem]:
    """A listen_address that is not this machine's fails every PASV (EADDRNOTAVAIL)."""
    host = config.passive.listen_address
    if host is not None and (error := _bind_error(host)) is not None:
        yield Problem(
            Severity.ERROR,
            "[passive] listen_address",
            f'"{host}"',
            f"cannot be bound: {_why(error)}",
            "name an address of this machine, or remove the key to bind the address each client dialed",
        )


def _ephemeral_ports(config: Config) -> Iterator[Problem]:
    """The passive range lies in the kernel's ephemeral range.

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
    yield Problem(
        Severity.WARNING,
        "[passive] ports",
        f'"{ports}"',
        f"lies in the kernel's ephemeral range {low}-{high}, where outgoing connections take their ports",
        f"reserve them with sysctl -w net.ipv4.ip_local_reserved_ports={ports} (docker run --sysctl ...), "
        f"or pick ports outside {low}-{high}",
    )


def check_source_port(config: Config) -> Iterator[Problem]:
    """``[active] source_port`` can be bound, now rather than at the first transfer."""
    port = config.active.source_port
    if port is None or config.active.mode != ActiveMode.PROXY:
        return
    if port == 0:
        yield Problem(
            Severity.WARNING,
            "[active] source_port",
            "0",
            "lets the kernel pick the port, as leaving it unset does",
            "remove it, or name the port the client's firewall expects, e.g. 20",
        )
        return
    with socket.socket() as sock:
        try:
            bind_source_port(sock, port)
        except PermissionError:
            yield Problem(
                Severity.ERROR,
                "[active] source_port",
                str(port),
                "needs the right to bind privileged ports",
                f"run ftpfix with CAP_NET_BIND_SERVICE or net.ipv4.ip_unprivileged_port_start <= {port} "
                "(in a container: --sysctl net.ipv4.ip_unprivileged_port_start=0), or remove source_port",
            )
        except OSError as error:
            yield Problem(
                Severity.ERROR, "[active] source_port", str(port), f"cannot be bound: {_why(error)}", "remove it"
            )


def _descriptors(config: Config) -> Iterator[Problem]:
    """The descriptor limit fits fewer sessions at their worst than max_sessions."""
    descriptors = raise_descriptor_limit()
    fitting = Admission(descriptors, open_descriptors()).max_by_descriptors
    if fitting is not None and fitting < config.limits.max_sessions:
        yield Problem(
            Severity.WARNING,
            "[limits] max_sessions",
            str(config.limits.max_sessions),
            f"may not fit the descriptor limit ({descriptors} descriptors, room for {fitting} sessions at their worst)",
            "raise the limit (ulimit -n, docker run --ulimit nofile=...) or lower max_sessions",
        )


def _proxy_protocol(config: Config) -> Iterator[Problem]:
    listen = config.listen
    if listen.trusted_proxies and not listen.proxy_protocol:
        yield Problem(
            Severity.WARNING,
            "[listen] trusted_proxies",
            None,
            "is set, but [listen] proxy_protocol is false: no PROXY header is read, and every session "
            "from a balancer counts as the balancer's own",
            "set [listen] proxy_protocol = true, or remove trusted_proxies",
        )
    wide = [network for network in listen.trusted_proxies if network.prefixlen == 0]
    if listen.proxy_protocol and wide:
        yield Problem(
            Severity.WARNING,
            "[listen] trusted_proxies",
            f'["{wide[0]}"]',
            "trusts every address: any client can name itself any address in a PROXY header, and "
            "direct clients are refused for sending none",
            "list only the load balancers' own addresses",
        )


def _why(error: OSError) -> str:
    return error.strerror or str(error)
