"""/metrics, the transfer log and ``ftpfix status`` against a real ftpfix
process and a real vsftpd: the counters move with a real session mix, and a
scrape stays cheap with many sessions open."""

from __future__ import annotations

import ftplib
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import legacy
from tests.harness.proxy import ROOT, Ftpfix, config_text, start_ftpfix
from tests.integration.test_health import exchange, probe_port, wait_until

pytestmark = [pytest.mark.servers, pytest.mark.root]

#: One passive port, so a second PASV finds the pool exhausted.
PORTS = "20860-20860"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"200", head
    assert b"Content-Type: text/plain; version=" in head
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def proxies() -> Iterator[list[Ftpfix]]:
    started: list[Ftpfix] = []
    yield started
    for proxy in started:
        proxy.stop()


def start(backend: tuple[str, int], workdir: Path, *, ports: str = PORTS, extra: str = "") -> Ftpfix:
    return start_ftpfix(
        workdir / f"ftpfix-{time.monotonic_ns()}",
        config_text(
            listen=("127.0.0.1", 0),
            backend=backend,
            public_address="127.0.0.1",
            ports=ports,
            extra=f'[metrics]\nlisten = "127.0.0.1:0"\nready_interval = 0.2\n{extra}',
        ).replace('format = "json"\n', f'format = "json"\nxferlog = "{workdir}/xferlog"\n'),
    )


def login(proxy: Ftpfix) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", proxy.port, timeout=10)
    ftp.login("anonymous", "x")
    return ftp


def test_metrics_move_with_a_real_session_mix(vsftpd: legacy.LegacyServer, tmp_path: Path, proxies) -> None:
    data = os.urandom(300_000)
    name = "a b\u2028c.bin"  # a space and a line separator: no control byte reaches the core
    legacy.put_file(vsftpd, name, data)
    proxy = start((vsftpd.host, vsftpd.port), tmp_path, extra="[limits]\nmax_sessions = 2\n")
    proxies.append(proxy)
    port = probe_port(proxy)
    proxy.wait_for("backend ready")
    before = scrape(port)
    assert value(before, "ftpfix_sessions_open") == 0
    assert value(before, "ftpfix_passive_pool_ports") == 1
    assert value(before, "ftpfix_backend_up") == 1
    assert [key for key in before if key[0] == "ftpfix_config_info"], "no config hash"

    first = login(proxy)
    first.voidcmd("TYPE I")
    # The SMC router's mangling: an alias, then a 227 rewritten.
    host, data_port = ftplib.parse227(first.sendcmd("P@SW"))
    second = login(proxy)
    # The only passive port is leased: 425, counted as exhaustion.
    with pytest.raises(ftplib.error_temp, match="425"):
        second.sendcmd("PASV")
    # A third session is over max_sessions: refused at connect.
    with pytest.raises(ftplib.error_temp, match="421"):
        login(proxy)
    # A stranger (another source address) on the data port is refused.
    stranger = socket.socket()
    stranger.bind(("127.0.0.2", 0))
    stranger.settimeout(5)
    stranger.connect((host, data_port))
    proxy.wait_for("data connection from a stranger refused")
    stranger.close()
    # Bounce attempt and an over-long line on the second session.
    with pytest.raises(ftplib.error_perm, match="504"):
        second.sendcmd("PORT 127,0,0,1,0,25")
    with pytest.raises(ftplib.error_perm, match="500"):
        second.sendcmd("NOOP " + "x" * 5000)
    during = scrape(port)
    assert value(during, "ftpfix_sessions_open") == 2
    assert value(during, "ftpfix_passive_pool_leased") == 1
    assert value(during, "ftpfix_data_connections_open") == 1

    # A real download through the rewritten mapping.
    with socket.create_connection((host, data_port), timeout=10) as sock:
        assert first.sendcmd(f"RETR {name}").startswith("150")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert first.voidresp().startswith("226")
    assert received == data
    first.quit()
    second.quit()
    wait_until(lambda: len(proxy.events("session closed")) == 2)
    after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ftpfix_rewrites_total", kind="alias") == 1
    assert moved("ftpfix_rewrites_total", kind="227") == 1
    assert moved("ftpfix_passive_pool_exhausted_total") == 1
    assert moved("ftpfix_refusals_total", kind="stranger") == 1
    assert moved("ftpfix_refusals_total", kind="bounce") == 1
    assert moved("ftpfix_refusals_total", kind="long_line") == 1
    assert moved("ftpfix_refusals_total", kind="limit") == 1
    assert moved("ftpfix_transfers_total", direction="download", mode="passive", result="ok") == 1
    assert moved("ftpfix_transfer_duration_seconds_count", direction="download") == 1
    assert moved("ftpfix_data_bytes_total", direction="download") == len(data)
    assert moved("ftpfix_backend_connect_seconds_count") == 2
    assert moved("ftpfix_sessions_ended_total", reason="quit") == 2
    assert value(after, "ftpfix_sessions_open") == 0
    assert value(after, "ftpfix_passive_pool_leased") == 0
    assert value(after, "ftpfix_data_connections_open") == 0
    # No series carries a client address, a user or a file name.
    for key in after:
        for label, text in key[1]:
            assert "127.0.0" not in text and "anonymous" not in text and "bin" not in text, (key, label)

    # The transfer log: one structured line, one xferlog line, the name escaped.
    (line,) = proxy.events("transfer")
    assert line["verb"] == "RETR" and line["path"] == "a b\\u2028c.bin" and line["bytes"] == len(data)
    assert line["code"] == 226 and line["mode"] == "passive" and line["user"] == "anonymous"
    assert line["client"].startswith("127.0.0.1:") and line["duration"] >= 0
    (xfer,) = (tmp_path / "xferlog").read_text().splitlines()
    fields = xfer.split()
    assert len(fields) == 18, fields  # ctime is 5 fields, then 13
    assert fields[6:] == [
        *("127.0.0.1", str(len(data)), "a\\x20b\\u2028c.bin"),
        *("b", "_", "o", "a", "anonymous", "ftp", "0", "*", "c"),
    ]


