import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftpfix.ports import PeerTable, PortPool, PortRange, Slice


def net(text: str):
    return ipaddress.ip_network(text, strict=False)


A, B, C = net("198.51.100.1"), net("198.51.100.2"), net("203.0.113.7")


def test_round_robin_and_exhaustion() -> None:
    pool = PortPool(PortRange(50000, 50002))
    first = next(pool.candidates())
    second = next(pool.candidates())
    assert (first.port, second.port) == (50000, 50001)
    pool.release(first)
    # A released port rests while the rest of the range is used.
    assert next(pool.candidates()).port == 50002
    assert next(pool.candidates()).port == 50000
    assert list(pool.candidates()) == []
    assert pool.leased == 3


def test_a_port_taken_elsewhere_is_skipped() -> None:
    pool = PortPool(PortRange(50000, 50001))
    candidates = pool.candidates(A, share=True)
    taken = next(candidates)
    pool.release(taken)  # the bind failed: give it back, try the next
    assert next(candidates).port == 50001


def test_range() -> None:
    assert len(PortRange(50000, 50019)) == 20
    assert 50019 in PortRange(50000, 50019) and 50020 not in PortRange(50000, 50019)
    with pytest.raises(ValueError):
        PortRange(50001, 50000)


def test_free_ports_first_then_shared_with_other_addresses() -> None:
    pool = PortPool(PortRange(50000, 50001))
    a1 = next(pool.candidates(A, share=True))
    b1 = next(pool.candidates(B, share=True))
    assert (a1.port, b1.port) == (50000, 50001)  # sharing waits until every port is in use
    # A's second mapping cannot share its own port: it gets B's.
    a2 = next(pool.candidates(A, share=True))
    assert a2.port == 50001
    # A holds both ports now: the range is exhausted for A, not for C.
    assert list(pool.candidates(A, share=True)) == []
    c1 = next(pool.candidates(C, share=True))
    assert c1.port in (50000, 50001)
    assert (pool.leased, pool.leases) == (2, 4)
    assert pool.holders(50000) + pool.holders(50001) == 4
    for lease in (a1, b1, a2, c1):
        pool.release(lease)
    assert (pool.leased, pool.leases) == (0, 0)


def test_one_port_serves_many_addresses_but_one_lease_per_address() -> None:
    pool = PortPool(PortRange(50000, 50000))
    leases = [next(pool.candidates(net(f"127.0.0.{i}"), share=True)) for i in range(2, 7)]
    assert {lease.port for lease in leases} == {50000}
    assert list(pool.candidates(net("127.0.0.4"), share=True)) == []


def test_an_exclusive_lease_is_alone_on_its_port() -> None:
    pool = PortPool(PortRange(50000, 50000))
    alone = next(pool.candidates(A, share=False))
    assert list(pool.candidates(B, share=True)) == []
    assert list(pool.candidates(B, share=False)) == []
    pool.release(alone)
    shared = next(pool.candidates(A, share=True))
    # An exclusive lease takes only a port nobody holds.
    assert list(pool.candidates(B, share=False)) == []
    pool.release(shared)


def test_overlapping_networks_never_share_a_port() -> None:
    """accept_data_from = "same-network": a /24 and an address inside it would be ambiguous."""
    pool = PortPool(PortRange(50000, 50000))
    network = next(pool.candidates(net("198.51.100.0/24"), share=True))
    assert list(pool.candidates(A, share=True)) == []  # 198.51.100.1 is inside the /24
    assert next(pool.candidates(C, share=True)).port == 50000  # 203.0.113.7 is not
    pool.release(network)
    a = next(pool.candidates(A, share=True))
    assert list(pool.candidates(net("198.51.100.0/24"), share=True)) == []  # holds A
    pool.release(a)


