"""Which address is which: the two control connections' ends, and the address
a client is told to dial for its data connection (split horizon)."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from .public import PublicAddress


@functools.lru_cache(maxsize=16)
def is_address(host: str) -> bool:
    """True if ``host`` is an IP address rather than a name (asked once per config)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalize_host(host: str) -> str:
    """The address as text, with IPv4-mapped IPv6 (::ffff:a.b.c.d) unwrapped."""
    if ":" not in host:
        return host  # IPv4, as the kernel spells it: already canonical
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The addresses of a session's two control connections, read once.

    Passive ports listen on the address the client dialed (``local``), active
    listeners on the one ftpfix reaches the backend from (``backend_local``).
    """

    client: str
    local: str
    backend: str
    backend_local: str
    #: The address the client dialed, when a PROXY header said (the
    #: balancer's); otherwise ``local`` is it.
    dialed: str | None = None


def advertised_address(endpoints: Endpoints, internal: bool, public: PublicAddress) -> ipaddress.IPv4Address | None:
    """The address to put in a 227 for this session, or None if there is none.

    Split horizon: a LAN client (``internal``) that dialed the private
    address must be sent back to it, not out to the router; everyone else
    gets the public address.
    """
    local = ipaddress.ip_address(endpoints.dialed or endpoints.local)
    if internal:
        return local if isinstance(local, ipaddress.IPv4Address) else None
    return public.for_connection(local)
