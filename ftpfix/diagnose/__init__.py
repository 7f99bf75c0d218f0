"""``ftpfix diagnose``: an end-to-end NAT self-test that names the failing stage.

- ``ftpfix diagnose URL`` (``probe.py``) walks the path from this host to an
  FTP server, with or without ftpfix in front, stage by stage;
- ``ftpfix diagnose --config FILE`` (``host.py``) checks the ftpfix host
  itself: what only the inside can see.

Both print each stage as it finishes (✓ ✗ ! on a terminal, words otherwise)
and end with one verdict line; ``--json`` prints one JSON document instead.
Exit status: 0 when everything works, 1 when a stage fails, 2 on bad usage.
What each observation means is decided in ``checks.py``, which does no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from .certificates import tls_context
from .checks import Check, Network, verdict
from .probe import Options, Target, diagnose, read_password

#: Who an anonymous login says it is (RFC 1635 asks for an e-mail-like password).
ANONYMOUS = ("anonymous", "ftpfix-diagnose@")


class UsageError(ValueError):
    """Bad arguments: exit status 2."""


def without_password(url: str) -> str:
    """``url`` with the password of its user part written as ``***``."""
    scheme, separator, rest = url.partition("://") if "://" in url else ("", "", url)
    location, slash, path = rest.partition("/")
    user, at, where = location.rpartition("@")
    if at and ":" in user:
        location = f"{user.partition(':')[0]}:***@{where}"
    return f"{scheme}{separator}{location}{slash}{path}"


def parse_target(
    url: str, *, user: str | None = None, password_file: Path | None = None, implicit: bool = False
) -> Target:
    """``ftp://[user[:password]@]host[:port][/file]`` (or ``ftps://``) as a ``Target``."""
    parts = urlsplit(url if "://" in url else f"ftp://{url}")
    shown = without_password(url)  # errors end up in terminals' scrollback and CI logs
    if parts.scheme not in ("ftp", "ftps"):
        raise UsageError(f"{shown}: only ftp:// and ftps:// URLs")
    try:
        port = parts.port
    except ValueError as error:
        raise UsageError(f"{shown}: {error}") from None
    if port == 0:
        raise UsageError(f"{shown}: port 0 is no port to dial")
    host = parts.hostname
    if not host:
        raise UsageError(f"{shown}: no host")
    name = unquote(parts.username) if parts.username else None
    secret = unquote(parts.password) if parts.password is not None else None
    if user is not None:
        name = user
    if password_file is not None:
        try:
            secret = read_password(password_file)
        except (OSError, ValueError) as error:  # UnicodeDecodeError too
            raise UsageError(f"--password-file {password_file}: {error}") from None
    if name is None:
        name, secret = ANONYMOUS[0], secret if secret is not None else ANONYMOUS[1]
    path = unquote(parts.path.lstrip("/"))  # checked decoded: %0d%0a is a line end too
    for value in (name, secret or "", path):
        if any(ch in value for ch in "\r\n\x00"):
            raise UsageError("the user, password and path cannot hold line ends or NUL")
    tls = "implicit" if implicit else ("explicit" if parts.scheme == "ftps" else "off")
    default_port = 990 if implicit else 21
    return Target(host, default_port if port is None else port, name, secret or "", path, tls)


def print_run(checks: Sequence[Check], header: str, *, as_json: bool, out: TextIO, extra: dict | None = None) -> int:
    """The verdict after the stages; the JSON document with ``as_json``. Returns the exit status."""
    result = verdict(checks)
    if as_json:
        document: dict[str, Any] = {
            "target": header,
            "checks": [check.as_json() for check in checks],
            "verdict": result.as_json(),
            "exit_status": result.exit_status,
            **(extra or {}),
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        print(result.line(), file=out)
    return result.exit_status


def run_url(arguments: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        target = parse_target(
            arguments.url, user=arguments.user, password_file=arguments.password_file, implicit=arguments.implicit
        )
        private: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in arguments.private or ())
        if arguments.ca is not None:
            _check_ca(arguments.ca)
    except (UsageError, ValueError) as error:
        print(f"ftpfix diagnose: {error}", file=sys.stderr)
        return 2
    options = Options(
        timeout=arguments.timeout,
        port_timeout=arguments.port_timeout,
        active=arguments.active,
        private=private,
        ca=arguments.ca,
        insecure=getattr(arguments, "insecure", False),
    )
    terminal = out.isatty()
    scheme = "ftps" if target.tls != "off" else "ftp"
    host = f"[{target.host}]" if ":" in target.host else target.host
    header = f"{scheme}://{host}:{target.port} as {target.user}"

    def emit(check: Check) -> None:
        if not arguments.json:
            print(check.line(terminal=terminal), file=out, flush=True)

    if not arguments.json:
        print(f"ftpfix diagnose {header}", file=out, flush=True)
    results = diagnose(target, options, emit)
    return print_run(results, header, as_json=arguments.json, out=out)


def _check_ca(path: str) -> None:
    """``--ca`` loads as a CA bundle, or a usage error now (it once was a traceback at the TLS stage)."""
    try:
        tls_context(verify=True, ca=path)
    except OSError as error:  # ssl.SSLError too
        raise UsageError(f"--ca {path}: {error.strerror or error}") from None


def run_host(arguments: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    from ..config import ConfigError, load_config
    from .host import check_host

    try:
        config = load_config(arguments.config)
    except ConfigError as error:
        print(f"ftpfix diagnose: {error}", file=sys.stderr)
        return 2
    terminal = out.isatty()

    def emit(check: Check) -> None:
        if not arguments.json:
            print(check.line(terminal=terminal), file=out, flush=True)

    header = f"this host, {arguments.config}"
    if not arguments.json:
        print(f"ftpfix diagnose {header}", file=out, flush=True)
    results, notes = check_host(config, emit, timeout=arguments.timeout)
    status = print_run(results, header, as_json=arguments.json, out=out, extra={"cannot_check": notes})
    if not arguments.json:
        for note in notes:
            print(f"note: {note}", file=out)
    return status
