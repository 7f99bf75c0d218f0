"""deploy/ftpfix.service: systemd-analyze verify finds nothing, and the
hardening the issue asks for is there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

UNIT = Path(__file__).resolve().parent.parent.parent / "deploy" / "ftpfix.service"


def _settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_hardened() -> None:
    settings = _settings()
    assert settings["DynamicUser"] == ["yes"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["PrivateTmp"] == ["yes"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # systemd must wait longer than ftpfix's default drain before SIGKILL.
    assert float(settings["TimeoutStopSec"][0]) > 30


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed (./tests/run installs it)")
    # verify checks that ExecStart's program exists: point it at this venv's ftpfix.
    ftpfix = Path(sys.executable).parent / "ftpfix"
    require(ftpfix.exists(), f"{ftpfix} is not installed (pip install -e .)")
    unit = tmp_path / "ftpfix.service"
    unit.write_text(UNIT.read_text().replace("/opt/ftpfix/bin/ftpfix", str(ftpfix)))
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    # Warnings do not fail verify: any line about this unit is a finding.
    findings = [line for line in (checked.stdout + checked.stderr).splitlines() if "ftpfix.service" in line]
    assert findings == [], findings
