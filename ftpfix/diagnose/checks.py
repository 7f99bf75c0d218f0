"""What each stage of ``ftpfix diagnose`` concludes from what it saw: pure.

Theory of operation
-------------------
The prober (``probe.py``) does the I/O and records plain observations: a
connect refused or timed out, a reply's code and text, the ports a 227 named.
Each function here turns one stage's observations into a ``Check``: a status,
one line saying what was seen, and, when something is wrong, one line saying
what to change. ``verdict`` picks the line the run ends with: the first
failing stage, or, when nothing failed, the first warning.

Nothing here touches the network, so every verdict is unit-tested from
observations alone, and the NAT lab tests check that the prober observes
what the lab set up.

"Private" addresses are RFC 1918, carrier-grade NAT (RFC 6598), loopback,
link-local and IPv6 ULA: what a NAT router's LAN side uses. Python's
``is_private`` also counts the documentation networks (RFC 5737) that the
NAT lab uses as the Internet, so it is not used; ``--private`` adds networks
(the lab's LAN is 192.0.2.0/24).
"""

from __future__ import annotations

import enum
import ipaddress
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Networks behind NAT routers: RFC 1918, RFC 6598, loopback, link-local, ULA.
PRIVATE_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(text)
    for text in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)

#: Where each kind of server is told its public address, for hints about a
#: server with no ftpfix in front.
SERVER_SETTINGS = "vsftpd pasv_address, ProFTPD MasqueradeAddress, pure-ftpd -P (ForcePassiveIP)"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # it works, but something deserves a look
    FAIL = "fail"
    SKIP = "skip"  # not run: an earlier stage failed, or it was not asked for


#: How a status shows on a terminal, and as a word elsewhere.
SYMBOLS = {Status.OK: "✓", Status.WARN: "!", Status.FAIL: "✗", Status.SKIP: "-"}
WORDS = {Status.OK: "ok", Status.WARN: "warn", Status.FAIL: "FAIL", Status.SKIP: "skip"}


#: Unicode categories a terminal acts on rather than shows: controls (ESC
#: starts a sequence that can clear the screen or set the title), format
#: characters (a right-to-left override reorders what follows), lone
#: surrogates (undecodable bytes), and the line and paragraph separators.
_UNSHOWN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def shown(text: str) -> str:
    """``text`` safe to print: what a terminal would act on is written out (``\\x1b``).

    Summaries quote what a server said (its greeting, its replies, the names in
    its listing), and any server may be hostile: its escape sequences are shown,
    never obeyed, and it cannot start a line of its own."""
    if text.isprintable():
        return text
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in _UNSHOWN else ch for ch in text)


class Stage(enum.StrEnum):
    """The stages, in the order they run."""

    RESOLVE = "resolution"
    CONNECT = "connect"
    GREETING = "greeting"
    TLS = "tls"
    LOGIN = "login"
    PASV = "pasv integrity"
    ADDRESS = "227 address"
    PORTS = "passive ports"
    EPSV = "epsv"
    DATA_PASSIVE = "data (passive)"
    DATA_EPSV = "data (epsv)"
    ACTIVE = "active mode"
    SAMPLE = "speed"


@dataclass(frozen=True, slots=True)
class Check:
    """One stage's conclusion."""

    stage: str  # a Stage, or a host check's name
    status: Status
    summary: str
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def line(self, *, terminal: bool) -> str:
        """The line printed as the stage finishes, and its hint below it."""
        summary, hint = shown(self.summary), shown(self.hint)
        if terminal:
            text = f"{SYMBOLS[self.status]} {self.stage:<15} {summary}"
            return text + (f"\n  → {hint}" if hint else "")
        text = f"{WORDS[self.status]:<4} {self.stage}: {summary}"
        return text + (f"\n     to fix: {hint}" if hint else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": str(self.stage),
            "status": str(self.status),
            "summary": self.summary,
            "hint": self.hint,
            **({"data": self.data} if self.data else {}),
        }


#: Stages that only PASV's 227 decides: a 227 cannot name an IPv6 address.
PASV_ONLY = frozenset({Stage.PASV, Stage.ADDRESS, Stage.DATA_PASSIVE})


