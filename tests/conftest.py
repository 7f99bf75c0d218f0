"""Shared fixtures: real legacy servers, ftpfix processes, test files.

Tests that need root or the unpacked servers skip with a clear reason on a
machine without them. In CI (``CI`` set) they fail instead: a green CI must
mean that every real-parts test ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import legacy, matrix

#: Size of the files the transfer tests move: the issues ask for at least 16 MiB.
TRANSFER_SIZE = 16 * 1024 * 1024


def require(condition: bool, reason: str) -> None:
    """Skip unless ``condition``; in CI, fail, so nothing is silently left out."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (run ./tests/run)")


def require_servers(*kinds: str) -> None:
    require_root()
    missing = [kind for kind in kinds or legacy.SERVERS if kind not in legacy.installed()]
    require(not missing, f"legacy servers not unpacked: {', '.join(missing)} (run ./tests/run)")


def require_programs(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    require(not missing, f"not installed: {', '.join(missing)} (run ./tests/run)")


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TRANSFER_SIZE random bytes, made once per run."""
    path = tmp_path_factory.mktemp("payload") / "payload.bin"
    path.write_bytes(os.urandom(TRANSFER_SIZE))
    return path


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A folder for a legacy server's files that its unprivileged user can reach.

    pytest's own temporary folders are mode 0700 under root, which ProFTPD's
    ``nobody`` cannot enter to chroot into its home.
    """
    path = Path(tempfile.mkdtemp(prefix="ftpfix-server-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vsftpd(server_dir: Path) -> Iterator[legacy.LegacyServer]:
    """A real vsftpd on loopback, for tests that need one server, any server."""
    require_servers("vsftpd")
    server = legacy.start("vsftpd", server_dir / "vsftpd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=legacy.SERVERS)
def server_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend(server_kind: str, server_dir: Path) -> Iterator[legacy.LegacyServer]:
    """One real legacy server on loopback."""
    require_servers(server_kind)
    server = legacy.start(server_kind, server_dir / server_kind)
    try:
        yield server
    finally:
        server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    matrix.save()
