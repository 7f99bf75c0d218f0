"""Real servers, real clients, ftpfix in between, on loopback.

Every cell moves a 16 MiB file each way and compares sha256 digests. The
clients trust the 227 they get, so a wrong rewrite would fail the transfer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_programs
from tests.harness import legacy, matrix
from tests.harness.clients import Endpoint, cells, sha256, transfer
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

#: Loopback addresses: the proxy advertises 127.0.0.1 while the backend's own
#: 227 names 127.0.0.1 too, so the mapping is proven by the port, which must
#: come from ftpfix's range.
PASSIVE_PORTS = "20100-20119"


@pytest.fixture
def proxy(backend: legacy.LegacyServer, tmp_path: Path):
    ftpfix = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(backend.host, backend.port),
            public_address="127.0.0.1",
            ports=PASSIVE_PORTS,
        ),
    )
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


@pytest.mark.parametrize("client, mode", cells())
def test_retr_and_stor_through_ftpfix(
    client: str, mode: str, backend: legacy.LegacyServer, proxy, big_file: Path, tmp_path: Path
) -> None:
    require_programs("curl", "lftp")
    passed = False
    try:
        check_transfers(client, mode, backend, proxy, big_file, tmp_path)
        passed = True
    finally:
        matrix.record("loopback", backend.kind, client, mode, passed)


def check_transfers(
    client: str, mode: str, backend: legacy.LegacyServer, proxy, big_file: Path, tmp_path: Path
) -> None:
    legacy.put_file(backend, "download.bin", big_file.read_bytes())
    endpoint = Endpoint(proxy.host, proxy.port, backend.user, backend.password)

    downloaded = tmp_path / "downloaded.bin"
    result = transfer(client, "get", endpoint, "download.bin", downloaded, mode=mode)
    assert result.returncode == 0, result.stderr
    assert sha256(downloaded) == sha256(big_file)

    result = transfer(client, "put", endpoint, "uploaded.bin", big_file, mode=mode)
    assert result.returncode == 0, result.stderr
    assert sha256(backend.files / "uploaded.bin") == sha256(big_file)

    kind = "active mapping" if mode in ("port", "eprt") else "passive mapping"
    mappings = proxy.events(kind)
    assert len(mappings) >= 2
    for mapping in proxy.events("passive mapping"):
        port = int(mapping["public"].rpartition(":")[2])
        assert 20100 <= port <= 20119, mapping
    # Commands are logged at debug level, but never the password.
    assert backend.password not in proxy.log.read_text()
    closed = proxy.events("session closed")
    assert all(event["user"] == backend.user and event["duration"] >= 0 for event in closed)
    assert sum(event["bytes_down"] for event in closed) >= big_file.stat().st_size
    assert sum(event["bytes_up"] for event in closed) >= big_file.stat().st_size


def test_psw_reaches_proftpd_as_pasv(server_dir: Path, tmp_path: Path) -> None:
    """ProFTPD 1.3.8 answers P@SW with 500; through ftpfix it gets PASV."""
    import ftplib

    from tests.conftest import require_servers

    require_servers("proftpd")
    server = legacy.start("proftpd", server_dir / "proftpd")
    try:
        direct = ftplib.FTP()
        direct.connect(server.host, server.port)
        direct.login(server.user, server.password)
        with pytest.raises(ftplib.error_perm, match="500 P@SW not understood"):
            direct.sendcmd("P@SW")
        direct.quit()

        ftpfix = start_ftpfix(
            tmp_path / "ftpfix",
            config_text(
                listen=("127.0.0.1", 0),
                backend=(server.host, server.port),
                public_address="192.0.2.77",
                ports=PASSIVE_PORTS,
            ),
        )
        try:
            proxied = ftplib.FTP()
            proxied.connect(ftpfix.host, ftpfix.port)
            proxied.login(server.user, server.password)
            for spelling in ("P@SW", "p@sw", "P@sw"):
                reply = proxied.sendcmd(spelling)
                assert reply.startswith("227 Entering Passive Mode (192,0,2,77,"), reply
                numbers = reply[reply.index("(") + 1 : reply.index(")")].split(",")
                assert 20100 <= int(numbers[4]) * 256 + int(numbers[5]) <= 20119
            assert proxied.sendcmd("NOOP").startswith("200")
            proxied.quit()
        finally:
            ftpfix.stop()
    finally:
        server.stop()