def over_ipv6(check: Check, *, range_known: bool) -> Check:
    """``check`` for a server dialed over IPv6, where clients use EPSV (RFC 2428): a failure of
    PASV, its 227 or a round trip over it is a warning. So are the ports only a 227 named; ports of
    a range ftpfix told are EPSV's too, and stay as they are."""
    passive_only = check.stage in PASV_ONLY or (check.stage == Stage.PORTS and not range_known)
    if check.status is not Status.FAIL or not passive_only:
        return check
    return Check(
        check.stage,
        Status.WARN,
        f"{check.summary} (dialed over IPv6, where clients use EPSV, RFC 2428: only IPv4 clients need PASV)",
        check.hint,
        data=check.data,
    )


@dataclass(frozen=True, slots=True)
class FtpfixInfo:
    """What ``SITE FTPFIX`` said: ftpfix is in front of the server."""

    version: str
    ports: range | None
    last_pasv: str  # "none", "PASV", or "P@SW (repaired)"

    @property
    def repaired(self) -> bool:
        return self.last_pasv.endswith("(repaired)")


def parse_site_ftpfix(code: int, lines: Sequence[str]) -> FtpfixInfo | None:
    """ftpfix's 211 to ``SITE FTPFIX``, or None for any other server's answer."""
    if code != 211 or not lines or not lines[0].startswith("211-ftpfix "):
        return None
    version = lines[0][len("211-ftpfix ") :].strip()[:40]
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.strip().partition(": ")
        fields[key] = value.strip()[:80]
    ports = None
    first, _, last = fields.get("passive-ports", "").partition("-")
    if first.isdigit() and last.isdigit() and 0 < int(first) <= int(last) <= 65535:
        ports = range(int(first), int(last) + 1)
    return FtpfixInfo(version, ports, fields.get("last-pasv", "none"))


def is_private(address: Address, extra: Iterable[Network] = ()) -> bool:
    return any(address.version == network.version and address in network for network in (*PRIVATE_NETWORKS, *extra))


def spans(ports: Iterable[int]) -> str:
    """``50010-50014, 50016``: sorted ports, runs joined."""
    ordered = sorted(set(ports))
    parts: list[str] = []
    start = previous = None
    for port in [*ordered, None]:
        if port is not None and previous is not None and port == previous + 1:
            previous = port
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = port
    return ", ".join(parts)


def _server_side(ftpfix: FtpfixInfo | None) -> str:
    return "ftpfix" if ftpfix else "the FTP server"


# -- the stages ------------------------------------------------------------


def resolution(host: str, addresses: Sequence[str], error: str | None) -> Check:
    if error is not None or not addresses:
        return Check(
            Stage.RESOLVE,
            Status.FAIL,
            f"{host} does not resolve ({error or 'no address'})",
            "check the name (its DNS record, or the dynamic DNS client that updates it)",
        )
    if addresses == [host]:
        return Check(Stage.RESOLVE, Status.OK, f"{host} is an address", data={"addresses": list(addresses)})
    return Check(Stage.RESOLVE, Status.OK, f"{host} → {', '.join(addresses)}", data={"addresses": list(addresses)})


class Outcome(enum.StrEnum):
    """How a TCP connect ended."""

    OPEN = "open"
    REFUSED = "refused"  # RST: nobody listens there, or a router rejects it
    TIMEOUT = "timeout"  # no answer: dropped by a router or a firewall
    UNREACHABLE = "unreachable"  # ICMP unreachable, no route

    @property
    def said(self) -> str:
        """As a sentence has it: "refused", "timed out"."""
        return "timed out" if self is Outcome.TIMEOUT else self.value


