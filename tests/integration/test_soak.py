"""A bounded soak: 300 concurrent sessions through ftpfix to a real backend,
with mixed LIST, RETR and STOR checked by sha256, and clients that abort or
vanish at random. Afterwards nothing is corrupted and ftpfix's open file
descriptors and memory are back at their baseline."""

from __future__ import annotations

import ftplib
import hashlib
import os
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import require_servers
from tests.harness import legacy
from tests.harness.procstat import open_fds, rss_kib
from tests.harness.proxy import config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

SESSIONS = 300
ROUNDS = 5  # each session: LIST, then RETR and STOR this many times
FILE_SIZE = 256 * 1024
FILES = 8
ABORT_RATE = 0.08  # a RETR that the client aborts half-way
VANISH_RATE = 0.05  # a RETR after which the client disappears with RST
SOAK_ROUNDS = 2  # measured rounds of SESSIONS concurrent sessions, after one warm-up round
LIMIT = 240  # seconds one round may take


def test_soak_300_sessions(server_dir: Path, tmp_path: Path) -> None:
    require_servers("vsftpd")
    server = legacy.start("vsftpd", server_dir / "vsftpd")
    digests = {}
    for index in range(FILES):
        data = os.urandom(FILE_SIZE)
        legacy.put_file(server, f"f{index}.bin", data)
        digests[f"f{index}.bin"] = hashlib.sha256(data).hexdigest()
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(server.host, server.port),
            public_address="127.0.0.1",
            ports="21000-21399",
            extra="[limits]\nmax_sessions = 1000\nmax_sessions_per_ip = 1000\n",
        ).replace('level = "debug"', 'level = "info"'),
    )
    pid = proxy.process.pid
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def count(outcome: str) -> None:
        with lock:
            outcomes[outcome] += 1

    def session(number: int, start: threading.Barrier) -> None:
        rng = random.Random(number)
        ftp = ftplib.FTP(timeout=60)
        ftp.trust_server_pasv_ipv4_address = True
        try:
            start.wait()
            ftp.connect(proxy.host, proxy.port)
            ftp.login(server.user, server.password)
            ftp.voidcmd("TYPE I")
            assert len(ftp.nlst()) >= FILES
            count("list")
            for round_ in range(ROUNDS):
                name = f"f{rng.randrange(FILES)}.bin"
                roll = rng.random()
                if roll < ABORT_RATE:
                    conn = ftp.transfercmd(f"RETR {name}")
                    conn.recv(4096)
                    conn.close()
                    ftp.abort()
                    ftp.sock.settimeout(10)
                    # Read the second reply (RFC 959 4.1.3) if one is due.
                    try:
                        while True:
                            if ftp.getresp()[:3] in ("225", "226"):
                                break
                    except (ftplib.error_temp, ftplib.error_perm, TimeoutError):
                        pass
                    ftp.sock.settimeout(60)
                    assert ftp.sendcmd("NOOP").startswith("200")
                    count("abort")
                    continue
                if roll < ABORT_RATE + VANISH_RATE:
                    conn = ftp.transfercmd(f"RETR {name}")
                    conn.recv(4096)
                    for sock in (conn, ftp.sock):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()
                    ftp.close()
                    count("vanish")
                    return
                digest = hashlib.sha256()
                ftp.retrbinary(f"RETR {name}", digest.update)
                count("retr ok" if digest.hexdigest() == digests[name] else "retr CORRUPT")
                data = rng.randbytes(FILE_SIZE)
                upload = f"up-{number}-{round_}.bin"
                ftp.storbinary(f"STOR {upload}", _Reader(data))
                stored = (server.files / upload).read_bytes()
                count("stor ok" if hashlib.sha256(stored).digest() == hashlib.sha256(data).digest() else "stor CORRUPT")
            ftp.quit()
        except Exception as error:  # noqa: BLE001 - every failure is counted, none hidden
            count(f"error {type(error).__name__}: {error}"[:120])
            ftp.close()

    def soak(first: int) -> float:
        started = time.monotonic()
        barrier = threading.Barrier(SESSIONS)
        threads = [threading.Thread(target=session, args=(first + n, barrier)) for n in range(SESSIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LIMIT)
        return time.monotonic() - started

    try:
        # Warm up at full concurrency, then take the baseline: the first peak
        # of 300 relays grows the allocator's heap once, and glibc keeps that
        # high-water mark. A leak is growth beyond it.
        soak(100_000)
        _wait_until_idle(proxy, SESSIONS)
        base_fds, base_rss = open_fds(pid), rss_kib(pid)
        outcomes.clear()

        elapsed = sum(soak(round_ * SESSIONS) for round_ in range(SOAK_ROUNDS))
        _wait_until_idle(proxy, SESSIONS * (SOAK_ROUNDS + 1))
        fds, rss = open_fds(pid), rss_kib(pid)
        print(f"\nsoak: {SOAK_ROUNDS} x {SESSIONS} concurrent sessions in {elapsed:.1f} s: {dict(outcomes)}")
        print(f"soak: after warm-up fds {base_fds}, RSS {base_rss} KiB; after the soak fds {fds}, RSS {rss} KiB")

        assert not [outcome for outcome in outcomes if "CORRUPT" in outcome or outcome.startswith("error")], outcomes
        assert outcomes["retr ok"] > SESSIONS and outcomes["stor ok"] > SESSIONS
        assert outcomes["abort"] > 0 and outcomes["vanish"] > 0
        assert fds == base_fds
        assert rss <= base_rss * 1.05, f"RSS {base_rss} KiB after warm-up, {rss} KiB after the soak"
    finally:
        proxy.stop()
        server.stop()


def _wait_until_idle(proxy, expected_sessions: int, timeout: float = 60) -> None:
    """Until every session opened so far has closed, as the log tells."""
    deadline = time.monotonic() + timeout
    while True:
        opened, closed = len(proxy.events("session opened")), len(proxy.events("session closed"))
        if opened >= expected_sessions and opened == closed:
            return
        assert time.monotonic() < deadline, f"{opened} sessions opened, {closed} closed"
        time.sleep(0.2)


class _Reader:
    """A file-like object over bytes, for storbinary."""

    def __init__(self, data: bytes) -> None:
        self._data, self._offset = data, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._data[self._offset : self._offset + (size if size >= 0 else len(self._data))]
        self._offset += len(chunk)
        return chunk
