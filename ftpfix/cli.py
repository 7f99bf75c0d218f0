"""The command line: ``ftpfix run``, ``check``, ``health``, ``status`` and ``diagnose``."""

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
        ("status", "ask the running ftpfix ([metrics] listen) for sessions, pool use, transfers and backend health"),
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
    k8s = commands.add_parser(
        "k8s",
        help="print Kubernetes manifests: a StatefulSet of ftpfix replicas, one Service per pod with its passive slice",
        description="Print Kubernetes manifests for --replicas pods of ftpfix, each leasing its slice of --ports.",
    )
    k8s.add_argument("--replicas", type=int, required=True, help="pods in the StatefulSet")
    k8s.add_argument("--ports", help="the whole passive range, e.g. 50000-50029 (default: the config's)")
    k8s.add_argument("--config", type=Path, default=None, help="the config for the ConfigMap (default: a template)")
    k8s.add_argument("--image", default="ftpfix:latest", help="the container image (default: ftpfix:latest)")
    k8s.add_argument("--name", default="ftpfix", help="the StatefulSet's name, and the prefix of the others")
    k8s.add_argument(
        "--domain", default="ftp.example.org", help="pod N advertises <name>-N.<domain> (default: ftp.example.org)"
    )
    k8s.add_argument("--tls-cert", type=Path, help="PEM certificate chain: put the TLS Secret in the output")
    k8s.add_argument("--tls-key", type=Path, help="its PEM key (the output then holds the key: do not commit it)")
    _diagnose_parser(commands)
    commands.choices["health"].add_argument(
        "--ready", action="store_true", help="ask /readyz (backend greeting lately, not draining) instead of /healthz"
    )
    return parser


def _diagnose_parser(commands: argparse._SubParsersAction) -> None:
    text = "walk the path to an FTP server stage by stage and name the stage that fails (see README)"
    command = commands.add_parser("diagnose", help=text, description=text)
    command.add_argument(
        "url", nargs="?", help="ftp://[user[:password]@]host[:port][/file], or ftps:// (explicit AUTH TLS)"
    )
    command.add_argument("--config", type=Path, default=None, help="check this ftpfix host and its config instead")
    command.add_argument("--user", help="log in as this user (default: the URL's, else anonymous)")
    command.add_argument("--password-file", type=Path, help="read the password from this file's first line")
    command.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    command.add_argument(
        "--active", action="store_true", help="also test active mode (PORT): this host must be reachable"
    )
    command.add_argument("--implicit", action="store_true", help="implicit FTPS: TLS from the first byte (port 990)")
    command.add_argument("--ca", help="trust this CA bundle (PEM) when checking the certificate")
    command.add_argument(
        "--insecure",
        action="store_true",
        help="send the password even over TLS whose certificate is not trusted (as curl -k)",
    )
    command.add_argument(
        "--private",
        action="append",
        metavar="NETWORK",
        help="count this network as private, besides RFC 1918 and the like (repeatable), e.g. a LAN on odd addresses",
    )
    command.add_argument("--timeout", type=float, default=10.0, help="seconds for each control step (default 10)")
    command.add_argument(
        "--port-timeout", type=float, default=3.0, help="seconds before a passive port counts as dropped (default 3)"
    )


#: Longest ``--timeout`` or ``--port-timeout`` of ``ftpfix diagnose``: a day.
MAX_TIMEOUT = 86400


def diagnose(arguments: argparse.Namespace) -> int:
    """``ftpfix diagnose URL`` or ``ftpfix diagnose --config FILE``: exit 0, 1, or 2 on bad usage."""
    from .diagnose import run_host, run_url

    if (arguments.url is None) == (arguments.config is None):
        print(
            "ftpfix diagnose: give a URL (run from outside) or --config FILE (run on the ftpfix host)", file=sys.stderr
        )
        return 2
    # Written so that NaN fails too; inf and huge values once ended in a traceback from a thread.
    if not all(0 < seconds <= MAX_TIMEOUT for seconds in (arguments.timeout, arguments.port_timeout)):
        print(f"ftpfix diagnose: timeouts must be positive seconds, at most {MAX_TIMEOUT}", file=sys.stderr)
        return 2
    return run_url(arguments) if arguments.url is not None else run_host(arguments)


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        return importlib.metadata.version("ftpfix")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "k8s":
        return kubernetes(arguments, argv)
    if arguments.command == "diagnose":
        return diagnose(arguments)
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
    if arguments.command == "status":
        return status(config)
    from .net.server import StartupError, run

    logs.configure(config.log.level, config.log.format)
    failures: list[BaseException] = []
    exit_status = 0
    try:
        exit_status = trio.run(run, config)
    except* StartupError as group:
        failures = list(group.exceptions)
    for error in failures:
        for line in str(error).splitlines():
            print(f"ftpfix: {line}", file=sys.stderr)
    return 1 if failures else exit_status


