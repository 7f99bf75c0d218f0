"""Where the 227 points: a DNS name that follows a dynamic IP, "auto", and
split horizon for clients on the LAN."""

from __future__ import annotations

import ftplib
import shutil
from pathlib import Path

import pytest

from tests.conftest import require, require_root
from tests.harness import legacy
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

NAME = "ftp.example.test"  # RFC 2606: .test is never delegated


def pasv_host(proxy: Ftpfix, user: str, password: str) -> str:
    """The address in a 227 from ftpfix; nothing ever connects to it."""
    ftp = ftplib.FTP(timeout=20)
    ftp.connect(proxy.host, proxy.port)
    ftp.login(user, password)
    reply = ftp.sendcmd("PASV")
    ftp.quit()
    numbers = reply[reply.index("(") + 1 : reply.index(")")].split(",")
    return ".".join(numbers[:4])


def test_a_dns_name_is_followed_and_a_failed_lookup_keeps_the_last_address(
    vsftpd: legacy.LegacyServer, tmp_path: Path
) -> None:
    require_root()
    require(shutil.which("unshare") is not None, "unshare (util-linux) is not installed")
    # ftpfix runs in a mount namespace of its own, where the test controls name
    # resolution: its own hosts file, files only, and no DNS server to ask.
    hosts, nsswitch, resolv = tmp_path / "hosts", tmp_path / "nsswitch.conf", tmp_path / "resolv.conf"
    hosts.write_text(f"127.0.0.1 localhost\n192.0.2.55 {NAME}\n")
    nsswitch.write_text("hosts: files\n")
    resolv.write_text("nameserver 127.0.0.1\n")
    mount = (
        'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf'
        ' && mount --bind "$3" /etc/resolv.conf && shift 3 && exec "$@"'
    )
    wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount,
        "sh",
        str(hosts),
        str(nsswitch),
        str(resolv),
    ]
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address=NAME,
            ports="20700-20719",
            passive_extra="public_address_ttl = 0.5",
        ),
        wrapper=wrapper,
    )
    try:
        assert pasv_host(proxy, vsftpd.user, vsftpd.password) == "192.0.2.55"
        # The dynamic IP changes; the hosts file is rewritten in place.
        hosts.write_text(f"127.0.0.1 localhost\n192.0.2.66 {NAME}\n")
        proxy.wait_for("public address resolved", count=2)
        assert pasv_host(proxy, vsftpd.user, vsftpd.password) == "192.0.2.66"
        # The name stops resolving: keep the last good address, and say so.
        hosts.write_text("127.0.0.1 localhost\n")
        failure = proxy.wait_for("public address lookup failed")[0]
        assert failure["keeping"] == "192.0.2.66"
        assert pasv_host(proxy, vsftpd.user, vsftpd.password) == "192.0.2.66"
    finally:
        proxy.stop()


def test_auto_gives_the_address_the_client_dialed(vsftpd: legacy.LegacyServer, tmp_path: Path) -> None:
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.2", 0), backend=(vsftpd.host, vsftpd.port), public_address="auto", ports="20720-20739"
        ),
    )
    try:
        assert pasv_host(proxy, vsftpd.user, vsftpd.password) == "127.0.0.2"
    finally:
        proxy.stop()


def test_split_horizon_on_loopback(vsftpd: legacy.LegacyServer, tmp_path: Path) -> None:
    """127.0.0.0/8 plays the LAN: its clients get the address they dialed."""
    proxy = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.3", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="203.0.113.1",
            ports="20740-20759",
            passive_extra='internal_networks = ["127.0.0.0/8"]',
        ),
    )
    try:
        assert pasv_host(proxy, vsftpd.user, vsftpd.password) == "127.0.0.3"
    finally:
        proxy.stop()
