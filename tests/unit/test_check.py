"""``ftpfix check`` says what ``ftpfix run`` would warn about or fail on, and
``run`` refuses at start what can never work; ``ftpfix --version``.

Each case runs the real ``python -m ftpfix`` on a config file, the way users do.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from ftpfix.config import load_config
from ftpfix.net.preflight import EPHEMERAL_RANGE, RESERVED_PORTS
from tests.harness.demo import ephemeral_range, passive_ports
from tests.harness.proxy import ROOT, config_text, start_ftpfix

LOW, HIGH = ephemeral_range()
#: Outside this machine's ephemeral range, as the demo picks them.
PORTS = passive_ports(LOW, HIGH)
FIRST_PORT = int(PORTS.split("-")[0])

#: A config with nothing to say about: every key that a case changes is here.
#: max_sessions = 1 keeps the descriptor-limit warning out on any ulimit.
CLEAN = f"""\
[listen]
address = "127.0.0.1"
port = 2100

[backend]
address = "127.0.0.1"
port = 2121

[passive]
public_address = "203.0.113.1"
ports = "{PORTS}"

[limits]
max_sessions = 1
"""

#: TEST-NET-1 (RFC 5737): an address no interface of the test machine has.
NOT_LOCAL = "192.0.2.123"


def ftpfix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftpfix", *args], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False
    )


def check(tmp_path: Path, text: str, *options: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "ftpfix.toml"
    path.write_text(text)
    return ftpfix("check", "--config", str(path), *options)


def test_a_clean_config_is_ok_even_when_strict(tmp_path: Path) -> None:
    result = check(tmp_path, CLEAN, "--strict")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert ": OK\n" in result.stdout


def ephemeral_ports() -> str:
    """20 ports inside the kernel's ephemeral range, not all reserved."""
    try:
        EPHEMERAL_RANGE.read_text()
        reserved = RESERVED_PORTS.read_text().strip()
    except OSError:
        pytest.skip("no /proc/sys/net/ipv4: the ephemeral range is unknown")
    spans = [[int(n) for n in part.split("-")] for part in reserved.split(",") if part]
    if all(any(span[0] <= port <= span[-1] for span in spans) for port in range(LOW + 100, LOW + 120)):
        pytest.skip(f"{LOW + 100}-{LOW + 119} is reserved on this machine: nothing to warn about")
    return f"{LOW + 100}-{LOW + 119}"


# case: (what changes in CLEAN, how the line check prints begins, the fix it must name)
WARNINGS = {
    "ephemeral": (
        lambda: CLEAN.replace(PORTS, ephemeral_ports()),
        f'warning: [passive] ports = "{LOW + 100}-{LOW + 119}" lies in the kernel\'s ephemeral range {LOW}-{HIGH}',
        f"sysctl -w net.ipv4.ip_local_reserved_ports={LOW + 100}-{LOW + 119}",
    ),
    "private public_address": (
        lambda: CLEAN.replace('"203.0.113.1"', '"192.168.1.1"'),
        'warning: [passive] public_address = "192.168.1.1" is not a public address',
        "write the router's public IPv4 address or DNS name",
    ),
    "unresolvable public_address": (
        lambda: CLEAN.replace('"203.0.113.1"', '"ftp.example.invalid"'),
        'warning: [passive] public_address = "ftp.example.invalid" does not resolve',
        "fix the name",
    ),
    "unresolvable backend": (
        lambda: CLEAN.replace('address = "127.0.0.1"\nport = 2121', 'address = "legacy.invalid"\nport = 2121'),
        'warning: [backend] address = "legacy.invalid" does not resolve',
        "fix the name or write the backend's IP address",
    ),
    "ports with spaces": (
        lambda: CLEAN.replace(f'"{PORTS}"', f'"{PORTS.replace("-", " - ")}"'),
        f'warning: [passive] ports: "{PORTS.replace("-", " - ")}" read as "{PORTS}"',
        f'write "{PORTS}" if that is what you mean',
    ),
    "one port as a number": (
        lambda: CLEAN.replace(f'"{PORTS}"', str(FIRST_PORT)),
        f'warning: [passive] ports: {FIRST_PORT} read as "{FIRST_PORT}-{FIRST_PORT}"',
        f'write "{FIRST_PORT}-{FIRST_PORT}"',
    ),
    "host bits in a network": (
        lambda: CLEAN.replace("[limits]", 'internal_networks = ["192.168.123.1/24"]\n\n[limits]'),
        'warning: [passive] internal_networks: "192.168.123.1/24" read as "192.168.123.0/24"',
        'write "192.168.123.0/24"',
    ),
    "lower-case alias": (
        lambda: CLEAN + '\n[commands]\naliases = { "p@sw" = "pasv" }\n',
        'warning: [commands] aliases: "p@sw" = "pasv" read as "P@SW" = "PASV"',
        "if that is what you mean",
    ),
    "source_port 0": (
        lambda: CLEAN + "\n[active]\nsource_port = 0\n",
        "warning: [active] source_port = 0 lets the kernel pick the port",
        "remove it",
    ),
    "trusted_proxies without proxy_protocol": (
        lambda: CLEAN.replace("port = 2100", 'port = 2100\ntrusted_proxies = ["10.0.0.0/8"]'),
        "warning: [listen] trusted_proxies: is set, but [listen] proxy_protocol is false",
        "set [listen] proxy_protocol = true, or remove trusted_proxies",
    ),
    "every address trusted": (
        lambda: CLEAN.replace("port = 2100", 'port = 2100\nproxy_protocol = true\ntrusted_proxies = ["0.0.0.0/0"]'),
        'warning: [listen] trusted_proxies = ["0.0.0.0/0"] trusts every address',
        "list only the load balancers' own addresses",
    ),
}

