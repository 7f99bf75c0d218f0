"""A NAT lab in network namespaces that reproduces the SMC Barricade problem.

::

    wan  198.51.100.10 --veth-- 198.51.100.1  router  192.0.2.1 (br0) --veth-- lan
                                203.0.113.1 (public)              |       192.0.2.10 ftpfix
                                                                  |       192.0.2.20 backend
                                                                  +-veth-- lanclient
                                                                          192.0.2.30

The router, like the consumer routers of the problem, forwards only TCP port
21 and the passive range to the LAN (nftables dnat), lets the LAN out with
masquerade, and drops every other new connection from the WAN. Its forward
hook also reproduces the SMC bug in the kernel: a segment to port 21 that
starts with PASV (or pasv) leaves the router as P@SW (or p@sw).

Only documentation ranges are used (RFC 5737): 198.51.100.0/24 is the
Internet, 203.0.113.1 the router's public address, and 192.0.2.0/24 plays the
private LAN that 192.168.123.0/24 is in the field.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from .netns import in_netns

CLIENT = "198.51.100.10"
ROUTER_WAN = "198.51.100.1"
PUBLIC = "203.0.113.1"
ROUTER_LAN = "192.0.2.1"
FTPFIX_HOST = "192.0.2.10"
BACKEND_HOST = "192.0.2.20"
LAN_CLIENT = "192.0.2.30"
PASSIVE_PORTS = "50000-50019"

# The SMC Barricade bug: PASV at the start of a segment to port 21 becomes
# P@SW, and pasv becomes p@sw.
SMC_TABLE = """\
table inet smc {
    chain forward {
        type filter hook forward priority mangle; policy accept;
        tcp dport 21 @ih,0,32 0x50415356 @ih,0,32 set 0x50405357
        tcp dport 21 @ih,0,32 0x70617376 @ih,0,32 set 0x70407377
    }
}
"""


def _run(*argv: str, input: str | None = None) -> None:
    result = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


@dataclass
class NatLab:
    """The three namespaces; ``forward_control_to`` picks what port 21 reaches."""

    prefix: str

    @property
    def wan(self) -> str:
        return f"{self.prefix}-wan"

    @property
    def router(self) -> str:
        return f"{self.prefix}-router"

    @property
    def lan(self) -> str:
        return f"{self.prefix}-lan"

    @property
    def lanclient(self) -> str:
        return f"{self.prefix}-lanclient"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.wan, self.router, self.lan, self.lanclient)

    def up(self) -> None:
        self.down()
        for ns in self.namespaces:
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # WAN link: the client and the router's Internet side.
        _run("ip", "link", "add", "w0", "netns", self.wan, "type", "veth", "peer", "name", "rw0", "netns", self.router)
        _run("ip", "-n", self.wan, "addr", "add", f"{CLIENT}/24", "dev", "w0")
        _run("ip", "-n", self.wan, "link", "set", "w0", "up")
        _run("ip", "-n", self.wan, "route", "add", "default", "via", ROUTER_WAN)
        _run("ip", "-n", self.router, "addr", "add", f"{ROUTER_WAN}/24", "dev", "rw0")
        _run("ip", "-n", self.router, "addr", "add", f"{PUBLIC}/32", "dev", "rw0")
        _run("ip", "-n", self.router, "link", "set", "rw0", "up")
        # LAN: a bridge on the router, as a home router's switch ports are.
        _run("ip", "-n", self.router, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.router, "addr", "add", f"{ROUTER_LAN}/24", "dev", "br0")
        _run("ip", "link", "add", "rl0", "netns", self.router, "type", "veth", "peer", "name", "l0", "netns", self.lan)
        _run("ip", "-n", self.router, "link", "set", "rl0", "master", "br0")
        for link in ("br0", "rl0"):
            _run("ip", "-n", self.router, "link", "set", link, "up")
        for host in (FTPFIX_HOST, BACKEND_HOST):
            _run("ip", "-n", self.lan, "addr", "add", f"{host}/24", "dev", "l0")
        _run("ip", "-n", self.lan, "link", "set", "l0", "up")
        _run("ip", "-n", self.lan, "route", "add", "default", "via", ROUTER_LAN)
        # A second LAN host: the user "testing it from inside".
        _run(
            "ip",
            "link",
            "add",
            "rl1",
            "netns",
            self.router,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            self.lanclient,
        )
        _run("ip", "-n", self.router, "link", "set", "rl1", "master", "br0")
        _run("ip", "-n", self.router, "link", "set", "rl1", "up")
        _run("ip", "-n", self.lanclient, "addr", "add", f"{LAN_CLIENT}/24", "dev", "c0")
        _run("ip", "-n", self.lanclient, "link", "set", "c0", "up")
        _run("ip", "-n", self.lanclient, "route", "add", "default", "via", ROUTER_LAN)
        _run(*in_netns(self.router, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        self.forward_control_to(FTPFIX_HOST)

    def forward_control_to(
        self,
        lan_host: str,
        *,
        control_port: int = 21,
        forward_control: bool = True,
        passive_ports: Iterable[int] | None = None,
        smc: bool = True,
        drop_unforwarded: bool = False,
        loopback: bool = False,
    ) -> None:
        """Port-forward 21 and the passive range to ``lan_host``, nothing else.

        ``control_port`` is the port on ``lan_host`` that public port 21 reaches;
        ``forward_control=False`` leaves port 21 unforwarded. ``passive_ports``
        forwards only those ports of the range (default: all of it). ``smc``
        keeps the SMC Barricade's P@SW rule on. ``drop_unforwarded`` makes
        the router drop new connections to its own address (ports it does not
        forward) instead of answering them with a reset, as many consumer
        routers do. ``loopback`` makes it loop LAN connections to the public
        address back into the LAN (hairpin NAT), masquerading their source as
        its own LAN address, as routers with "NAT loopback" do. The defaults
        are the lab as the other tests know it.
        """
        first, last = (int(port) for port in PASSIVE_PORTS.split("-"))
        ports = sorted(set(range(first, last + 1) if passive_ports is None else passive_ports))
        inside = '{ "rw0", "br0" }' if loopback else '"rw0"'
        control_rule = (
            f"iifname {inside} ip daddr {PUBLIC} tcp dport 21 dnat to {lan_host}:{control_port}"
            if forward_control
            else ""
        )
        passive_rule = (
            f"iifname {inside} ip daddr {PUBLIC} tcp dport {{ {_spans(ports)} }} dnat to {lan_host}" if ports else ""
        )
        loopback_rule = 'oifname "br0" ip saddr 192.0.2.0/24 ct status dnat masquerade' if loopback else ""
        smc_table = SMC_TABLE if smc else ""
        drop_rule = 'iifname "rw0" ct state new drop' if drop_unforwarded else ""
        ruleset = f"""\
flush ruleset
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {control_rule}
        {passive_rule}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "rw0" ip saddr 192.0.2.0/24 masquerade
        {loopback_rule}
    }}
}}
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        {drop_rule}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "br0" accept
        ct status dnat accept
    }}
}}
{smc_table}"""
        _run(*in_netns(self.router, ["nft", "-f", "-"]), input=ruleset)

    def mangles_pasv(self) -> bool:
        """Whether the router's SMC rule (PASV becomes P@SW) is loaded.

        With FTPS the router cannot see into the control channel, so the rule
        changes nothing there; the FTPS tests check it is on all the same, so
        that they pass behind the very router that breaks plain FTP.
        """
        listing = subprocess.run(
            in_netns(self.router, ["nft", "list", "table", "inet", "smc"]), capture_output=True, text=True, check=False
        )
        return listing.returncode == 0 and "0x50405357" in listing.stdout

    def down(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def new_lab(prefix: str = "ftpfix") -> NatLab:
    return NatLab(prefix=f"{prefix}{os.getpid()}")


def _spans(ports: list[int]) -> str:
    """nftables' set syntax for sorted ports: ``50000-50009, 50012``."""
    runs: list[list[int]] = []
    for port in ports:
        if runs and runs[-1][1] == port - 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
