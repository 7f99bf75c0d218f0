import pytest

from ftpfix.ports import PortPool, PortRange


def test_round_robin_and_exhaustion() -> None:
    pool = PortPool(PortRange(50000, 50002))
    first = next(pool.candidates())
    second = next(pool.candidates())
    assert (first, second) == (50000, 50001)
    pool.release(first)
    # A released port rests while the rest of the range is used.
    assert next(pool.candidates()) == 50002
    assert next(pool.candidates()) == 50000
    assert list(pool.candidates()) == []
    assert pool.leased == 3


def test_a_port_taken_elsewhere_is_skipped() -> None:
    pool = PortPool(PortRange(50000, 50001))
    candidates = pool.candidates()
    taken = next(candidates)
    pool.release(taken)  # the bind failed: give it back, try the next
    assert next(candidates) == 50001


def test_range() -> None:
    assert len(PortRange(50000, 50019)) == 20
    assert 50019 in PortRange(50000, 50019) and 50020 not in PortRange(50000, 50019)
    with pytest.raises(ValueError):
        PortRange(50001, 50000)
