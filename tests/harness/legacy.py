"""Real legacy FTP servers from Debian's packages, run from folders the tests own.

vsftpd, pure-ftpd and ProFTPD conflict as Debian packages, so none is
installed: ``tests/run`` fetches each .deb with ``apt-get download`` and unpacks
it with ``dpkg -x`` into ``tests/.cache/debs/<package>/``, and installs only the
shared libraries they link against, which do not conflict.

Each server gets a throwaway working folder with its config, its account and a
data folder that is the FTP root, so a test can put a file there and read back
what was uploaded. Their passive ports are left at the default: the backend
picks any port above 1023, which is exactly the problem ftpfix solves.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .netns import in_netns

CACHE = Path(__file__).resolve().parent.parent / ".cache"
DEBS = CACHE / "debs"

#: Debian package that holds each server, and its binary inside the package.
PACKAGES = {
    "vsftpd": ("vsftpd", "usr/sbin/vsftpd"),
    "pure-ftpd": ("pure-ftpd", "usr/sbin/pure-ftpd"),
    "proftpd": ("proftpd-core", "usr/sbin/proftpd"),
}
#: ProFTPD's mod_proxy, the peer the benchmarks measure against.
MOD_PROXY = ("proftpd-mod-proxy", "usr/lib/proftpd/mod_proxy.so")

SERVERS = tuple(PACKAGES)

#: The unprivileged account the servers map their users to.
NOBODY_UID = 65534
NOBODY_GID = 65534

USER = "alice"
PASSWORD = "wonderland"


class NotInstalled(RuntimeError):
    """The server's package has not been unpacked: run tests/run first."""


def package_root(package: str) -> Path:
    return DEBS / package


def binary(kind: str) -> Path:
    package, path = PACKAGES[kind]
    binary = package_root(package) / path
    if not binary.exists():
        raise NotInstalled(f"{kind} is not unpacked at {binary}; run tests/run (it calls tests/install-servers)")
    return binary


def installed() -> list[str]:
    """The server kinds whose binaries are unpacked."""
    return [kind for kind, (package, path) in PACKAGES.items() if (package_root(package) / path).exists()]


@dataclass(frozen=True)
class ServerTls:
    """TLS for a legacy server: its certificate and key (made at test time),
    and whether it speaks TLS from the first byte (implicit) or after AUTH TLS."""

    certificate: Path
    key: Path
    implicit: bool = False


@dataclass
class LegacyServer:
    """A running legacy FTP server and what a client needs to use it."""

    kind: str
    host: str
    port: int
    user: str
    password: str
    files: Path
    workdir: Path
    process: subprocess.Popen[bytes]
    netns: str | None = None
    tls: ServerTls | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "server.log"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # ProFTPD and pure-ftpd fork one process per session: end those too.
        subprocess.run(["pkill", "-f", str(self.workdir)], check=False)


