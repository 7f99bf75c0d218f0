"""Backends with odd reply formats, through ftpfix, with real clients and data."""

from __future__ import annotations

import ftplib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_programs
from tests.harness.clients import Endpoint, sha256, transfer
from tests.harness.fakeftp import PASV_DEFAULT, FakeBackend
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

PAYLOAD = os.urandom(2 * 1024 * 1024)


@pytest.fixture
def run(tmp_path: Path) -> Iterator:
    started: list[tuple[FakeBackend, Ftpfix]] = []

    def run(epsv_mode: str = "auto", **replies: str | None) -> tuple[FakeBackend, Ftpfix]:
        backend = FakeBackend(PAYLOAD, **replies).start()
        proxy = start_ftpfix(
            tmp_path / f"ftpfix{len(started)}",
            config_text(
                listen=("127.0.0.1", 0),
                backend=(backend.host, backend.port),
                public_address="127.0.0.1",
                ports="20400-20419",
                passive_extra=f'epsv = "{epsv_mode}"',
            ),
        )
        started.append((backend, proxy))
        return backend, proxy

    yield run
    for backend, proxy in started:
        proxy.stop()
        backend.stop()


def ftplib_retr(proxy: Ftpfix) -> bytes:
    ftp = ftplib.FTP(timeout=20)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.port)
    ftp.login("alice", "x")
    chunks: list[bytes] = []
    ftp.retrbinary("RETR f.bin", chunks.append)
    ftp.quit()
    return b"".join(chunks)


def curl_retr(proxy: Ftpfix, tmp_path: Path, *options: str) -> bytes:
    require_programs("curl")
    out = tmp_path / "curl.bin"
    result = transfer(
        "curl",
        "get",
        Endpoint(proxy.host, proxy.port, "alice", "x"),
        "f.bin",
        out,
        mode=options[0] if options else "pasv",
    )
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


@pytest.mark.parametrize(
    "pasv",
    [
        "227 Entering Passive Mode ({h},{p}).",
        "227 Entering Passive Mode {h},{p}",
        "227 ={h},{p}",
        "227 Entering Passive Mode (127,000,000,001,{p1:03d},{p2:03d})",
        "227 Passive: {h},{p} (and here is no other address)",
        "227-Entering Passive Mode\n227 ({h},{p})",
        "227-Entering Passive Mode\n {h},{p}\n227 on a continuation line",
    ],
)
def test_every_227_form_works_end_to_end(run, pasv: str, tmp_path: Path) -> None:
    _, proxy = run(pasv=pasv)
    assert hashlib.sha256(ftplib_retr(proxy)).digest() == hashlib.sha256(PAYLOAD).digest()
    assert curl_retr(proxy, tmp_path) == PAYLOAD


@pytest.mark.parametrize(
    "pasv",
    [
        "227 Entering Passive Mode (127,0,0,1,300,1)",
        "227 Entering Passive Mode (127,0,0,256,4,1)",
        "227 no numbers here",
        # Two addresses: one of them is text the server echoed (slipstreaming).
        "227 Passive: {h},{p} (and 9,9,9,9,9,9 is not it)",
    ],
)
def test_an_out_of_range_227_gets_a_425_and_the_session_goes_on(run, pasv: str) -> None:
    _, proxy = run(pasv=pasv)
    ftp = ftplib.FTP(timeout=20)
    ftp.connect(proxy.host, proxy.port)
    ftp.login("alice", "x")
    with pytest.raises(
        ftplib.error_temp, match="425 Can't open data connection: the server's passive reply was unusable"
    ):
        ftp.sendcmd("PASV")
    assert ftp.sendcmd("NOOP").startswith("200")
    ftp.quit()


@pytest.mark.parametrize("refusal", [None, "502 EPSV not implemented."])
def test_epsv_auto_translates_for_a_backend_without_epsv(run, refusal: str | None, tmp_path: Path) -> None:
    backend, proxy = run(epsv=refusal)
    assert curl_retr(proxy, tmp_path, "epsv") == PAYLOAD
    assert curl_retr(proxy, tmp_path, "epsv") == PAYLOAD
    sent = [line.split()[0] for line in backend.received if line[:4] in (b"EPSV", b"PASV")]
    # The first EPSV is tried and refused; from then on the session knows.
    assert sent[:2] == [b"EPSV", b"PASV"]
    assert proxy.events("backend does not know EPSV; sending PASV")


def test_epsv_translate_never_sends_epsv(run, tmp_path: Path) -> None:
    backend, proxy = run(epsv_mode="translate")
    assert curl_retr(proxy, tmp_path, "epsv") == PAYLOAD
    assert not any(line.startswith(b"EPSV") for line in backend.received)


def test_a_backend_that_answers_epsv_with_a_227(run, tmp_path: Path) -> None:
    _, proxy = run(epsv=PASV_DEFAULT)
    assert curl_retr(proxy, tmp_path, "epsv") == PAYLOAD


def test_a_229_with_another_delimiter(run, tmp_path: Path) -> None:
    backend, proxy = run(epsv_mode="passthrough", epsv="229 Extended Passive mode OK (!!!{port}!)")
    assert curl_retr(proxy, tmp_path, "epsv") == PAYLOAD
    assert any(line.startswith(b"EPSV") for line in backend.received)


def test_a_multi_line_reply_with_digits_on_a_continuation_line(run) -> None:
    syst = (
        "215-Welcome to the system\n123 this line starts with digits\n"
        " 215 and so does this one, almost\n215 UNIX Type: L8"
    )
    _, proxy = run(syst=syst)
    ftp = ftplib.FTP(timeout=20)
    ftp.connect(proxy.host, proxy.port)
    ftp.login("alice", "x")
    assert ftp.sendcmd("SYST") == syst
    ftp.quit()


def test_an_upload_through_an_odd_backend(run, tmp_path: Path) -> None:
    require_programs("curl")
    backend, proxy = run(pasv="227 ={h},{p}")
    source = tmp_path / "up.bin"
    source.write_bytes(PAYLOAD)
    result = transfer("curl", "put", Endpoint(proxy.host, proxy.port, "alice", "x"), "up.bin", source)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(backend.uploads["up.bin"]).hexdigest() == sha256(source)


def test_an_over_long_backend_reply_line_ends_the_session_with_421(run) -> None:
    _, proxy = run(syst="215 " + "x" * 70_000)
    ftp = ftplib.FTP(timeout=20)
    ftp.connect(proxy.host, proxy.port)
    ftp.login("alice", "x")
    with pytest.raises(ftplib.error_temp, match="421 Service not available: the server sent an over-long reply."):
        ftp.sendcmd("SYST")
    proxy.wait_for("protocol error")


def test_a_long_multi_line_reply_streams_through(run) -> None:
    # A STAT-style listing of 20,000 lines: relayed line by line, never held.
    body = "\n".join(f" file{n:05d}.txt" for n in range(20_000))
    syst = f"215-listing\n{body}\n215 end"
    _, proxy = run(syst=syst)
    ftp = ftplib.FTP(timeout=20)
    ftp.connect(proxy.host, proxy.port)
    ftp.login("alice", "x")
    assert ftp.sendcmd("SYST") == syst
    ftp.quit()