def test_releasing_twice_is_harmless() -> None:
    pool = PortPool(PortRange(50000, 50000))
    lease = next(pool.candidates(A, share=True))
    pool.release(lease)
    again = next(pool.candidates(A, share=True))
    pool.release(lease)  # the old lease: the new one stays
    assert pool.leases == 1
    pool.release(again)
    assert pool.leases == 0


def test_peer_table_finds_by_address_and_refuses_overlaps() -> None:
    table: PeerTable[str] = PeerTable()
    table.add(net("10.0.0.0/24"), "lan")
    table.add(net("192.0.2.5"), "one")
    table.add(net("2001:db8::/64"), "six")
    assert table.find(ipaddress.ip_address("10.0.0.77")) == "lan"
    assert table.find(ipaddress.ip_address("192.0.2.5")) == "one"
    assert table.find(ipaddress.ip_address("192.0.2.6")) is None
    assert table.find(ipaddress.ip_address("2001:db8::1")) == "six"
    assert table.find(ipaddress.ip_address("::ffff:192.0.2.5")) is None  # the shell unwraps these first
    assert table.overlaps(net("10.0.0.0/16")) and table.overlaps(net("10.0.0.9"))
    assert not table.overlaps(net("10.0.1.0/24"))
    with pytest.raises(ValueError):
        table.add(net("10.0.0.1"), "inside")
    assert not table.remove(net("10.0.0.0/24"), "other")  # only with its own value
    assert table.remove(net("10.0.0.0/24"), "lan") and len(table) == 2


@pytest.mark.parametrize(
    ("ports", "count", "expected"),
    [
        ("50000-50029", 3, ["50000-50009", "50010-50019", "50020-50029"]),
        # 20 ports, 3 slices: the first 20 % 3 = 2 slices get one more.
        ("50000-50019", 3, ["50000-50006", "50007-50013", "50014-50019"]),
        ("50000-50000", 1, ["50000-50000"]),
    ],
)
def test_slices_are_contiguous_chunks(ports: str, count: int, expected: list[str]) -> None:
    first, last = map(int, ports.split("-"))
    assert [str(Slice(i, count).of(PortRange(first, last))) for i in range(1, count + 1)] == expected


def test_bad_slices() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Slice(0, 3)
    with pytest.raises(ValueError, match="does not exist"):
        Slice(4, 3)
    with pytest.raises(ValueError, match="too few"):
        Slice(1, 4).of(PortRange(50000, 50002))


@given(first=st.integers(1024, 60000), size=st.integers(1, 300), count=st.integers(1, 40))
def test_slices_cover_the_range_exactly(first: int, size: int, count: int) -> None:
    ports = PortRange(first, first + size - 1)
    if count > size:
        return
    chunks = [list(Slice(i, count).of(ports)) for i in range(1, count + 1)]
    assert [port for chunk in chunks for port in chunk] == list(ports)
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.booleans(),  # take (or release)
            st.integers(0, 7),  # which address, or which lease to release
            st.sampled_from([32, 30, 24]),  # prefix: address, small net, /24
            st.booleans(),  # share
        ),
        max_size=60,
    )
)
def test_no_port_ever_holds_overlapping_leases(steps) -> None:
    """The invariant the shared listener relies on: one connection, at most one lease."""
    pool = PortPool(PortRange(50000, 50003))
    held = []
    for take, which, prefix, share in steps:
        if take:
            peers = net(f"198.51.100.{which}/{prefix}")
            lease = next(pool.candidates(peers, share=share), None)
            if lease is not None:
                held.append(lease)
        elif held:
            pool.release(held.pop(which % len(held)))
        for port in pool.ports:
            on_port = [lease for lease in held if lease.port == port]
            if any(lease.exclusive for lease in on_port):
                assert len(on_port) == 1
            for i, one in enumerate(on_port):
                assert not any(one.peers.overlaps(other.peers) for other in on_port[i + 1 :])
        assert pool.leases == len(held)
        assert pool.leased == len({lease.port for lease in held})
