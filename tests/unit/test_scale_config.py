"""[passive] share_ports and slice, and their environment variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftpfix.config import ConfigError, load_config
from ftpfix.ports import PortRange, Slice

GOOD = """\
[backend]
address = "192.168.123.1"
[passive]
public_address = "203.0.113.1"
ports = "50000-50029"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ftpfix.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("FTPFIX_PASSIVE_PORTS", "FTPFIX_PASSIVE_SLICE", "FTPFIX_PUBLIC_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)


def test_the_defaults_share_ports_and_lease_the_whole_range(tmp_path: Path) -> None:
    passive = load_config(write(tmp_path, GOOD)).passive
    assert passive.share_ports is True
    assert passive.slice is None
    assert passive.leased_ports == PortRange(50000, 50029)
    assert load_config(write(tmp_path, GOOD + "share_ports = false\n")).passive.share_ports is False


@pytest.mark.parametrize(
    ("value", "leased"),
    [
        ("1/3", "50000-50009"),
        ("2/3", "50010-50019"),
        ("3/3", "50020-50029"),
        ("", "50000-50029"),
        ("4/4", "50023-50029"),
    ],
)
def test_a_slice_leases_its_chunk(tmp_path: Path, value: str, leased: str) -> None:
    passive = load_config(write(tmp_path, GOOD + f'slice = "{value}"\n')).passive
    assert str(passive.leased_ports) == leased


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"0/3"', "[passive] slice: '0/3': slices are numbered from 1 to 3"),
        ('"4/3"', "[passive] slice: '4/3': slices are numbered from 1 to 3"),
        ('"x"', "[passive] slice: 'x' is not a slice like \"2/3\""),
        ('"1/0"', "[passive] slice: '1/0': there must be at least one slice"),
        ("2", "[passive] slice: 2 is not a slice"),
        ('"1/31"', '[passive] slice: "1/31": 50000-50029 has 30 ports, too few for 31 slices'),
    ],
)
def test_bad_slices_name_the_key(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD + f"slice = {value}\n"))
    assert message in str(caught.value)
    assert "ftpfix.toml" in str(caught.value)


def test_the_environment_overrides_the_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTPFIX_PASSIVE_SLICE", "2/3")
    assert load_config(write(tmp_path, GOOD + 'slice = "1/3"\n')).passive.slice == Slice(2, 3)
    monkeypatch.setenv("FTPFIX_PASSIVE_SLICE", "0/3")
    with pytest.raises(ConfigError, match=r"\$FTPFIX_PASSIVE_SLICE \(overrides .*\[passive\] slice\): '0/3'"):
        load_config(write(tmp_path, GOOD))


def test_an_ordinal_slice_comes_from_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTPFIX_PASSIVE_SLICE", "ordinal/3")
    monkeypatch.setenv("HOSTNAME", "ftpfix-0")  # a StatefulSet's first pod
    assert load_config(write(tmp_path, GOOD)).passive.leased_ports == PortRange(50000, 50009)
    monkeypatch.setenv("HOSTNAME", "ftp-proxy-2")
    assert load_config(write(tmp_path, GOOD)).passive.leased_ports == PortRange(50020, 50029)
    monkeypatch.setenv("HOSTNAME", "ftpfix-3")
    with pytest.raises(ConfigError, match="has ordinal 3, but there are only 3 slices"):
        load_config(write(tmp_path, GOOD))
    monkeypatch.setenv("HOSTNAME", "ftpfix")
    with pytest.raises(ConfigError, match='does not end in "-N"'):
        load_config(write(tmp_path, GOOD))


def test_the_environment_overrides_the_public_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTPFIX_PUBLIC_ADDRESS", "ftpfix-1.ftp.example.org")
    assert load_config(write(tmp_path, GOOD)).passive.public_address == "ftpfix-1.ftp.example.org"
    monkeypatch.setenv("FTPFIX_PUBLIC_ADDRESS", "not a name")
    with pytest.raises(ConfigError, match=r"\$FTPFIX_PUBLIC_ADDRESS \(overrides .*\[passive\] public_address\)"):
        load_config(write(tmp_path, GOOD))


def test_check_shows_the_slice_ports_and_refuses_bad_ones(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    env = {**os.environ, "FTPFIX_PASSIVE_SLICE": "ordinal/3", "HOSTNAME": "ftpfix-1"}
    result = subprocess.run(
        [sys.executable, "-m", "ftpfix", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: warnings about this machine only
    assert 'slice = "2/3"' in result.stdout
    assert "# slice 2/3 (from the host name ftpfix-1: ordinal 1) of 50000-50029: this replica leases 50010-50019" in (
        result.stdout
    )
    for bad in ("0/3", "4/3", "x"):
        result = subprocess.run(
            [sys.executable, "-m", "ftpfix", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            env={**os.environ, "FTPFIX_PASSIVE_SLICE": bad},
            timeout=30,
            check=False,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("ftpfix: $FTPFIX_PASSIVE_SLICE (overrides")
        assert f"'{bad}'" in result.stderr
