"""Two replicas of ftpfix on one range ([passive] slice): each leases only its own slice."""

from __future__ import annotations

import ftplib
import hashlib
import os
from pathlib import Path

import pytest

from tests.harness import legacy
from tests.harness.proxy import config_text, start_ftpfix
from tests.integration.test_shared_ports import data_connect, download, free_range, login, pasv_port

pytestmark = [pytest.mark.servers, pytest.mark.root]


def test_each_replica_advertises_only_its_slice(vsftpd, tmp_path: Path) -> None:
    data = os.urandom(512 * 1024)
    legacy.put_file(vsftpd, "f.bin", data)
    first, ports = free_range(5)
    replicas = [
        start_ftpfix(
            tmp_path / f"replica{index}",
            config_text(
                listen=("127.0.0.1", 0),
                backend=(vsftpd.host, vsftpd.port),
                public_address="127.0.0.1",
                ports=ports,
                passive_extra=f'slice = "{index}/2"',
            ),
        )
        for index in (1, 2)
    ]
    try:
        # 5 ports in 2 slices: the first gets 3, the second 2.
        owned = [set(range(first, first + 3)), set(range(first + 3, first + 5))]
        for replica, mine in zip(replicas, owned, strict=True):
            listening = replica.events("listening")[0]
            assert listening["passive_ports"] == f"{min(mine)}-{max(mine)}"
            assert listening["slice"].endswith(f"/2 of {ports}")
        for replica, mine in zip(replicas, owned, strict=True):
            sessions = [login(replica, f"127.0.0.{i}") for i in range(2, 5)]
            seen = {pasv_port(ftp) for ftp in sessions for _ in range(4)}
            assert seen <= mine and seen
            ftp = sessions[0]
            port = pasv_port(ftp)
            received = download(ftp, data_connect(port, "127.0.0.2"), "f.bin")
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
            for session in sessions:
                session.quit()
        # A full slice is full even though the other replica has free ports.
        sessions = [login(replicas[1], "127.0.0.2") for _ in range(3)]
        assert {pasv_port(sessions[0]), pasv_port(sessions[1])} == owned[1]
        with pytest.raises(ftplib.error_temp, match="425"):
            sessions[2].sendcmd("PASV")
        for session in sessions:
            session.quit()
    finally:
        for replica in replicas:
            replica.stop()
