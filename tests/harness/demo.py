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
PUBLIC_ADDRESS = "127.0.0.1"
PASSIVE_PORTS = "50000-50019"

CONFIG = f"""\
# The demo's config: ProFTPD on 127.0.0.1:{BACKEND_PORT} plays the legacy server
# behind the router; 127.0.0.1 plays the router's public address.
[listen]
address = "127.0.0.1"
port = {LISTEN_PORT}

[backend]
address = "127.0.0.1"
port = {BACKEND_PORT}

[passive]
public_address = "{PUBLIC_ADDRESS}"
ports = "{PASSIVE_PORTS}"

[log]
level = "debug"
format = "console"
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Stop on Ctrl-C and on SIGTERM, even if started where SIGINT is ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    for port in (BACKEND_PORT, LISTEN_PORT):
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
        config.write_text(CONFIG)
        url = f"ftp://{server.user}:{server.password}@127.0.0.1:{LISTEN_PORT}"
        print(
            f"""
ProFTPD 1.3.8 is listening on 127.0.0.1:{BACKEND_PORT} (user {server.user}, password {server.password}),
files in {server.files}. ftpfix is in front of it on 127.0.0.1:{LISTEN_PORT}; its config is {config}.

Try it from another terminal. The first two trust the address in the 227, as an old
client would; the third sends P@SW, as the SMC router makes clients do, and ProFTPD
answers it once ftpfix has turned it back into PASV:

  curl --disable-epsv --no-ftp-skip-pasv-ip {url}/welcome.txt
  curl -v --disable-epsv --no-ftp-skip-pasv-ip {url}/random.bin -o /tmp/random.bin 2>&1 | grep -E '^< 227|^> PASV'
  curl -v -Q P@SW {url}/ 2>&1 | grep -E 'P@SW|^< 227'
  curl --no-ftp-skip-pasv-ip -T /etc/hostname {url}/uploaded.txt

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
