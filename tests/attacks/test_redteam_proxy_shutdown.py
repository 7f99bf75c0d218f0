"""Red team, PROXY protocol and SIGTERM: a connection from a trusted balancer
that is still waiting for its PROXY header is idle (nothing was dialed, no
command is in flight), so SIGTERM's drain must treat it like an idle session:
421 at once, and it must not hold ftpfix's exit for ``shutdown_grace``.

Found: a late-header connection (AWS NLB style: ftpfix greeted the client
itself and waits for the header in front of its first command) got nothing
at SIGTERM, kept ftpfix running for the whole grace, and was then cut off
without a word; a header that came during the grace even dialed the backend.
Likewise a session whose backend had not greeted yet (a loaded or hung
server): no command of the client's was outstanding, yet it held the exit
for the whole grace."""

from __future__ import annotations

import signal
import time

import pytest

from ftpfix.net.proxied import OWN_GREETING
from ftpfix.protocol.proxyheader import format_v1
from tests.attacks.transcript import Attacker, Listener
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

BALANCER = "127.0.0.100"
GRACE = 20


@pytest.fixture
def proxy(vsftpd, tmp_path, proxies) -> Ftpfix:
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=(vsftpd.host, vsftpd.port),
        public_address="127.0.0.1",
        ports="21214-21217",
        extra=f"[limits]\nshutdown_grace = {GRACE}\nlogin_timeout = 60\n",
    ).replace("[listen]\n", f'[listen]\nproxy_protocol = true\ntrusted_proxies = ["{BALANCER}/32"]\n', 1)
    started = start_ftpfix(tmp_path / "ftpfix", text)
    proxies.append(started)
    return started


def test_sigterm_tells_a_connection_waiting_for_its_proxy_header(proxy, vsftpd) -> None:
    """Operator: SIGTERM while an NLB client has ftpfix's own 220 and has not
    spoken yet (so no header came), beside a logged-in session that came
    through the balancer at once. Both get 421 within 2 s, nothing is dialed
    for the waiting one, and ftpfix exits 0 long before the grace is over."""
    bystander = Attacker(proxy, source=BALANCER, greet=False)
    bystander.send(format_v1(("127.0.0.50", 40000), ("127.0.0.1", proxy.port)))
    bystander.expect("220")
    bystander.login(vsftpd.user, vsftpd.password)
    waiting = Attacker(proxy, source=BALANCER)  # ftpfix's own 220, after PROXY_HEADER_WAIT
    assert waiting.banner == OWN_GREETING.decode().strip()
    proxy.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    bystander.expect("421", timeout=2)
    waiting.expect("421 Service shutting down", timeout=max(2 - (time.monotonic() - signalled), 0.01))
    assert waiting.closed(timeout=2)
    assert proxy.process.wait(GRACE / 2) == 0, "a connection waiting for its header held the shutdown"
    assert len(proxy.events("session opened")) == 1, "the waiting connection was made a session during shutdown"
    assert proxy.events("shutting down: closing a connection that was waiting for its PROXY header")


def test_sigterm_tells_a_session_whose_backend_has_not_greeted_yet(tmp_path, proxies) -> None:
    """Operator: SIGTERM while a client waits for the greeting of a backend that
    accepted the connection and says nothing. The client has asked nothing, so
    the session is idle: 421 within 2 s, and ftpfix exits 0 before the grace."""
    with Listener("127.0.0.1") as mute:
        text = config_text(
            listen=("127.0.0.1", 0),
            backend=("127.0.0.1", mute.port),
            public_address="127.0.0.1",
            ports="21214-21217",
            extra=f"[limits]\nshutdown_grace = {GRACE}\n",
        )
        proxy = start_ftpfix(tmp_path / "ftpfix", text)
        proxies.append(proxy)
        client = Attacker(proxy, greet=False)
        mute.wait(1)
        proxy.wait_for("session opened")
        proxy.process.send_signal(signal.SIGTERM)
        client.expect("421 Service shutting down", timeout=2)
        assert client.closed(timeout=2)
        assert proxy.process.wait(GRACE / 2) == 0, "a session waiting for the backend's greeting held the shutdown"