def connect(
    target: Address, port: int, outcome: Outcome, seconds: float, own: Address | None, private: Iterable[Network] = ()
) -> Check:
    """The control connection; from inside the LAN to the public address, the hairpin trap."""
    where = f"{target}:{port}" if target.version == 4 else f"[{target}]:{port}"
    data = {"outcome": str(outcome), "seconds": round(seconds, 3), "own_address": str(own) if own else None}
    private = tuple(private)
    inside = own is not None and is_private(own, private) and not is_private(target, private)
    if outcome is Outcome.OPEN and inside:
        # The router looped the connection back (hairpin NAT): what follows is
        # what this LAN sees through that loop, not what clients outside see.
        return Check(
            Stage.CONNECT,
            Status.WARN,
            f"{where} open ({seconds * 1000:.0f} ms), dialed from {own}, a private address: the router loops"
            " this back into the LAN (hairpin NAT), so the stages below show that path, not the outside one",
            "run ftpfix diagnose from outside the LAN too",
            data={**data, "hairpin": True},
        )
    if outcome is Outcome.OPEN:
        return Check(Stage.CONNECT, Status.OK, f"{where} open ({seconds * 1000:.0f} ms)", data=data)
    if inside:
        return Check(
            Stage.CONNECT,
            Status.FAIL,
            f"{where} {outcome.said}, dialed from {own}, a private address: this host is inside a LAN and dials a"
            " public address, which most routers do not loop back (no hairpin NAT): this says nothing about"
            " the server",
            "run ftpfix diagnose from outside the LAN (a phone's hotspot, a VPS), or dial the server's LAN"
            " address from inside",
            data={**data, "hairpin": True},
        )
    if outcome is Outcome.REFUSED:
        return Check(
            Stage.CONNECT,
            Status.FAIL,
            f"{where} refused: nothing listens there, or the router does not forward port {port}",
            f"forward TCP port {port} on the router to the FTP host (ftpfix, if it is in front), and check"
            " that it runs",
            data=data,
        )
    if outcome is Outcome.TIMEOUT:
        return Check(
            Stage.CONNECT,
            Status.FAIL,
            f"{where} timed out after {seconds:.0f} s: dropped on the way (port {port} not forwarded, or filtered)",
            f"forward TCP port {port} on the router to the FTP host, and allow it in the firewalls on the way",
            data=data,
        )
    return Check(
        Stage.CONNECT,
        Status.FAIL,
        f"{where} unreachable (no route)",
        "check this host's network, and the address the name points to",
        data=data,
    )


def greeting(code: int | None, text: str) -> Check:
    shown = text[:200].rstrip(".")
    if code is None:
        return Check(
            Stage.GREETING,
            Status.FAIL,
            f"no greeting ({text or 'nothing'}): something accepts the connection but does not speak FTP",
            "check what listens on the port (another service, a half-dead server, a port forwarded to the wrong host)",
        )
    if code == 220:
        return Check(Stage.GREETING, Status.OK, shown)
    if code == 421:
        behind = "the FTP server cannot be reached" in text or "the server closed" in text
        return Check(
            Stage.GREETING,
            Status.FAIL,
            f"{shown}: "
            + ("the proxy in front is up, but the FTP server behind it is down" if behind else "the server refuses"),
            "start the FTP server behind the proxy, or fix [backend] address and port in ftpfix's config"
            if behind
            else "the server refuses sessions now (too many users, access rules): see its log",
        )
    return Check(Stage.GREETING, Status.FAIL, f"unexpected greeting {shown}", "check what listens on the port")


def login(user: str, code: int | None, text: str) -> Check:
    if code == 230:
        return Check(Stage.LOGIN, Status.OK, f"logged in as {user}")
    return Check(
        Stage.LOGIN,
        Status.FAIL,
        f"login as {user} refused: {text[:200] or 'no reply'}",
        "check the user name and password (--user, --password-file); anonymous is tried by default"
        if code in (530, 331, 332)
        else "see the server's log for why",
    )


def password_withheld(seen: TlsSeen) -> Check | None:
    """A FAIL when a password must not go over this TLS: whoever sits in the
    middle of a connection whose certificate is not trusted, or names another
    host, would read it. None when it may go."""
    if seen.trusted and seen.name_matches is not False:
        return None
    why = "does not name the host dialed" if seen.trusted else "is not trusted"
    return Check(
        Stage.LOGIN,
        Status.FAIL,
        f"password not sent: the certificate {why}, so a man in the middle would read it",
        "pass --ca FILE to trust the server's CA, or --insecure to send the password anyway (as curl -k)",
    )


@dataclass(frozen=True, slots=True)
class TlsSeen:
    """What the TLS handshake showed."""

    version: str
    days_left: int | None  # until the certificate expires; None if unknown
    trusted: bool
    name_matches: bool | None  # None when dialed by address and not checked
    self_signed: bool
    verify_error: str = ""


