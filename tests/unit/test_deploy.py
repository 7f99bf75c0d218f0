"""deploy/: the passive range written once, the loader's environment
override, the [metrics] keys, and an example config that throttles no one."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ftpfix.config import PASSIVE_PORTS_VARIABLE, ConfigError, HostPort, load_config
from ftpfix.ports import PortRange

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
RANGE = re.compile(r"\b\d{4,5}\s*-\s*\d{4,5}\b")


def _uncommented(path: Path) -> str:
    return "\n".join(
        line for line in path.read_text(errors="replace").splitlines() if not line.lstrip().startswith("#")
    )


def test_the_passive_range_is_written_once_in_deploy() -> None:
    # deploy/k8s/ is generated (its range is written once, in deploy/k8s/generate, and
    # tests/unit/test_k8s.py checks every copy of it), and deploy/haproxy/ holds the
    # replicas' slices, which tests/integration/test_haproxy.py checks against
    # ftpfix's own: neither is a second copy of the compose range.
    holders = {
        str(path.relative_to(DEPLOY)): RANGE.findall(_uncommented(path))
        for path in sorted(DEPLOY.rglob("*"))
        if path.is_file()
        and path.name != "requirements.lock"
        and path.relative_to(DEPLOY).parts[0] not in ("k8s", "haproxy")
        and RANGE.search(_uncommented(path))
    }
    assert holders == {".env": ["50000-50019"]}
    compose = (DEPLOY / "compose.yaml").read_text()
    # compose takes it from .env for the published ports, the sysctl, the
    # build's EXPOSE and ftpfix itself.
    assert '"${FTPFIX_PASSIVE_PORTS}:${FTPFIX_PASSIVE_PORTS}"' in compose
    assert "net.ipv4.ip_local_reserved_ports: ${FTPFIX_PASSIVE_PORTS}" in compose
    assert "FTPFIX_PASSIVE_PORTS: ${FTPFIX_PASSIVE_PORTS}" in compose
    assert "FTPFIX_PASSIVE_PORTS: ${FTPFIX_PASSIVE_PORTS:?" in compose


def test_the_environment_overrides_the_passive_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ftpfix.toml"
    path.write_text(
        '[backend]\naddress = "192.0.2.1"\n[passive]\npublic_address = "192.0.2.2"\nports = "40000-40009"\n'
    )
    assert load_config(path).passive.ports == PortRange(40000, 40009)
    monkeypatch.setenv(PASSIVE_PORTS_VARIABLE, "50100-50119")
    assert load_config(path).passive.ports == PortRange(50100, 50119)
    monkeypatch.setenv(PASSIVE_PORTS_VARIABLE, "")
    assert load_config(path).passive.ports == PortRange(40000, 40009)
    monkeypatch.setenv(PASSIVE_PORTS_VARIABLE, "50119-50100")
    with pytest.raises(ConfigError, match=r"\$FTPFIX_PASSIVE_PORTS \(overrides .*ftpfix.toml: \[passive\] ports\)"):
        load_config(path)


def test_the_compose_config_gets_its_range_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    value = (DEPLOY / ".env").read_text().split("FTPFIX_PASSIVE_PORTS=", 1)[1].split()[0]
    monkeypatch.setenv(PASSIVE_PORTS_VARIABLE, value)
    first, last = (int(n) for n in value.split("-"))
    assert load_config(DEPLOY / "compose-ftpfix.toml").passive.ports == PortRange(first, last)


@pytest.mark.parametrize(
    ("text", "expected"),
    [('""', None), ('"127.0.0.1:9121"', HostPort("127.0.0.1", 9121)), ('"[::1]:9121"', HostPort("::1", 9121))],
)
def test_metrics_listen(tmp_path: Path, text: str, expected: HostPort | None) -> None:
    path = tmp_path / "ftpfix.toml"
    path.write_text(f'[backend]\naddress = "b"\n[passive]\npublic_address = "auto"\n[metrics]\nlisten = {text}\n')
    assert load_config(path).metrics.listen == expected


@pytest.mark.parametrize("text", ['"localhost:9121"', '"127.0.0.1"', '"127.0.0.1:99999"', '"::1:9121"', "9121"])
def test_bad_metrics_listen_names_the_key(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ftpfix.toml"
    path.write_text(f'[backend]\naddress = "b"\n[passive]\npublic_address = "auto"\n[metrics]\nlisten = {text}\n')
    with pytest.raises(ConfigError, match=r"ftpfix.toml: \[metrics\] listen: "):
        load_config(path)


def test_the_example_config_throttles_no_one_and_keeps_the_pure_ftpd_limits_as_comments() -> None:
    config = load_config(DEPLOY / "ftpfix.toml")
    assert config.limits.max_sessions >= 100
    assert config.limits.max_sessions_per_ip >= 10
    assert (config.limits.upload_rate, config.limits.download_rate) == (0, 0)
    assert config.limits.idle_timeout >= 300
    assert not config.access.deny_anonymous
    assert config.metrics.listen == HostPort("127.0.0.1", 9121)
    # Below the 10 s docker stop and podman stop wait before SIGKILL.
    assert config.limits.shutdown_grace < 10
    text = (DEPLOY / "ftpfix.toml").read_text()
    for line in ("max_sessions = 3", "max_sessions_per_ip = 2", "upload_rate = 12288", "download_rate = 32768"):
        assert f"# {line}\n" in text
    assert "# deny_anonymous = true\n" in text
    # Uncommented, they load.
    limited = tomllib.loads(text.replace("\n# max_sessions = 3", "\nmax_sessions_x = 3"))
    assert limited["limits"]["max_sessions_x"] == 3


def test_compose_stops_after_the_grace() -> None:
    compose = (DEPLOY / "compose.yaml").read_text()
    stop = int(re.search(r"stop_grace_period: (\d+)s", compose).group(1))
    assert load_config(DEPLOY / "compose-ftpfix.toml").limits.shutdown_grace < stop
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "STOPSIGNAL SIGTERM" in dockerfile
    assert "setcap" not in _uncommented(ROOT / "Dockerfile")
    assert re.search(r"--require-hashes[\s\\]+-r /tmp/requirements.lock", dockerfile)
    assert "COPY deploy/requirements.lock" in dockerfile and "--no-deps" in dockerfile


def test_the_examples_ftps_keys_load_when_uncommented(tmp_path: Path) -> None:
    """The commented [tls] section and [backend] tls keys of deploy/ftpfix.toml
    are real keys with valid values: uncommented (with test files), they load."""
    from tests.harness.ftps import make_certificates

    certs = make_certificates(tmp_path / "certs")
    text = (DEPLOY / "ftpfix.toml").read_text()
    for key in ("tls = ", "tls_verify = ", "tls_ca = ", "[tls]", "mode = ", "certificate = ", "key = "):
        text = text.replace(f"# {key}", key)
    for key in ("implicit_port = ", "require_session_reuse = ", "min_version = "):
        text = text.replace(f"# {key}", key)
    text = text.replace('tls = "off"', 'tls = "explicit"')
    text = text.replace("/etc/ftpfix/tls/backend-ca.pem", str(certs.ca))
    text = text.replace("/etc/ftpfix/tls/fullchain.pem", str(certs.certificate))
    text = text.replace("/etc/ftpfix/tls/privkey.pem", str(certs.key))
    path = tmp_path / "ftpfix.toml"
    path.write_text(text)
    config = load_config(path)
    assert (config.backend.tls, config.backend.tls_verify, config.backend.tls_ca) == ("explicit", True, str(certs.ca))
    assert (config.tls.mode, config.tls.implicit_port, config.tls.min_version) == ("optional", 990, "TLSv1.2")
