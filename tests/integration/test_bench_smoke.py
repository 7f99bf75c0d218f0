"""The benchmark at a small size: it runs end to end against direct, ftpfix
and mod_proxy, and every transfer it makes is intact. Speed is not judged
here; tests/bench/bench.py reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require_programs, require_servers
from tests.harness.proxy import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.root]


def test_the_benchmark_runs_and_moves_intact_data() -> None:
    require_servers("vsftpd", "proftpd")
    require_programs("curl")
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench", "--smoke"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 1 transfer of 8 MiB, RETR |" in result.stdout
    assert "FAILED" not in result.stdout
