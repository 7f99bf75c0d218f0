"""The Prometheus metrics: one registry per process, rendered for /metrics.

The exposition is ``prometheus_client``'s, not written here: its text format
(escaping of label values and help text, ``_total``/``_created`` suffixes,
histogram buckets, ``# HELP``/``# TYPE`` order) is what every Prometheus
version parses, and the library is kept up to date with the format, so
ftpfix does not carry a second implementation of it to get wrong.

A dedicated ``CollectorRegistry``, not the library's global one: nothing
else (a library's import, a test) can add to what /metrics shows, and the
process, platform and GC collectors that the global registry brings are left
out. ``METRICS`` is built once, at import, so every session of the process
counts into the same series.

Label values come from closed sets only (the ``*_KINDS`` tuples and
``SESSION_ENDS``), never from a client address, a user or a file name, so the
number of series is fixed however many clients come: a scrape costs the same
at two sessions and at two thousand.

Where each series is counted:

- the core, through ``Count`` commands (``Tally``): rewrites, bounce and
  long-line refusals, which only the core sees;
- the shell, where it knows: sessions and their ends (``edge.py``), admission
  refusals (``server.py``), the backend dial (``edge.py``), data connections,
  bytes and the pool (``dispatch.py``, ``transfer.py``), transfers (on the
  core's ``TransferReplied``), reloads (``server.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from ..protocol import Tally

#: How a session ended, as the ``reason`` label of ftpfix_sessions_ended_total.
SESSION_ENDS = (
    "quit",
    "timeout",
    "limit",
    "backend_down",
    "error",
    "client_hung_up",
    "shutdown",
    "tls_handshake",
    "other",
)

#: ftpfix_refusals_total{kind}: strangers on data ports, PORT/EPRT bounce
#: attempts, over-long command lines, the access lists, the session limits,
#: trusted balancers whose PROXY header was bad, late or missing.
REFUSAL_KINDS = ("stranger", "bounce", "long_line", "access", "limit", "proxy_header")

#: ftpfix_rewrites_total{kind}.
REWRITE_KINDS = ("227", "229", "alias", "epsv_translated")

#: ftpfix_transfers_total labels.
TRANSFER_DIRECTIONS = ("download", "upload")
TRANSFER_MODES = ("passive", "active", "passthrough", "passive_tls", "active_tls")
TRANSFER_RESULTS = ("ok", "no_data_connection", "aborted", "refused")

#: Transfers last from milliseconds (a listing on a LAN) to hours (an image
#: over a slow uplink).
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

#: A backend on the LAN answers in well under a millisecond; a second or
#: more means trouble (ARP, a SYN queue, a firewall dropping).
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_TALLIES: dict[Tally, tuple[str, str]] = {
    Tally.REWRITE_227: ("rewrites", "227"),
    Tally.REWRITE_229: ("rewrites", "229"),
    Tally.ALIAS: ("rewrites", "alias"),
    Tally.EPSV_TRANSLATED: ("rewrites", "epsv_translated"),
    Tally.BOUNCE: ("refusals", "bounce"),
    Tally.LONG_LINE: ("refusals", "long_line"),
}


class Metrics:
    """Every series ftpfix exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.sessions_open = Gauge("ftpfix_sessions_open", "Client sessions open now", registry=registry)
        self.sessions_ended = Counter(
            "ftpfix_sessions_ended", "Client sessions ended, by how they ended", ["reason"], registry=registry
        )
        self.data_connections_open = Gauge(
            "ftpfix_data_connections_open",
            "Data connections set up and not yet over (waiting for their peer or relaying)",
            registry=registry,
        )
        self.transfers = Counter(
            "ftpfix_transfers",
            "Transfer commands answered, by direction, data connection mode and result",
            ["direction", "mode", "result"],
            registry=registry,
        )
        self.transfer_seconds = Histogram(
            "ftpfix_transfer_duration_seconds",
            "Seconds from a transfer command to its final reply",
            ["direction"],
            buckets=TRANSFER_BUCKETS,
            registry=registry,
        )
        self.data_bytes = Counter(
            "ftpfix_data_bytes",
            "Bytes relayed on data connections; upload is client to server",
            ["direction"],
            registry=registry,
        )
        self.pool_size = Gauge("ftpfix_passive_pool_ports", "Ports in the passive range", registry=registry)
        self.pool_leased = Gauge("ftpfix_passive_pool_leased", "Passive ports leased now", registry=registry)
        self.pool_exhausted = Counter(
            "ftpfix_passive_pool_exhausted",
            "PASV/EPSV answered 425 because every passive port was leased",
            registry=registry,
        )
        self.rewrites = Counter("ftpfix_rewrites", "Replies and commands ftpfix rewrote", ["kind"], registry=registry)
        self.refusals = Counter("ftpfix_refusals", "Connections and commands refused", ["kind"], registry=registry)
        self.backend_connect_seconds = Histogram(
            "ftpfix_backend_connect_seconds",
            "Seconds to open a session's control connection to the backend",
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self.backend_connect_failures = Counter(
            "ftpfix_backend_connect_failures", "Sessions whose backend could not be reached", registry=registry
        )
        self.backend_up = Gauge(
            "ftpfix_backend_up", "1 while /readyz would answer 200 (the backend greeted lately)", registry=registry
        )
        self.config_reloads = Counter(
            "ftpfix_config_reloads", "SIGHUP reloads, by result", ["result"], registry=registry
        )
        self.config = Info("ftpfix_config", "The running configuration", registry=registry)
        # Every label value exists from the start, at 0, so rate() and
        # increase() see the first event and dashboards show no gaps.
        for reason in SESSION_ENDS:
            self.sessions_ended.labels(reason)
        for kind in REFUSAL_KINDS:
            self.refusals.labels(kind)
        for kind in REWRITE_KINDS:
            self.rewrites.labels(kind)
        for direction in TRANSFER_DIRECTIONS:
            self.data_bytes.labels(direction)
            self.transfer_seconds.labels(direction)
        for result in ("ok", "failed"):
            self.config_reloads.labels(result)

    def count(self, what: Tally) -> None:
        """Count what the core reported with a ``Count`` command."""
        family, kind = _TALLIES[what]
        getattr(self, family).labels(kind).inc()

    def watch(self, sessions: Callable[[], float], pool_size: Callable[[], float], leased: Callable[[], float]) -> None:
        """Read these gauges from the server's own state at each scrape,
        so they can never drift from it."""
        self.sessions_open.set_function(sessions)
        self.pool_size.set_function(pool_size)
        self.pool_leased.set_function(leased)

    def render(self) -> tuple[bytes, str]:
        """The exposition of every series, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def session_end(reason: str) -> str:
    """The ``reason`` label for a session's close reason (free text: a
    protocol error's message may name anything, so it is mapped, not used)."""
    text = reason.lower()
    if text == "quit":
        return "quit"
    if "shutting down" in text:
        return "shutdown"
    if "timeout" in text or "timed out" in text or "stopped reading" in text:
        return "timeout"
    if "over-long" in text:
        return "limit"
    if text.startswith("tls handshake failed"):
        return "tls_handshake"
    if text.startswith("client"):
        return "client_hung_up"
    if text.startswith("backend"):
        return "backend_down"
    if text in ("unknown", ""):
        return "other"
    return "error"


def transfer_result(code: int) -> str:
    """The ``result`` label for the final reply a client got to a transfer command."""
    if 200 <= code < 300:
        return "ok"
    if code == 425:
        return "no_data_connection"
    if code == 426:
        return "aborted"
    return "refused"


def config_hash(rendered: str) -> str:
    """A short fingerprint of the effective config, for ftpfix_config_info."""
    return hashlib.sha256(rendered.encode()).hexdigest()[:16]


#: The process's metrics.
METRICS = Metrics()
