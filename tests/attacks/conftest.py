"""Fixtures the attack files share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.proxy import Ftpfix


@pytest.fixture
def proxies() -> Iterator[list[Ftpfix]]:
    """Every ftpfix a test starts, killed at its end.

    No graceful shutdown: sessions the attacks left open would hold it for the
    whole shutdown grace. The log's tail is printed, which pytest shows only
    when the test failed.
    """
    started: list[Ftpfix] = []
    yield started
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
        proxy.process.wait()
        print(f"--- ftpfix log {proxy.log} (tail) ---")
        print("\n".join(proxy.log.read_text(errors="replace").splitlines()[-25:]))
