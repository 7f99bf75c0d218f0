"""The address put in every 227: fixed, the one the client dialed, or a DNS
name that follows a dynamic public IP.

Home users behind a dynamic IP publish it under a DNS name (dynamic DNS). The
name is looked up at start and again every ``ttl`` seconds; a failed lookup
keeps the last good address, so a DNS hiccup does not break passive mode.
"""

from __future__ import annotations

import ipaddress
import socket
from ipaddress import IPv4Address, IPv6Address

import trio
from structlog.typing import FilteringBoundLogger

#: Seconds between retries while a name has never resolved.
FIRST_LOOKUP_RETRY = 5.0


class PublicAddress:
    """Answers "which IPv4 address goes in this 227?" for one config setting."""

    def __init__(self, setting: str, ttl: float, log: FilteringBoundLogger) -> None:
        self.setting = setting
        self.ttl = ttl
        self.log = log
        self._address: IPv4Address | None = None
        self.name: str | None = None
        if setting == "auto":
            pass
        elif _is_ipv4(setting):
            self._address = IPv4Address(setting)
        else:
            self.name = setting

    def for_connection(self, local: IPv4Address | IPv6Address) -> IPv4Address | None:
        """The address for a client whose control connection arrived at ``local``.

        None when there is none to give: a name that never resolved, or
        "auto" on an IPv6 connection.
        """
        if self.setting == "auto":
            return local if isinstance(local, IPv4Address) else None
        return self._address

    async def refresh(self) -> None:
        """Look the name up once; keep the last good address on failure."""
        assert self.name is not None
        try:
            infos = await trio.socket.getaddrinfo(self.name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError as error:
            self.log.warning(
                "public address lookup failed", name=self.name, error=str(error), keeping=str(self._address)
            )
            return
        address = IPv4Address(infos[0][4][0])
        if address != self._address:
            self.log.info("public address resolved", name=self.name, address=str(address), previous=str(self._address))
            self._address = address

    async def keep_fresh(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve the name now and every ``ttl`` seconds, until cancelled."""
        if self.name is None:
            task_status.started()
            return
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self.ttl if self._address is not None else min(self.ttl, FIRST_LOOKUP_RETRY))
            await self.refresh()


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), IPv4Address)
    except ValueError:
        return False
