"""The problem and its fix, end to end, behind a real (namespaced) NAT router.

Without ftpfix, passive mode fails from the WAN for every server: the 227
names a LAN address on a port the router does not forward, and ProFTPD does not
even get that far, since the router turned PASV into P@SW. With ftpfix in front,
every server works with every client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_programs, require_servers
from tests.harness import legacy, matrix, natlab
from tests.harness.clients import Endpoint, cells, sha256, transfer
from tests.harness.ftps import Certificates, make_certificates, tls_section
from tests.harness.netns import in_netns
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.nat, pytest.mark.root, pytest.mark.servers]

PROBE = """\
import ftplib, sys
ftp = ftplib.FTP(timeout=10)
ftp.connect(sys.argv[1], 21)
ftp.login(sys.argv[2], sys.argv[3])
try:
    print(ftp.sendcmd("PASV"))
except ftplib.Error as error:
    print(error)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[natlab.NatLab]:
    require_servers()
    require_programs("nft", "ip", "curl", "lftp")
    lab = natlab.new_lab()
    try:
        lab.up()
    except RuntimeError as error:
        lab.down()
        require(False, f"cannot build the NAT lab here: {error}")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module", params=legacy.SERVERS)
def lan_server(
    request: pytest.FixtureRequest, lab: natlab.NatLab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[legacy.LegacyServer]:
    """A legacy server on the LAN at 192.0.2.20:21, as in the field."""
    # Not under pytest's 0700 folders: ProFTPD's unprivileged user must reach it.
    workdir = Path(tempfile.mkdtemp(prefix=f"ftpfix-lab-{request.param}-"))
    workdir.chmod(0o755)
    server = legacy.start(request.param, workdir, host=natlab.BACKEND_HOST, port=21, netns=lab.lan)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A certificate for the router's public address, which WAN clients dial."""
    return make_certificates(tmp_path_factory.mktemp("certs"), addresses=(natlab.PUBLIC, natlab.FTPFIX_HOST))


@pytest.fixture(scope="module")
def lan_ftpfix(
    lab: natlab.NatLab,
    lan_server: legacy.LegacyServer,
    lab_certs: Certificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Ftpfix]:
    """ftpfix on the LAN at 192.0.2.10:21, in front of ``lan_server``; TLS is
    optional, so plain clients and FTPS clients share it, as in the field."""
    proxy = start_ftpfix(
        tmp_path_factory.mktemp("ftpfix"),
        config_text(
            listen=(natlab.FTPFIX_HOST, 21),
            backend=(natlab.BACKEND_HOST, 21),
            public_address=natlab.PUBLIC,
            ports=natlab.PASSIVE_PORTS,
            passive_extra='internal_networks = ["192.0.2.0/24"]',
            extra=tls_section(lab_certs, mode="optional"),
        ),
        netns=lab.lan,
    )
    try:
        yield proxy
    finally:
        proxy.stop()


def wan_probe(lab: natlab.NatLab, server: legacy.LegacyServer) -> str:
    """What a WAN client gets for PASV at the router's public address."""
    argv = in_netns(lab.wan, [sys.executable, "-c", PROBE, natlab.PUBLIC, server.user, server.password])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def test_the_router_forwards_only_port_21_and_the_passive_range(lab: natlab.NatLab) -> None:
    probe = (
        "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 1.5)\n"
        " print('open')\nexcept OSError as e:\n print(type(e).__name__)"
    )
    for host, port in [
        (natlab.PUBLIC, 2121),
        (natlab.PUBLIC, 50020),
        (natlab.BACKEND_HOST, 21),
        (natlab.FTPFIX_HOST, 21),
    ]:
        result = subprocess.run(
            in_netns(lab.wan, [sys.executable, "-c", probe, host, str(port)]),
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.strip() != "open", (host, port)


def test_without_ftpfix_passive_mode_fails_from_the_wan(
    lab: natlab.NatLab, lan_server: legacy.LegacyServer, big_file: Path, tmp_path: Path
) -> None:
    lab.forward_control_to(natlab.BACKEND_HOST)
    try:
        reply = wan_probe(lab, lan_server)
        if lan_server.kind == "proftpd":
            # The router's P@SW reaches ProFTPD, which rejects it.
            assert reply == "500 P@SW not understood"
        else:
            # vsftpd and pure-ftpd accept P@SW but name their LAN address.
            assert reply.startswith("227") and "192,0,2,20" in reply, reply
        legacy.put_file(lan_server, "direct.bin", big_file.read_bytes()[: 1 << 20])
        endpoint = Endpoint(natlab.PUBLIC, 21, lan_server.user, lan_server.password)
        result = transfer("curl", "get", endpoint, "direct.bin", tmp_path / "direct.bin", netns=lab.wan, timeout=60)
        assert result.returncode != 0, "a passive download through the bare router should fail"
    finally:
        lab.forward_control_to(natlab.FTPFIX_HOST)


@pytest.mark.parametrize("client, mode", cells())
def test_with_ftpfix_every_mode_works_from_the_wan(
    client: str,
    mode: str,
    lab: natlab.NatLab,
    lan_server: legacy.LegacyServer,
    lan_ftpfix: Ftpfix,
    big_file: Path,
    tmp_path: Path,
) -> None:
    passed = False
    try:
        check_transfers(client, mode, lab, lan_server, lan_ftpfix, big_file, tmp_path)
        passed = True
    finally:
        matrix.record("nat", lan_server.kind, client, mode, passed)


def check_transfers(client, mode, lab, lan_server, lan_ftpfix, big_file: Path, tmp_path: Path) -> None:
    reply = wan_probe(lab, lan_server)
    assert reply.startswith("227 Entering Passive Mode (203,0,113,1,"), reply

    legacy.put_file(lan_server, "download.bin", big_file.read_bytes())
    endpoint = Endpoint(natlab.PUBLIC, 21, lan_server.user, lan_server.password)
    downloaded = tmp_path / "downloaded.bin"
    result = transfer(client, "get", endpoint, "download.bin", downloaded, mode=mode, netns=lab.wan)
    assert result.returncode == 0, result.stderr
    assert sha256(downloaded) == sha256(big_file)

    remote = f"uploaded-{client}-{mode}.bin"
    result = transfer(client, "put", endpoint, remote, big_file, mode=mode, netns=lab.wan)
    assert result.returncode == 0, result.stderr
    assert sha256(lan_server.files / remote) == sha256(big_file)

    # The router really did mangle the command: ftpfix logged the alias.
    aliases = lan_ftpfix.events("command alias")
    assert any(event["received"] in ("P@SW", "p@sw") for event in aliases)


def test_a_lan_client_gets_the_lan_address(
    lab: natlab.NatLab, lan_server: legacy.LegacyServer, lan_ftpfix: Ftpfix, big_file: Path, tmp_path: Path
) -> None:
    """Split horizon: the user who tests from inside, dialing the private
    address, is sent to it, not to the public one the router will not hairpin."""
    legacy.put_file(lan_server, "inside.bin", big_file.read_bytes())
    endpoint = Endpoint(natlab.FTPFIX_HOST, 21, lan_server.user, lan_server.password)
    result = transfer("curl", "get", endpoint, "inside.bin", tmp_path / "inside.bin", netns=lab.lanclient)
    assert result.returncode == 0, result.stderr
    assert sha256(tmp_path / "inside.bin") == sha256(big_file)
    mapping = [event for event in lan_ftpfix.events("passive mapping") if event["client"].startswith(natlab.LAN_CLIENT)]
    assert mapping and mapping[-1]["public"].startswith(natlab.FTPFIX_HOST + ":")


def test_without_split_horizon_a_lan_client_is_sent_outside(
    lab: natlab.NatLab, lan_server: legacy.LegacyServer, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    proxy = start_ftpfix(
        tmp_path_factory.mktemp("ftpfix-no-split"),
        config_text(
            listen=(natlab.FTPFIX_HOST, 2100),
            backend=(natlab.BACKEND_HOST, 21),
            public_address=natlab.PUBLIC,
            ports="50020-50029",
        ),
        netns=lab.lan,
    )
    try:
        legacy.put_file(lan_server, "inside.bin", b"x" * 1000)
        endpoint = Endpoint(natlab.FTPFIX_HOST, 2100, lan_server.user, lan_server.password)
        result = transfer(
            "curl", "get", endpoint, "inside.bin", tmp_path / "inside.bin", netns=lab.lanclient, timeout=60
        )
        assert result.returncode != 0
        assert proxy.events("passive mapping")[-1]["public"].startswith(natlab.PUBLIC + ":")
    finally:
        proxy.stop()


# -- FTPS from the WAN ------------------------------------------------------
#
# Once the control channel is encrypted no router helper can read or rewrite
# a 227: only a proxy that terminates TLS can. The SMC rule stays on (it has
# nothing to mangle inside TLS); the client trusts the 227 it is sent, so the
# transfers work only if ftpfix's rewrite to the public address is right.

FTPLIB_TLS = """\
import json, sys
from tests.harness.ftps import ReusingFTP_TLS
host, user, password, ca, download, upload, remote = sys.argv[1:]
import ssl
context = ssl.create_default_context(cafile=ca)
context.check_hostname = False
ftp = ReusingFTP_TLS(context=context, timeout=60)
ftp.trust_server_pasv_ipv4_address = True
replies = []
sendcmd = ftp.sendcmd
def recording(cmd):
    reply = sendcmd(cmd)
    if cmd == "PASV":
        replies.append(reply)
    return reply
ftp.sendcmd = recording
ftp.connect(host, 21)
ftp.auth()
ftp.login(user, password)
ftp.prot_p()
with open(download, "wb") as file:
    ftp.retrbinary("RETR download-tls.bin", file.write, blocksize=1 << 16)
with open(upload, "rb") as file:
    ftp.storbinary("STOR " + remote, file, blocksize=1 << 16)
version = ftp.sock.version()
ftp.quit()
print(json.dumps({"pasv": replies, "tls": version}))
"""

PUBLIC_227 = "227 Entering Passive Mode (203,0,113,1,"


def test_ftps_with_curl_from_the_wan(
    lab: natlab.NatLab,
    lan_server: legacy.LegacyServer,
    lan_ftpfix: Ftpfix,
    lab_certs: Certificates,
    big_file: Path,
    tmp_path: Path,
) -> None:
    """curl --ssl-reqd, PROT P, PASV with the 227's address trusted: RETR and
    STOR through the router that turns PASV into P@SW."""
    assert lab.mangles_pasv()
    legacy.put_file(lan_server, "download-tls.bin", big_file.read_bytes())
    url = f"ftp://{natlab.PUBLIC}:21"
    common = ["curl", "-v", "-sS", "--ssl-reqd", "--cacert", str(lab_certs.ca)]
    common += ["--user", f"{lan_server.user}:{lan_server.password}", "--no-ftp-skip-pasv-ip", "--disable-epsv"]
    common += ["--connect-timeout", "10", "--max-time", "100"]
    downloaded = tmp_path / "downloaded.bin"
    remote = f"uploaded-tls-curl-{lan_server.kind}.bin"
    runs = [
        [*common, "-o", str(downloaded), f"{url}/download-tls.bin"],
        [*common, "-T", str(big_file), f"{url}/{remote}"],
    ]
    for argv in runs:
        result = subprocess.run(in_netns(lab.wan, argv), capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        # curl -v shows the control replies it decrypted: the 227 it trusted.
        seen = [line[2:] for line in result.stderr.splitlines() if line.startswith("< 227")]
        assert seen and all(reply.startswith(PUBLIC_227) for reply in seen), seen
        assert "SSL connection using TLSv1.3" in result.stderr or "SSL connection using TLSv1.2" in result.stderr
    assert sha256(downloaded) == sha256(big_file)
    assert sha256(lan_server.files / remote) == sha256(big_file)
    # Both data connections were TLS, and ftpfix relayed them.
    tls_transfers = [event for event in lan_ftpfix.events("transfer") if event.get("mode") == "passive_tls"]
    assert {("RETR", 226), ("STOR", 226)} <= {(event["verb"], event["code"]) for event in tls_transfers}


def test_ftps_with_ftplib_from_the_wan(
    lab: natlab.NatLab,
    lan_server: legacy.LegacyServer,
    lan_ftpfix: Ftpfix,
    lab_certs: Certificates,
    big_file: Path,
    tmp_path: Path,
) -> None:
    """ftplib's FTP_TLS (resuming the control session on its data
    connections), PROT P, trusting the 227: RETR and STOR from the WAN."""
    assert lab.mangles_pasv()
    legacy.put_file(lan_server, "download-tls.bin", big_file.read_bytes())
    downloaded = tmp_path / "downloaded.bin"
    remote = f"uploaded-tls-ftplib-{lan_server.kind}.bin"
    argv = [
        sys.executable,
        "-c",
        FTPLIB_TLS,
        natlab.PUBLIC,
        lan_server.user,
        lan_server.password,
        str(lab_certs.ca),
        str(downloaded),
        str(big_file),
        remote,
    ]
    result = subprocess.run(in_netns(lab.wan, argv), capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["pasv"]) == 2 and all(reply.startswith(PUBLIC_227) for reply in report["pasv"]), report
    assert report["tls"] in ("TLSv1.2", "TLSv1.3")
    assert sha256(downloaded) == sha256(big_file)
    assert sha256(lan_server.files / remote) == sha256(big_file)
