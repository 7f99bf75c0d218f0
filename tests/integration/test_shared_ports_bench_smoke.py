"""The shared-ports benchmark at a small size: every session's mapping waits at
once on a range smaller than the number of sessions, and every transfer is
intact. Speed is not judged here; tests/bench/shared_ports.py reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require_servers
from tests.harness.proxy import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.root]


def test_the_shared_ports_benchmark_moves_intact_data() -> None:
    require_servers("vsftpd")
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.shared_ports", "--smoke"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all 60 mappings waiting at once: True" in result.stdout
    assert "intact (sha256): 60 of 60" in result.stdout
    assert "ports used: 10" in result.stdout
