"""The benchmarks at a small size: they run end to end against direct, ftpfix
and mod_proxy (plain FTP, and FTPS with mod_tls), and every transfer they make
is intact. Speed is not judged here; tests/bench/bench.py and
tests/bench/ftps.py report it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.bench.ftps import MOD_TLS
from tests.conftest import require, require_programs, require_servers
from tests.harness import legacy
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


def test_the_ftps_benchmark_runs_and_moves_intact_data() -> None:
    """tests/bench/ftps.py at 8 MiB: direct FTPS to vsftpd, ftpfix and
    mod_proxy + mod_tls each RETR and STOR with PROT P, sha256-checked, and
    ftpfix answers a burst of control-port TLS handshakes without an error
    (the peers' own dropped handshakes are only noted)."""
    require_servers("vsftpd", "proftpd")
    require_programs("curl")
    mod_tls = legacy.package_root(MOD_TLS[0]) / MOD_TLS[1]
    require(mod_tls.exists(), f"mod_tls is not unpacked at {mod_tls} (run ./tests/run)")
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.ftps", "--smoke"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| RETR 8 MiB, PROT P" in result.stdout and "| STOR 8 MiB, PROT P" in result.stdout
    assert "control-port TLS sessions/s" in result.stdout
    assert "FAILED" not in result.stdout