def tls(seen: TlsSeen | None, error: str | None, asked: bool) -> Check:
    if seen is None:
        return Check(
            Stage.TLS,
            Status.FAIL if asked else Status.WARN,
            f"TLS handshake failed: {error}",
            "check the certificate and key configured for TLS ([tls] in ftpfix's config)",
        )
    facts = [seen.version]
    if seen.days_left is not None:
        facts.append(f"certificate expires in {seen.days_left} days")
    problems: list[str] = []
    if seen.days_left is not None and seen.days_left < 0:
        problems.append("the certificate has expired")
    if seen.self_signed:
        problems.append("the certificate is self-signed: clients will warn")
    elif not seen.trusted:
        problems.append(f"the certificate is not trusted ({seen.verify_error or 'unknown issuer'})")
    if seen.name_matches is False:
        problems.append("the certificate does not name the host dialed")
    if seen.version in ("TLSv1", "TLSv1.1", "SSLv3"):
        problems.append(f"{seen.version} is obsolete")
    data = {"version": seen.version, "days_left": seen.days_left, "self_signed": seen.self_signed}
    if problems:
        expired = seen.days_left is not None and seen.days_left < 0
        return Check(
            Stage.TLS,
            Status.FAIL if expired else Status.WARN,
            ", ".join(facts) + "; " + "; ".join(problems),
            "get a certificate for the name clients dial from a public CA (e.g. Let's Encrypt) and set it in [tls]",
            data=data,
        )
    if seen.days_left is not None and seen.days_left < 14:
        return Check(
            Stage.TLS, Status.WARN, ", ".join(facts), "renew the certificate soon, and reload ftpfix", data=data
        )
    named = "name matches" if seen.name_matches else "name not checked"
    return Check(Stage.TLS, Status.OK, ", ".join(facts) + f", trusted, {named}", data=data)


def pasv_integrity(code: int | None, text: str, ftpfix: FtpfixInfo | None) -> Check:
    """Did PASV reach the server as PASV? Only ftpfix or the server's own complaint can tell."""
    if code is not None and code >= 500 and "P@SW" in text.upper():
        return Check(
            Stage.PASV,
            Status.FAIL,
            f"the server got P@SW, not PASV ({text[:120]}): a router on the way rewrites the command"
            " (the SMC Barricade bug, or a broken FTP helper)",
            "put ftpfix in front of the server (it repairs P@SW), or turn off the router's FTP helper / update"
            " its firmware",
        )
    if code != 227:
        return Check(
            Stage.PASV,
            Status.FAIL,
            f"PASV refused: {text[:200] or 'no reply'}",
            "enable passive mode on the server",
        )
    if ftpfix is not None and ftpfix.repaired:
        return Check(
            Stage.PASV,
            Status.WARN,
            f"PASV arrived at ftpfix as {ftpfix.last_pasv.split(' ')[0]} and ftpfix repaired it: a router on the"
            " way rewrites the command (the SMC Barricade bug)",
            "nothing to do while ftpfix is in front; the router's FTP helper or firmware is at fault",
        )
    if ftpfix is not None:
        return Check(Stage.PASV, Status.OK, "PASV arrived as PASV (ftpfix says so)")
    return Check(Stage.PASV, Status.OK, "PASV answered with 227 (no ftpfix in front to say how it arrived)")


def address_227(
    dialed: Address,
    advertised: Address,
    ftpfix: FtpfixInfo | None,
    private: Iterable[Network] = (),
    own: Address | None = None,
) -> Check:
    """The address the 227 names: the dialed one, a private one, or another.

    Dialed from inside the LAN (``own`` private) through a router that loops
    back, a LAN address is what ftpfix's split horizon (``internal_networks``)
    tells LAN clients, and right for them: only the outside run can judge.
    """
    data = {"dialed": str(dialed), "advertised": str(advertised)}
    if advertised == dialed:
        return Check(Stage.ADDRESS, Status.OK, f"227 names {advertised}, the address dialed", data=data)
    private = tuple(private)
    if ftpfix is not None:
        hint = f'set [passive] public_address = "{dialed}" in ftpfix\'s config (or a DNS name that resolves to it)'
    else:
        hint = f"put ftpfix in front of the server, or set its public address to {dialed} ({SERVER_SETTINGS})"
    inside = own is not None and is_private(own, private)
    if is_private(advertised, private) and not is_private(dialed, private) and inside and ftpfix is not None:
        return Check(
            Stage.ADDRESS,
            Status.WARN,
            f"227 names {advertised}, a LAN address, as ftpfix tells LAN clients (internal_networks): right for"
            " this host, which dials from inside; clients outside must get the public one",
            "run ftpfix diagnose from outside the LAN to see what they get",
            data=data,
        )
    if is_private(advertised, private) and not is_private(dialed, private):
        return Check(
            Stage.ADDRESS,
            Status.FAIL,
            f"227 names {advertised}, a private address: {_server_side(ftpfix)} is not told its public address,"
            " and clients outside cannot reach it",
            hint,
            data=data,
        )
    return Check(
        Stage.ADDRESS,
        Status.FAIL,
        f"227 names {advertised}, not {dialed} that was dialed: clients will connect elsewhere",
        hint,
        data=data,
    )