def kubernetes(arguments: argparse.Namespace, argv: list[str] | None) -> int:
    """``ftpfix k8s``: print the manifests on stdout; exit 2 on a bad config or option."""
    from . import k8s
    from .config import _port_range
    from .ports import PortRange

    try:
        if arguments.config is not None:
            text = arguments.config.read_text()
            where = str(arguments.config)
        else:
            text, where = k8s.DEFAULT_CONFIG, "<template>"
        config, tls = k8s.read_config(text, where)
        ports = None
        if arguments.ports is not None:
            parsed = _port_range(arguments.ports)
            ports = parsed if isinstance(parsed, PortRange) else parsed.value
        options = k8s.Options(
            replicas=arguments.replicas,
            ports=ports,
            image=arguments.image,
            name=arguments.name,
            domain=arguments.domain,
            tls_cert=arguments.tls_cert.read_bytes() if arguments.tls_cert else None,
            tls_key=arguments.tls_key.read_bytes() if arguments.tls_key else None,
        )
        documents = k8s.manifests(text, config, tls, options)
    except OSError as error:
        print(f"ftpfix: k8s: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except (ConfigError, k8s.ManifestError, ValueError) as error:
        print(f"ftpfix: k8s: {error}", file=sys.stderr)
        return 2
    command = "ftpfix " + " ".join(sys.argv[1:] if argv is None else argv)
    print(k8s.render_yaml(documents, k8s.header(options, ports or config.passive.ports, command, tls.on)), end="")
    return 0


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

    probe = _probe_address(config, "health")
    if probe is None:
        return 1
    host, port = probe
    path = "/readyz" if ready else "/healthz"
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    connection = http.client.HTTPConnection(host, port, timeout=HEALTH_TIMEOUT)
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


def _probe_address(config: Config, command: str) -> tuple[str, int] | None:
    """Where the probe listener answers, or None after saying why it cannot be asked."""
    where = config.path or "the config"
    address = config.metrics.listen
    if address is None:
        print(
            f'ftpfix: {command}: [metrics] listen is not set in {where}; set it, e.g. listen = "127.0.0.1:9121"',
            file=sys.stderr,
        )
        return None
    if address.port == 0:
        print(f"ftpfix: {command}: [metrics] listen in {where} has port 0; give it a fixed port", file=sys.stderr)
        return None
    host = address.host
    if ipaddress.ip_address(host).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    return host, address.port


def _get(host: str, port: int, path: str) -> tuple[int, str]:
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=HEALTH_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(4 * 1024 * 1024).decode("utf-8", "replace")
    finally:
        connection.close()


def status(config: Config) -> int:
    """Print a short summary of the running instance, from its /metrics and /readyz.

    Exits 0 when the instance answered (whatever the backend's state), 1 when
    it could not be asked.
    """
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    probe = _probe_address(config, "status")
    if probe is None:
        return 1
    host, port = probe
    where = f"{f'[{host}]' if ':' in host else host}:{port}"
    try:
        code, text = _get(host, port, "/metrics")
        ready_code, ready = _get(host, port, "/readyz")
    except (OSError, http.client.HTTPException) as error:
        print(f"ftpfix: status: cannot reach ftpfix at {where}: {error}", file=sys.stderr)
        return 1
    if code != 200:
        print(f"ftpfix: status: {where}/metrics answered {code}", file=sys.stderr)
        return 1
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def total(name: str, **labels: str) -> int:
        return round(sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items())))

    def by(name: str, label: str) -> str:
        parts = [f"{found[label]} {round(v)}" for found, v in samples.get(name, []) if v]
        return ", ".join(parts) or "none"

    info = samples.get("ftpfix_config_info", [({}, 0)])[0][0]
    mib = 1024 * 1024
    lines = [
        f"ftpfix at {where}, config {info.get('hash', '?')} ({info.get('path') or 'no path'})",
        f"backend:        {ready.strip()}" + ("" if ready_code == 200 else f" ({ready_code})"),
        f"sessions:       {total('ftpfix_sessions_open')} open; ended: {by('ftpfix_sessions_ended_total', 'reason')}",
        (
            f"passive pool:   {total('ftpfix_passive_pool_leased')} of {total('ftpfix_passive_pool_ports')}"
            f" ports leased, exhausted {total('ftpfix_passive_pool_exhausted_total')} times"
        ),
        (
            f"data:           {total('ftpfix_data_connections_open')} connections open;"
            f" {total('ftpfix_data_bytes_total', direction='download') / mib:.1f} MiB down,"
            f" {total('ftpfix_data_bytes_total', direction='upload') / mib:.1f} MiB up"
        ),
        (
            f"transfers:      {total('ftpfix_transfers_total', result='ok')} ok,"
            f" {total('ftpfix_transfers_total') - total('ftpfix_transfers_total', result='ok')} failed"
        ),
        f"refusals:       {by('ftpfix_refusals_total', 'kind')}",
        f"config reloads: {by('ftpfix_config_reloads_total', 'result')}",
    ]
    print("\n".join(lines))
    return 0
