"""The network fuzzer (tests/fuzz/netfuzz.py) in CI: 60 seconds of fuzzing in
all, against vsftpd, pure-ftpd and ProFTPD at once, each behind its own ftpfix.

The fixed seed runs every time. FTPFIX_FUZZ_SEED adds a second seed (a run
found by hand, or a random one from CI); the 60 seconds are then shared. See
the summary with ``-s``; a failure also writes it into the assertion, and the
logs stay in the folder it names.

    .venv/bin/python -m pytest tests/fuzz/test_netfuzz.py -s
    FTPFIX_FUZZ_SEED=12345 .venv/bin/python -m pytest tests/fuzz/test_netfuzz.py -s
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import require_servers
from tests.fuzz import netfuzz

pytestmark = [pytest.mark.servers, pytest.mark.root]

FIXED_SEED = netfuzz.DEFAULT_SEED
TOTAL_SECONDS = 60.0


def _seeds() -> list[int]:
    seeds = [FIXED_SEED]
    extra = os.environ.get("FTPFIX_FUZZ_SEED", "").strip()
    if extra:
        seeds.append(int(extra, 0))
    return seeds


SEEDS = _seeds()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed={seed}" for seed in SEEDS])
def test_network_fuzz(seed: int) -> None:
    require_servers(*netfuzz.BACKEND_RANGES)
    report = netfuzz.run(TOTAL_SECONDS / len(SEEDS), seed=seed)
    summary = netfuzz.summary(report)
    print("\n" + summary)
    if not report["ok"]:
        examples = json.dumps(report["failures"], indent=1, default=str)[:6000]
        pytest.fail(
            f"the network fuzzer found ftpfix misbehaving (seed {seed}):\n{summary}\n\nexamples:\n{examples}",
            pytrace=False,
        )