@dataclass(frozen=True, slots=True)
class PortsSeen:
    """What probing the passive ports found.

    ``scanned``: every port of a known range, dialed at once without a lease:
    a timeout there means dropped on the way. ``leased``: ports a PASV named,
    dialed while the server listened on them, which is the only way to tell
    a port the router does not forward from one where nobody listens yet: both
    are refused when the router answers for ports it does not forward.
    """

    known_range: range | None
    scanned: dict[int, Outcome]
    leased: dict[int, Outcome]

    def missing(self) -> list[int]:
        """Ports that are not forwarded, as far as can be told."""
        bad = {port for port, outcome in self.leased.items() if outcome is not Outcome.OPEN}
        bad |= {port for port, outcome in self.scanned.items() if outcome in (Outcome.TIMEOUT, Outcome.UNREACHABLE)}
        return sorted(bad)

    def untested(self) -> list[int]:
        """Ports of the range that were refused unleased and never leased: undecided."""
        if self.known_range is None:
            return []
        return sorted(
            port
            for port in self.known_range
            if port not in self.leased and self.scanned.get(port, Outcome.REFUSED) is Outcome.REFUSED
        )


def passive_ports(seen: PortsSeen, ftpfix: FtpfixInfo | None, seconds: float | None = None) -> Check:
    missing = seen.missing()
    untested = seen.untested()
    tested = (set(seen.leased) | set(seen.scanned)) - set(untested)
    data = {
        "range": f"{seen.known_range.start}-{seen.known_range.stop - 1}" if seen.known_range else None,
        "not_forwarded": missing,
        "untested": untested,
        "tested": len(tested),
        **({"seconds": round(seconds, 2)} if seconds is not None else {}),
    }
    if not tested:
        return Check(Stage.PORTS, Status.FAIL, "no passive port could be tested", data=data)
    of = f"ports of the range {data['range']}" if seen.known_range else "ports the server named"
    if missing:
        if seen.known_range is not None:
            hint = (
                f"forward TCP ports {spans(missing)} on the router to the ftpfix host (the whole range {data['range']})"
            )
        elif len(missing) < len(tested):
            hint = "forward the server's whole passive port range on the router (set one in the server if it has none)"
        else:
            hint = (
                "the server's passive ports are not forwarded: put ftpfix in front (one small range to forward),"
                " or give the server a passive port range and forward it on the router"
            )
        return Check(
            Stage.PORTS,
            Status.FAIL,
            f"{len(missing)} of {len(tested)} {of} not forwarded: {spans(missing)}",
            hint,
            data=data,
        )
    summary = f"all {len(tested)} {of} reach the server"
    if untested:
        return Check(
            Stage.PORTS,
            Status.WARN,
            f"{summary}; {spans(untested)} untested (held by other sessions, or past what one run tests)",
            data=data,
        )
    return Check(Stage.PORTS, Status.OK, summary, data=data)


def epsv(code: int | None, text: str) -> Check:
    if code == 229:
        return Check(Stage.EPSV, Status.OK, text[:120])
    if code in (500, 502):
        return Check(
            Stage.EPSV,
            Status.WARN,
            f"EPSV unknown to the server ({text[:120]}): clients fall back to PASV",
            "put ftpfix in front: it answers EPSV for any server",
        )
    return Check(Stage.EPSV, Status.FAIL, f"EPSV failed: {text[:200] or 'no reply'}", "see the server's log")


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """A LIST and a RETR over one kind of data connection."""

    listing_bytes: int | None = None
    retr_name: str | None = None
    retr_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    via: str = ""  # the address the data connection went to, when not the 227's
    file_refused: bool = False  # the LIST came through; the server refused the RETR's file (550)
    elsewhere: bool = False  # the data connection was accepted, yet the server said none came (425)


