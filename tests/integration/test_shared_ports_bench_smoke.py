"""The shared-ports benchmark at a small size: every session's mapping waits at
once on a range smaller than the number of sessions, and every transfer is
intact. Speed is not judged here; tests/bench/shared_ports.py reports it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require, require_servers
from tests.harness import haproxy
from tests.harness.proxy import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.root]


@pytest.mark.parametrize("through", [(), ("--haproxy",)], ids=["one-process", "haproxy-two-replicas"])
def test_the_shared_ports_benchmark_moves_intact_data(through: tuple[str, ...]) -> None:
    require_servers("vsftpd")
    if through:
        require(haproxy.installed(), "HAProxy is not unpacked in tests/.cache (run tests/install-servers)")
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.shared_ports", "--smoke", *through],
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
    if through:
        # Both replicas served transfers: the balancer spread the sessions.
        served = result.stdout.split("transfers each served: [", 1)[1].split("]", 1)[0]
        assert all(int(count) > 0 for count in served.split(",")), served