ERRORS = {
    "listen port 0": (
        lambda: CLEAN.replace("port = 2100", "port = 0"),
        "error: [listen] port = 0 makes the kernel pick another port at every start",
        "set the port the router forwards",
    ),
    "non-local listen address": (
        lambda: CLEAN.replace('address = "127.0.0.1"\nport = 2100', f'address = "{NOT_LOCAL}"\nport = 2100'),
        f'error: [listen] address = "{NOT_LOCAL}" cannot be listened on: Cannot assign requested address',
        "name addresses of this machine",
    ),
    "non-local passive listen_address": (
        lambda: CLEAN.replace("[limits]", f'listen_address = "{NOT_LOCAL}"\n\n[limits]'),
        f'error: [passive] listen_address = "{NOT_LOCAL}" cannot be bound: Cannot assign requested address',
        "name an address of this machine, or remove the key",
    ),
    "backend port 0": (
        lambda: CLEAN.replace("port = 2121", "port = 0"),
        "error: [backend] port = 0 can never be dialed",
        "set the backend's control port",
    ),
}


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(("error: ", "warning: "))]


@pytest.mark.parametrize("case", WARNINGS)
def test_a_warning_exits_0_but_1_when_strict(tmp_path: Path, case: str) -> None:
    make, line, fix = WARNINGS[case]
    text = make()
    result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    [problem] = problem_lines(result)
    assert problem.startswith(line), problem
    assert fix in problem, problem
    assert "1 warning\n" in result.stdout.splitlines(keepends=True)[0]
    # The effective config follows on stdout, as before, and loads again.
    (tmp_path / "again.toml").write_text(result.stdout)
    assert load_config(tmp_path / "again.toml").notes == ()

    strict = check(tmp_path, text, "--strict")
    assert strict.returncode == 1, strict.stderr
    assert problem_lines(strict) == [problem]


@pytest.mark.parametrize("case", ERRORS)
def test_an_error_exits_1(tmp_path: Path, case: str) -> None:
    make, line, fix = ERRORS[case]
    text = make()
    for options in ((), ("--strict",)):
        result = check(tmp_path, text, *options)
        assert result.returncode == 1, result.stderr
        [problem] = problem_lines(result)
        assert problem.startswith(line), problem
        assert fix in problem, problem
        assert "1 error\n" in result.stdout.splitlines(keepends=True)[0]


def test_the_effective_config_shows_normalised_values(tmp_path: Path) -> None:
    text = CLEAN.replace(f'"{PORTS}"', str(FIRST_PORT)).replace(
        "[limits]", 'internal_networks = ["192.168.123.1/24"]\n\n[limits]'
    )
    result = check(tmp_path, text)
    assert f'ports = "{FIRST_PORT}-{FIRST_PORT}"' in result.stdout
    assert 'internal_networks = ["192.168.123.0/24"]' in result.stdout
    assert len(problem_lines(result)) == 2


def test_the_loader_notes_what_it_normalised(tmp_path: Path) -> None:
    path = tmp_path / "ftpfix.toml"
    path.write_text(CLEAN.replace(f'"{PORTS}"', str(FIRST_PORT)))
    assert load_config(path).notes == (f'[passive] ports: {FIRST_PORT} read as "{FIRST_PORT}-{FIRST_PORT}"',)
    path.write_text(CLEAN)
    assert load_config(path).notes == ()


