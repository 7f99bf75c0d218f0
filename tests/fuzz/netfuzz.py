"""A network fuzzer for ftpfix, against the three real legacy servers.

usage: python -m tests.fuzz.netfuzz --seconds N [--servers vsftpd,pure-ftpd,proftpd]
           [--seed S] [--json out.json] [--concurrency C] [--benign] [--ftpfix-src DIR]

It starts vsftpd, pure-ftpd and ProFTPD, each confined to its own known passive
port range R, and one ftpfix process in front of each (ftpfix itself is not
told R: the fuzzer checks ftpfix's own defences). Then, for N seconds, all
three at once, it runs C sessions at a time per server, each a seeded random
walk over a grammar that mixes ordinary client behaviour with hostile input:
logins, plain commands, file names that embed reply-looking text (``213 y``,
``227 Entering Passive Mode (...)``) behind NUL, CR, LF or tab, PASV/EPSV/P@SW
and PORT/EPRT (to the fuzzer's own listener or to bogus hosts and ports), RETR,
STOR, LIST, NLST with data connections that complete (RETR sha256-checked,
STOR checked with SIZE), are reset, stall or are never opened, ABOR in the
ways clients send it (plain, ftplib's urgent line, Telnet IP/DM), pipelined
batches, PASV storms, mutated lines (control bytes, NUL, lone CR, 0xFF, tabs,
odd verbs, over-long lines, bare-LF floods, lines split across segments), and
control connections that are reset or half-closed at random moments. Every
read has a timeout, each session a hard time limit, and the whole run one too.

After hostile input a session resynchronises: it sends an empty line, then
``MKD <nonce>`` and ``RMD <nonce>``, and reads until the nonce comes back (all
three servers echo it in their 257). Only then does it check replies strictly.

Oracles, checked while it runs and at the end:

a.  the ftpfix process never exits (if it does, the exit and its last output
    are recorded and ftpfix is restarted, so the rest of the run still fuzzes);
b.  no log event whose name starts with "session crashed" or "data connection
    crashed";
c.  every "passive mapping" event's backend port lies in the backend's real
    passive range R: a port outside R means ftpfix opened a mapping for a
    reply the backend did not send for that PASV;
c2. no line the client reads names a port in R: the fuzzer never writes such
    a number itself, so it can only be the backend's own 227/229 relayed
    unrewritten (the client would be sent to the backend's private port);
d.  once every session is closed and a few seconds have passed, ftpfix's open
    descriptors are within +8 of their value after the warm-up, and its RSS
    within +40 MiB (the fuzzer resets, rather than closes, every connection it
    leaves mid-conversation, so ftpfix has no pending reply to wait for);
e.  a healthy client (ftplib, trusting the 227) can still log in and RETR a
    1 MiB file whose sha256 matches;
f.  no transfer the fuzzer could check (RETR of a known file in TYPE I
    answered 226; STOR answered 226, then SIZE) arrived corrupted;
g.  no reply that ftpfix makes up itself ("500 Empty command line.") reaches
    the client after the reply to a command sent later;
h.  a PROXY protocol header (v1 or v2, valid or not, alone or with a command
    behind it) sent by a client after the greeting closes its session: the
    fuzzer's ftpfix trusts no balancer, so no client may name an address.

Reported but not failing: replies "out of step" (a strict command answered
with a reply that cannot be its own), late backend replies, and the sessions
still open after the run, with transcripts of the fuzzer's side.

``--benign`` is a control run: only well-behaved sessions. It must pass on any
ftpfix whose ordinary paths work, which checks the fuzzer's own oracles.
``--ftpfix-src DIR`` runs ftpfix from another source tree (a ``git archive``
of a commit, say). The process exits with status 1 if any oracle failed.

Session i of worker w on server k draws from ``Random(f"{seed}/{k}/{w}/{i}")``,
so a seed replays the same walks; the interleaving of concurrent sessions, and
so the exact outcome, still depends on timing. pure-ftpd's password is
re-hashed with SHA-512 crypt (see ``cheap_pure_ftpd_login``), or its argon2id
logins would eat the two CPU cores.
"""

from __future__ import annotations

import argparse
import ftplib
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ftpfix.protocol.proxyheader import V2_SIGNATURE, format_v1, format_v2
from tests.harness import legacy
from tests.harness.procstat import open_fds, rss_kib
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

#: The real passive range R each backend is confined to (and told about).
#: Wide, below the kernel's ephemeral ports: a backend session that waits for
#: a data connection that never comes keeps its port for a minute (vsftpd's
#: accept timeout), and the fuzzer leaves many such sessions behind.
BACKEND_RANGES = {"vsftpd": (24000, 25999), "pure-ftpd": (26000, 27999), "proftpd": (28000, 29999)}
#: ftpfix's own [passive] ports, one slice of 21200-21299 per ftpfix process.
FTPFIX_RANGES = {"vsftpd": (21200, 21232), "pure-ftpd": (21233, 21265), "proftpd": (21266, 21299)}

PUBLIC_ADDRESS = "127.0.0.1"
DEFAULT_SEED = 20261124
DEFAULT_CONCURRENCY = 8

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 10.0
IO_TIMEOUT = 10.0
DATA_TIMEOUT = 20.0
RESYNC_TIMEOUT = 8.0
SESSION_LIMIT = 45.0  # hard cap on one session, whatever it does
LOGIN_TIMEOUT = 20.0
MAX_RESTARTS = 25  # per server; past this the server is no longer fuzzed

FD_SLACK = 8
RSS_SLACK_KIB = 40 * 1024
SETTLE_SECONDS = 2.0
CLOSE_WAIT = 10.0  # seconds ftpfix has to close every session once the fuzzer has closed them all

#: Files placed in every server's root: name -> size. Names are relative: a
#: session that changes directory goes back home at once (vsftpd, run as the
#: launching user, does not chroot, so "/" is the machine's root there; the
#: fuzzer never names a path outside the server's folder).
FILES = {"empty.bin": 0, "small.txt": 1000, "k64.bin": 64 * 1024, "m1.bin": 1 << 20, "big.bin": 4 << 20}
HEALTHY_FILE = "healthy.bin"
HEALTHY_SIZE = 1 << 20

CRASH_PREFIXES = ("session crashed", "data connection crashed")

#: What ``--benign`` leaves out: every hostile opening, action, transfer mode and ending.
HOSTILE_CHOICES = frozenset(
    {
        "rst-at-once",
        "close-at-once",
        "early-talker",
        "prelogin-hostile",
        "proxy-header",
        "bogus_active",
        "pipelined",
        "mutated",
        "long_lines",
        "lf_flood",
        "abort_idle",
        "stat_listing",
        "injection",
        "pasv_storm",
        "end",
        "RETR-missing",
        "MLSD",
        "reset",
        "never",
        "abort",
        "close-early",
        "control-reset",
        "control-close",
        "close",
        "rst",
        "half-close",
        "rst-after-send",
    }
)

#: Texts of replies ftpfix makes up itself (never a backend's).
FTPFIX_OWN_REPLIES = (
    b"Empty command line",
    b"Command line too long",
    b"through this FTP proxy",
    b"is not supported; use",
    b"not allowed after EPSV ALL",
    b"a 227 cannot carry",
    b"control characters are not allowed",
    b"a command starts with its verb",
)


# ---------------------------------------------------------------- the grammar's pieces


def _outside_ranges(port: int) -> bool:
    return not any(first <= port <= last for first, last in BACKEND_RANGES.values())


#: (p1, p2) pairs for injected 227s: all name ports outside every backend range R.
INJECT_PORTS = [(8, 174), (0, 21), (254, 3), (4, 1), (255, 255), (1, 0), (78, 32), (200, 200)]
assert all(_outside_ranges(p1 * 256 + p2) for p1, p2 in INJECT_PORTS)
#: Every port number the fuzzer writes into names and reply-looking text.
PLANTED_PORTS = {p1 * 256 + p2 for p1, p2 in INJECT_PORTS} | {2222, 256, 1286}
INJECT_HOSTS = ["127,0,0,1", "10,0,0,1", "192,168,123,1", "8,8,8,8", "0,0,0,0"]


def injection_texts(rng: random.Random) -> bytes:
    p1, p2 = rng.choice(INJECT_PORTS)
    host = rng.choice(INJECT_HOSTS)
    port = p1 * 256 + p2
    return rng.choice(
        [
            f"227 Entering Passive Mode ({host},{p1},{p2})",
            f"227 Entering Passive Mode ({host},{p1},{p2}).",
            f"227 ={host},{p1},{p2}",
            f"227 {host},{p1},{p2}",
            f"227-Entering Passive Mode ({host},{p1},{p2})",
            f"229 Entering Extended Passive Mode (|||{port}|)",
            f"229 (!!!{port}!)",
            "213 y",
            "213 1048576",
            "150 Opening BINARY mode data connection",
            "226 Transfer complete",
            "230 Login successful",
            f"{host},{p1},{p2}",
            "1,2,3,4,5,6",
            "421 Service not available",
        ]
    ).encode()


#: Plain names used with MKD/RMD and friends: a small pool, so directories do not pile up.
PLAIN_NAMES = [b"fz-a", b"fz b", b"123", b"1,2,3,4,5,6", b"x,y,z", b"fz-\xc3\xa9", b"fz 227", b"0", b"fz-(1,2)"]
#: What may come before an injected reply in a name.
INJECT_PREFIXES = [b"", b"", b"x ", b"a\r", b"a\n", b"a\x00", b"a\t", b" ", b"\r\n", b"dir/"]

