"""The configuration: one TOML file, loaded into frozen dataclasses.

Every section is a dataclass whose fields carry their own parser in their
metadata, so the schema, the defaults and the validation are written once, side
by side. Every error is a ConfigError that names the file and the key, as in
``ftpfix.toml: [passive] ports: 50000-49999 runs backwards``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .logs import LogFormat
from .ports import PortRange, Slice
from .protocol.commands import Level
from .protocol.policy import DEFAULT_ALIASES, DEFAULT_MAX_LINE, ActiveMode, EpsvMode, Policy, TlsMode

DEFAULT_PATH = Path("/etc/ftpfix/ftpfix.toml")

#: The core's defaults, which the keys it reads take as theirs.
_CORE = Policy()
ENVIRONMENT_VARIABLE = "FTPFIX_CONFIG"

#: Passive ports must be unprivileged: the backend's own range usually sits
#: there too, and ports under 1024 would need root for every bind.
PASSIVE_PORT_FLOOR = 1024


class AcceptDataFrom(enum.StrEnum):
    """Which addresses may make a passive data connection for a client.

    ``same-network`` is for clients behind carrier-grade NAT, whose pool may
    give the data connection another public address than the control
    connection's (RFC 6888 asks pools to keep them paired, and not all do):
    the same /24 (IPv4) or /64 (IPv6) is accepted.
    """

    SAME_ADDRESS = "same-address"
    SAME_NETWORK = "same-network"

    def network(self, host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The addresses accepted for a client at ``host``."""
        address = ipaddress.ip_address(host)
        if self is AcceptDataFrom.SAME_ADDRESS:
            return ipaddress.ip_network(address)
        prefix = 24 if address.version == 4 else 64
        return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


class ConfigError(Exception):
    """The configuration file cannot be used; the message names file and key."""


@dataclass(frozen=True, slots=True)
class Normalised:
    """A parser's result when the file wrote a value otherwise than it is read.

    The loader keeps ``value`` and notes "written read as read" on the Config,
    so ``ftpfix check`` and ``ftpfix run`` can say what was understood.
    """

    value: Any
    written: str
    read: str


# -- value parsers: each takes the raw TOML value and returns the typed one,
#    or raises ValueError with a message that completes "key: ..." ----------


def _port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"{value!r} is not a TCP port (0-65535)")
    return value


def _ip(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _ipv4(value: Any) -> ipaddress.IPv4Address:
    address = ipaddress.ip_address(_ip(value))
    if not isinstance(address, ipaddress.IPv4Address):
        # A 227 reply can only carry an IPv4 address (RFC 959 section 4.1.2).
        raise ValueError(f"{value!r} is not an IPv4 address, and a 227 reply can only carry IPv4")
    return address


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _host(value: Any) -> str:
    """An IP address, or a host name as RFC 1123 section 2.1 allows."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a host name or IP address")
    if re.fullmatch(r"[0-9.]+", value) or ":" in value:
        return _ip(value)
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


def _addresses(value: Any) -> tuple[str, ...]:
    """One IP address, or a list of them."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"{value!r} is not an IP address or a list of them")
    return tuple(_ip(item) for item in values)


def _public_address(value: Any) -> str:
    """An IPv4 address, "auto", or a DNS name that resolves to one."""
    if value == "auto":
        return value
    if isinstance(value, str) and (re.fullmatch(r"[0-9.]+", value) or ":" in value):
        return str(_ipv4(value))
    try:
        return _host(value)
    except ValueError:
        raise ValueError(f'{value!r} is not an IPv4 address, a DNS name or "auto"') from None


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | Normalised:
    if not isinstance(value, list):
        raise ValueError(f'{value!r} is not a list of networks like ["192.168.123.0/24"]')
    try:
        networks = tuple(ipaddress.ip_network(item, strict=False) for item in value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a list of networks in CIDR notation") from None
    # "192.168.123.1/24" has host bits set: it is read as 192.168.123.0/24,
    # which may not be what was meant. A bare address is a /32 (or /128).
    changed = [
        (item, network)
        for item, network in zip(value, networks, strict=True)
        if isinstance(item, str) and "/" in item and ipaddress.ip_interface(item).ip != network.network_address
    ]
    if changed:
        return Normalised(
            networks,
            ", ".join(_toml_value(item) for item, _ in changed),
            ", ".join(_toml_value(str(network)) for _, network in changed),
        )
    return networks


def _optional_port(value: Any) -> int | None:
    if value is False:
        return None
    return _port(value)


#: Highest rate limit: a terabyte per second is no limit at all.
MAX_RATE = 10**12


def _rate(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RATE:
        raise ValueError(f"{value!r} is not a rate in bytes per second (0 for no limit, at most {MAX_RATE})")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _port_range(value: Any) -> PortRange | Normalised:
    if isinstance(value, int) and not isinstance(value, bool):
        first = last = value
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)):
        first, last = int(match.group(1)), int(match.group(2))
    else:
        raise ValueError(f'{value!r} is not a port range like "50000-50019"')
    if first > last:
        raise ValueError(f'"{first}-{last}" runs backwards; write "{last}-{first}"')
    if first < PASSIVE_PORT_FLOOR or last > 65535:
        raise ValueError(f'"{first}-{last}" is outside {PASSIVE_PORT_FLOOR}-65535')
    if value != f"{first}-{last}":
        return Normalised(PortRange(first, last), _toml_value(value), _toml_value(f"{first}-{last}"))
    return PortRange(first, last)


#: Longest duration any setting accepts: a year. Past it a number is a typo,
#: and nan or inf would make every deadline computed from it meaningless.
MAX_SECONDS = 365 * 24 * 3600


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"{value!r} is not a number of seconds from 0 (excluded) to {MAX_SECONDS}")
    return float(value)


