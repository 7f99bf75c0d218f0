"""deploy/ftpfix.toml, the example users copy and the image's default
config, as shipped: only the addresses are adapted to this machine. It must
throttle no one: more clients than the old example's max_sessions = 3, each
at full speed, not at its old 32 KB/s."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require_programs
from tests.harness import legacy
from tests.harness.clients import Endpoint, sha256, transfer
from tests.harness.proxy import ROOT, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

EXAMPLE = ROOT / "deploy" / "ftpfix.toml"
CLIENTS = 5
#: The old example's download_rate, in bytes per second.
OLD_RATE = 32768


def adapt(text: str, changes: dict[tuple[str, str], str]) -> str:
    """Replace the value of each uncommented ``key`` in ``[section]``; every one must be there."""
    section, lines, done = "", [], set()
    for line in text.splitlines():
        if match := re.fullmatch(r"\[(\w+)\]", line):
            section = match.group(1)
        elif (match := re.fullmatch(r"(\w+) = .*", line)) and (section, match.group(1)) in changes:
            line = f"{match.group(1)} = {changes[section, match.group(1)]}"
            done.add((section, match.group(1)))
        lines.append(line)
    assert done == set(changes), f"not in the example: {set(changes) - done}"
    return "\n".join(lines) + "\n"


def test_the_example_serves_five_clients_at_full_speed(
    vsftpd: legacy.LegacyServer, big_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_programs("curl")
    config = adapt(
        EXAMPLE.read_text(),
        {
            ("listen", "address"): '"127.0.0.1"',
            ("listen", "port"): "0",
            ("backend", "address"): f'"{vsftpd.host}"',
            ("backend", "port"): str(vsftpd.port),
            ("passive", "public_address"): '"127.0.0.1"',
            ("passive", "internal_networks"): "[]",
            ("metrics", "listen"): '"127.0.0.1:0"',
        },
    )
    # The range the compose file would hand over, away from the other tests'.
    monkeypatch.setenv("FTPFIX_PASSIVE_PORTS", "20860-20879")
    proxy = start_ftpfix(tmp_path / "ftpfix", config)
    try:
        assert proxy.events("listening")[0]["passive_ports"] == "20860-20879"
        legacy.put_file(vsftpd, "big.bin", big_file.read_bytes())
        endpoint = Endpoint("127.0.0.1", proxy.port, vsftpd.user, vsftpd.password)
        results: dict[int, tuple[int, str, float]] = {}

        def download(index: int) -> None:
            started = time.monotonic()
            result = transfer("curl", "get", endpoint, "big.bin", tmp_path / f"{index}.bin")
            results[index] = (result.returncode, result.stderr, time.monotonic() - started)

        threads = [threading.Thread(target=download, args=(index,)) for index in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        assert sorted(results) == list(range(CLIENTS))
        size = big_file.stat().st_size
        for index, (status, stderr, seconds) in results.items():
            assert status == 0, stderr
            assert sha256(tmp_path / f"{index}.bin") == sha256(big_file)
            rate = size / seconds
            # 16 MiB at 32 KiB/s would take 512 s; demand more than 30 times that speed.
            print(f"client {index}: {rate / 1e6:.1f} MB/s")
            assert rate > 30 * OLD_RATE, f"client {index}: {rate / 1e6:.2f} MB/s"
        assert not proxy.events("session refused")
        closed = proxy.events("session closed")
        assert len(closed) == CLIENTS
    finally:
        proxy.stop()