SIMPLE_COMMANDS = [
    b"NOOP",
    b"noop",
    b"PWD",
    b"XPWD",
    b"SYST",
    b"FEAT",
    b"TYPE I",
    b"TYPE A",
    b"TYPE A N",
    b"TYPE L 8",
    b"MODE S",
    b"STRU F",
    b"HELP",
    b"HELP SITE",
    b"STAT",
    b"OPTS UTF8 ON",
    b"CWD .",
    b"CDUP",
    b"REST 0",
    b"ALLO 100",
    b"SIZE m1.bin",
    b"SIZE small.txt",
    b"MDTM k64.bin",
    b"AUTH TLS",
    b"LPSV",
    b"PBSZ 0",
    b"SITE HELP",
    b"ACCT x",
    b"SMNT .",
    b"NOOP 227 Entering Passive Mode (127,0,0,1,8,174)",
]
#: Lines that the mutator starts from. No USER/PASS/QUIT/REIN (they would
#: derail the session), no REST/MODE/STRU (they would silently change what a
#: later checked transfer returns), no CWD that could leave the home folder.
MUTATION_BASE = [
    b"NOOP",
    b"PWD",
    b"SYST",
    b"PASV",
    b"EPSV",
    b"P@SW",
    b"TYPE I",
    b"TYPE A",
    b"FEAT",
    b"SIZE m1.bin",
    b"MKD fz-a",
    b"CWD .",
    b"STAT",
    b"ABOR",
    b"HELP",
    b"PORT 127,0,0,1,4,1",
    b"EPRT |1|127.0.0.1|1025|",
    b"SIZE 213 y",
    b"MKD 227 Entering Passive Mode (127,0,0,1,8,174)",
    b"LIST",
    b"NLST",
    b"EPSV ALL",
    b"SITE CHMOD 644 small.txt",
    b"DELE fz-nothing",
    b"RNFR fz-nothing",
    b"OPTS UTF8 ON",
]
PIPELINE_ITEMS = [
    b"PASV",
    b"PASV",
    b"EPSV",
    b"P@SW",
    b"p@sw",
    b"pasv",
    b"NOOP",
    b"PWD",
    b"TYPE I",
    b"SYST",
    b"STAT",
    b"FEAT",
    b"ABOR",
    b"HELP",
    b"SIZE 213 y",
    b"MKD fz-a",
    b"RMD fz-a",
    b"CWD .",
    b"EPSV 1",
    b"EPSV 2",
    b"PORT 127,0,0,1,4,1",
    b"PORT 8,8,8,8,4,1",
    b"EPRT |1|127.0.0.1|1025|",
    b"AUTH TLS",
    b"LPSV",
]
ECHO_VERBS = [
    b"MKD",
    b"XMKD",
    b"RMD",
    b"DELE",
    b"SIZE",
    b"CWD",
    b"MDTM",
    b"RNFR",
    b"STAT",
    b"SITE CHMOD 644",
    b"HELP",
    b"RETR",
]

ABOR_VARIANTS: dict[str, list[tuple[bytes, int]]] = {
    "plain": [(b"ABOR\r\n", 0)],
    "lower": [(b"abor\r\n", 0)],
    # ftplib's abort(): the whole line sent with MSG_OOB (its last byte is urgent).
    "ftplib": [(b"ABOR\r\n", socket.MSG_OOB)],
    # lftp / RFC 959 4.1.3: IAC IP, IAC DM as urgent data, ABOR.
    "telnet": [(b"\xff\xf4\xff", 0), (b"\xf2", socket.MSG_OOB), (b"ABOR\r\n", 0)],
    "telnet-inline": [(b"\xff\xf4\xff\xf2ABOR\r\n", 0)],
}


# ---------------------------------------------------------------- bookkeeping


@dataclass
class Failure:
    oracle: str
    server: str
    detail: str
    example: str = ""


@dataclass
class Target:
    """One backend, its ftpfix and everything the run learns about them."""

    kind: str
    server: legacy.LegacyServer
    backend_range: tuple[int, int]
    ftpfix_range: tuple[int, int]
    workdir: Path
    digests: dict[str, str]
    ftpfix_src: Path | None = None
    proxy: Ftpfix | None = None
    incarnation: int = 0
    up: bool = False
    restarting: bool = False
    gave_up: bool = False
    log_offset: int = 0
    log_partial: bytes = b""
    open_sessions: int = 0
    raw_tail: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    desyncs: list[dict[str, Any]] = field(default_factory=list)
    misordered: list[dict[str, Any]] = field(default_factory=list)
    leaks: list[list[str]] = field(default_factory=list)
    crash_kinds: Counter[str] = field(default_factory=Counter)
    bad_mapping_transcripts: list[dict[str, Any]] = field(default_factory=list)
    #: ftpfix session id -> client address, for sessions logged open and not closed.
    live: dict[int, str] = field(default_factory=dict)
    stuck_transcripts: list[list[str]] = field(default_factory=list)
    stuck_sessions: int = 0
    #: The fuzzer's recent control connections: local "host:port" -> transcript.
    transcripts: dict[str, deque[str]] = field(default_factory=dict)
    exits: list[dict[str, Any]] = field(default_factory=list)
    fds_before: int | None = None
    rss_before: int | None = None
    fds_after: int | None = None
    rss_after: int | None = None
    healthy: dict[str, Any] = field(default_factory=dict)
    baseline_note: str = "after the warm-up"

    def fail(self, oracle: str, detail: str, example: str = "") -> None:
        self.failures.append(Failure(oracle, self.kind, detail, example))

    @property
    def home(self) -> bytes:
        return str(self.server.files).encode() if self.kind == "vsftpd" else b"/"

    @property
    def pid(self) -> int | None:
        return self.proxy.process.pid if self.proxy is not None else None


class PeerClosed(Exception):
    """The peer closed (or reset) the connection."""


class SessionEnd(Exception):
    """A terminal action ended the session on purpose."""


@dataclass
class Reply:
    code: int | None
    lines: list[bytes]

    @property
    def text(self) -> bytes:
        return b"\n".join(self.lines)


