"""Start-up checks: what would otherwise fail at the first transfer, or
quietly starve the passive port pool, is said at start."""

from __future__ import annotations

import socket
from pathlib import Path

import structlog

from ..config import Config
from ..protocol import ActiveMode
from .dial import bind_source_port


class StartupError(Exception):
    """ftpfix cannot start with this config on this machine; the message says why."""


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
    if port is None or config.active.mode != ActiveMode.PROXY:
        return
    with socket.socket() as sock:
        try:
            bind_source_port(sock, port)
        except PermissionError:
            raise StartupError(
                f"[active] source_port = {port} needs the right to bind privileged ports: run ftpfix with "
                f"CAP_NET_BIND_SERVICE or net.ipv4.ip_unprivileged_port_start <= {port} (in a container: "
                f"--sysctl net.ipv4.ip_unprivileged_port_start=0), or remove source_port"
            ) from None
        except OSError as error:
            raise StartupError(f"[active] source_port = {port} cannot be bound: {error.strerror or error}") from None