def _count(maximum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
            raise ValueError(f"{value!r} is not a whole number from 1 to {maximum}")
        return value

    return parse


#: A StatefulSet pod's name ends in "-N", its ordinal from 0 (ftpfix-0, ftpfix-1, ...).
_ORDINAL = re.compile(r".*-(\d+)")


def _slice(value: Any) -> Slice | Normalised | None:
    """ "i/n" (1-based), "ordinal/n" (this pod's StatefulSet ordinal + 1, from
    the host name's trailing "-N"), or "" for the whole range."""
    if not isinstance(value, str):
        raise ValueError(f'{value!r} is not a slice like "2/3", "ordinal/3" or ""')
    text = value.strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+|ordinal)\s*/\s*(\d+)", text)
    if match is None:
        raise ValueError(f'{value!r} is not a slice like "2/3" (the second of three), "ordinal/3" or ""')
    count = int(match.group(2))
    if count < 1:
        raise ValueError(f"{value!r}: there must be at least one slice")
    if match.group(1) == "ordinal":
        host = os.environ.get("HOSTNAME") or socket.gethostname()
        ordinal = _ORDINAL.fullmatch(host)
        if ordinal is None:
            raise ValueError(
                f'{value!r}: the host name {host!r} does not end in "-N" as a StatefulSet pod\'s does (ftpfix-0)'
            )
        index = int(ordinal.group(1)) + 1
        if index > count:
            raise ValueError(f"{value!r}: pod {host!r} has ordinal {index - 1}, but there are only {count} slices")
        return Slice(index, count, host)
    index = int(match.group(1))
    if not 1 <= index <= count:
        raise ValueError(f"{value!r}: slices are numbered from 1 to {count}")
    if text != f"{index}/{count}":
        return Normalised(Slice(index, count), _toml_value(value), _toml_value(f"{index}/{count}"))
    return Slice(index, count)


def _optional_port_range(value: Any) -> PortRange | Normalised | None:
    if value is False:
        return None
    return _port_range(value)


_VERB = re.compile(r"[!-~]{1,16}")


def _aliases(value: Any) -> Mapping[bytes, bytes] | Normalised:
    if not isinstance(value, dict):
        raise ValueError('is not a table like {"P@SW" = "PASV"}')
    aliases = {}
    for received, sent in value.items():
        if not isinstance(sent, str) or not _VERB.fullmatch(received) or not _VERB.fullmatch(sent):
            raise ValueError(f"{received!r} = {sent!r} is not a pair of command verbs")
        # Verbs are case-insensitive (RFC 959 section 5.3), so match upper case.
        aliases[received.upper().encode("ascii")] = sent.upper().encode("ascii")
    changed = [(k, v) for k, v in value.items() if (k.upper(), v.upper()) != (k, v)]
    if changed:
        pairs = ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in changed)
        return Normalised(MappingProxyType(aliases), pairs, pairs.upper())
    return MappingProxyType(aliases)


