"""``ftpfix diagnose`` and TLS: ftps:// through ftpfix's FTPS (AUTH TLS, PROT P data connections
that resume the control connection's session), and what it says of the certificate.

ftpfix's passive ports in this file: 21470-21479.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import legacy
from tests.harness.ftps import Certificates, make_certificates, tls_section
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


@pytest.fixture
def proxy(vsftpd: legacy.LegacyServer, tmp_path: Path, certs: Certificates) -> Iterator[Ftpfix]:
    legacy.put_file(vsftpd, "hello.txt", b"hello over TLS\n" * 64)
    started = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(vsftpd.host, vsftpd.port),
            public_address="127.0.0.1",
            ports="21470-21479",
            extra=tls_section(certs),
        ),
    )
    try:
        yield started
    finally:
        started.stop()


def diagnose(url: str, *extra: str) -> tuple[int, Any]:
    argv = [sys.executable, "-m", "ftpfix", "diagnose", url, "--json", "--port-timeout", "2", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def by_stage(document: Any) -> dict[str, dict[str, Any]]:
    return {check["stage"]: check for check in document["checks"]}


def test_ftps_through_ftpfix_with_a_trusted_certificate(proxy: Ftpfix, certs: Certificates) -> None:
    status, document = diagnose(f"ftps://127.0.0.1:{proxy.port}/hello.txt", "--ca", str(certs.ca))
    assert status == 0, document
    checks = by_stage(document)
    assert checks["tls"]["status"] == "ok" and checks["tls"]["data"]["version"].startswith("TLSv1.")
    assert checks["tls"]["data"]["days_left"] > 300
    # PROT P data connections, each resuming the control connection's TLS session.
    assert "RETR hello.txt 960 bytes" in checks["data (passive)"]["summary"]
    assert checks["passive ports"]["status"] == "ok"


def test_an_untrusted_certificate_is_a_warning(proxy: Ftpfix) -> None:
    status, document = diagnose(f"ftps://127.0.0.1:{proxy.port}/hello.txt")
    assert status == 0
    tls = by_stage(document)["tls"]
    assert tls["status"] == "warn" and "not trusted" in tls["summary"]
    assert document["verdict"]["stage"] == "tls"


def test_plain_ftp_looks_at_the_tls_on_offer(proxy: Ftpfix, certs: Certificates) -> None:
    status, document = diagnose(f"ftp://127.0.0.1:{proxy.port}/hello.txt", "--ca", str(certs.ca))
    assert status == 0, document
    assert by_stage(document)["tls"]["status"] == "ok"


def test_a_password_is_not_sent_over_an_untrusted_certificate(proxy: Ftpfix, certs: Certificates) -> None:
    # Whoever sits in the middle of a connection with an untrusted certificate
    # would read the password: diagnose stops before USER, as curl does without -k.
    status, document = diagnose(f"ftps://bob:s3cret@127.0.0.1:{proxy.port}/hello.txt")
    assert status == 1
    login = by_stage(document)["login"]
    assert login["status"] == "fail" and "password not sent" in login["summary"]
    assert "--insecure" in login["hint"] and "s3cret" not in json.dumps(document)
    assert not [event for event in proxy.events() if event.get("user") == "bob"], "USER bob reached ftpfix"
    # --insecure sends it (and vsftpd, anonymous only here, refuses bob); a
    # trusted CA lets it go without --insecure.
    for extra in (("--insecure",), ("--ca", str(certs.ca))):
        status, document = diagnose(f"ftps://bob:s3cret@127.0.0.1:{proxy.port}/hello.txt", *extra)
        assert "login as bob refused" in by_stage(document)["login"]["summary"], extra
