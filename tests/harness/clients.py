"""The three FTP clients the tests drive: curl, lftp and Python's ftplib.

Each runs as a subprocess, so the same call works on loopback and inside the
NAT lab's WAN namespace. Every client is told to trust the address in the 227
(curl ``--no-ftp-skip-pasv-ip``, lftp ``ftp:fix-pasv-address no``, ftplib
``trust_server_pasv_ipv4_address``): by default they would quietly replace it
with the control connection's address and hide a wrong rewrite.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .netns import in_netns

CLIENTS = ("curl", "lftp", "ftplib")
MODES = ("pasv", "epsv", "port", "eprt")

#: Modes a client cannot be made to use over IPv4, and why.
NOT_APPLICABLE = {
    ("lftp", "eprt"): "lftp sends EPRT only on IPv6 connections",
    ("ftplib", "epsv"): "ftplib sends EPSV only on IPv6 connections (see the IPv6 test)",
    ("ftplib", "eprt"): "ftplib sends EPRT only on IPv6 connections (see the IPv6 test)",
}


def cells() -> list[tuple[str, str]]:
    """Every (client, mode) pair that a client supports over IPv4."""
    return [(client, mode) for client in CLIENTS for mode in MODES if (client, mode) not in NOT_APPLICABLE]


FTPLIB_CLIENT = Path(__file__).with_name("ftplib_client.py")

#: Seconds one transfer may take; 16 MiB on loopback takes well under one.
TRANSFER_TIMEOUT = 120


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    password: str


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def transfer(
    client: str,
    direction: str,
    endpoint: Endpoint,
    remote: str,
    local: Path,
    *,
    mode: str = "pasv",
    netns: str | None = None,
    timeout: float = TRANSFER_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Download (``get``) or upload (``put``) one file; never raises on failure."""
    argv = _argv[client](direction, endpoint, remote, local, mode)
    return subprocess.run(in_netns(netns, argv), capture_output=True, text=True, timeout=timeout, check=False)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _curl(direction: str, e: Endpoint, remote: str, local: Path, mode: str) -> list[str]:
    url = f"ftp://{_url_host(e.host)}:{e.port}/{remote}"
    argv = [
        "curl",
        "--silent",
        "--show-error",
        "--user",
        f"{e.user}:{e.password}",
        "--no-ftp-skip-pasv-ip",
        "--connect-timeout",
        "10",
        "--max-time",
        "100",
    ]
    # -P - : active mode, from the control connection's own address.
    argv += {"pasv": ["--disable-epsv"], "epsv": [], "port": ["-P", "-", "--disable-eprt"], "eprt": ["-P", "-"]}[mode]
    argv += ["--output", str(local), url] if direction == "get" else ["--upload-file", str(local), url]
    return argv


def _lftp(direction: str, e: Endpoint, remote: str, local: Path, mode: str) -> list[str]:
    settings = [
        "set ftp:fix-pasv-address no",
        f"set ftp:passive-mode {'no' if mode in ('port', 'eprt') else 'yes'}",
        f"set ftp:prefer-epsv {'yes' if mode == 'epsv' else 'no'}",
        "set net:max-retries 1",
        "set net:timeout 20",
        "set ftp:ssl-allow no",
        "set xfer:clobber yes",
    ]
    action = f"get {remote} -o {local}" if direction == "get" else f"put {local} -o {remote}"
    script = "; ".join([*settings, f"open -u {e.user},{e.password} ftp://{_url_host(e.host)}:{e.port}", action, "quit"])
    return ["lftp", "-c", script]


def _ftplib(direction: str, e: Endpoint, remote: str, local: Path, mode: str) -> list[str]:
    return [
        sys.executable,
        str(FTPLIB_CLIENT),
        direction,
        e.host,
        str(e.port),
        e.user,
        e.password,
        remote,
        str(local),
        mode,
    ]


_argv = {"curl": _curl, "lftp": _lftp, "ftplib": _ftplib}