def start(
    kind: str,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    passive_ports: tuple[int, int] | None = None,
    tls: ServerTls | None = None,
) -> LegacyServer:
    """Start a ``kind`` server listening on ``host:port`` and wait for its banner.

    ``passive_ports`` (first, last) confines the ports the server opens for
    PASV; by default it picks any port above 1023. ``tls`` makes it an FTPS
    server that requires TLS for logins and data (vsftpd and pure-ftpd).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    files = workdir / "files"
    files.mkdir(exist_ok=True)
    port = port if port is not None else free_port(host)
    prepare = _prepare[kind]
    if tls is not None:
        if kind not in _prepare_tls:
            raise NotImplementedError(f"the harness has no TLS set-up for {kind}")
        prepare = partial(_prepare_tls[kind], tls=tls)
    command, user, password = prepare(workdir, files, host, port, passive_ports=passive_ports)
    log = (workdir / "server.log").open("ab")
    process = subprocess.Popen(in_netns(netns, command), stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = LegacyServer(kind, host, port, user, password, files, workdir, process, netns, tls)
    try:
        wait_for_banner(host, port, netns=netns, process=process, implicit_tls=tls is not None and tls.implicit)
    except Exception:  # noqa: BLE001 - any failure to start: stop it and show its log
        server.stop()
        raise RuntimeError(f"{kind} did not start; its log:\n{server.log.read_text(errors='replace')}") from None
    return server


def put_file(server: LegacyServer, name: str, data: bytes) -> Path:
    """Place a file in the server's FTP root, readable by its unprivileged user."""
    path = server.files / name
    path.write_bytes(data)
    os.chown(path, NOBODY_UID, NOBODY_GID)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True if something on this machine already listens on ``host:port``."""
    with socket.socket() as sock:
        # Connections of an earlier run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_banner(
    host: str,
    port: int,
    *,
    netns: str | None = None,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 15.0,
    implicit_tls: bool = False,
) -> None:
    """Wait until ``host:port`` answers with a 220 greeting (inside TLS, for
    an implicit FTPS server, whose certificate is not checked here)."""
    if netns is not None:
        probe = (
            "import socket,sys,time\n"
            f"end=time.monotonic()+{timeout}\n"
            "while True:\n"
            "    try:\n"
            f"        s=socket.create_connection(({host!r},{port}),1); b=s.recv(4)\n"
            "        sys.exit(0 if b.startswith(b'220') else 1)\n"
            "    except OSError:\n"
            "        if time.monotonic()>end: sys.exit(1)\n"
            "        time.sleep(0.05)\n"
        )
        subprocess.run(in_netns(netns, ["python3", "-c", probe]), check=True, timeout=timeout + 5)
        return
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                if implicit_tls:
                    context = ssl.create_default_context()
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                    with context.wrap_socket(sock, server_hostname=host) as tls:
                        banner = tls.recv(512)
                else:
                    banner = sock.recv(512)
        except OSError:
            banner = b""
        if banner.startswith(b"220"):
            return
        if banner:
            raise RuntimeError(f"the server greeted with {banner!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no FTP banner on {host}:{port}")
        time.sleep(0.05)


# -- one function per server: write its config, return (argv, user, password)


def _vsftpd(
    workdir: Path, files: Path, host: str, port: int, passive_ports: tuple[int, int] | None = None
) -> tuple[list[str], str, str]:
    # run_as_launching_user: vsftpd runs as whoever starts it and needs no
    # system account, which keeps it inside its folder. It then serves
    # anonymous users only; any password is accepted.
    empty = workdir / "empty"
    empty.mkdir(exist_ok=True)
    (workdir / "vsftpd.conf").write_text(
        "\n".join(
            [
                "listen=YES",
                "listen_ipv6=NO",
                f"listen_address={host}",
                f"listen_port={port}",
                "run_as_launching_user=YES",
                "anonymous_enable=YES",
                "local_enable=NO",
                "no_anon_password=NO",
                "ftp_username=nobody",
                f"anon_root={files}",
                "write_enable=YES",
                "anon_upload_enable=YES",
                "anon_mkdir_write_enable=YES",
                "anon_other_write_enable=YES",
                "anon_umask=022",
                f"secure_chroot_dir={empty}",
                "seccomp_sandbox=NO",
                "background=NO",
                "xferlog_enable=NO",
                "pasv_enable=YES",
                "port_enable=YES",
                "connect_from_port_20=NO",
                # Every session comes from ftpfix's one address: no per-IP cap.
                "max_per_ip=0",
                "max_clients=0",
                *([f"pasv_min_port={passive_ports[0]}", f"pasv_max_port={passive_ports[1]}"] if passive_ports else []),
                "",
            ]
        )
    )
    return [str(binary("vsftpd")), str(workdir / "vsftpd.conf")], "anonymous", "ftpfix@example.org"


def _pure_ftpd(
    workdir: Path, files: Path, host: str, port: int, passive_ports: tuple[int, int] | None = None
) -> tuple[list[str], str, str]:
    os.chown(files, NOBODY_UID, NOBODY_GID)
    pure_pw = package_root("pure-ftpd") / "usr/bin/pure-pw"
    passwd, pdb = workdir / "pureftpd.passwd", workdir / "pureftpd.pdb"
    passwd.unlink(missing_ok=True)
    subprocess.run(
        [
            str(pure_pw),
            "useradd",
            USER,
            "-u",
            str(NOBODY_UID),
            "-g",
            str(NOBODY_GID),
            "-d",
            str(files),
            "-f",
            str(passwd),
            "-m",
            "-F",
            str(pdb),
        ],
        input=f"{PASSWORD}\n{PASSWORD}\n".encode(),
        check=True,
        capture_output=True,
    )
    # -E: no anonymous logins; -H: no reverse DNS; -A: chroot everyone;
    # -c: clients at once (50 by default, which the soak and the fuzzer pass:
    # a pure-ftpd session waiting for a data connection outlives its control
    # connection for a while, and all come from ftpfix's one address).
    command = [str(binary("pure-ftpd")), "-S", f"{host},{port}", "-l", f"puredb:{pdb}", "-E", "-H", "-A", "-c", "1000"]
    if passive_ports:
        command += ["-p", f"{passive_ports[0]}:{passive_ports[1]}"]
    return command, USER, PASSWORD


def _proftpd(
    workdir: Path, files: Path, host: str, port: int, passive_ports: tuple[int, int] | None = None
) -> tuple[list[str], str, str]:
    os.chown(files, NOBODY_UID, NOBODY_GID)
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", PASSWORD], check=True, capture_output=True, text=True
    ).stdout.strip()
    passwd = workdir / "ftpd.passwd"
    passwd.write_text(f"{USER}:{hashed}:{NOBODY_UID}:{NOBODY_GID}::{files}:/bin/sh\n")
    passwd.chmod(0o600)
    extra = f"PassivePorts {passive_ports[0]} {passive_ports[1]}\n" if passive_ports else ""
    (workdir / "proftpd.conf").write_text(proftpd_config(workdir, host, port, passwd, extra))
    return [str(binary("proftpd")), "--nodaemon", "-c", str(workdir / "proftpd.conf")], USER, PASSWORD


def proftpd_config(workdir: Path, host: str, port: int, passwd: Path | None, extra: str = "") -> str:
    """A minimal standalone ProFTPD config in ``workdir``; mod_proxy adds ``extra``."""
    auth = f"AuthOrder mod_auth_file.c\nAuthUserFile {passwd}\n" if passwd else ""
    return f"""\
