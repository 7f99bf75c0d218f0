"""Running commands inside a network namespace."""

from __future__ import annotations

from collections.abc import Sequence


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``netns`` (with ``ip netns exec``), or as is."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
