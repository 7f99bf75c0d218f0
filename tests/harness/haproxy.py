"""Debian's HAProxy, run as a real process: a load balancer in front of ftpfix
(``send-proxy``, ``send-proxy-v2``) or a PROXY protocol consumer in front of a
backend (``accept-proxy``).

``tests/install-servers`` unpacks the haproxy package into
``tests/.cache/debs/haproxy/`` as it does the FTP servers, so no service is
installed or started; ``tests/run`` installs the libraries it links against
(liblua5.3-0, libopentracing-c-wrapper0). HAProxy logs to its stdout in the
tcplog format, which names the client address as HAProxy believes it: the
PROXY header's, on an ``accept-proxy`` bind.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .legacy import DEBS

BINARY = DEBS / "haproxy/usr/sbin/haproxy"


def installed() -> bool:
    if not BINARY.exists():
        return False
    # The unpacked binary runs only with its libraries installed.
    return subprocess.run([str(BINARY), "-v"], capture_output=True, check=False).returncode == 0


@dataclass
class Haproxy:
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        """The first log line containing ``text``, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy never logged {text!r}:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def config(
    port: int, server: tuple[str, int], *, server_options: str = "", bind_options: str = "", backend: str = ""
) -> str:
    """A TCP frontend on 127.0.0.1:``port`` forwarding to ``server``;
    ``backend`` holds more lines for the backend section (checks)."""
    return f"""\
global
    log stdout format raw local0 info
    maxconn 2000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend ftp
    bind 127.0.0.1:{port} {bind_options}
    default_backend servers

backend servers
{backend}
    server s1 {server[0]}:{server[1]} {server_options}
"""


def start(workdir: Path, text: str, port: int, timeout: float = 15.0) -> Haproxy:
    """Run HAProxy in the foreground on ``text``; wait until ``port`` accepts."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "haproxy.cfg"
    path.write_text(text)
    log = workdir / "haproxy.log"
    check = subprocess.run([str(BINARY), "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"HAProxy refuses its config:\n{check.stdout}{check.stderr}\n{text}")
    with log.open("wb") as out:
        process = subprocess.Popen([str(BINARY), "-db", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"HAProxy exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Haproxy(process, log, port)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"HAProxy did not listen on {port}:\n{log.read_text(errors='replace')}")
