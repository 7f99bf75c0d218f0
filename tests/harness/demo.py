"""The demo that ``deploy/demo`` runs: ProFTPD behind ftpfix on this machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import legacy
from .proxy import ROOT

BACKEND_PORT = 2121
LISTEN_PORT = 2100
#: Implicit FTPS (TLS from the first byte), 990 by convention.
IMPLICIT_PORT = 2990
PUBLIC_ADDRESS = "127.0.0.1"
#: As many passive ports as the example config has.
PASSIVE_PORT_COUNT = 20
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel takes for outgoing connections (Linux's default if unreadable)."""
    try:
        low, high = (int(n) for n in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def passive_ports(low: int, high: int) -> str:
    """``PASSIVE_PORT_COUNT`` ports just above the ephemeral range ``low-high``, else just below it.

    The example config's 50000-50019 lies inside Linux's default ephemeral
    range (32768-60999), and ftpfix rightly warns about that at start; the
    demo should start clean without changing the machine's sysctls.
    """
    if high + PASSIVE_PORT_COUNT <= 65535:
        return f"{high + 1}-{high + PASSIVE_PORT_COUNT}"
    return f"{low - PASSIVE_PORT_COUNT}-{low - 1}"


CONFIG = """\
# The demo's config: ProFTPD on 127.0.0.1:{backend_port} plays the legacy server
# behind the router; 127.0.0.1 plays the router's public address. The passive
# ports lie outside this machine's ephemeral range ({ephemeral}).
[listen]
address = "127.0.0.1"
port = {listen_port}

[backend]
address = "127.0.0.1"
port = {backend_port}

[passive]
public_address = "{public_address}"
ports = "{ports}"

[tls]
# A self-signed pair made at start (openssl): clients must be told to accept
# it (curl -k). Explicit FTPS on the control port, implicit on its own port.
mode = "optional"
certificate = "{certificate}"
key = "{key}"
implicit_port = {implicit_port}

[log]
level = "debug"
format = "console"
"""


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for the demo's FTPS (never a committed key)."""
    certificate, key = directory / "demo-cert.pem", directory / "demo-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-days", "30", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )
    return certificate, key


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Stop on Ctrl-C and on SIGTERM, even if started where SIGINT is ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    for port in (BACKEND_PORT, LISTEN_PORT, IMPLICIT_PORT):
        if legacy.port_in_use(port):
            print(f"demo: port {port} on 127.0.0.1 is in use; stop whatever holds it and try again", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="ftpfix-demo-"))
    workdir.chmod(0o755)
    server = legacy.start("proftpd", workdir / "proftpd", port=BACKEND_PORT)
    try:
        legacy.put_file(server, "welcome.txt", b"Hello from a legacy ProFTPD, through ftpfix.\n")
        legacy.put_file(server, "random.bin", os.urandom(8 * 1024 * 1024))
        config = workdir / "ftpfix.toml"
        certificate, key = self_signed(workdir)
        low, high = ephemeral_range()
        ports = passive_ports(low, high)
        config.write_text(
            CONFIG.format(
                backend_port=BACKEND_PORT,
                listen_port=LISTEN_PORT,
                public_address=PUBLIC_ADDRESS,
                ports=ports,
                ephemeral=f"{low}-{high}",
                certificate=certificate,
                key=key,
                implicit_port=IMPLICIT_PORT,
            )
        )
        url = f"ftp://{server.user}:{server.password}@127.0.0.1:{LISTEN_PORT}"
        implicit = f"ftps://{server.user}:{server.password}@127.0.0.1:{IMPLICIT_PORT}"
        print(
            f"""
ProFTPD 1.3.8 is listening on 127.0.0.1:{BACKEND_PORT} (user {server.user}, password {server.password}),
files in {server.files}. ftpfix is in front of it on 127.0.0.1:{LISTEN_PORT} (FTP, and FTPS after
AUTH TLS) and 127.0.0.1:{IMPLICIT_PORT} (implicit FTPS), passive ports {ports} (outside the kernel's
ephemeral ports {low}-{high}); its config is {config}.

Try it from another terminal. The first two trust the address in the 227, as an old
client would; the third sends P@SW, as the SMC router makes clients do, and ProFTPD
answers it once ftpfix has turned it back into PASV:

  curl --disable-epsv --no-ftp-skip-pasv-ip {url}/welcome.txt
  curl -v --disable-epsv --no-ftp-skip-pasv-ip {url}/random.bin -o /tmp/random.bin 2>&1 | grep -E '^< 227|^> PASV'
  curl -v -Q P@SW {url}/ 2>&1 | grep -E 'P@SW|^< 227'
  curl --no-ftp-skip-pasv-ip -T /etc/hostname {url}/uploaded.txt

FTPS, which ProFTPD here does not speak: ftpfix terminates TLS (a self-signed certificate, hence -k):
  curl --ssl-reqd -k {url}/welcome.txt
  curl -k {implicit}/welcome.txt

Without ftpfix, ProFTPD answers the router's P@SW with "500 P@SW not understood":
  curl -Q P@SW ftp://{server.user}:{server.password}@127.0.0.1:{BACKEND_PORT}/

Ctrl-C stops the demo.
""",
            flush=True,
        )
        proxy = subprocess.Popen([sys.executable, "-m", "ftpfix", "run", "--config", str(config)], cwd=ROOT)
        try:
            return proxy.wait()
        except KeyboardInterrupt:
            proxy.send_signal(signal.SIGINT)
            proxy.wait(10)
            return 0
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