def _optional_path(value: Any) -> Path | None:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError(f"{value!r} is not a file path")
    if value == "":
        return None
    if not value.startswith("/"):
        # The service's working directory is not the config's: say which file.
        raise ValueError(f"{value!r} is not an absolute path")
    return Path(value)


def _choice(choices: type[enum.StrEnum]) -> Callable[[Any], Any]:
    def parse(value: Any) -> enum.StrEnum:
        try:
            return choices(value)
        except ValueError:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}") from None

    return parse


def _key(parse: Callable[[Any], Any], default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A config key: its parser, its default (none means required) and its help."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: parse(default), metadata={"parse": parse, "help": help})
    return field(default=default, metadata={"parse": parse, "help": help})


class BackendProxyProtocol(enum.StrEnum):
    """Whether ftpfix tells the backend the real client with a PROXY header."""

    OFF = "off"
    V1 = "v1"
    V2 = "v2"


class BackendTls(enum.StrEnum):
    """How ftpfix speaks to the backend."""

    OFF = "off"
    EXPLICIT = "explicit"
    IMPLICIT = "implicit"


def _backend_tls(value: Any) -> BackendTls:
    return _choice(BackendTls)(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a file path")
    return value


#: TLS versions ``[tls] min_version`` accepts, by the names Python's ssl gives them.
TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _tls_version(value: Any) -> str:
    if value not in TLS_VERSIONS:
        raise ValueError(f"{value!r} is not one of {', '.join(TLS_VERSIONS)} (older versions are broken)")
    return value


# -- the sections ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listen:
    address: tuple[str, ...] = _key(_addresses, ["0.0.0.0", "::"], "addresses the control listener binds")
    port: int = _key(_port, 21, "control port; the router forwards it here")
    proxy_protocol: bool = _key(
        _boolean, False, "read a PROXY protocol header (v1 or v2) from the trusted_proxies, naming the real client"
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(
        _networks, [], 'load balancers whose PROXY header is believed, e.g. ["10.0.0.0/8"]'
    )


@dataclass(frozen=True, slots=True)
class Backend:
    address: str = _key(_host, help="the legacy FTP server (required)")
    port: int = _key(_port, 21, "its control port")
    connect_timeout: float = _key(_seconds, 10.0, "seconds to reach it before the client gets 421")
    passive_ports: PortRange | None = _key(
        _optional_port_range,
        None,
        "its own passive range (e.g. vsftpd's pasv_min_port-pasv_max_port); a 227 naming another port opens nothing",
    )
    proxy_protocol: BackendProxyProtocol = _key(
        _choice(BackendProxyProtocol),
        BackendProxyProtocol.OFF,
        'send a PROXY protocol header naming the real client: "off", "v1" or "v2"',
    )
    tls: BackendTls = _key(
        _backend_tls, "off", 'TLS to the backend: "off", "explicit" (AUTH TLS) or "implicit" (TLS from the first byte)'
    )
    tls_verify: bool = _key(_boolean, True, "verify the backend's certificate against its address or name (with tls)")
    tls_ca: str = _key(_string, "", "CA bundle (PEM) for verifying the backend; empty: the system's")


@dataclass(frozen=True, slots=True)
class Passive:
    public_address: str = _key(_public_address, help='address put in every 227: IPv4, a DNS name or "auto" (required)')
    public_address_ttl: float = _key(_seconds, 300.0, "seconds between lookups of a DNS-named public address")
    ports: PortRange = _key(_port_range, PortRange(50000, 50019), "public passive ports; forward them on the router")
    listen_address: str | None = _key(
        _ip, None, "address the passive listeners bind (default: the one the client dialed)"
    )
    internal_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(
        _networks, [], "clients in these networks are told the address they dialed"
    )
    epsv: EpsvMode = _key(_choice(EpsvMode), EpsvMode.AUTO, "what the backend gets for EPSV")
    accept_data_from: AcceptDataFrom = _key(
        _choice(AcceptDataFrom),
        AcceptDataFrom.SAME_ADDRESS,
        'who may connect to a passive port: "same-address" as the control connection, or "same-network" (/24, /64)',
    )
    share_ports: bool = _key(
        _boolean, True, "one port serves several clients at once, one mapping per client address (or network)"
    )
    slice: Slice | None = _key(
        _slice, None, 'this replica\'s part of the range: "i/n" (1-based), "ordinal/n" (StatefulSet pod), "" for all'
    )

    @property
    def leased_ports(self) -> PortRange:
        """The ports this replica leases: its slice of ``ports``, or all of them."""
        return self.slice.of(self.ports) if self.slice is not None else self.ports


@dataclass(frozen=True, slots=True)
class Active:
    mode: ActiveMode = _key(_choice(ActiveMode), ActiveMode.PROXY, "PORT and EPRT: relay, forward as is, or refuse")
    source_port: int | None = _key(_optional_port, None, "local port of connections to the client, e.g. 20")
    fix_address: bool = _key(_boolean, _CORE.fix_address, "replace a private address in PORT/EPRT by the client's own")
    connect_timeout: float = _key(_seconds, 10.0, "seconds to reach the client's data port")


@dataclass(frozen=True, slots=True)
class Commands:
    aliases: Mapping[bytes, bytes] = _key(
        _aliases,
        {verb.decode(): alias.decode() for verb, alias in DEFAULT_ALIASES.items()},
        "verbs rewritten before the backend sees them",
    )


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = _key(_count(1_000_000), 200, "sessions at once; more get 421 at connect")
    max_sessions_per_ip: int = _key(_count(1_000_000), 20, "sessions at once from one client address")
    idle_timeout: float = _key(_seconds, 900.0, "seconds without a command or a transfer before 421")
    login_timeout: float = _key(_seconds, 60.0, "seconds from connect to a successful login")
    line_timeout: float = _key(_seconds, 30.0, "seconds a started command line has to end (slowloris)")
    data_connect_timeout: float = _key(_seconds, 30.0, "seconds a data port waits for its peer")
    upload_rate: int = _key(_rate, 0, "bytes per second per session, client to server; 0 for none")
    download_rate: int = _key(_rate, 0, "bytes per second per session, server to client; 0 for none")
    max_line: int = _key(_count(1024 * 1024), DEFAULT_MAX_LINE, "longest command line, in bytes")
    shutdown_grace: float = _key(_seconds, 30.0, "seconds sessions may finish after SIGTERM")


@dataclass(frozen=True, slots=True)
class Access:
    deny_anonymous: bool = _key(_boolean, _CORE.deny_anonymous, "refuse USER anonymous and USER ftp")
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(
        _networks, [], "only these client networks (empty: all)"
    )
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _key(_networks, [], "never these client networks")

    def permits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)


@dataclass(frozen=True, slots=True)
class Log:
    level: Level = _key(_choice(Level), Level.INFO, "lowest level logged")
    format: LogFormat = _key(_choice(LogFormat), LogFormat.AUTO, "auto: JSON unless stdout is a terminal")
    xferlog: Path | None = _key(
        _optional_path, None, 'file for wu-ftpd xferlog lines, e.g. "/var/log/ftpfix/xferlog"; "" for none'
    )


@dataclass(frozen=True, slots=True)
class HostPort:
    """An HTTP listener's address, written "127.0.0.1:9121" or "[::1]:9121"."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})")


def _optional_host_port(value: Any) -> HostPort | None:
    if value == "":
        return None
    match = _HOST_PORT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'{value!r} is not "" or an address and port like "127.0.0.1:9121" or "[::1]:9121"')
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return HostPort(_ip(host), _port(int(port)))


@dataclass(frozen=True, slots=True)
class Metrics:
    listen: HostPort | None = _key(
        _optional_host_port, None, 'HTTP listener for /healthz, /readyz, /metrics, e.g. "127.0.0.1:9121"; "" for none'
    )
    ready_interval: float = _key(_seconds, 10.0, "seconds between the backend checks behind /readyz")


@dataclass(frozen=True, slots=True)
class Tls:
    """FTPS towards clients (RFC 4217): ftpfix terminates TLS; the backend's side is ``[backend] tls``."""

    mode: TlsMode = _key(_choice(TlsMode), TlsMode.OFF, 'explicit FTPS (AUTH TLS): "off", "optional" or "required"')
    certificate: str = _key(_path, "", "PEM certificate chain (leaf first); needed unless mode is off")
    key: str = _key(_path, "", "PEM private key of the certificate")
    implicit_port: int = _key(_port, 0, "implicit FTPS listener (990 by convention), TLS from the first byte; 0: none")
    require_session_reuse: bool = _key(
        _boolean, True, "a PROT P data connection must resume its own control connection's TLS session"
    )
    min_version: str = _key(_tls_version, "TLSv1.2", 'oldest TLS version accepted: "TLSv1.2" or "TLSv1.3"')


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen
    backend: Backend
    passive: Passive
    active: Active
    commands: Commands
    limits: Limits
    access: Access
    log: Log
    metrics: Metrics
    tls: Tls = field(default_factory=Tls)
    path: Path | None = None
    #: What the loader read otherwise than written, one line per key, as in
    #: ``[passive] ports: 50000 read as "50000-50000"``.
    notes: tuple[str, ...] = ()


SECTIONS: dict[str, type] = {
    "listen": Listen,
    "backend": Backend,
    "passive": Passive,
    "active": Active,
    "commands": Commands,
    "limits": Limits,
    "access": Access,
    "log": Log,
    "metrics": Metrics,
    "tls": Tls,
}


def _build_section(name: str, cls: type, table: Any, where: str, notes: list[str]) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in table.items():
        if key not in known:
            raise ConfigError(f"{where}: [{name}] {key}: unknown key (known: {', '.join(known)})")
        try:
            values[key] = known[key].metadata["parse"](raw)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{where}: [{name}] {key}: {error}") from None
        if isinstance(values[key], Normalised):
            notes.append(f"[{name}] {key}: {values[key].written} read as {values[key].read}")
            values[key] = values[key].value
    for key, spec in known.items():
        if key not in values and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: [{name}] {key}: missing, and it has no default")
    return cls(**values)


def parse_config(document: Mapping[str, Any], path: Path | None = None) -> Config:
    """Build a Config from a parsed TOML document; ``path`` only names errors."""
    where = str(path) if path is not None else "<config>"
    for name in document:
        if name not in SECTIONS:
            raise ConfigError(f"{where}: [{name}]: unknown section (known: {', '.join(SECTIONS)})")
    for required in ("backend", "passive"):
        if required not in document:
            raise ConfigError(f"{where}: [{required}]: missing section")
    notes: list[str] = []
    sections = {name: _build_section(name, cls, document.get(name, {}), where, notes) for name, cls in SECTIONS.items()}
    _check_tls(sections["tls"], sections["listen"], where)
    _check_backend_tls(sections["backend"], sections["active"], where)
    _check_slice(sections["passive"], where)
    if sections["listen"].proxy_protocol and not sections["listen"].trusted_proxies:
        # Only a trusted peer's header is believed: with none, every header
        # would be refused, and every balanced client with it.
        raise ConfigError(
            f"{where}: [listen] proxy_protocol: true needs [listen] trusted_proxies, the balancers' "
            'networks (e.g. ["10.0.0.0/8"]); with none, every PROXY header is refused'
        )
    return Config(**sections, path=path, notes=tuple(notes))


def _check_slice(passive: Passive, where: str) -> None:
    """A slice needs a port of its own: refuse more slices than ports."""
    if passive.slice is None:
        return
    try:
        passive.slice.of(passive.ports)
    except ValueError as error:
        raise ConfigError(f"{where}: [passive] slice: {_toml_value(str(passive.slice))}: {error}") from None


def _check_tls(tls: Tls, listen: Listen, where: str) -> None:
    """Refuse at start what would fail at the first AUTH TLS: a missing,
    unreadable or mismatched certificate and key, named by key."""
    if tls.implicit_port and tls.mode is TlsMode.OFF:
        raise ConfigError(
            f'{where}: [tls] implicit_port: {tls.implicit_port} needs [tls] mode = "optional" or "required" '
            "and a certificate; or set it to 0"
        )
    if tls.implicit_port and tls.implicit_port == listen.port:
        raise ConfigError(
            f"{where}: [tls] implicit_port: {tls.implicit_port} is [listen] port too; "
            "implicit FTPS needs a port of its own (990 by convention)"
        )
    if tls.mode is TlsMode.OFF:
        return
    for name in ("certificate", "key"):
        value = getattr(tls, name)
        if not value:
            raise ConfigError(f'{where}: [tls] {name}: missing, and [tls] mode = "{tls.mode}" needs it')
        try:
            Path(value).read_bytes()
        except OSError as error:
            raise ConfigError(f"{where}: [tls] {name}: cannot read {value}: {error.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error) or "key values mismatch" in str(error):
            raise ConfigError(
                f"{where}: [tls] key: {tls.key} does not match [tls] certificate {tls.certificate}"
            ) from None
        raise ConfigError(
            f"{where}: [tls] certificate, key: {tls.certificate} and {tls.key} are not a PEM certificate chain "
            f"and its key: {error.reason or error}"
        ) from None


def _check_backend_tls(backend: Backend, active: Active, where: str) -> None:
    """Refuse at start a CA file that cannot verify anything, and a mode that
    cannot work with TLS to the backend."""
    if backend.tls == BackendTls.OFF:
        return
    if active.mode == ActiveMode.PASSTHROUGH:
        raise ConfigError(
            f'{where}: [active] mode: "passthrough" cannot work with [backend] tls = "{backend.tls}": the '
            "backend's data connections are TLS with ftpfix's session, which a client cannot resume; "
            'use "proxy"'
        )
    if backend.tls_ca:
        try:
            ssl.create_default_context(cafile=backend.tls_ca)
        except FileNotFoundError:
            raise ConfigError(f"{where}: [backend] tls_ca: {backend.tls_ca} does not exist") from None
        except ssl.SSLError as error:  # an OSError too: first
            raise ConfigError(
                f"{where}: [backend] tls_ca: {backend.tls_ca} is not a PEM CA bundle: {error.reason or error}"
            ) from None
        except OSError as error:
            raise ConfigError(f"{where}: [backend] tls_ca: cannot read {backend.tls_ca}: {error.strerror}") from None


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        document = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except RecursionError:
        # tomllib recurses once per nesting level of arrays and tables.
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return parse_config(_environment_overrides(document, path), path)


#: Overrides ``[passive] ports``, so that compose writes the range once (deploy/.env) for the published
#: ports, the reserved-ports sysctl and ftpfix itself.
PASSIVE_PORTS_VARIABLE = "FTPFIX_PASSIVE_PORTS"


#: Overrides ``[passive] slice``, so that one image (one ConfigMap) serves every replica: e.g.
#: ``FTPFIX_PASSIVE_SLICE=ordinal/3`` in a StatefulSet (see ``deploy/k8s/``).
PASSIVE_SLICE_VARIABLE = "FTPFIX_PASSIVE_SLICE"

#: Overrides ``[passive] public_address``: in a StatefulSet each pod advertises its own Service's
#: address, e.g. ``$(POD_NAME).ftp.example.org`` (see ``deploy/k8s/``).
PUBLIC_ADDRESS_VARIABLE = "FTPFIX_PUBLIC_ADDRESS"


def _environment_overrides(document: dict[str, Any], path: Path) -> dict[str, Any]:
    if not isinstance(document.get("passive"), dict):
        return document  # a missing [passive] is parse_config's error to name
    for variable, key, parse in (
        (PASSIVE_PORTS_VARIABLE, "ports", _port_range),
        (PASSIVE_SLICE_VARIABLE, "slice", _slice),
        (PUBLIC_ADDRESS_VARIABLE, "public_address", _public_address),
    ):
        value = os.environ.get(variable, "").strip()
        if not value:
            continue
        try:
            parse(value)
        except ValueError as error:
            raise ConfigError(f"${variable} (overrides {path}: [passive] {key}): {error}") from None
        document = {**document, "passive": {**document["passive"], key: value}}
    return document


def default_path() -> Path:
    """``$FTPFIX_CONFIG`` if set, else /etc/ftpfix/ftpfix.toml."""
    return Path(os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_PATH)


def render(config: Config) -> str:
    """The effective configuration, as TOML, for ``ftpfix check``."""
    lines = []
    for name in SECTIONS:
        section = getattr(config, name)
        lines.append(f"[{name}]")
        for spec in dataclasses.fields(section):
            value = getattr(section, spec.name)
            comment = f"  # {spec.metadata['help']}" if spec.metadata.get("help") else ""
            if value is None:
                lines.append(f"# {spec.name} is not set{comment}")
                continue
            lines.append(f"{spec.name} = {_toml_value(value)}{comment}")
            if isinstance(value, Slice):
                leased = config.passive.leased_ports
                source = f" (from the host name {value.host}: ordinal {value.index - 1})" if value.host else ""
                lines.append(
                    f"# slice {value}{source} of {config.passive.ports}:"
                    f" this replica leases {leased} ({len(leased)} ports)"
                )
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(str(item)) for item in value) + "]"
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{_toml_value(k.decode())} = {_toml_value(v.decode())}" for k, v in value.items())
        return "{ " + pairs + " }" if pairs else "{}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
