"""Config: TOML into frozen dataclasses; every error names the file and the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ftpfix.config import ConfigError, default_path, load_config, parse_config
from ftpfix.ports import PortRange

GOOD = """\
[listen]
address = "0.0.0.0"
port = 21
[backend]
address = "192.168.123.1"
port = 21
[passive]
public_address = "203.0.113.1"
ports = "50000-50019"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ftpfix.toml"
    path.write_text(text)
    return path


def test_the_documented_keys_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.backend.address == "192.168.123.1"
    assert config.passive.public_address == "203.0.113.1"
    assert config.listen.address == ("0.0.0.0",)
    assert config.passive.ports == PortRange(50000, 50019)
    assert config.commands.aliases == {b"P@SW": b"PASV"}
    assert config.limits.max_line == 4096


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend.port = 2121  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.commands.aliases[b"X"] = b"Y"  # type: ignore[index]


def test_aliases_are_configurable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD + '[commands]\naliases = { "p@sw" = "pasv", "XPWD" = "PWD" }\n'))
    assert config.commands.aliases == {b"P@SW": b"PASV", b"XPWD": b"PWD"}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.replace("port = 21\n[backend]", "prot = 21\n[backend]"), "[listen] prot: unknown key"),
        (lambda t: t.replace('[backend]\naddress = "192.168.123.1"\nport = 21\n', ""), "[backend]: missing section"),
        (
            lambda t: t.replace('"192.168.123.1"', '"192.168.123.300"'),
            "[backend] address: '192.168.123.300' is not an IP address",
        ),
        (
            lambda t: t.replace('"203.0.113.1"', '"not an address"'),
            "[passive] public_address: 'not an address' is not an IPv4 address, a DNS name or \"auto\"",
        ),
        (
            lambda t: t.replace('"203.0.113.1"', '"2001:db8::1"'),
            "[passive] public_address: '2001:db8::1' is not an IPv4 address",
        ),
        (lambda t: t.replace('"50000-50019"', '"50000-49999"'), '[passive] ports: "50000-49999" runs backwards'),
        (lambda t: t.replace('"50000-50019"', '"1000-1019"'), '[passive] ports: "1000-1019" is outside 1024-65535'),
        (lambda t: t.replace('"50000-50019"', '"65530-65540"'), '[passive] ports: "65530-65540" is outside 1024-65535'),
        (lambda t: t.replace('"50000-50019"', '"lots"'), "[passive] ports: 'lots' is not a port range"),
        (
            lambda t: t.replace("port = 21\n[backend]", "port = 70000\n[backend]"),
            "[listen] port: 70000 is not a TCP port",
        ),
        (lambda t: t + "[extra]\n", "[extra]: unknown section"),
        (lambda t: t + "[limits]\nmax_line = -1\n", "[limits] max_line: -1 is not a whole number from 1 to 1048576"),
        (lambda t: t.replace("[listen]", "[listen"), "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, change, message: str) -> None:
    path = write(tmp_path, change(GOOD))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(str(path))
    assert message in text, text


def test_missing_backend_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[backend\] address: missing"):
        load_config(write(tmp_path, GOOD.replace('address = "192.168.123.1"\n', "")))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTPFIX_CONFIG", raising=False)
    assert default_path() == Path("/etc/ftpfix/ftpfix.toml")
    monkeypatch.setenv("FTPFIX_CONFIG", "/tmp/x.toml")
    assert default_path() == Path("/tmp/x.toml")


def ftpfix(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftpfix", *args], check=False, capture_output=True, text=True, env=env, timeout=30
    )


def test_check_prints_the_effective_config(tmp_path: Path) -> None:
    result = ftpfix("check", "--config", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert 'ports = "50000-50019"' in result.stdout
    assert 'aliases = { "P@SW" = "PASV" }' in result.stdout
    assert "data_connect_timeout = 30.0" in result.stdout
    assert "deny_anonymous = false" in result.stdout


def test_check_fails_clearly(tmp_path: Path) -> None:
    result = ftpfix("check", "--config", str(write(tmp_path, GOOD.replace('"50000-50019"', '"50000-49999"'))))
    assert result.returncode == 2
    assert "ftpfix.toml: [passive] ports:" in result.stderr


def test_ftpfix_config_environment_variable(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "FTPFIX_CONFIG": str(write(tmp_path, GOOD))}
    result = ftpfix("check", env=env)
    assert result.returncode == 0 and str(tmp_path) in result.stdout


def test_the_effective_config_loads_again(tmp_path: Path) -> None:
    original = load_config(write(tmp_path, GOOD))
    rendered = ftpfix("check", "--config", str(tmp_path / "ftpfix.toml")).stdout
    again = load_config(write(tmp_path, rendered))
    assert dataclasses.replace(again, path=None) == dataclasses.replace(original, path=None)


def _tls_document(**tls: object) -> dict:
    return {"backend": {"address": "192.168.123.1"}, "passive": {"public_address": "203.0.113.1"}, "tls": tls}


def test_tls_files_are_checked_at_start(tmp_path) -> None:
    from tests.harness.ftps import make_certificates

    certs = make_certificates(tmp_path / "a")
    other = make_certificates(tmp_path / "b")
    config = parse_config(_tls_document(mode="required", certificate=str(certs.certificate), key=str(certs.key)))
    assert config.tls.mode == "required" and config.tls.require_session_reuse
    with pytest.raises(ConfigError, match=r"\[tls\] certificate: missing"):
        parse_config(_tls_document(mode="optional"))
    with pytest.raises(ConfigError, match=r"\[tls\] key: cannot read /nonexistent.pem"):
        parse_config(_tls_document(mode="optional", certificate=str(certs.certificate), key="/nonexistent.pem"))
    with pytest.raises(ConfigError, match=r"\[tls\] key: .* does not match \[tls\] certificate"):
        parse_config(_tls_document(mode="optional", certificate=str(certs.certificate), key=str(other.key)))
    with pytest.raises(ConfigError, match=r"\[tls\] min_version: 'TLSv1.0' is not one of"):
        parse_config(_tls_document(min_version="TLSv1.0"))
    with pytest.raises(ConfigError, match=r'\[tls\] implicit_port: 990 needs \[tls\] mode = "optional"'):
        parse_config(_tls_document(implicit_port=990))
    files = {"certificate": str(certs.certificate), "key": str(certs.key)}
    assert parse_config(_tls_document(mode="optional", implicit_port=990, **files)).tls.implicit_port == 990
    with pytest.raises(ConfigError, match=r"\[tls\] implicit_port: 21 is \[listen\] port too"):
        parse_config(_tls_document(mode="optional", implicit_port=21, **files))


def test_backend_tls_keys(tmp_path) -> None:
    from tests.harness.ftps import make_certificates

    certs = make_certificates(tmp_path / "a")
    document = _tls_document()
    document["backend"].update(tls="explicit", tls_ca=str(certs.ca))
    config = parse_config(document)
    assert (config.backend.tls, config.backend.tls_verify, config.backend.tls_ca) == ("explicit", True, str(certs.ca))
    document["backend"]["tls"] = "starttls"
    with pytest.raises(ConfigError, match=r"\[backend\] tls: 'starttls' is not one of"):
        parse_config(document)
    document["backend"].update(tls="implicit", tls_ca="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match=r"\[backend\] tls_ca: /nonexistent/ca.pem does not exist"):
        parse_config(document)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    document["backend"]["tls_ca"] = str(garbage)
    with pytest.raises(ConfigError, match=r"\[backend\] tls_ca: .*garbage.pem is not a PEM CA bundle"):
        parse_config(document)
    document["backend"]["tls_ca"] = ""
    document["active"] = {"mode": "passthrough"}
    with pytest.raises(ConfigError, match=r'\[active\] mode: "passthrough" cannot work with \[backend\] tls'):
        parse_config(document)


def test_proxy_protocol_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.listen.proxy_protocol is False
    assert config.listen.trusted_proxies == ()
    assert config.backend.proxy_protocol == "off"
    text = GOOD.replace(
        "port = 21\n[backend]", 'port = 21\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8"]\n[backend]'
    )
    text = text.replace('address = "192.168.123.1"\n', 'address = "192.168.123.1"\nproxy_protocol = "v2"\n')
    config = load_config(write(tmp_path, text))
    assert config.listen.proxy_protocol is True
    assert [str(network) for network in config.listen.trusted_proxies] == ["10.0.0.0/8"]
    assert config.backend.proxy_protocol == "v2"
    assert load_config(write(tmp_path, render_of(config))).listen == config.listen


def render_of(config) -> str:
    from ftpfix.config import render

    return render(config)


@pytest.mark.parametrize(
    ("listen", "backend", "message"),
    [
        ("proxy_protocol = true\n", "", "[listen] proxy_protocol: true needs [listen] trusted_proxies"),
        ('proxy_protocol = "yes"\n', "", "[listen] proxy_protocol: 'yes' is not true or false"),
        ('trusted_proxies = ["10.0.0.0/33"]\n', "", "[listen] trusted_proxies:"),
        ("", 'proxy_protocol = "v3"\n', "[backend] proxy_protocol: 'v3' is not one of off, v1, v2"),
        ("", "proxy_protocol = true\n", "[backend] proxy_protocol: True is not one of off, v1, v2"),
    ],
)
def test_proxy_protocol_errors(tmp_path: Path, listen: str, backend: str, message: str) -> None:
    text = GOOD.replace("port = 21\n[backend]", f"port = 21\n{listen}[backend]")
    text = text.replace('address = "192.168.123.1"\n', f'address = "192.168.123.1"\n{backend}')
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value), str(caught.value)
