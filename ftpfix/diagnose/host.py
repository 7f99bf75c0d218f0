"""``ftpfix diagnose --config FILE``: what only the ftpfix host can see.

It runs ``ftpfix check``'s preflight (``net/preflight.py``: the config, the
names, the ephemeral-port overlap, the descriptor limit) and adds what a
running setup depends on: the backend's greeting, each passive port free to
bind, the public address against this host's own, the TLS certificate's
expiry, and the kernel's FTP connection-tracking helper. It cannot see the
router from inside; it says so and suggests the outside run.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from ..config import Config
from ..net.addresses import is_address
from ..net.preflight import Severity, preflight
from ..protocol.policy import TlsMode
from .certificates import decode_pem
from .checks import Check, Status, spans
from .wire import Control, WireError, dial, text

PROC_MODULES = Path("/proc/modules")
CONNTRACK_HELPER = Path("/proc/sys/net/netfilter/nf_conntrack_helper")

#: Days before a certificate's expiry from which it is worth a warning.
EXPIRY_WARNING_DAYS = 14


def check_host(config: Config, emit: Callable[[Check], None], *, timeout: float) -> tuple[list[Check], list[str]]:
    """Every host check, each given to ``emit`` as it is made; and what cannot be checked from here."""
    results: list[Check] = []

    def report(check: Check) -> None:
        results.append(check)
        emit(check)

    problems = preflight(config, dry_run=True)
    for problem in problems:
        status = Status.FAIL if problem.severity is Severity.ERROR else Status.WARN
        report(Check(f"config {problem.key}", status, problem.finding, problem.fix))
    if not problems:
        report(Check("config", Status.OK, f"{config.path}: the preflight of ftpfix check finds nothing"))
    report(backend_greeting(config, timeout))
    report(passive_ports_free(config))
    report(public_address(config))
    if config.tls.mode is not TlsMode.OFF:
        report(certificate_expiry(Path(config.tls.certificate)))
    report(conntrack_helper())
    public = config.passive.public_address
    outside = public if public != "auto" else "<the router's public address>"
    notes = [
        (
            "from inside, the router cannot be tested: whether it forwards port "
            f"{config.listen.port} and the passive ports {config.passive.ports}, and whether it rewrites PASV;"
        ),
        "a test from this LAN to the public address fails on most routers whatever the setup (no hairpin NAT);",
        f"run from outside the LAN: ftpfix diagnose ftp://USER@{outside}"
        + (f":{config.listen.port}" if config.listen.port != 21 else ""),
    ]
    return results, notes


def backend_greeting(config: Config, timeout: float) -> Check:
    backend = config.backend
    where = f"{backend.address}:{backend.port}"
    seconds = min(timeout, backend.connect_timeout)
    try:
        infos = socket.getaddrinfo(backend.address, backend.port, type=socket.SOCK_STREAM)
    except OSError as error:
        return Check("backend", Status.FAIL, f"{where} does not resolve: {error}", "fix [backend] address")
    outcome, sock, _, _ = dial(str(infos[0][4][0]), backend.port, seconds)
    if sock is None:
        return Check(
            "backend",
            Status.FAIL,
            f"{where} {outcome.said}: every session would get 421",
            "start the FTP server, or fix [backend] address and port",
        )
    control = Control(sock, seconds)
    try:
        code, lines = control.past_preliminary(*control.reply())  # "120 ready in n minutes", then 220
    except (WireError, OSError) as failure:
        return Check("backend", Status.FAIL, f"{where} connected but sent no greeting: {failure}", "check the server")
    finally:
        try:
            control.send("QUIT")
        except OSError:
            pass
        control.close()
    if code != 220:
        return Check("backend", Status.FAIL, f"{where} greets with {text(lines)}", "see the FTP server's log")
    return Check("backend", Status.OK, f"{where} greets: {text(lines)}")


def passive_ports_free(config: Config) -> Check:
    """Each passive port can be bound now; a taken one names the process that holds it."""
    host = config.passive.listen_address or ("0.0.0.0" if "0.0.0.0" in config.listen.address else None)
    host = host or config.listen.address[0]
    taken: dict[int, str] = {}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in config.passive.ports:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ftpfix binds them
            try:
                sock.bind((host, port))
            except OSError as error:
                taken[port] = error.strerror or str(error) if error.errno != errno.EADDRINUSE else "in use"
    ports = str(config.passive.ports)
    if not taken:
        return Check("passive ports", Status.OK, f"all {len(config.passive.ports)} ports {ports} free on {host}")
    owners = listening_processes(taken)
    described = []
    ftpfix_only = True
    for port in sorted(taken):
        owner = owners.get(port)
        described.append(f"{port} ({owner or taken[port]})")
        ftpfix_only = ftpfix_only and owner is not None and "ftpfix" in owner
    if ftpfix_only:
        return Check(
            "passive ports",
            Status.WARN,
            f"{spans(taken)} held by a running ftpfix (open mappings): cannot be checked now",
            data={"taken": sorted(taken)},
        )
    return Check(
        "passive ports",
        Status.FAIL,
        f"{len(taken)} of {len(config.passive.ports)} ports cannot be bound: {', '.join(described)}",
        "stop what holds them, or move [passive] ports (and the router's forwarding) to a free range",
        data={"taken": sorted(taken)},
    )


def listening_processes(ports: Iterable[int]) -> dict[int, str]:
    """Which process listens on each of ``ports``, as "pid 123 vsftpd", from /proc."""
    wanted = set(ports)
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if port in wanted:
                    inodes[fields[9]] = port
    found: dict[int, str] = {}
    if not inodes:
        return found
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for link in links:
            match = re.fullmatch(r"socket:\[(\d+)\]", link)
            if match and match.group(1) in inodes:
                found[inodes[match.group(1)]] = f"pid {pid} {command.strip()[:60]}"
    return found


def public_address(config: Config) -> Check:
    """The public address against what this host can know of its outside address."""
    setting = config.passive.public_address
    if setting == "auto":
        return Check(
            "public address",
            Status.OK,
            '"auto": each client is told the address it dialed (no NAT in front, or a router that forwards as is)',
        )
    if is_address(setting):
        resolved = setting
    else:
        try:
            resolved = socket.getaddrinfo(setting, None, family=socket.AF_INET, type=socket.SOCK_STREAM)[0][4][0]
        except OSError as error:
            return Check(
                "public address",
                Status.FAIL,
                f'"{setting}" does not resolve: {error}',
                "fix the DNS record (or the dynamic DNS client), or write the router's public IPv4 address",
            )
    own = local_addresses()
    named = f'"{setting}"' + (f" → {resolved}" if resolved != setting else "")
    if resolved in own:
        return Check("public address", Status.OK, f"{named}, an address of this host (no NAT in front)")
    return Check(
        "public address",
        Status.OK,
        f"{named}, not this host's: the router's, as it should be behind NAT; only the outside run can tell"
        " whether it is the router's current address",
    )


def local_addresses() -> set[str]:
    """This host's IPv4 addresses, from ``ip -o addr`` (without it, none known)."""
    ip = shutil.which("ip")
    if ip is None:
        return set()
    try:
        result = subprocess.run(
            [ip, "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", result.stdout))