def data(stage: Stage, trip: RoundTrip) -> Check:
    facts = {"listing_bytes": trip.listing_bytes, "retr": trip.retr_name, "retr_bytes": trip.retr_bytes}
    if trip.error is not None and trip.file_refused:
        return Check(
            stage,
            Status.WARN,
            f"LIST {trip.listing_bytes} bytes, but {trip.error}",
            f"the data connection works; the server will not send {trip.retr_name}: name a file this user may"
            " read (not a folder) in the URL's path, or none to fetch the first small file listed",
            data=facts,
        )
    if trip.error is not None:
        return Check(
            stage,
            Status.FAIL,
            f"data round trip failed: {trip.error}",
            "the data connection was accepted, yet the server says none came: either the router forwards the"
            " passive ports to another host than the FTP server (the ftpfix host, with ftpfix in front), or"
            " something on the way answers for them, or the server refused it (its log says which)"
            if trip.elsewhere
            else "see the stages above; the server's log says why it refused",
            data=facts,
        )
    text = f"LIST {trip.listing_bytes} bytes"
    if trip.retr_name is not None:
        text += f", RETR {trip.retr_name} {trip.retr_bytes} bytes"
    else:
        text += " (no small file to RETR: name one in the URL's path)"
    if trip.via:
        text += f" (via {trip.via})"
    return Check(stage, Status.OK, text, data=facts)


def active(outcome: str | None, error: str | None) -> Check:
    if error is None:
        return Check(Stage.ACTIVE, Status.OK, f"PORT and LIST: {outcome}")
    return Check(
        Stage.ACTIVE,
        Status.FAIL,
        f"active mode failed: {error}",
        "active mode needs this host to take connections from the server: forward the port on this side's"
        " router, or use passive mode",
    )


def sample(latencies: Sequence[float], bytes_moved: int, seconds: float) -> Check:
    if not latencies:
        return Check(Stage.SAMPLE, Status.SKIP, "no sample")
    median = sorted(latencies)[len(latencies) // 2]
    text = f"control round trip {median * 1000:.1f} ms (median of {len(latencies)} NOOPs)"
    if bytes_moved and seconds > 0:
        text += f", download {bytes_moved / seconds / 1e6:.2f} MB/s ({bytes_moved} bytes)"
    return Check(
        Stage.SAMPLE,
        Status.OK,
        text,
        data={"latency_ms": round(median * 1000, 2), "bytes": bytes_moved, "seconds": round(seconds, 4)},
    )


def skipped(stage: Stage, why: str) -> Check:
    return Check(stage, Status.SKIP, why)


# -- the end ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    stage: str | None
    text: str
    exit_status: int

    def line(self) -> str:
        return f"verdict: {shown(self.text)}"

    def as_json(self) -> dict[str, Any]:
        return {"status": str(self.status), "stage": str(self.stage) if self.stage else None, "text": self.text}


def verdict(checks: Sequence[Check]) -> Verdict:
    """The first failing stage and what to change; else the first warning; else all is well."""
    for check in checks:
        if check.status is Status.FAIL:
            fix = f"; {check.hint}" if check.hint else ""
            if check.data.get("hairpin"):
                text = f"HAIRPIN at {check.stage}: this host is inside the LAN and the router does not loop back{fix}"
            else:
                text = f"FAIL at {check.stage}: {check.summary}{fix}"
                if any(earlier.data.get("hairpin") for earlier in checks):
                    text += " (seen from inside the LAN through the router's loopback: run from outside to be sure)"
            return Verdict(Status.FAIL, check.stage, text, 1)
    for check in checks:
        if check.status is Status.WARN:
            fix = f"; {check.hint}" if check.hint else ""
            return Verdict(Status.WARN, check.stage, f"WORKS, but {check.stage}: {check.summary}{fix}", 0)
    return Verdict(Status.OK, None, "OK: every stage passed", 0)
