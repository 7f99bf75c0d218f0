"""Red team, PROXY protocol and ``login_timeout``: the README says it runs
"from connect until the backend has accepted USER and PASS". Behind a
balancer that sends the header only with the client's first bytes (AWS NLB),
ftpfix greets the client itself and waits up to ``login_timeout`` for the
header, so the session must not start a fresh ``login_timeout`` once it comes.

Found: a client that sat on ftpfix's own 220 and sent its header (with USER)
just before ``login_timeout`` got a whole second ``login_timeout`` to log in:
nearly twice the limit, per connection, from anyone behind the balancer."""

from __future__ import annotations

import time

import pytest

from ftpfix.net.proxied import OWN_GREETING
from ftpfix.protocol.proxyheader import format_v1
from tests.attacks.transcript import Attacker, assert_healthy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

BALANCER = "127.0.0.100"
LOGIN_TIMEOUT = 5


@pytest.fixture
def proxy(vsftpd, tmp_path, proxies) -> Ftpfix:
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=(vsftpd.host, vsftpd.port),
        public_address="127.0.0.1",
        ports="21218-21221",
        extra=f"[limits]\nlogin_timeout = {LOGIN_TIMEOUT}\n",
    ).replace("[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1)
    started = start_ftpfix(tmp_path / "ftpfix", text)
    proxies.append(started)
    return started


def test_login_timeout_counts_the_wait_for_a_late_proxy_header(proxy) -> None:
    """Attack: NLB client reads ftpfix's 220, waits 4 of its 5 s, then sends the
    header with USER (and never PASS). It gets the backend's 331, then the
    login timeout's 421 about a second later, not 5 s later."""
    client = Attacker(proxy, source=BALANCER)
    connected = time.monotonic()
    assert client.banner == OWN_GREETING.decode().strip()
    time.sleep(LOGIN_TIMEOUT - 1 - (time.monotonic() - connected))
    client.send(format_v1(("127.0.0.50", 40000), ("127.0.0.1", proxy.port)) + b"USER ftp\r\n")
    client.expect("331")
    client.expect("421 Login timeout", timeout=3)
    assert client.closed()
    assert_healthy(proxy)