def _rst(sock: Any) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Conn:
    """A control connection: sends lines, reads replies, everything with timeouts."""

    def __init__(
        self, sock: trio.socket.SocketType, stats: Counter[str], check: Callable[[bytes, Conn], None] | None = None
    ) -> None:
        self.sock = sock
        self.stats = stats
        self.check = check
        self.buf = bytearray()
        self.eof = False
        #: The last things sent (">") and lines received ("<"), for reports.
        self.transcript: deque[str] = deque(maxlen=60)

    @classmethod
    async def open(cls, port: int, stats: Counter[str], check: Callable[[bytes, Conn], None] | None = None) -> Conn:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await sock.connect((PUBLIC_ADDRESS, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return cls(sock, stats, check)

    async def send(self, data: bytes, flags: int = 0, commands: int = 0) -> None:
        self.transcript.append(
            f"> {data[:200]!r}{' (urgent)' if flags else ''}{f' ...{len(data)} bytes' if len(data) > 200 else ''}"
        )
        view = memoryview(data)
        with trio.fail_after(IO_TIMEOUT):
            while view:
                sent = await self.sock.send(view, flags)
                view = view[sent:]
        self.stats["commands sent"] += commands
        self.stats["control bytes sent"] += len(data)

    async def command(self, line: bytes) -> None:
        await self.send(line + b"\r\n", commands=1)

    async def _fill(self, deadline: float) -> None:
        if self.eof:
            raise PeerClosed("control connection closed")
        with trio.fail_at(deadline):
            try:
                data = await self.sock.recv(65536)
            except OSError as error:
                raise PeerClosed(f"control connection: {error}") from None
        if not data:
            self.eof = True
            raise PeerClosed("control connection closed")
        self.buf += data

    async def line(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        deadline = trio.current_time() + timeout
        while (end := self.buf.find(b"\n")) < 0:
            await self._fill(deadline)
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        self.transcript.append(f"< {line[:200]!r}")
        if self.check is not None:
            self.check(line, self)
        return line[:-1] if line.endswith(b"\r") else line

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        first = await self.line(timeout)
        self.stats["replies"] += 1
        match = re.match(rb"([1-5]\d\d)([- ]|$)", first)
        if match is None:
            self.stats["reply lines that are not replies"] += 1
            return Reply(None, [first])
        code = match.group(1)
        self.stats[f"replies {code[:1].decode()}xx"] += 1
        lines = [first]
        if match.group(2) == b"-":
            while len(lines) < 10000:
                line = await self.line(timeout)
                lines.append(line)
                if line[:3] == code and line[3:4] in (b" ", b""):
                    break
        return Reply(int(code), lines)

    async def until(self, token: bytes, timeout: float) -> bytes:
        """Read lines until one contains ``token``; return it."""
        deadline = trio.current_time() + timeout
        while True:
            line = await self.line(max(deadline - trio.current_time(), 0.001))
            if token in line:
                return line

    async def eof_within(self, timeout: float) -> bool:
        """Read and discard until the peer closes; False on timeout."""
        with trio.move_on_after(timeout):
            try:
                while True:
                    await self._fill(trio.current_time() + timeout)
                    self.buf.clear()
            except PeerClosed:
                return True
        return False

    def reset(self) -> None:
        _rst(self.sock)

    def close(self) -> None:
        self.sock.close()


def parse_passive(reply: Reply) -> int | None:
    """The port a 227 or 229 reply names, or None."""
    text = reply.text
    if reply.code == 227:
        match = re.search(rb"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", text)
        if match:
            p1, p2 = int(match.group(5)), int(match.group(6))
            if p1 < 256 and p2 < 256:
                return p1 * 256 + p2
    elif reply.code == 229:
        match = re.search(rb"\((.)\1\1(\d+)\1\)", text)
        if match:
            return int(match.group(2))
    return None


async def open_data(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await sock.connect((PUBLIC_ADDRESS, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_data(sock: trio.socket.SocketType, timeout: float, limit: int | None = None) -> tuple[bytes, bool]:
    """Read up to ``limit`` bytes (all, if None) or EOF; (data, reached EOF)."""
    chunks, total = [], 0
    with trio.move_on_after(timeout):
        while limit is None or total < limit:
            try:
                data = await sock.recv(1 << 16 if limit is None else min(1 << 16, limit - total))
            except OSError:
                return b"".join(chunks), False
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
            total += len(data)
    return b"".join(chunks), False


async def send_data(sock: trio.socket.SocketType, data: bytes, timeout: float) -> bool:
    view = memoryview(data)
    with trio.move_on_after(timeout):
        try:
            while view:
                sent = await sock.send(view[: 1 << 16])
                view = view[sent:]
        except OSError:
            return False
        return True
    return False


# ---------------------------------------------------------------- one fuzz session


class FuzzSession:
    """One random walk: connect, maybe log in, act, end in one of several ways."""

    def __init__(self, target: Target, rng: random.Random, control_port: int, benign: bool = False) -> None:
        self.t = target
        self.rng = rng
        self.stats = target.stats
        self.port = control_port
        self.ctl: Conn | None = None
        self.clean = True  # every reply to what was sent has been read
        self.binary = False  # TYPE I is known to be in effect
        self.sockets: list[Any] = []
        self.ended_on_purpose = False
        self.benign = benign

    # -- helpers

    def weighted(self, table: dict[str, float]) -> str:
        if self.benign:
            table = {key: weight for key, weight in table.items() if key not in HOSTILE_CHOICES and weight} or table
        return self.rng.choices(list(table), weights=list(table.values()))[0]

    def name(self) -> bytes:
        roll = self.rng.random()
        if self.benign:
            return self.rng.choice(PLAIN_NAMES)
        if roll < 0.3:
            return self.rng.choice(PLAIN_NAMES)
        if roll < 0.9:
            return (
                self.rng.choice(INJECT_PREFIXES)
                + injection_texts(self.rng)
                + self.rng.choice([b"", b"", b" x", b"\x00", b"\xff"])
            )
        # Digits only 0: a random name can never spell a port in any range R.
        return bytes(self.rng.choice(b"abcXYZ0 ,()|=-_.\x80\xc3\xa9\xff") for _ in range(self.rng.randint(1, 40)))

    def nonce(self) -> bytes:
        return b"fzsync%012x" % self.rng.getrandbits(48)

    async def strict(self, line: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send one command and read its one reply; only in a clean state."""
        assert self.ctl is not None
        await self.ensure_clean()
        await self.ctl.command(line)
        reply = await self.ctl.reply(timeout)
        if reply.code in (227, 229) and line.split(b" ")[0].upper() not in (b"PASV", b"EPSV", b"P@SW"):
            self.desync(f"{line[:60]!r} answered {reply.text[:100]!r}")
        if line[:4].upper() == b"TYPE" and reply.code == 200:
            self.binary = line.upper() == b"TYPE I"
        return reply

    def unclean(self) -> None:
        self.clean = False
        self.binary = False

    async def ensure_clean(self) -> None:
        if not self.clean:
            await self.resync()

    async def resync(self, timeout: float = RESYNC_TIMEOUT) -> None:
        """Bring the reply stream back in step: end any partial line, then MKD
        a unique directory and read until its name comes back (all three
        servers echo it in the 257), then remove it."""
        assert self.ctl is not None
        nonce = self.nonce()
        self.stats["resyncs"] += 1
        await self.ctl.send(b"\r\nMKD " + nonce + b"\r\nRMD " + nonce + b"\r\n", commands=3)
        try:
            await self.ctl.until(nonce, timeout)
            # Only RMD's reply may follow the 257. Anything before it answers a
            # command sent before the MKD: ftpfix let a reply overtake it.
            late = []
            while (reply := await self.ctl.reply(timeout)).code not in (250, 550):
                late.append(reply.text[:100])
        except trio.TooSlowError:
            self.stats["resyncs failed (no echo in time)"] += 1
            raise SessionEnd("resync failed") from None
        if late:
            # A backend answers in order, so a late reply is ftpfix's doing;
            # but only one ftpfix made up itself proves it beyond doubt (the
            # empty line above gets "500 Empty command line." from ftpfix).
            self.stats["replies late (after a later command's reply)"] += 1
            if any(mark in text for text in late for mark in FTPFIX_OWN_REPLIES):
                self.out_of_order(f"{late!r} arrived after the reply to a later MKD")
                self.t.fail(
                    "g: replies out of order",
                    f"{late!r} arrived after the reply to a later command",
                    " | ".join(list(self.ctl.transcript)[-12:]),
                )
        self.clean = True

    async def go_home(self) -> None:
        """Back to the login folder (an absolute path for vsftpd, which does not chroot)."""
        await self.strict(b"CWD " + self.t.home)

    async def ensure_binary(self) -> bool:
        if not self.binary:
            reply = await self.strict(b"TYPE I")
            return reply.code == 200
        return True

    # -- the walk

    async def run(self) -> None:
        """One session. Every way out closes every socket it opened.

        A control connection that the walk did not end on purpose (a timeout,
        a failed resync, the end of the run) is reset, not closed: a FIN is a
        half-close that ftpfix must honour by waiting for the backend's
        pending replies, and a backend waiting for a data connection that
        never comes takes its time (vsftpd 60 s). After a reset ftpfix has
        nothing to wait for, so a session it keeps open is its own doing.
        """
        try:
            await self._run()
        except SessionEnd:
            pass
        except PeerClosed:
            self.stats["sessions closed by ftpfix"] += 1
        except trio.TooSlowError:
            self.stats["sessions ended by a read timeout"] += 1
        except OSError as error:
            self.stats[f"sessions ended by {type(error).__name__}"] += 1
        finally:
            for sock in self.sockets:
                sock.close()
            if self.ctl is not None:
                if self.ended_on_purpose:
                    self.ctl.close()
                else:
                    self.ctl.reset()

    async def _run(self) -> None:
        opening = self.weighted(
            {
                "normal": 80,
                "rst-at-once": 4,
                "close-at-once": 2,
                "early-talker": 5,
                "prelogin-hostile": 7,
                "proxy-header": 2,
            }
        )
        try:
            self.ctl = await Conn.open(self.port, self.stats, self.check_line)
        except (OSError, trio.TooSlowError):
            self.stats["control connects failed"] += 1
            await trio.sleep(0.1)
            raise SessionEnd() from None
        self.stats["sessions"] += 1
        ctl = self.ctl
        host, port = ctl.sock.getsockname()[:2]
        self.t.transcripts[f"{host}:{port}"] = ctl.transcript
        while len(self.t.transcripts) > 400:
            del self.t.transcripts[next(iter(self.t.transcripts))]
        ctl.transcript.append(f"# opening: {opening}")
        if opening in ("rst-at-once", "close-at-once"):
            self.ended_on_purpose = True
        if opening == "rst-at-once":
            self.stats["control resets"] += 1
            ctl.reset()
            raise SessionEnd()
        if opening == "close-at-once":
            ctl.close()
            raise SessionEnd()
        if opening == "early-talker":
            # Commands before the greeting, pipelined.
            await ctl.send(b"NOOP\r\nSYST\r\nPASV\r\n", commands=3)
            self.unclean()
        greeting = await ctl.reply()
        if greeting.code != 220:
            self.stats[f"greeting {greeting.code}"] += 1
            raise SessionEnd()
        if opening == "proxy-header":
            await self.act_proxy_header()
        if opening == "prelogin-hostile":
            for _ in range(self.rng.randint(1, 3)):
                await self.rng.choice(
                    [self.act_mutated, self.act_pipelined_hostile, self.act_long_lines, self.act_split]
                )(prelogin=True)
            if self.rng.random() < 0.3:
                await self.end_session()
        await self.login()
        for _ in range(self.rng.randint(3, 30)):
            action = self.weighted(
                {
                    "simple": 14,
                    "echo_name": 12,
                    "passive": 18,
                    "active": 6,
                    "bogus_active": 5,
                    "pipelined": 8,
                    "mutated": 8,
                    "long_lines": 2,
                    "lf_flood": 2,
                    "abort_idle": 2,
                    "split": 3,
                    "stat_listing": 3,
                    "injection": 8,
                    "pasv_storm": 2,
                    "end": 2.5,
                }
            )
            self.ctl.transcript.append(f"# action: {action}")
            if action == "end":
                await self.end_session(abrupt=True)
            await getattr(self, f"act_{action}")()
        await self.end_session()

    async def login(self) -> None:
        assert self.ctl is not None
        user, password = self.t.server.user.encode(), self.t.server.password.encode()
        if self.clean:
            reply = await self.strict(b"USER " + user)
            if reply.code == 331:
                reply = await self.strict(b"PASS " + password, LOGIN_TIMEOUT)
            if reply.code != 230:
                self.stats[f"login refused ({reply.code})"] += 1
                raise SessionEnd()
        else:
            # Blind: whatever came before, the 230 marks the login.
            await self.ctl.send(b"\r\nUSER " + user + b"\r\nPASS " + password + b"\r\n", commands=2)
            try:
                await self.ctl.until(b"230 ", LOGIN_TIMEOUT)
            except trio.TooSlowError:
                self.stats["blind logins failed"] += 1
                raise SessionEnd() from None
            self.unclean()
        self.stats["logins"] += 1

    async def end_session(self, abrupt: bool = False) -> None:
        """End the session on purpose. An orderly end (QUIT, FIN, half-close)
        only when every reply has been read: with a command pending, ftpfix
        rightly keeps the session until the backend answers it."""
        assert self.ctl is not None
        self.ended_on_purpose = True
        if self.clean:
            how = self.weighted(
                {"quit": 0 if abrupt else 50, "close": 20, "rst": 20, "half-close": 15, "rst-after-send": 8}
            )
        else:
            how = self.weighted({"rst": 20, "rst-after-send": 8})
        self.stats[f"ended by {how}"] += 1
        self.ctl.transcript.append(f"# end: {how}")
        if how == "quit":
            await self.ctl.command(b"QUIT")
            if not await self.ctl.eof_within(REPLY_TIMEOUT):
                self.stats["QUIT not followed by a close"] += 1
        elif how == "close":
            self.ctl.close()
        elif how == "rst":
            self.stats["control resets"] += 1
            self.ctl.reset()
        elif how == "rst-after-send":
            # Commands in flight, then a reset: ftpfix is mid-work when it goes.
            await self.ctl.send(b"PASV\r\nNOOP\r\nLIST\r\n", commands=3)
            await trio.sleep(self.rng.choice([0, 0, 0.001, 0.01, 0.05]))
            self.stats["control resets"] += 1
            self.ctl.reset()
        else:
            if self.rng.random() < 0.5:
                await self.ctl.send(b"NOOP\r\nPASV\r\nPWD\r\n", commands=3)
            self.ctl.sock.shutdown(socket.SHUT_WR)
            self.stats["half-closes"] += 1
            if not await self.ctl.eof_within(REPLY_TIMEOUT):
                self.stats["half-close not followed by a close"] += 1
        raise SessionEnd()

    # -- actions

    async def act_proxy_header(self) -> None:
        """Oracle h: a client's PROXY header, in any form, ends its session."""
        assert self.ctl is not None
        rng = self.rng
        source = (".".join(str(rng.randint(1, 254)) for _ in range(4)), rng.randint(1, 65535))
        header = rng.choice(
            [
                format_v1(source, ("127.0.0.1", 21)),
                format_v2(source, ("127.0.0.1", 21)),
                b"PROXY UNKNOWN\r\n",
                V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00]),  # LOCAL
                V2_SIGNATURE + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))),
                b"PROXY " + bytes(rng.choice(b"TCP46 .:0123456789abcdefUNKOW") for _ in range(rng.randint(0, 120))),
            ]
        )
        tail = rng.choice([b"", b"", b"USER anonymous\r\n", b"NOOP\r\nPASV\r\n"])
        self.ctl.transcript.append(f"# proxy header {header[:40]!r}")
        self.ended_on_purpose = True
        await self.ctl.send(header + tail, commands=0)
        if await self.ctl.eof_within(REPLY_TIMEOUT):
            self.stats["PROXY headers refused"] += 1
        else:
            self.t.fail("h", "a client's PROXY header did not end its session", repr(header[:60]))
        raise SessionEnd()

    async def act_simple(self) -> None:
        line = self.rng.choice(SIMPLE_COMMANDS)
        if line == b"ALLO 100" and self.rng.random() < 0.05:
            line = b"EPSV ALL"  # rare: refuses PASV/PORT for the rest of the session
        reply = await self.strict(line)
        if line == b"CDUP" and reply.code is not None and reply.code < 300:
            await self.go_home()

    async def act_echo_name(self) -> None:
        verb = self.rng.choice(ECHO_VERBS)
        name = self.name()
        if verb in (b"MKD", b"XMKD"):
            name = self.rng.choice(PLAIN_NAMES + ([] if self.benign else [injection_texts(self.rng)]))
        line = verb + b" " + name
        self.stats["names with reply-looking text"] += b"227" in name or b"229" in name or b"213" in name
        if re.search(rb"[\x00-\x1f]", name):
            await self.ensure_clean()
            await self.ctl.command(line)  # type: ignore[union-attr]
            self.unclean()
            return
        reply = await self.strict(line)
        if verb == b"RETR" and reply.code is not None and reply.code < 200:
            self.unclean()  # no data connection was set up: let the server give up on its own
        if verb == b"CWD" and reply.code == 250:
            await self.go_home()
        if verb == b"RNFR" and reply.code == 350 and self.rng.random() < 0.5:
            await self.strict(b"RNTO " + name + b"-renamed")

    async def act_stat_listing(self) -> None:
        name = injection_texts(self.rng)
        await self.strict(b"MKD " + name)
        await self.strict(
            self.rng.choice([b"STAT .", b"STAT -1", b"STAT -1 .", b"STAT -la", b"STAT -la .", b"STAT " + name])
        )

    async def act_injection(self) -> None:
        """Reply-looking names next to PASVs, in one send."""
        await self.ensure_clean()
        rng = self.rng
        # A unique head before the separator, so MKD succeeds (and echoes) even
        # where the server cuts the name at a NUL; it is removed at the end.
        head = b"fz%05x" % rng.getrandbits(20)
        separator = self.weighted(
            {"": 15, "\x00": 30, "\r": 15, "\n": 10, " ": 10, "\t": 5, "\r\n": 5, "\xff": 5, "/": 5}
        ).encode("latin-1")
        name = head + separator + injection_texts(rng)
        verb = rng.choice(
            [b"MKD"] * 6 + [b"XMKD", b"SIZE", b"CWD", b"DELE", b"RETR", b"SITE", b"HELP", b"STAT", b"MDTM", b"RNFR"]
        )
        passive = rng.choice([b"PASV", b"P@SW", b"EPSV", b"pasv"])
        shape = self.weighted({"name-pasv": 50, "pasv-name": 10, "twice": 15, "bare": 10, "stat": 15})
        if shape == "name-pasv":
            batch = [verb + b" " + name, passive]
        elif shape == "pasv-name":
            batch = [passive, verb + b" " + name]
        elif shape == "twice":
            batch = [verb + b" " + name, passive, verb + b" " + name, passive]
        elif shape == "bare":
            batch = [injection_texts(rng), passive]  # the reply text as the command itself
        else:
            batch = [b"STAT -1", passive, b"STAT .", passive]
        if verb in (b"MKD", b"XMKD"):
            batch.append(b"RMD " + name)
            batch.append(b"RMD " + head)
        ending = self.rng.choice([b"\r\n", b"\r\n", b"\n"])
        await self.ctl.send(ending.join(batch) + ending, commands=len(batch))  # type: ignore[union-attr]
        self.stats["injection batches"] += 1
        self.unclean()

    async def act_pipelined(self) -> None:
        await self.ensure_clean()
        batch = [self.rng.choice(PIPELINE_ITEMS) for _ in range(self.rng.randint(2, 8))]
        if self.rng.random() < 0.3:
            batch.insert(self.rng.randrange(len(batch) + 1), b"MKD " + injection_texts(self.rng))
        data = b"".join(item + self.rng.choice([b"\r\n", b"\r\n", b"\r\n", b"\n"]) for item in batch)
        await self.send_in_pieces(data, len(batch))
        self.stats["pipelined batches"] += 1
        self.unclean()

    async def act_pipelined_hostile(self, prelogin: bool = False) -> None:
        batch = [
            self.rng.choice([b"PASV", b"EPSV", b"P@SW", b"NOOP", b"PORT 127,0,0,1,4,1", b"SYST", b"LIST"])
            for _ in range(self.rng.randint(2, 6))
        ]
        await self.ctl.send(b"\r\n".join(batch) + b"\r\n", commands=len(batch))  # type: ignore[union-attr]
        self.stats["pipelined batches"] += 1
        self.unclean()

    async def send_in_pieces(self, data: bytes, commands: int) -> None:
        """Send ``data`` whole, or split at random points with short pauses."""
        assert self.ctl is not None
        if self.rng.random() < 0.7 or len(data) < 2:
            await self.ctl.send(data, commands=commands)
            return
        cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randint(1, 4))))
        start = 0
        for cut in [*cuts, len(data)]:
            await self.ctl.send(data[start:cut])
            start = cut
            await trio.sleep(self.rng.choice([0, 0.001, 0.02]))
        self.stats["commands sent"] += commands

    def mutate(self, line: bytes) -> bytes:
        rng = self.rng
        data = bytearray(line)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(11)
            pos = rng.randint(0, len(data))
            if op == 0:
                data[pos:pos] = bytes([rng.choice(b"\x01\x07\x08\x0b\x0c\x1b\x7f")])
            elif op == 1:
                data[pos:pos] = b"\x00"
            elif op == 2:
                data[pos:pos] = b"\r"
            elif op == 3:
                data[pos:pos] = rng.choice(
                    [b"\xff", b"\xff\xf4", b"\xff\xf2", b"\xff\xff", b"\xff\xfb\x01", b"\xff\xf4\xff\xf2"]
                )
            elif op == 4:
                data = data.replace(b" ", rng.choice([b"\t", b"  ", b"\x0b", b" \t"]), 1)
            elif op == 5:
                verb, _, rest = bytes(data).partition(b" ")
                data = bytearray(
                    bytes(
                        rng.choice(
                            [
                                b"P@SW",
                                b"p@sw",
                                b"12#",
                                b"@@@@",
                                b"!",
                                b"\xc3\xa9",
                                b"227",
                                b"213",
                                verb.lower(),
                                verb.swapcase(),
                            ]
                        )
                    )
                    + (b" " + rest if rest else b"")
                )
            elif op == 6:
                data += rng.choice([b"\xc3\x28", b"\x80\xff", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
            elif op == 7:
                data[pos:pos] = rng.choice([b"\t", b"\x00\x00", b"\r\r"])
            elif op == 8:
                data = bytearray(b" ") + data
            elif op == 9:
                data += b" " + b"A" * rng.choice([100, 1000, 4000, 4100])
            else:
                data = data + b"\r\n" + data  # a duplicate
        ending = self.weighted({"\r\n": 60, "\n": 20, "\r": 10, "": 5, "\r\r\n": 5}).encode()
        return bytes(data) + ending

    async def act_mutated(self, prelogin: bool = False) -> None:
        if not prelogin:
            await self.ensure_clean()
        count = self.rng.randint(1, 4)
        data = b"".join(self.mutate(self.rng.choice(MUTATION_BASE)) for _ in range(count))
        await self.send_in_pieces(data, count)
        self.stats["mutated lines"] += count
        self.unclean()

    async def act_long_lines(self, prelogin: bool = False) -> None:
        count = self.rng.choice([1, 1, 2, 3, 4])
        for _ in range(count):
            size = self.rng.choice([4094, 4095, 4096, 4097, 5000, 9000, 70000])
            line = self.rng.choice([b"NOOP ", b"MKD ", b"PASV ", b"SIZE 227 Entering Passive Mode (127,0,0,1,8,174) "])
            line += b"x" * (size - len(line))
            await self.ctl.send(line + self.rng.choice([b"\r\n", b"\n"]), commands=1)  # type: ignore[union-attr]
        self.stats["long lines"] += count
        self.unclean()

    async def act_lf_flood(self) -> None:
        size = self.rng.randint(500, 6000)
        await self.ctl.send(self.rng.choice([b"\n", b"\r\n", b"\r"]) * size)  # type: ignore[union-attr]
        self.stats["bare-LF floods"] += 1
        self.unclean()
        await self.resync(RESYNC_TIMEOUT + size / 500)

    async def act_abort_idle(self) -> None:
        await self.ensure_clean()
        variant = self.rng.choice(list(ABOR_VARIANTS))
        for data, flags in ABOR_VARIANTS[variant]:
            await self.ctl.send(data, flags)  # type: ignore[union-attr]
        self.stats["commands sent"] += 1
        self.stats["ABOR without a transfer"] += 1
        self.unclean()

    async def act_split(self, prelogin: bool = False) -> None:
        line = self.rng.choice([b"NOOP", b"PWD", b"SYST", b"TYPE I", b"PASV", b"EPSV", b"P@SW", b"FEAT"]) + b"\r\n"
        if not prelogin:
            await self.ensure_clean()
        assert self.ctl is not None
        for index in range(len(line)):
            await self.ctl.send(line[index : index + 1])
            if self.rng.random() < 0.3:
                await trio.sleep(0.005)
        self.stats["commands sent"] += 1
        self.stats["commands sent a byte at a time"] += 1
        if prelogin:
            self.unclean()
            return
        await self.ctl.reply()

    async def act_pasv_storm(self) -> None:
        await self.ensure_clean()
        count = self.rng.randint(5, 30)
        batch = b"".join(self.rng.choice([b"PASV\r\n", b"EPSV\r\n", b"P@SW\r\n"]) for _ in range(count))
        await self.ctl.send(batch, commands=count)  # type: ignore[union-attr]
        self.stats["PASV storms"] += 1
        self.unclean()

    async def act_bogus_active(self) -> None:
        assert self.ctl is not None
        closed = legacy.free_port()  # nothing listens there
        p1, p2 = divmod(closed, 256)
        line = self.rng.choice(
            [
                b"PORT 127,0,0,1,0,21",
                b"PORT 127,0,0,1,3,255",
                b"PORT 8,8,8,8,4,1",
                b"PORT 10,1,2,3,%d,%d" % (p1, p2),
                b"PORT 192,168,1,1,%d,%d" % (p1, p2),
                b"PORT 127,0,0,1,%d,%d" % (p1, p2),
                b"PORT 300,1,1,1,1,1",
                b"PORT 127,0,0,1,256,1",
                b"PORT 1,2,3",
                b"PORT a,b,c,d,e,f",
                b"PORT -1,0,0,1,4,1",
                b"PORT",
                b"PORT 127,0,0,1,4,1,7",
                b"PORT 0,0,0,0,4,1",
                b"PORT 255,255,255,255,4,1",
                b"EPRT |1|8.8.8.8|2000|",
                b"EPRT |1|127.0.0.1|21|",
                b"EPRT |2|::1|%d|" % closed,
                b"EPRT |3|x|1|",
                b"EPRT |1|127.0.0.1|%d|" % closed,
                b"EPRT garbage",
                b"EPRT |1|127.0.0.1|70000|",
                b"EPRT ||||",
                b"EPRT !1!127.0.0.1!%d!" % closed,
            ]
        )
        self.stats["bogus PORT/EPRT"] += 1
        reply = await self.strict(line)
        if reply.code == 200 and self.rng.random() < 0.7:
            # ftpfix agreed: make the backend use it. Whatever is dialed refuses.
            await self.ctl.command(self.rng.choice([b"LIST", b"NLST", b"RETR small.txt"]))
            self.unclean()

    async def act_passive(self) -> None:
        await self.transfer(passive=True)

    async def act_active(self) -> None:
        await self.transfer(passive=False)

    # -- transfers

    async def transfer(self, passive: bool) -> None:
        assert self.ctl is not None
        rng = self.rng
        kind = self.weighted({"RETR": 45, "RETR-missing": 8, "STOR": 17, "LIST": 15, "NLST": 10, "MLSD": 5})
        mode = self.weighted(
            {
                "complete": 55,
                "reset": 12,
                "stall": 8,
                "never": 8 if passive else 4,
                "abort": 10,
                "close-early": 3,
                "control-reset": 2,
                "control-close": 2,
            }
        )
        verifiable = False
        payload = b""
        if kind == "RETR":
            name = rng.choice(list(FILES))
            verifiable = await self.ensure_binary()
            command = b"RETR " + name.encode()
        elif kind == "RETR-missing":
            name = ""
            command = b"RETR " + self.rng.choice(INJECT_PREFIXES[:3]) + injection_texts(rng)
        elif kind == "STOR":
            name = f"up-{rng.getrandbits(48):012x}.bin"
            payload = rng.randbytes(rng.choice([0, 1, 1000, 65536, 300_000, 1 << 20]))
            verifiable = await self.ensure_binary()
            command = b"STOR " + name.encode()
        else:
            name = ""
            command = kind.encode() + rng.choice(
                [b"", b"", b" .", b" -la", b"" if self.benign else b" " + injection_texts(rng)]
            )
        await self.ensure_clean()
        self.stats["transfers started"] += 1
        self.ctl.transcript.append(f"# transfer: {'passive' if passive else 'active'} {kind} mode={mode}")
        listener = data = None
        try:
            if passive:
                verb = rng.choice([b"PASV", b"PASV", b"EPSV", b"P@SW", b"pasv", b"p@sw", b"EPSV 1"])
                pipelined = rng.random() < 0.2 and mode != "never"
                await self.ctl.send(verb + b"\r\n" + (command + b"\r\n" if pipelined else b""), commands=1 + pipelined)
                reply = await self.ctl.reply()
                port = parse_passive(reply)
                if port is None:
                    self.stats[f"passive refused ({reply.code})"] += 1
                    if reply.code is None or 100 <= reply.code < 400:
                        self.desync(f"{verb.decode()} answered {reply.text[:100]!r}")
                    if pipelined:
                        await self.ctl.reply()  # the transfer command's
                    return
                self.stats["passive replies"] += 1
                if not FTPFIX_RANGES[self.t.kind][0] <= port <= FTPFIX_RANGES[self.t.kind][1]:
                    self.stats["227/229 with a port outside ftpfix's range"] += 1
                if mode == "never":
                    self.stats["data connections never opened"] += 1
                    if rng.random() < 0.6:
                        return  # the mapping stays pending; a later PASV replaces it
                    await self.ctl.command(command)
                    self.unclean()
                    await trio.sleep(rng.choice([0, 0.05, 0.5]))
                    await self.end_session(abrupt=True)
                try:
                    data = await open_data(port)
                    self.sockets.append(data)
                except (OSError, trio.TooSlowError):
                    self.stats["data connects failed"] += 1
                    if pipelined:
                        self.unclean()
                    return
                if not pipelined:
                    await self.ctl.command(command)
                first = await self.ctl.reply(DATA_TIMEOUT)
            else:
                listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self.sockets.append(listener)
                await listener.bind((PUBLIC_ADDRESS, 0))
                listener.listen(2)
                lport = listener.getsockname()[1]
                if rng.random() < 0.5:
                    line = b"PORT 127,0,0,1,%d,%d" % divmod(lport, 256)
                else:
                    line = b"EPRT |1|127.0.0.1|%d|" % lport
                reply = await self.strict(line)
                if reply.code != 200:
                    self.stats[f"active refused ({reply.code})"] += 1
                    if reply.code is None or 100 <= reply.code < 400:
                        self.desync(f"{line.decode()} answered {reply.text[:100]!r}")
                    return
                await self.ctl.command(command)
                if mode == "never":
                    self.stats["data connections never opened"] += 1
                    listener.close()  # ftpfix's dial is refused
                    self.unclean()
                    return
                first = await self.ctl.reply(DATA_TIMEOUT)
                if first.code is not None and first.code < 200:
                    with trio.move_on_after(DATA_TIMEOUT):
                        data, _ = await listener.accept()
                        self.sockets.append(data)
                    if data is None:
                        self.stats["active data connection never came"] += 1
                        self.unclean()
                        return
            if first.code is None or first.code >= 200:
                self.stats[f"transfer refused ({first.code})"] += 1
                if first.code is None or 200 <= first.code < 400:
                    self.desync(f"{command[:60].decode('latin-1')} answered {first.text[:100]!r}")
                return
            await self.run_transfer(data, mode, kind, name, command, payload, verifiable)
        finally:
            for sock in (data, listener):
                if sock is not None:
                    sock.close()

    async def run_transfer(
        self, data: Any, mode: str, kind: str, name: str, command: bytes, payload: bytes, verifiable: bool
    ) -> None:
        assert self.ctl is not None
        rng = self.rng
        upload = kind == "STOR"
        if mode == "stall":
            self.stats["stalled data connections"] += 1
            await trio.sleep(rng.uniform(0.5, 4))
            mode = "complete"
        if mode == "complete":
            if upload:
                sent = await send_data(data, payload, DATA_TIMEOUT)
                try:
                    data.shutdown(socket.SHUT_WR)
                except OSError:
                    sent = False
                await read_data(data, DATA_TIMEOUT)
                received, eof = b"", sent
            else:
                received, eof = await read_data(data, DATA_TIMEOUT)
            data.close()
            final = await self.ctl.reply(DATA_TIMEOUT)
            if final.code is None or final.code >= 300 or not eof:
                self.stats[f"transfers failed ({final.code})"] += 1
                return
            self.stats["transfers completed"] += 1
            if not verifiable:
                return
            if upload:
                size = await self.strict(b"SIZE " + name.encode())
                got = size.text[4:].strip() if size.code == 213 else b""
                if got.isdigit() and int(got) == len(payload):
                    self.stats["transfers verified"] += 1
                elif got.isdigit():
                    self.corrupt(f"STOR {name}: sent {len(payload)} bytes, 226, then SIZE says {int(got)}", final)
                await self.strict(b"DELE " + name.encode())
            else:
                digest = hashlib.sha256(received).hexdigest()
                if digest == self.t.digests[name]:
                    self.stats["transfers verified"] += 1
                else:
                    self.corrupt(
                        f"RETR {name} (TYPE I): got {len(received)} bytes of {FILES[name]}, sha256 differs, "
                        f"final reply {final.text[:80]!r}",
                        final,
                    )
            return
        self.unclean()
        if mode == "reset":
            if upload:
                await send_data(data, payload[: rng.randint(0, len(payload))], 2)
            else:
                await read_data(data, 2, rng.choice([0, 1, 4096, 100_000]))
            _rst(data)
            self.stats["data connections reset"] += 1
        elif mode == "close-early":
            if not upload:
                await read_data(data, 2, rng.choice([0, 1, 4096]))
            data.close()
            self.stats["data connections closed early"] += 1
        elif mode == "abort":
            if not upload:
                await read_data(data, 2, rng.choice([0, 1, 4096, 100_000]))
            else:
                await send_data(data, payload[: len(payload) // 2], 2)
            variant = rng.choice(list(ABOR_VARIANTS))
            for chunk, flags in ABOR_VARIANTS[variant]:
                await self.ctl.send(chunk, flags)
            self.stats["commands sent"] += 1
            self.stats[f"ABOR during a transfer ({variant})"] += 1
            if rng.random() < 0.5:
                data.close()
            else:
                await read_data(data, 3)
        elif mode in ("control-reset", "control-close"):
            if not upload:
                await read_data(data, 2, rng.choice([0, 4096]))
            if mode == "control-reset":
                self.stats["control resets"] += 1
                self.ctl.reset()
            else:
                self.ctl.close()
            self.stats[f"{mode} during a transfer"] += 1
            self.ended_on_purpose = True
            raise SessionEnd()

    def check_line(self, line: bytes, ctl: Conn) -> None:
        """Oracle c2: no line the client reads may name a port in the backend's
        real passive range R. The fuzzer never sends such a number itself, so
        one can only be the backend's own 227 or 229, relayed unrewritten."""
        if not (b"," in line or b"|" in line):
            return
        first, last = self.t.backend_range
        ports = [
            int(a) * 256 + int(b)
            for a, b in re.findall(rb"\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*(\d+)\s*,\s*(\d+)", line)
        ]
        ports += [int(p) for p in re.findall(rb"\(([^\d\s])\1\1(\d+)\1\)", line) for p in [p[1]]]
        if any(first <= port <= last for port in ports):
            self.stats["backend passive replies leaked"] += 1
            self.t.fail(
                "c2: backend's passive reply reached the client unrewritten",
                f"a port in {first}-{last} reached the client",
                line.decode("latin-1")[:200],
            )
            self.t.leaks.append(list(ctl.transcript))

    def out_of_order(self, detail: str) -> None:
        self.stats["replies out of order"] += 1
        assert self.ctl is not None
        self.t.misordered.append({"detail": detail, "transcript": list(self.ctl.transcript)})

    def desync(self, detail: str) -> None:
        """A reply that cannot answer the command just sent in a clean state."""
        self.stats["replies out of step"] += 1
        assert self.ctl is not None
        self.t.desyncs.append({"detail": detail, "transcript": list(self.ctl.transcript)})

    def corrupt(self, detail: str, final: Reply) -> None:
        self.stats["transfers corrupted"] += 1
        self.t.fail("f: corrupt transfer", detail, final.text.decode("latin-1")[:200])


# ---------------------------------------------------------------- the run


class Fuzzer:
    def __init__(
        self,
        *,
        seconds: float,
        kinds: list[str],
        seed: int,
        concurrency: int,
        workdir: Path,
        ftpfix_src: Path | None = None,
        benign: bool = False,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.seconds = seconds
        self.benign = benign
        self.kinds = kinds
        self.seed = seed
        self.concurrency = concurrency
        self.workdir = workdir
        self.ftpfix_src = ftpfix_src
        self.echo = echo
        self.targets: list[Target] = []
        self.fuzzer_errors: list[str] = []
        self.printed_crashes: Counter[str] = Counter()
        self.started = time.monotonic()

    # -- processes

    def start_backends(self) -> None:
        for kind in self.kinds:
            server_dir = self.workdir / kind
            server = legacy.start(kind, server_dir, passive_ports=BACKEND_RANGES[kind])
            if kind == "pure-ftpd":
                cheap_pure_ftpd_login(server)
            digests = {}
            for name, size in FILES.items():
                data = random.Random(f"{self.seed}/{name}").randbytes(size)
                legacy.put_file(server, name, data)
                digests[name] = hashlib.sha256(data).hexdigest()
            healthy = os.urandom(HEALTHY_SIZE)
            legacy.put_file(server, HEALTHY_FILE, healthy)
            digests[HEALTHY_FILE] = hashlib.sha256(healthy).hexdigest()
            self.targets.append(
                Target(kind, server, BACKEND_RANGES[kind], FTPFIX_RANGES[kind], server_dir, digests, self.ftpfix_src)
            )

    def start_ftpfix(self, target: Target) -> None:
        target.incarnation += 1
        first, last = target.ftpfix_range
        config = config_text(
            listen=("127.0.0.1", 0),
            backend=(target.server.host, target.server.port),
            public_address=PUBLIC_ADDRESS,
            ports=f"{first}-{last}",
            extra="[limits]\nmax_sessions = 2000\nmax_sessions_per_ip = 2000\n",
        ).replace('level = "debug"', 'level = "info"')
        wrapper: list[str] = []
        if target.ftpfix_src is not None:
            # Run another copy of ftpfix (``python -m`` imports from the working directory).
            wrapper = ["sh", "-c", 'cd "$0" && exec "$@"', str(target.ftpfix_src)]
        target.proxy = start_ftpfix(target.workdir / f"ftpfix-{target.incarnation}", config, wrapper=wrapper)
        target.log_offset, target.log_partial, target.open_sessions = 0, b"", 0
        target.live.clear()

    def stop_all(self) -> None:
        for target in self.targets:
            if target.proxy is not None and target.proxy.process.poll() is None:
                # Its verdict is in: no graceful shutdown (that waits out open sessions).
                target.proxy.process.kill()
                target.proxy.process.wait()
            target.server.stop()
        kill_leftovers(self.workdir)

    # -- the oracles that read the log and the process

    def poll_log(self, target: Target) -> None:
        proxy = target.proxy
        if proxy is None:
            return
        try:
            with proxy.log.open("rb") as file:
                file.seek(target.log_offset)
                chunk = file.read()
        except OSError:
            return
        target.log_offset += len(chunk)
        lines = (target.log_partial + chunk).split(b"\n")
        target.log_partial = lines.pop()
        for raw in lines:
            text = raw.decode("utf-8", "replace")
            try:
                event = json.loads(text) if text.startswith("{") else None
            except ValueError:
                event = None
            if not isinstance(event, dict):
                if text.strip():
                    target.raw_tail = (target.raw_tail + [text])[-40:]
                continue
            name = str(event.get("event", ""))
            target.stats[f"log: {event.get('level', '?')}"] += 1
            if name == "session opened":
                target.open_sessions += 1
                target.live[event.get("session")] = str(event.get("client"))  # type: ignore[index]
            elif name == "session closed":
                target.open_sessions -= 1
                target.live.pop(event.get("session"), None)  # type: ignore[arg-type]
            elif name == "passive mapping":
                target.stats["passive mappings logged"] += 1
                _, _, port_text = str(event.get("backend", "")).rpartition(":")
                first, last = target.backend_range
                if not (port_text.isdigit() and first <= int(port_text) <= last):
                    target.stats["bad mappings"] += 1
                    planted = port_text.isdigit() and int(port_text) in PLANTED_PORTS
                    target.stats["bad mappings to a port the fuzzer planted in a name"] += planted
                    why = (
                        "a port the fuzzer planted in a file name or command"
                        if planted
                        else "not a port the fuzzer planted"
                    )
                    target.fail(
                        "c: passive mapping outside the backend's range",
                        f"backend port {port_text} not in {first}-{last} ({why})",
                        text,
                    )
                    transcript = target.transcripts.get(str(event.get("client")))
                    if transcript is not None and len(target.bad_mapping_transcripts) < 5:
                        target.bad_mapping_transcripts.append({"event": text, "client_transcript": list(transcript)})
            if name.startswith(CRASH_PREFIXES):
                target.stats["crashes logged"] += 1
                digest = crash_digest(event)
                target.crash_kinds[digest] += 1
                target.fail("b: crash logged", digest, text)
                if self.printed_crashes[target.kind] < 3:
                    self.printed_crashes[target.kind] += 1
                    self.echo(f"[{target.kind}] CRASH: {digest}\n    {text[:1500]}")

    def check_process(self, target: Target) -> bool:
        """True if ftpfix is running; records its exit once."""
        proxy = target.proxy
        if proxy is None or not target.up:
            return target.up
        status = proxy.process.poll()
        if status is None:
            return True
        target.up = False
        self.poll_log(target)
        tail = target.raw_tail[-12:]
        meaningful = [line.strip(" |+-") for line in tail if line.strip(" |+-")]
        errors = [
            line
            for line in meaningful
            if re.match(r"^[\w.]+(Error|Exception)\b", line) and not line.startswith("ExceptionGroup")
        ]
        last = (errors or meaningful or ["(no output)"])[-1]
        target.exits.append({"incarnation": target.incarnation, "status": status, "output_tail": tail})
        target.stats["ftpfix exits"] += 1
        target.fail("a: ftpfix exited", f"exit status {status}", last)
        if target.stats["ftpfix exits"] <= 2:
            self.echo(f"[{target.kind}] FTPFIX EXITED with status {status}; last output:\n    " + "\n    ".join(tail))
        return False

    async def restart(self, target: Target) -> None:
        """Start a new ftpfix after an exit (the caller has set ``restarting``)."""
        if target.incarnation > MAX_RESTARTS:
            target.gave_up = True
            target.restarting = False
            self.echo(f"[{target.kind}] ftpfix exited {target.incarnation} times; no longer fuzzing it")
            return
        target.raw_tail = []
        self.echo(f"[{target.kind}] restarting ftpfix ({target.incarnation} exits so far)")
        try:
            await trio.to_thread.run_sync(self.start_ftpfix, target)
            target.up = True
            # The baseline stays the first process's, taken after its warm-up at
            # rest: this one starts in the middle of the run, with sessions at
            # once, and the same config should come back to the same figures.
            target.baseline_note = (
                f"the first ftpfix's, after its warm-up (ftpfix was restarted {target.incarnation - 1} times)"
            )
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            target.gave_up = True
            target.fail("a: ftpfix exited", f"could not restart ftpfix: {error}", "")
        finally:
            target.restarting = False

    async def monitor(self, stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            while not stop.is_set():
                for target in self.targets:
                    self.poll_log(target)
                    if target.up:
                        self.check_process(target)
                    if not target.up and not target.restarting and not target.gave_up and target.proxy is not None:
                        target.restarting = True
                        nursery.start_soon(self.restart, target)
                with trio.move_on_after(0.3):
                    await stop.wait()

    # -- warm-up, healthy client

    def healthy_client(self, target: Target) -> dict[str, Any]:
        started = time.monotonic()
        assert target.proxy is not None
        try:
            ftp = ftplib.FTP(timeout=30, encoding="latin-1")
            ftp.trust_server_pasv_ipv4_address = True
            ftp.connect(target.proxy.host, target.proxy.port)
            ftp.login(target.server.user, target.server.password)
            digest = hashlib.sha256()
            ftp.retrbinary(f"RETR {HEALTHY_FILE}", digest.update, blocksize=1 << 16)
            ftp.quit()
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            return {
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
                "seconds": round(time.monotonic() - started, 2),
            }
        ok = digest.hexdigest() == target.digests[HEALTHY_FILE]
        return {"ok": ok, "error": "" if ok else "sha256 mismatch", "seconds": round(time.monotonic() - started, 2)}

    async def warm_up(self, target: Target, sessions: int = 3) -> None:
        """Healthy traffic before the baseline: RETR, STOR and LIST, some at once."""

        def one(index: int) -> None:
            try:
                transfer(index)
            except Exception as error:  # noqa: BLE001 - counted; the oracles judge
                target.stats["warm-up sessions failed"] += 1
                self.echo(f"[{target.kind}] warm-up session failed: {type(error).__name__}: {error}")

        def transfer(index: int) -> None:
            assert target.proxy is not None
            ftp = ftplib.FTP(timeout=LOGIN_TIMEOUT, encoding="latin-1")
            ftp.trust_server_pasv_ipv4_address = True
            ftp.connect(target.proxy.host, target.proxy.port)
            ftp.login(target.server.user, target.server.password)
            ftp.voidcmd("TYPE I")
            ftp.retrbinary("RETR m1.bin", lambda _: None)
            ftp.nlst()
            ftp.set_pasv(index % 2 == 0)
            ftp.storbinary(f"STOR warm-{target.incarnation}-{index}.bin", io.BytesIO(os.urandom(300_000)))
            ftp.delete(f"warm-{target.incarnation}-{index}.bin")
            ftp.quit()

        async with trio.open_nursery() as nursery:
            for index in range(sessions):
                nursery.start_soon(trio.to_thread.run_sync, one, index)
        await self.wait_sessions_closed(target, 10)
        await trio.sleep(1)

    async def wait_sessions_closed(self, target: Target, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while True:
                self.poll_log(target)
                if target.open_sessions <= 0:
                    return True
                await trio.sleep(0.2)
        return False

    # -- fuzzing

    async def worker(self, target: Target, number: int, deadline: float) -> None:
        index = 0
        while trio.current_time() < deadline and not target.gave_up:
            if not target.up or target.proxy is None:
                await trio.sleep(0.1)
                continue
            rng = random.Random(f"{self.seed}/{target.kind}/{number}/{index}")
            index += 1
            session = FuzzSession(target, rng, target.proxy.port, self.benign)
            with trio.move_on_after(SESSION_LIMIT) as limit:
                try:
                    await session.run()
                except Exception:  # noqa: BLE001 - a bug in the fuzzer itself: report it loudly
                    detail = traceback.format_exc()
                    target.stats["fuzzer errors"] += 1
                    if len(self.fuzzer_errors) < 5:
                        self.fuzzer_errors.append(detail)
                        self.echo(f"[{target.kind}] FUZZER ERROR (a bug in the fuzzer, not ftpfix):\n{detail}")
            if limit.cancelled_caught:
                target.stats["sessions cut at the time limit"] += 1

    async def main(self) -> None:
        # A last guard: whatever happens, the run ends.
        with trio.move_on_after(self.seconds + 150) as guard:
            await self._main()
        if guard.cancelled_caught:
            self.fuzzer_errors.append(f"the run overran {self.seconds + 150:g} s and was cut off")

    async def _main(self) -> None:
        for target in self.targets:
            await trio.to_thread.run_sync(self.start_ftpfix, target)
            target.up = True
        stop = trio.Event()
        async with trio.open_nursery() as outer:
            outer.start_soon(self.monitor, stop)
            async with trio.open_nursery() as nursery:
                for target in self.targets:
                    nursery.start_soon(self.warm_up, target)
            for target in self.targets:
                if target.up:
                    target.fds_before, target.rss_before = open_fds(target.pid), rss_kib(target.pid)  # type: ignore[arg-type]
            self.echo(
                f"fuzzing {', '.join(self.kinds)} for {self.seconds:g} s, {self.concurrency} sessions at a "
                f"time each, seed {self.seed} (set-up took {time.monotonic() - self.started:.1f} s)"
            )
            deadline = trio.current_time() + self.seconds
            async with trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = deadline + 1  # sessions in flight are cut off
                for target in self.targets:
                    for number in range(self.concurrency):
                        nursery.start_soon(self.worker, target, number, deadline)
            # Every fuzzer socket is closed now. ftpfix must close every session.
            self.echo(f"fuzzing done after {time.monotonic() - self.started:.1f} s; settling")
            await trio.sleep(0.5)
            async with trio.open_nursery() as nursery:
                for target in self.targets:
                    nursery.start_soon(self.settle_and_check, target)
            stop.set()

    async def settle_and_check(self, target: Target) -> None:
        """Oracles d and e for one target, once the fuzzing is over."""
        if self.check_process(target):
            if not await self.wait_sessions_closed(target, CLOSE_WAIT):
                # Reported with the fd oracle: sessions that outlive their
                # client hold descriptors.
                stuck = [target.transcripts.get(client) for client in target.live.values()]
                target.stuck_transcripts = [list(t) for t in stuck if t is not None]
                target.stuck_sessions = target.open_sessions
            await trio.sleep(SETTLE_SECONDS)
            self.poll_log(target)
        if self.check_process(target):
            pid = target.pid
            assert pid is not None
            target.fds_after, target.rss_after = open_fds(pid), rss_kib(pid)
            if target.fds_before is not None and target.fds_after > target.fds_before + FD_SLACK:
                example = f"fds: {', '.join(sorted(_fd_kinds(pid)))}; TCP: {_sockets_of(pid)}"
                if target.stuck_sessions:
                    example += (
                        f"; {target.stuck_sessions} sessions still open {CLOSE_WAIT:g} s"
                        " after the fuzzer closed all its connections"
                    )
                    if target.stuck_transcripts:
                        example += "; the last steps of one: " + " | ".join(target.stuck_transcripts[0][-8:])
                target.fail(
                    "d: resources not released",
                    f"open fds {target.fds_before} -> {target.fds_after} (more than +{FD_SLACK})",
                    example,
                )
            if target.rss_before is not None and target.rss_after > target.rss_before + RSS_SLACK_KIB:
                target.fail(
                    "d: resources not released",
                    f"RSS {target.rss_before} -> {target.rss_after} KiB (more than +{RSS_SLACK_KIB} KiB)",
                )
        # An ftpfix that exited is restarted by the monitor: the healthy client needs one.
        while target.restarting or (not target.up and not target.gave_up and target.proxy is not None):
            await trio.sleep(0.1)
        if target.gave_up or target.proxy is None or not target.up:
            target.healthy = {"ok": False, "error": "ftpfix is not running"}
        else:
            target.healthy = await trio.to_thread.run_sync(self.healthy_client, target)
        if not target.healthy.get("ok"):
            target.fail("e: healthy client failed", target.healthy.get("error", ""))
        self.poll_log(target)
        self.check_process(target)

    def report(self, elapsed: float) -> dict[str, Any]:
        servers = {}
        for target in self.targets:
            stats = target.stats
            servers[target.kind] = {
                "backend_passive_range": "{}-{}".format(*target.backend_range),
                "ftpfix_passive_range": "{}-{}".format(*target.ftpfix_range),
                "sessions": stats["sessions"],
                "commands_sent": stats["commands sent"],
                "transfers_started": stats["transfers started"],
                "transfers_completed": stats["transfers completed"],
                "transfers_verified": stats["transfers verified"],
                "transfers_corrupted": stats["transfers corrupted"],
                "crashes": stats["crashes logged"],
                "crash_kinds": dict(target.crash_kinds.most_common()),
                "bad_mappings": stats["bad mappings"],
                "passive_mappings": stats["passive mappings logged"],
                "bad_mapping_examples": target.bad_mapping_transcripts[:3],
                "ftpfix_exits": [
                    {"status": e["status"], "incarnation": e["incarnation"], "last_output": e["output_tail"][-3:]}
                    for e in target.exits
                ],
                "ftpfix_restarts": max(target.incarnation - 1, 0),
                "fds_before": target.fds_before,
                "fds_after": target.fds_after,
                "rss_kib_before": target.rss_before,
                "rss_kib_after": target.rss_after,
                "baseline": target.baseline_note,
                "healthy_client": target.healthy,
                "exit_status": None
                if target.proxy is None or target.proxy.process.poll() is None
                else target.proxy.process.returncode,
                "running_at_end": target.proxy is not None and target.proxy.process.poll() is None,
                "replies_out_of_step": stats["replies out of step"],
                "out_of_step_examples": target.desyncs[:3],
                "backend_passive_replies_leaked": stats["backend passive replies leaked"],
                "leak_transcripts": target.leaks[:3],
                "replies_out_of_order": stats["replies out of order"],
                "out_of_order_examples": target.misordered[:3],
                "sessions_open_after_the_run": target.stuck_sessions,
                "stuck_session_transcripts": target.stuck_transcripts[:5],
                "counters": dict(sorted(stats.items())),
            }
        failures = [f for t in self.targets for f in t.failures]
        by_oracle: dict[str, dict[str, Any]] = {}
        for failure in failures:
            entry = by_oracle.setdefault(failure.oracle, {"count": 0, "per_server": Counter(), "examples": {}})
            entry["count"] += 1
            entry["per_server"][failure.server] += 1
            entry["examples"].setdefault(failure.server, {"detail": failure.detail, "example": failure.example[:4000]})
        for entry in by_oracle.values():
            entry["per_server"] = dict(entry["per_server"])
        if self.fuzzer_errors:
            by_oracle["fuzzer errors (bugs in the fuzzer)"] = {
                "count": len(self.fuzzer_errors),
                "examples": {"-": {"detail": self.fuzzer_errors[0], "example": ""}},
            }
        return {
            "seed": self.seed,
            "benign": self.benign,
            "seconds": self.seconds,
            "concurrency": self.concurrency,
            "elapsed_seconds": round(elapsed, 1),
            "ok": not by_oracle,
            "failures": by_oracle,
            "servers": servers,
        }


def kill_leftovers(workdir: Path) -> None:
    """End the backends' session processes that outlived their server.

    ``LegacyServer.stop`` ends processes whose command line names their
    folder, but pure-ftpd's and ProFTPD's session processes rename themselves
    ("pure-ftpd (IDLE)"), and those whose client went away while they waited
    for a data connection keep a passive port for minutes. Each is found by
    its root or working directory inside this run's folder, chrooted there,
    with its parent and children.
    """
    prefix = str(workdir)
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            places = [os.readlink(entry / "root"), os.readlink(entry / "cwd")]
        except OSError:
            continue
        if not any(place.startswith(prefix) for place in places):
            continue
        pid = int(entry.name)
        found.add(pid)
        try:
            found.add(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]))  # the parent
        except (OSError, ValueError, IndexError):
            pass
    found -= {0, 1, os.getpid(), os.getppid()}
    for pid in found:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith(("pure-ftpd", "proftpd", "vsftpd")):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def cheap_pure_ftpd_login(server: legacy.LegacyServer) -> None:
    """Re-hash pure-ftpd's one password with SHA-512 crypt instead of argon2id.

    pure-pw hashes with argon2id (t=1023): each login costs pure-ftpd about two
    CPU seconds, so on two cores the fuzzer would measure little but password
    hashing. pure-ftpd reads its puredb at every login, and glibc's crypt()
    checks a $6$ hash in milliseconds; the account is otherwise unchanged.
    """
    passwd, pdb = server.workdir / "pureftpd.passwd", server.workdir / "pureftpd.pdb"
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", server.password], check=True, capture_output=True, text=True
    ).stdout.strip()
    fields = passwd.read_text().split(":")
    fields[1] = hashed
    passwd.write_text(":".join(fields))
    pure_pw = legacy.package_root("pure-ftpd") / "usr/bin/pure-pw"
    subprocess.run([str(pure_pw), "mkdb", str(pdb), "-f", str(passwd)], check=True, capture_output=True)


def crash_digest(event: dict[str, Any]) -> str:
    """The event name, then each exception's last frame and message, on one line."""
    found, frame = [], ""
    for line in str(event.get("exception", "")).splitlines():
        line = line.strip(" |+-")
        if line.startswith("File "):
            if "/ftpfix/" in line:
                frame = re.sub(r'^File ".*/(ftpfix/[^"]+)", line (\d+), in (\S+)$', r"\1:\2 \3", line)
        elif re.match(r"^[\w.]+(Error|Exception)\b.*:|^[\w.]+Error$", line) and not line.startswith("ExceptionGroup"):
            found.append(f"{line} (at {frame})")
    return f"{event.get('event')}: " + "; ".join(dict.fromkeys(found))


def _sockets_of(pid: int) -> str:
    """ss's view of the process's TCP sockets, for a leak report."""
    try:
        out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    states = Counter(line.split()[0] for line in out.splitlines() if f"pid={pid}," in line)
    return ", ".join(f"{state} x{count}" for state, count in states.most_common())


def _fd_kinds(pid: int) -> Counter[str]:
    kinds: Counter[str] = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                kinds[re.sub(r"\[\d+\]", "", os.readlink(f"/proc/{pid}/fd/{fd}"))] += 1
            except OSError:
                pass
    except OSError:
        pass
    return Counter({f"{k} x{v}": v for k, v in kinds.items()})


def summary(report: dict[str, Any]) -> str:
    out = [
        (
            f"ftpfix network fuzz: seed {report['seed']}, {report['seconds']:g} s of fuzzing, "
            f"{report['elapsed_seconds']:g} s in all"
        )
    ]
    header = f"{'':28}" + "".join(f"{kind:>14}" for kind in report["servers"])
    out.append(header)

    def row(label: str, key: Callable[[dict[str, Any]], Any]) -> None:
        out.append(f"{label:28}" + "".join(f"{key(s)!s:>14}" for s in report["servers"].values()))

    row("sessions", lambda s: s["sessions"])
    row("commands sent", lambda s: s["commands_sent"])
    row("transfers started", lambda s: s["transfers_started"])
    row("transfers completed", lambda s: s["transfers_completed"])
    row("transfers verified", lambda s: s["transfers_verified"])
    row("transfers corrupted (0)", lambda s: s["transfers_corrupted"])
    row("passive mappings", lambda s: s["passive_mappings"])
    row("crashes logged (0)", lambda s: s["crashes"])
    row("bad mappings (0)", lambda s: s["bad_mappings"])
    row("227/229 leaked (0)", lambda s: s["backend_passive_replies_leaked"])
    row("replies out of order (0)", lambda s: s["replies_out_of_order"])
    row("replies out of step", lambda s: s["replies_out_of_step"])
    row("ftpfix exits (0)", lambda s: len(s["ftpfix_exits"]))
    row("sessions left open", lambda s: s["sessions_open_after_the_run"])
    row("fds before/after", lambda s: f"{s['fds_before']}/{s['fds_after']}")
    row("RSS KiB before/after", lambda s: f"{s['rss_kib_before']}/{s['rss_kib_after']}")
    row("healthy client", lambda s: "ok" if s["healthy_client"].get("ok") else "FAILED")
    row("ftpfix at the end", lambda s: "running" if s["running_at_end"] else f"exit {s['exit_status']}")
    for kind, server in report["servers"].items():
        for digest, count in list(server["crash_kinds"].items())[:6]:
            out.append(f"  crash kind [{kind}] x{count}: {digest[:300]}")
    if report["ok"]:
        out.append("PASS: every oracle held")
    else:
        out.append("FAIL:")
        for oracle, entry in sorted(report["failures"].items()):
            per = ", ".join(f"{k} {v}" for k, v in entry.get("per_server", {}).items())
            out.append(f"  {oracle}: {entry['count']} ({per})")
            for server, example in entry["examples"].items():
                out.append(f"    [{server}] {example['detail'][:400]}")
                if example["example"]:
                    out.append(f"        {example['example'][:400]}")
    return "\n".join(out)


def run(
    seconds: float,
    kinds: list[str] | None = None,
    seed: int = DEFAULT_SEED,
    concurrency: int = DEFAULT_CONCURRENCY,
    json_path: Path | None = None,
    ftpfix_src: Path | None = None,
    benign: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the fuzzer; return the report (``report["ok"]`` says if every oracle held)."""
    kinds = list(kinds or legacy.SERVERS)
    unknown = [kind for kind in kinds if kind not in BACKEND_RANGES]
    if unknown:
        raise ValueError(f"unknown servers: {', '.join(unknown)}")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ftpfix-netfuzz-"))
    workdir.chmod(0o755)  # ProFTPD's nobody must reach its home
    fuzzer = Fuzzer(
        seconds=seconds,
        kinds=kinds,
        seed=seed,
        concurrency=concurrency,
        workdir=workdir,
        ftpfix_src=ftpfix_src,
        benign=benign,
        echo=echo,
    )
    keep = False
    try:
        fuzzer.start_backends()
        trio.run(fuzzer.main)
        report = fuzzer.report(time.monotonic() - started)
        keep = not report["ok"]
    finally:
        fuzzer.stop_all()
        if keep or os.environ.get("FTPFIX_FUZZ_KEEP"):
            echo(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["workdir"] = str(workdir) if keep else None
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.netfuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, required=True, help="how long to fuzz (all servers at once)")
    parser.add_argument("--servers", default=",".join(legacy.SERVERS), help="comma-separated: vsftpd,pure-ftpd,proftpd")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="sessions at a time per server")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--ftpfix-src", type=Path, help="run ftpfix from this source tree instead of the repository's")
    parser.add_argument(
        "--benign",
        action="store_true",
        help="a control run: only well-behaved sessions (checks the fuzzer, not ftpfix's defences)",
    )
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.servers.split(",") if kind.strip()]
    missing = [kind for kind in kinds if kind not in legacy.installed()]
    if missing:
        print(f"not unpacked: {', '.join(missing)} (run ./tests/run)", file=sys.stderr)
        return 2
    report = run(args.seconds, kinds, args.seed, args.concurrency, args.json, args.ftpfix_src, args.benign)
    print(summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