def test_status_summarises_the_running_instance(vsftpd: legacy.LegacyServer, tmp_path: Path, proxies) -> None:
    proxy = start((vsftpd.host, vsftpd.port), tmp_path)
    proxies.append(proxy)
    port = probe_port(proxy)
    proxy.wait_for("backend ready")
    ftp = login(proxy)
    ftp.sendcmd("PASV")
    # The CLI needs a fixed port; point a copy of the config at the bound one.
    config = proxy.log.parent / "cli.toml"
    config.write_text((proxy.log.parent / "ftpfix.toml").read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    command = [sys.executable, "-m", "ftpfix", "status", "--config", str(config)]
    shown = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert shown.returncode == 0, shown.stderr
    print(shown.stdout)
    assert "backend:        ready: backend greeted" in shown.stdout
    assert "sessions:       1 open" in shown.stdout
    assert "passive pool:   1 of 1 ports leased" in shown.stdout
    assert "data:           1 connections open" in shown.stdout
    ftp.quit()
    proxy.stop()
    gone = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert gone.returncode == 1 and "cannot reach ftpfix" in gone.stderr


#: Sessions held open for the scrape timing (the issue's figure).
MANY_SESSIONS = 2000


def _greeting_backend() -> tuple[socket.socket, threading.Event]:
    """A backend that greets every connection with 220 and then holds it: the
    cheapest thing that makes an ftpfix session, so thousands fit in a test."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    stop = threading.Event()

    def serve() -> None:
        held = []
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not stop.is_set():
                for _ in selector.select(0.1):
                    try:
                        while True:
                            sock, _ = listener.accept()
                            sock.sendall(b"220 hello\r\n")
                            held.append(sock)
                    except BlockingIOError:
                        pass
        for sock in held:
            sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener, stop


def test_a_scrape_with_many_sessions_open_stays_cheap(tmp_path: Path, proxies) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener, stop = _greeting_backend()
    clients: list[socket.socket] = []
    try:
        proxy = start(
            listener.getsockname(),
            tmp_path,
            ports="20870-20879",
            extra=f"[limits]\nmax_sessions = {MANY_SESSIONS + 10}\nmax_sessions_per_ip = {MANY_SESSIONS + 10}\n",
        )
        proxies.append(proxy)
        port = probe_port(proxy)
        for _ in range(MANY_SESSIONS):
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            clients.append(client)
        for client in clients:
            assert client.recv(64).startswith(b"220")
        wait_until(lambda: value(scrape(port), "ftpfix_sessions_open") == MANY_SESSIONS, timeout=30)
        timings = []
        for _ in range(50):
            started = time.perf_counter()
            scrape(port)
            timings.append(time.perf_counter() - started)
        median, worst = statistics.median(timings) * 1000, max(timings) * 1000
        print(f"\n/metrics at {MANY_SESSIONS} open sessions: median {median:.1f} ms, worst {worst:.1f} ms (50 scrapes)")
        # The bound is 50 ms; here only a loose one, as shared CI
        # machines stall: the figure above is what the note reports.
        assert median < 250, timings
    finally:
        for client in clients:
            client.close()
        stop.set()
        listener.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_sighup_reopens_the_xferlog_and_counts_the_reload(vsftpd: legacy.LegacyServer, tmp_path: Path, proxies) -> None:
    legacy.put_file(vsftpd, "f.bin", b"x" * 1000)
    proxy = start((vsftpd.host, vsftpd.port), tmp_path)
    proxies.append(proxy)
    port = probe_port(proxy)
    xferlog = tmp_path / "xferlog"

    def download() -> None:
        ftp = login(proxy)
        ftp.trust_server_pasv_ipv4_address = True
        ftp.retrbinary("RETR f.bin", lambda _: None)
        ftp.quit()

    download()
    wait_until(lambda: xferlog.exists() and xferlog.read_text().count("\n") == 1)
    xferlog.rename(tmp_path / "xferlog.1")  # logrotate, then its postrotate SIGHUP
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for("config reloaded")
    download()
    wait_until(lambda: xferlog.exists() and xferlog.read_text().count("\n") == 1)
    assert (tmp_path / "xferlog.1").read_text().count("\n") == 1
    assert value(scrape(port), "ftpfix_config_reloads_total", result="ok") == 1