def certificate_expiry(path: Path, now: datetime | None = None) -> Check:
    try:
        pem = path.read_text()
    except OSError as error:
        return Check("tls certificate", Status.FAIL, f"{path}: {error}", "fix [tls] certificate")
    first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    decoded = decode_pem(first.group(0) + "\n") if first else {}
    if "notAfter" not in decoded:
        return Check("tls certificate", Status.FAIL, f"{path}: no certificate to read", "fix [tls] certificate")
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), UTC)
    days = (expires - (now or datetime.now(UTC))).days
    names = ", ".join(value for _, value in decoded.get("subjectAltName", ()))
    if days < 0:
        return Check("tls certificate", Status.FAIL, f"{path} expired {-days} days ago", "renew it and reload ftpfix")
    if days < EXPIRY_WARNING_DAYS:
        return Check("tls certificate", Status.WARN, f"{path} expires in {days} days", "renew it and reload ftpfix")
    return Check("tls certificate", Status.OK, f"expires in {days} days ({names or 'no names'})")


def conntrack_helper(
    modules: Path = PROC_MODULES, automatic: Path = CONNTRACK_HELPER, ruleset: str | None = None
) -> Check:
    """Is the kernel's FTP helper (nf_conntrack_ftp) active on this host's path?

    It reads 227s and PORTs on port 21 to open expectations, and with NAT
    (nf_nat_ftp) rewrites them too: behind ftpfix it sees ftpfix's rewritten
    227 and may rewrite it again, or open expectations ftpfix never meant.
    """
    try:
        loaded = any(line.split(" ", 1)[0] == "nf_conntrack_ftp" for line in modules.read_text().splitlines())
    except OSError:
        loaded = False
    try:
        auto = automatic.read_text().strip() == "1"
    except OSError:
        auto = False
    if ruleset is None:
        ruleset = _rulesets()
    assigned = bool(re.search(r"ct helper set|helper ftp|--helper ftp|ct helper \"?ftp", ruleset))
    if not loaded and not assigned:
        return Check("conntrack ftp helper", Status.OK, "nf_conntrack_ftp is not loaded on this host")
    if assigned or auto:
        how = "a firewall rule assigns it" if assigned else "net.netfilter.nf_conntrack_helper=1 assigns it to port 21"
        return Check(
            "conntrack ftp helper",
            Status.WARN,
            f"nf_conntrack_ftp is active ({how}): it reads and may rewrite ftpfix's 227s",
            "remove the ct helper rule for ftpfix's port / set net.netfilter.nf_conntrack_helper=0, or rmmod"
            " nf_nat_ftp nf_conntrack_ftp (the router's own helper is beyond this check)",
        )
    return Check(
        "conntrack ftp helper",
        Status.OK,
        "nf_conntrack_ftp is loaded, but nothing assigns it here (automatic helpers off, no ct helper rule)",
    )


def _rulesets() -> str:
    found = []
    for argv in (["nft", "list", "ruleset"], ["iptables-save", "-t", "raw"]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            found.append(subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False).stdout)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return "\n".join(found)
