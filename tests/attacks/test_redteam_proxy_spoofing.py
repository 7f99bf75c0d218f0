"""Red team, PROXY protocol spoofing: one client must stay one address.

The v1 header's addresses are written as inet_ntop writes them (spec 2.1),
and ``max_sessions_per_ip`` and ``[access]`` judge the address in it. Found:
ftpfix took an IPv6 scope ("fe80::1%0", "fe80::1%1", ...) as part of the
address, so one client, named with a different scope each time, was as many
clients as it liked: ``max_sessions_per_ip = 1`` let three sessions in. Such
a header is now refused like any malformed one."""

from __future__ import annotations

import pytest

from tests.attacks.transcript import Attacker, assert_healthy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

BALANCER = "127.0.0.100"


@pytest.fixture
def proxy(vsftpd, tmp_path, proxies) -> Ftpfix:
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=(vsftpd.host, vsftpd.port),
        public_address="127.0.0.1",
        ports="21226-21229",
        extra="[limits]\nmax_sessions_per_ip = 1\n",
    ).replace("[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1)
    started = start_ftpfix(tmp_path / "ftpfix", text)
    proxies.append(started)
    return started


def test_an_ipv6_scope_does_not_make_one_client_many(proxy) -> None:
    """Attack: three headers for fe80::1, each with another scope, past
    max_sessions_per_ip = 1. Each is refused as a bad header, and the same
    client without a scope gets its one session."""
    for scope in range(3):
        forged = Attacker(proxy, source=BALANCER, greet=False)
        forged.send(f"PROXY TCP6 fe80::1%{scope} ::1 {1000 + scope} 21\r\n".encode())
        assert forged.closed(timeout=5), f"a header for fe80::1%{scope} was served"
        forged.close()
    refused = proxy.wait_for("bad PROXY header from a trusted proxy; closing", count=3)
    assert all("not an IP address" in event["error"] for event in refused)
    assert not proxy.events("session opened")
    first = Attacker(proxy, source=BALANCER, greet=False)
    first.send(b"PROXY TCP6 fe80::1 ::1 1000 21\r\n")
    first.expect("220")
    second = Attacker(proxy, source=BALANCER, greet=False)
    second.send(b"PROXY TCP6 fe80::1 ::1 1001 21\r\n")
    second.expect("421 Too many connections from your address")
    assert_healthy(proxy)
