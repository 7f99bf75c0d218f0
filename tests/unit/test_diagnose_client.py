"""``ftpfix diagnose`` as a command: usage errors exit 2; and implicit FTPS against a scripted server on loopback."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from ftpfix.cli import main
from ftpfix.diagnose.checks import Status, verdict
from ftpfix.diagnose.probe import Options, Target, diagnose


@pytest.mark.parametrize(
    "argv",
    [
        ["diagnose"],
        ["diagnose", "http://example.org"],
        ["diagnose", "ftp://h", "--config", "x.toml"],
        ["diagnose", "ftp://h:70000"],
        ["diagnose", "ftp://h", "--timeout", "0"],
        ["diagnose", "ftp://h", "--private", "not-a-network"],
        ["diagnose", "ftp://h", "--password-file", "/nonexistent/ftpfix-password"],
        ["diagnose", "--config", "/nonexistent/ftpfix.toml"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "ftpfix diagnose:" in capsys.readouterr().err


def test_nothing_listening_is_a_failure_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        assert main(["diagnose", f"ftp://127.0.0.1:{port}", "--json", "--timeout", "2"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["exit_status"] == 1 and document["verdict"]["stage"] == "connect"
    assert "refused" in document["verdict"]["text"]


@pytest.fixture
def implicit_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A scripted implicit-FTPS server: TLS from the first byte, a greeting, any login, 502 to the rest."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    listener = socket.create_server(("127.0.0.1", 0))

    def session(raw: socket.socket) -> None:
        try:
            with context.wrap_socket(raw, server_side=True) as conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 implicit\r\n")
                for line in lines:
                    verb = line.split()[0].upper() if line.split() else b""
                    if verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    conn.sendall(b"230 in\r\n" if verb == b"USER" else b"502 no\r\n")
        except (OSError, ssl.SSLError):
            pass

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=session, args=(raw,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], ca_path
    finally:
        listener.close()


def test_implicit_tls_from_the_first_byte(implicit_server: tuple[int, Path]) -> None:
    port, ca = implicit_server
    target = Target("127.0.0.1", port, "anonymous", "x@", tls="implicit")
    checks = diagnose(target, Options(timeout=3, port_timeout=1, ca=str(ca)), lambda check: None)
    stages = {check.stage: check for check in checks}
    assert stages["greeting"].status is Status.OK and stages["greeting"].summary == "220 implicit"
    assert stages["tls"].status is Status.OK and "trusted" in stages["tls"].summary
    assert stages["login"].status is Status.OK
    # The scripted server knows no PASV: the first failure is named.
    assert verdict(checks).stage == "pasv integrity"
