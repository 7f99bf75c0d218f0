"""``ftpfix diagnose`` in the NAT lab: every failure set up for real, every verdict checked.

The lab (``tests/harness/natlab.py``) is a router that forwards port 21 and the
passive range 50000-50019 to the LAN, and rewrites PASV into P@SW as the SMC
Barricade did. Each test sets the router (or ftpfix, or the backend) up to
fail one way, runs ``ftpfix diagnose --json`` from the WAN client (or the LAN
client, for the hairpin trap) as a user would, and checks the first failing
stage and its hint. The lab's LAN is 192.0.2.0/24, a documentation network,
so the runs say ``--private 192.0.2.0/24``, as a user with a LAN on odd
addresses would.

The verdict lines the README quotes come from these runs: ``-s`` prints them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_programs, require_servers
from tests.harness import legacy, natlab
from tests.harness.netns import in_netns
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.nat, pytest.mark.root, pytest.mark.servers]

FIRST, LAST = (int(port) for port in natlab.PASSIVE_PORTS.split("-"))
PASSIVE = range(FIRST, LAST + 1)


@pytest.fixture(scope="module")
def lab() -> Iterator[natlab.NatLab]:
    require_servers()
    require_programs("nft", "ip")
    lab = natlab.new_lab("fxdiag")
    try:
        lab.up()
    except RuntimeError as error:
        lab.down()
        require(False, f"cannot build the NAT lab here: {error}")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's 0700 folders: ProFTPD's unprivileged user must reach it.
    path = Path(tempfile.mkdtemp(prefix="ftpfix-diagnose-lab-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Setup:
    """What one test runs in the LAN: a legacy server, perhaps ftpfix in front; stopped at the end."""

    def __init__(self, lab: natlab.NatLab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.server: legacy.LegacyServer | None = None
        self.proxy: Ftpfix | None = None

    def legacy(self, kind: str) -> legacy.LegacyServer:
        self.server = legacy.start(kind, self.workdir / kind, host=natlab.BACKEND_HOST, port=21, netns=self.lab.lan)
        legacy.put_file(self.server, "hello.txt", b"hello from the LAN\n" * 100)
        return self.server

    def ftpfix(self, *, public_address: str = natlab.PUBLIC, backend_port: int = 21, port: int = 21) -> Ftpfix:
        self.proxy = start_ftpfix(
            self.workdir / "ftpfix",
            config_text(
                listen=(natlab.FTPFIX_HOST, port),
                backend=(natlab.BACKEND_HOST, backend_port),
                public_address=public_address,
                ports=natlab.PASSIVE_PORTS,
                passive_extra='internal_networks = ["192.0.2.0/24"]',
            ),
            netns=self.lab.lan,
        )
        return self.proxy

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            self.server.stop()
        self.lab.forward_control_to(natlab.FTPFIX_HOST)


@pytest.fixture
def setup(lab: natlab.NatLab, workdir: Path) -> Iterator[Setup]:
    made = Setup(lab, workdir)
    try:
        yield made
    finally:
        made.stop()


def diagnose(setup: Setup, *extra: str, netns: str | None = None, host: str = natlab.PUBLIC) -> tuple[int, Any, str]:
    """Run ``ftpfix diagnose`` on the WAN client, JSON and then plain: exit status, document, text."""
    lab, server = setup.lab, setup.server
    user, password = (server.user, server.password) if server else (legacy.USER, legacy.PASSWORD)
    url = f"ftp://{user}:{password}@{host}/hello.txt"
    argv = [sys.executable, "-m", "ftpfix", "diagnose", url, "--private", "192.0.2.0/24", "--port-timeout", "2"]
    namespace = netns or lab.wan
    done = subprocess.run(
        in_netns(namespace, [*argv, *extra, "--json"]),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    document = json.loads(done.stdout)
    plain = subprocess.run(
        in_netns(namespace, [*argv, *extra]), capture_output=True, text=True, timeout=180, cwd=ROOT, check=False
    )
    print(plain.stdout)
    assert plain.returncode == done.returncode, (plain.stdout, done.stdout)
    return done.returncode, document, plain.stdout


def stages(document: Any) -> dict[str, dict[str, Any]]:
    return {check["stage"]: check for check in document["checks"]}


#: How the router answers for a port it does not forward: a reset, or nothing.
ROUTERS = pytest.mark.parametrize("drop", [False, True], ids=["router-resets", "router-drops"])


@ROUTERS
def test_port_21_not_forwarded(drop: bool, lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy("vsftpd")
    setup.ftpfix()
    lab.forward_control_to(natlab.FTPFIX_HOST, forward_control=False, drop_unforwarded=drop)
    status, document, text = diagnose(setup, "--timeout", "3")
    assert status == 1
    assert document["verdict"]["stage"] == "connect"
    assert f"203.0.113.1:21 {'timed out' if drop else 'refused'}" in document["verdict"]["text"]
    assert "forward TCP port 21" in document["verdict"]["text"]
    assert "verdict: FAIL at connect" in text


@ROUTERS
def test_half_the_passive_range_not_forwarded(drop: bool, lab: natlab.NatLab, setup: Setup) -> None:
    """With a router that drops, the ten missing ports cost one dial timeout, not ten: they are
    dialed at once, and not dialed again when leased."""
    setup.legacy("vsftpd")
    setup.ftpfix()
    forwarded = PASSIVE[: len(PASSIVE) // 2]
    lab.forward_control_to(natlab.FTPFIX_HOST, passive_ports=forwarded, smc=False, drop_unforwarded=drop)
    status, document, _ = diagnose(setup)
    assert status == 1
    ports = stages(document)["passive ports"]
    missing = [port for port in PASSIVE if port not in forwarded]
    assert ports["data"]["not_forwarded"] == missing
    assert document["verdict"]["stage"] == "passive ports"
    assert f"not forwarded: {missing[0]}-{missing[-1]}" in document["verdict"]["text"]
    assert f"forward TCP ports {missing[0]}-{missing[-1]}" in document["verdict"]["text"]
    print(f"passive ports stage: {ports['data']['seconds']} s for {len(PASSIVE)} ports ({'drop' if drop else 'reset'})")


def test_smc_rule_without_ftpfix_names_the_bug(lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy("proftpd")
    lab.forward_control_to(natlab.BACKEND_HOST)
    status, document, _ = diagnose(setup)
    assert status == 1
    assert document["verdict"]["stage"] == "pasv integrity"
    assert "P@SW" in document["verdict"]["text"] and "SMC Barricade" in document["verdict"]["text"]
    assert "put ftpfix in front" in document["verdict"]["text"]


def test_smc_rule_with_ftpfix_says_it_was_repaired(lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy("proftpd")
    setup.ftpfix()
    status, document, _ = diagnose(setup)
    assert status == 0, document["verdict"]
    pasv = stages(document)["pasv integrity"]
    assert pasv["status"] == "warn"
    assert "ftpfix repaired it" in pasv["summary"]
    assert document["verdict"]["status"] == "warn" and document["verdict"]["stage"] == "pasv integrity"
    assert all(check["status"] in ("ok", "warn") for check in document["checks"])


def test_legacy_server_without_ftpfix_advertises_its_private_address(lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy("vsftpd")
    lab.forward_control_to(natlab.BACKEND_HOST, smc=False)
    status, document, _ = diagnose(setup)
    assert status == 1
    assert document["verdict"]["stage"] == "227 address"
    assert "227 names 192.0.2.20, a private address" in document["verdict"]["text"]
    assert "put ftpfix in front" in document["verdict"]["text"]


def test_ftpfix_with_a_wrong_public_address(lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy("pure-ftpd")
    setup.ftpfix(public_address="203.0.113.99")
    lab.forward_control_to(natlab.FTPFIX_HOST, smc=False)
    status, document, _ = diagnose(setup)
    assert status == 1
    assert document["verdict"]["stage"] == "227 address"
    assert "227 names 203.0.113.99, not 203.0.113.1" in document["verdict"]["text"]
    assert 'set [passive] public_address = "203.0.113.1"' in document["verdict"]["text"]
    # The data connections still went through, to the address dialed.
    assert stages(document)["data (passive)"]["status"] == "ok"


def test_backend_down_behind_ftpfix(lab: natlab.NatLab, setup: Setup) -> None:
    setup.ftpfix(backend_port=2999)  # nothing listens there
    status, document, _ = diagnose(setup)
    assert status == 1
    assert document["verdict"]["stage"] == "greeting"
    assert "421" in document["verdict"]["text"]
    assert "the FTP server behind it is down" in document["verdict"]["text"]


@pytest.mark.parametrize("kind", legacy.SERVERS)
def test_healthy_setup_passes_every_stage(kind: str, lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy(kind)
    setup.ftpfix()
    lab.forward_control_to(natlab.FTPFIX_HOST, smc=False)
    status, document, text = diagnose(setup, "--active")
    assert status == 0, text
    assert [check["status"] for check in document["checks"]] == ["ok"] * len(document["checks"]), text
    assert document["verdict"] == {"status": "ok", "stage": None, "text": "OK: every stage passed"}
    seen = stages(document)
    assert seen["passive ports"]["data"]["tested"] == len(PASSIVE)
    assert "RETR hello.txt 1900 bytes" in seen["data (passive)"]["summary"]
    assert "RETR hello.txt 1900 bytes" in seen["data (epsv)"]["summary"]
    assert "verdict: OK" in text


def test_from_the_lan_against_the_public_address_is_the_hairpin_trap(lab: natlab.NatLab, setup: Setup) -> None:
    setup.legacy("vsftpd")
    setup.ftpfix()
    status, document, _ = diagnose(setup, netns=lab.lanclient)
    assert status == 1
    assert document["verdict"]["stage"] == "connect"
    assert document["verdict"]["text"].startswith("HAIRPIN at connect")
    assert "dialed from 192.0.2.30" in stages(document)["connect"]["summary"]
    assert "run ftpfix diagnose from outside" in document["verdict"]["text"]
    # Its other advice: the LAN address, from inside, works (ftpfix's split horizon names it).
    status, document, text = diagnose(setup, netns=lab.lanclient, host=natlab.FTPFIX_HOST)
    assert status == 0, text
    assert stages(document)["227 address"]["summary"] == f"227 names {natlab.FTPFIX_HOST}, the address dialed"


def test_from_the_lan_through_a_router_that_loops_back(lab: natlab.NatLab, setup: Setup) -> None:
    """A router with NAT loopback reaches ftpfix from inside: diagnose says the path is the loop,
    and that the LAN address ftpfix names to this (masqueraded, internal) client is right for it."""
    setup.legacy("vsftpd")
    setup.ftpfix()
    lab.forward_control_to(natlab.FTPFIX_HOST, smc=False, loopback=True)
    status, document, text = diagnose(setup, netns=lab.lanclient)
    assert status == 0, text
    seen = stages(document)
    assert seen["connect"]["status"] == "warn" and "hairpin NAT" in seen["connect"]["summary"]
    assert seen["227 address"]["status"] == "warn" and "as ftpfix tells LAN clients" in seen["227 address"]["summary"]
    assert seen["data (passive)"]["status"] == "ok"
    assert document["verdict"]["text"].startswith("WORKS, but connect")
