"""The command line: ``ftpfix run``, ``ftpfix check`` and ``ftpfix health``."""

from __future__ import annotations

import argparse
import importlib.metadata
import ipaddress
import sys
from pathlib import Path

import trio

from . import __version__, logs
from .config import ENVIRONMENT_VARIABLE, Config, ConfigError, default_path, load_config, render


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftpfix",
        description="A transparent FTP proxy that makes passive mode work for an FTP server behind NAT.",
    )
    parser.add_argument("--version", action="version", version=f"ftpfix {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the proxy in the foreground"),
        ("check", "run the start-up checks on the config and print the effective config"),
        ("health", "exit 0 if ftpfix's probe listener ([metrics] listen) says it serves; never dials the FTP port"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"the TOML config file (default: ${ENVIRONMENT_VARIABLE}, else {default_path()})",
        )
        if name == "check":
            command.add_argument("--strict", action="store_true", help="exit 1 on warnings too, not only on errors")
    commands.choices["health"].add_argument(
        "--ready", action="store_true", help="ask /readyz (backend greeting lately, not draining) instead of /healthz"
    )
    return parser


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        return importlib.metadata.version("ftpfix")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    path = arguments.config or default_path()
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"ftpfix: {error}", file=sys.stderr)
        return 2
    if arguments.command == "check":
        return check(config, path, strict=arguments.strict)
    if arguments.command == "health":
        return health(config, ready=arguments.ready)
    from .net.server import StartupError, run

    logs.configure(config.log.level, config.log.format)
    failures: list[BaseException] = []
    status = 0
    try:
        status = trio.run(run, config)
    except* StartupError as group:
        failures = list(group.exceptions)
    for error in failures:
        for line in str(error).splitlines():
            print(f"ftpfix: {line}", file=sys.stderr)
    return 1 if failures else status


def check(config: Config, path: Path, *, strict: bool) -> int:
    """The preflight ``run`` does, and what only a dry run can test.

    Each problem goes to stderr, one line each; the effective config goes to
    stdout, so that stays a TOML file that loads (``ftpfix check > x.toml``).
    Returns 1 on an error, or on a warning with ``strict``; else 0.
    """
    from .net.preflight import Severity, preflight

    problems = preflight(config, dry_run=True)
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.stderr.flush()
    errors = sum(problem.severity is Severity.ERROR for problem in problems)
    warnings = len(problems) - errors
    counts = [f"{n} {word}{'s' * (n != 1)}" for n, word in ((errors, "error"), (warnings, "warning")) if n]
    print(f"# {path}: {', '.join(counts) or 'OK'}\n")
    print(render(config), end="")
    return 1 if errors or (strict and warnings) else 0


#: Seconds the health check waits for its answer; Docker's own timeout
#: should be longer.
HEALTH_TIMEOUT = 5.0


def health(config: Config, *, ready: bool = False) -> int:
    """Ask ftpfix's probe listener for /healthz (or /readyz): exit 0 on a 200.

    It never dials the FTP port, so it opens no backend session and counts
    against no session limit; /healthz does not depend on the backend, so a
    HEALTHCHECK built on it does not restart ftpfix while the backend is down.
    """
    import http.client

    where = config.path or "the config"
    address = config.metrics.listen
    if address is None:
        print(
            f'ftpfix: health: [metrics] listen is not set in {where}; set it, e.g. listen = "127.0.0.1:9121"',
            file=sys.stderr,
        )
        return 1
    if address.port == 0:
        print(f"ftpfix: health: [metrics] listen in {where} has port 0; give it a fixed port", file=sys.stderr)
        return 1
    host = address.host
    if ipaddress.ip_address(host).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    path = "/readyz" if ready else "/healthz"
    url = f"http://{f'[{host}]' if ':' in host else host}:{address.port}{path}"
    connection = http.client.HTTPConnection(host, address.port, timeout=HEALTH_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        text = response.read(1024).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as error:
        print(f"ftpfix: unhealthy: {url}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if response.status != 200:
        print(f"ftpfix: {'not ready' if ready else 'unhealthy'}: {url}: {response.status} {text}", file=sys.stderr)
        return 1
    print(f"ftpfix: {url}: {text}")
    return 0