ServerType standalone
DefaultServer on
DefaultAddress {host}
SocketBindTight on
Port {port}
User nobody
Group nogroup
PidFile {workdir}/proftpd.pid
ScoreboardFile {workdir}/proftpd.scoreboard
DelayTable none
WtmpLog off
UseIPv6 off
UseReverseDNS off
RequireValidShell off
{auth}DefaultRoot ~
AllowOverwrite on
MaxInstances 500
<IfModule mod_auth_pam.c>
AuthPAM off
</IfModule>
{extra}
"""


def _vsftpd_tls(
    workdir: Path, files: Path, host: str, port: int, passive_ports: tuple[int, int] | None = None, *, tls: ServerTls
) -> tuple[list[str], str, str]:
    """vsftpd as Debian users run it with FTPS: TLS required for logins and
    data, and every data connection must resume the control connection's
    TLS session (require_ssl_reuse, Debian's default with ssl_enable): the
    setting ProFTPD's mod_proxy fails against."""
    command, user, password = _vsftpd(workdir, files, host, port, passive_ports)
    config = workdir / "vsftpd.conf"
    config.write_text(
        config.read_text()
        + "\n".join(
            [
                "ssl_enable=YES",
                f"rsa_cert_file={tls.certificate}",
                f"rsa_private_key_file={tls.key}",
                "allow_anon_ssl=YES",
                "force_anon_logins_ssl=YES",
                "force_anon_data_ssl=YES",
                "force_local_logins_ssl=YES",
                "force_local_data_ssl=YES",
                "require_ssl_reuse=YES",
                # vsftpd 3.0.3's own default is DES-CBC3-SHA, which OpenSSL 3 no longer offers.
                "ssl_ciphers=HIGH",
                f"implicit_ssl={'YES' if tls.implicit else 'NO'}",
                "debug_ssl=YES",
                "log_ftp_protocol=YES",
                f"vsftpd_log_file={workdir / 'vsftpd.log'}",
                "dual_log_enable=YES",
                "",
            ]
        )
    )
    return command, user, password


def _pure_ftpd_tls(
    workdir: Path, files: Path, host: str, port: int, passive_ports: tuple[int, int] | None = None, *, tls: ServerTls
) -> tuple[list[str], str, str]:
    """pure-ftpd with -Y 2: no login without TLS on the control connection;
    -2 names the certificate and key files (Debian's build reads
    /etc/ssl/private/pure-ftpd.pem without it)."""
    if tls.implicit:
        raise NotImplementedError("pure-ftpd has no implicit FTPS")
    command, user, password = _pure_ftpd(workdir, files, host, port, passive_ports)
    return [*command, "-Y", "2", "-2", f"{tls.certificate},{tls.key}"], user, password


_prepare = {"vsftpd": _vsftpd, "pure-ftpd": _pure_ftpd, "proftpd": _proftpd}
_prepare_tls = {"vsftpd": _vsftpd_tls, "pure-ftpd": _pure_ftpd_tls}


def ensure_clean(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
