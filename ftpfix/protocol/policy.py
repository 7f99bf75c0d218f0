"""The parts of the configuration that the core needs, with their defaults.

``ftpfix.config`` takes its defaults for these keys from here, so each is
written once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class EpsvMode(enum.StrEnum):
    """What the backend is sent for a client's EPSV."""

    AUTO = "auto"  # EPSV until the backend refuses it or leaves it out of FEAT, then PASV
    TRANSLATE = "translate"  # always PASV
    PASSTHROUGH = "passthrough"  # always EPSV


class ActiveMode(enum.StrEnum):
    """What happens to a client's PORT and EPRT."""

    PROXY = "proxy"  # relay the data connection through ftpfix
    PASSTHROUGH = "passthrough"  # forward the (checked) command to the backend
    DENY = "deny"  # refuse it


class TlsMode(enum.StrEnum):
    """Explicit FTPS towards the client (RFC 4217)."""

    OFF = "off"  # AUTH is refused, as before ftpfix spoke TLS
    OPTIONAL = "optional"  # AUTH TLS offered; plain sessions and PROT C allowed
    REQUIRED = "required"  # no login before AUTH TLS, no transfer without PROT P (RFC 4217 section 9)


#: The SMC Barricade's mangling of PASV, undone by default.
DEFAULT_ALIASES: Mapping[bytes, bytes] = MappingProxyType({b"P@SW": b"PASV"})

#: Longest command line accepted from a client, in bytes.
DEFAULT_MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class Policy:
    """The parts of the configuration that the core needs.

    ``aliases`` maps upper-cased verbs to the verb the backend receives: the
    default repairs the SMC Barricade's mangling of PASV into P@SW.

    ``epsv`` and ``active`` choose how EPSV and PORT/EPRT are served (see
    their enums). ``fix_address`` replaces a private address in PORT or EPRT
    by the client's real one, for clients behind NAT of their own.

    ``deny_anonymous`` refuses USER anonymous and USER ftp without asking the
    backend (pure-ftpd's ``-E``).

    ``backend_port`` is the backend's control port and ``backend_passive_ports``
    its passive range, if known: a 227 or 229 naming any other port opens
    nothing.

    ``tls`` says whether ftpfix answers AUTH TLS, PBSZ and PROT itself
    (``TlsMode``); the backend never sees them. Nor does it when
    ``backend_tls`` is on: then ftpfix speaks TLS to the backend itself, and
    a client's PBSZ or PROT must not change the backend's protection level.

    ``passive_ports`` is ftpfix's own public passive range, the ports a 227
    from ftpfix names; ``SITE FTPFIX`` reports it to a diagnosing client.
    """

    aliases: Mapping[bytes, bytes] = field(default_factory=lambda: DEFAULT_ALIASES)
    max_line: int = DEFAULT_MAX_LINE
    max_long_lines: int = 3
    epsv: EpsvMode = EpsvMode.AUTO
    active: ActiveMode = ActiveMode.PROXY
    fix_address: bool = True
    deny_anonymous: bool = False
    backend_port: int = 21
    backend_passive_ports: range | None = None
    tls: TlsMode = TlsMode.OFF
    backend_tls: bool = False
    passive_ports: range | None = None
