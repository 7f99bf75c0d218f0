"""Admission's descriptor budget: refuse before EMFILE, without listing
/proc/self/fd at every connection (that made 10,000 sessions take minutes)."""

from __future__ import annotations

import tomllib

import pytest

from ftpfix.config import parse_config
from ftpfix.net import admission
from ftpfix.net.admission import FD_RESERVE, FDS_PER_SESSION, MEASURE_EVERY, Admission

CONFIG = parse_config(
    tomllib.loads(
        """
[listen]
port = 2100
[backend]
address = "127.0.0.1"
[passive]
public_address = "203.0.113.1"
ports = "50000-50019"
[limits]
max_sessions = 100000
max_sessions_per_ip = 100000
"""
    )
)


class FakeProcess:
    """Open descriptors: ``base`` plus two per session (idle sessions)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.sessions = 0
        self.looks = 0

    def open_descriptors(self) -> int:
        self.looks += 1
        return self.base + 2 * self.sessions


@pytest.fixture
def process(monkeypatch: pytest.MonkeyPatch) -> FakeProcess:
    fake = FakeProcess(base=20)
    monkeypatch.setattr(admission, "open_descriptors", fake.open_descriptors)
    return fake


def admit_until_refused(gate: Admission, process: FakeProcess, limit: int) -> int:
    for _ in range(limit):
        if gate.admit("192.0.2.7", CONFIG) is not None:
            break
        process.sessions += 1
    return process.sessions


def test_sessions_that_fit_at_their_worst_are_never_counted(process: FakeProcess) -> None:
    gate = Admission(descriptors=10_000, in_use=20)
    fit = gate.max_by_descriptors
    assert fit == (10_000 - 20 - FD_RESERVE) // FDS_PER_SESSION
    admit_until_refused(gate, process, fit)
    assert process.looks == 0


def test_idle_sessions_fill_the_limit_and_the_next_is_refused_with_421(process: FakeProcess) -> None:
    gate = Admission(descriptors=4_000, in_use=20)
    admitted = admit_until_refused(gate, process, 10_000)
    # Each was let in while its worst case and the reserve still fitted;
    # the next would not fit.
    room = 4_000 - FDS_PER_SESSION - FD_RESERVE
    assert 20 + 2 * (admitted - 1) <= room < 20 + 2 * admitted
    assert gate.admit("192.0.2.7", CONFIG) == b"421 Too many users for this server's resources, try again later.\r\n"


def test_the_descriptors_are_counted_rarely_while_there_is_room(process: FakeProcess) -> None:
    gate = Admission(descriptors=20_000, in_use=20)
    admitted = admit_until_refused(gate, process, 9_000)
    assert admitted == 9_000
    beyond = admitted - (gate.max_by_descriptors or 0)
    # One look per MEASURE_EVERY at most while the estimate shows room; the
    # looks grow only near the limit, not with every connection.
    assert process.looks < beyond // 4, (process.looks, beyond)
    assert process.looks >= beyond // MEASURE_EVERY


def test_a_session_leaving_makes_room_again(process: FakeProcess) -> None:
    gate = Admission(descriptors=2_000, in_use=20)
    admit_until_refused(gate, process, 5_000)
    assert gate.admit("192.0.2.7", CONFIG) is not None
    gate.leave("192.0.2.7")
    process.sessions -= 1
    assert gate.admit("192.0.2.7", CONFIG) is None
