"""Red team: with accept_data_from = "same-network" the stranger check held (127.0.0.0/24 in,
127.0.1.1 out; IPv4-mapped clients get the IPv4 /24, not a /64), but what it said was wrong:

- the client's 425 read "the data connection came from another address than 127.0.0.0." --
  the network printed as if it were the one address accepted; it now says "outside 127.0.0.0/24";
- the log line "data port released: only other addresses connected, never the client" suggested
  accept_data_from = "same-network" although that was already the setting.
"""

from __future__ import annotations

import socket

import pytest

from tests.attacks.transcript import Attacker
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]


def test_same_network_refusal_says_the_network_and_no_circular_hint(vsftpd, tmp_path, proxies) -> None:
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports="21194-21195",
            passive_extra='accept_data_from = "same-network"',
            extra="[limits]\ndata_connect_timeout = 2\n",
        ),
    )
    proxies.append(proxy)
    attacker = Attacker(proxy)
    attacker.login(vsftpd.user, vsftpd.password)
    port = attacker.epsv()
    # The reset may come before connect() returns on a loaded machine.
    with (
        pytest.raises(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.1.1", 0)) as stranger,
    ):
        stranger.settimeout(2)
        assert stranger.recv(10) == b""
        raise ConnectionResetError
    attacker.line("NLST")
    reply = attacker.reply(6)
    assert reply.startswith("425")
    released = proxy.wait_for("data port released: only other addresses connected, never the client")[-1]
    assert released["accepted"] == "127.0.0.0/24"
    assert "127.0.0.0." not in reply or "127.0.0.0/24" in reply
    assert "same-network" not in released.get("hint", "")
    assert attacker.command("NOOP").startswith("200")