def test_an_unusable_config_still_exits_2(tmp_path: Path) -> None:
    assert ftpfix("check", "--config", str(tmp_path / "missing.toml")).returncode == 2
    result = check(tmp_path, CLEAN.replace(f'"{PORTS}"', '"lots"'), "--strict")
    assert result.returncode == 2
    assert "[passive] ports: 'lots' is not a port range" in result.stderr


def test_run_refuses_a_passive_listen_address_it_cannot_bind(tmp_path: Path) -> None:
    """Before, ftpfix started, and every PASV then failed with OSError errno 99."""
    path = tmp_path / "ftpfix.toml"
    path.write_text(
        CLEAN.replace("port = 2100", "port = 0").replace("[limits]", f'listen_address = "{NOT_LOCAL}"\n\n[limits]')
    )
    result = ftpfix("run", "--config", str(path))
    assert result.returncode == 1
    assert (
        f'ftpfix: [passive] listen_address = "{NOT_LOCAL}" cannot be bound: Cannot assign requested address; '
        "name an address of this machine" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_run_warns_as_check_does(tmp_path: Path) -> None:
    """run logs each warning check prints, naming the key and the fix, and serves on."""
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=("legacy.invalid", 21),
        public_address="192.168.1.1",
        ports=PORTS.replace("-", " - "),
        extra="[limits]\nmax_sessions = 1\n",
    )
    proxy = start_ftpfix(tmp_path, text)
    try:
        warnings = {event["key"]: event for event in proxy.events() if event.get("level") == "warning"}
    finally:
        proxy.stop()
    assert set(warnings) == {"[backend] address", "[passive] public_address", "[passive] ports"}
    assert warnings["[passive] ports"]["event"] == f'[passive] ports: "{PORTS.replace("-", " - ")}" read as "{PORTS}"'
    assert "does not resolve" in warnings["[backend] address"]["event"]
    assert "is not a public address" in warnings["[passive] public_address"]["event"]
    assert all(event["fix"] for event in warnings.values())


def test_version() -> None:
    result = ftpfix("--version")
    assert result.returncode == 0
    assert result.stdout == f"ftpfix {importlib.metadata.version('ftpfix')}\n"


def test_implicit_port_that_is_taken_is_reported(tmp_path: Path) -> None:
    """``[tls] implicit_port`` is bound by check, on each address: a port
    another process holds is a warning that names the key."""
    import socket

    from tests.harness.ftps import make_certificates

    certs = make_certificates(tmp_path / "certs")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        text = CLEAN + (
            f'\n[tls]\nmode = "optional"\ncertificate = "{certs.certificate}"\nkey = "{certs.key}"\n'
            f"implicit_port = {port}\n"
        )
        result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    [problem] = problem_lines(result)
    assert problem.startswith(f"warning: [tls] implicit_port = {port} cannot be bound on 127.0.0.1"), problem
    assert "is ftpfix running already?" in problem
    # Free again: nothing to say.
    assert problem_lines(check(tmp_path, text)) == []


def test_a_bad_backend_tls_ca_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    text = CLEAN.replace("port = 2121", f'port = 2121\ntls = "explicit"\ntls_ca = "{bad}"')
    result = check(tmp_path, text)
    assert result.returncode == 2
    assert f"[backend] tls_ca: {bad} is not a PEM CA bundle" in result.stderr
    missing = CLEAN.replace("port = 2121", 'port = 2121\ntls = "explicit"\ntls_ca = "/nonexistent/ca.pem"')
    result = check(tmp_path, missing)
    assert result.returncode == 2
    assert "[backend] tls_ca: /nonexistent/ca.pem does not exist" in result.stderr


def test_run_refuses_an_implicit_port_it_cannot_bind(tmp_path: Path) -> None:
    """run: a taken [tls] implicit_port stops ftpfix at start, naming the key,
    instead of serving without the listener clients were promised."""
    import socket

    from tests.harness.ftps import make_certificates

    certs = make_certificates(tmp_path / "certs")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "ftpfix.toml"
        path.write_text(
            CLEAN.replace("port = 2100", "port = 0")
            + f'\n[tls]\nmode = "optional"\ncertificate = "{certs.certificate}"\nkey = "{certs.key}"\n'
            f"implicit_port = {port}\n"
        )
        result = ftpfix("run", "--config", str(path))
    assert result.returncode == 1
    assert f"cannot listen on [127.0.0.1]:{port} ([tls] implicit_port): Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
