"""``ftpfix diagnose URL``: walk the path to an FTP server stage by stage.

Each stage observes (``wire.py``), concludes (``checks.py``) and reports at
once through ``emit``, so a slow stage shows where the run is. A stage that
cannot run because an earlier one failed is reported as skipped; the run
never stops halfway without saying so.

How the passive ports are tested
--------------------------------
A connect to a port nobody listens on is refused, whether the router
forwards it (and the ftpfix host answers with a reset) or the router itself
answers for a port it does not forward: the two cannot be told apart from
outside. A router that drops what it does not forward gives a timeout, which
can. So, with ftpfix in front (``SITE FTPFIX`` gives its range):

1. every port of the range is dialed at once: a timeout means dropped on
   the way, not forwarded;
2. then ftpfix is made to listen on each port in turn: its pool hands ports
   out round-robin, so consecutive PASVs name every free port of the range.
   Each is dialed while ftpfix listens on it: refused or timed out now means
   not forwarded, open means forwarded; a LIST on it closes the mapping, so
   the next PASV gets a fresh one (ftpfix holds two at most per session).

A port another session holds is never handed out; if the unleased dial was
refused, it stays "untested". Without ftpfix the range is unknown, and only
the ports that a handful of PASVs name can be tested.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from . import checks
from .certificates import inspect_tls, sni, tls_context
from .checks import Check, FtpfixInfo, Network, Outcome, PortsSeen, RoundTrip, Stage, Status
from .wire import Control, WireError, dial, own_address, read_all, scan, text

#: Seconds each control step may take (connect, a reply).
TIMEOUT = 10.0

#: Seconds a passive port's connect may take before it counts as dropped.
PORT_TIMEOUT = 3.0

#: PASVs asked of a server without ftpfix, whose range is unknown.
SAMPLE_PASVS = 5

#: Most ports leased one by one (step 2 above); a bigger range is tested
#: only by the concurrent dial beyond that.
MAX_LEASES = 256

#: Most ports of a range dialed at once (step 1): ftpfix's ranges are tens
#: to hundreds of ports; the rest of a bigger one is reported untested.
MAX_SCAN = 1024

#: Seconds the lease loop may take in all, whatever the server's pace.
PORTS_DEADLINE = 120.0

#: Seconds a data connection may take to deliver everything it sends.
DATA_DEADLINE = 60.0

#: Largest file the data round trip fetches, and the bytes it reads at most.
RETR_LIMIT = 4 * 1024 * 1024

#: Most bytes of a listing read by the data round trip.
LIST_LIMIT = 1024 * 1024

#: NOOPs timed for the latency sample.
LATENCY_SAMPLES = 5

_227 = re.compile(r"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_229 = re.compile(r"\((.)\1\1(\d{1,5})\1\)")


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    user: str
    password: str
    path: str = ""
    tls: str = "off"  # "off", "explicit" (ftps://) or "implicit" (--implicit)


@dataclass(frozen=True, slots=True)
class Options:
    timeout: float = TIMEOUT
    port_timeout: float = PORT_TIMEOUT
    active: bool = False
    private: tuple[Network, ...] = ()
    ca: str | None = None
    #: Send a password over TLS whose certificate is not trusted (curl -k).
    insecure: bool = False


#: Users whose password is no secret (RFC 1635): sent over any TLS.
ANONYMOUS_USERS = ("anonymous", "ftp")


class _Lost(Exception):
    """The control connection is gone: the stage under way fails, every later one is skipped."""


class _Stop(_Lost):
    """A stage failed and said so; every later stage is skipped."""


@dataclass
class _Run:
    target: Target
    options: Options
    emit: Callable[[Check], None]
    results: list[Check] = field(default_factory=list)
    control: Control | None = None
    dialed: str = ""
    ftpfix: FtpfixInfo | None = None
    pasv_ok: bool = False
    retr_bytes: int = 0
    retr_seconds: float = 0.0
    current: Stage = Stage.RESOLVE  # the stage under way, which fails if the connection breaks
    protected: bool = False  # PROT P was accepted: data connections are TLS
    own: checks.Address | None = None  # this host's address towards the server
    #: One context for the control connection and every data connection: a
    #: data connection resumes the control connection's session (RFC 4217
    #: section 10 leaves it open; ftpfix requires it by default), and Python
    #: resumes a session only in the context that made it.
    tls_context: ssl.SSLContext = field(default_factory=lambda: tls_context(verify=False))

    def begin(self, stage: Stage) -> None:
        self.current = stage

    def report(self, check: Check) -> Check:
        """Record and show ``check``; returned as the stage concluded, for what runs next."""
        shown = check
        if ":" in self.dialed:
            shown = checks.over_ipv6(check, range_known=self.ftpfix is not None and self.ftpfix.ports is not None)
        self.results.append(shown)
        self.emit(shown)
        return check

    def skip_rest(self, after: Stage, why: str) -> None:
        stages = list(Stage)
        for stage in stages[stages.index(after) + 1 :]:
            if stage is Stage.TLS and self.target.tls == "off":
                continue
            if stage is Stage.ACTIVE and not self.options.active:
                continue
            if stage is Stage.SAMPLE or any(check.stage == stage for check in self.results):
                continue
            self.report(checks.skipped(stage, why))


def diagnose(target: Target, options: Options, emit: Callable[[Check], None]) -> list[Check]:
    """Run every stage against ``target``; each ``Check`` goes to ``emit`` as it is made.

    Resource handling: the control connection is closed (after a QUIT) in a
    ``finally``; each data connection and each scan socket is closed by the
    step that opened it.

    Error handling: every failure the far end can cause (refusal, silence,
    a reset, a protocol breach, a bound exceeded, a TLS failure) becomes a
    failed ``Check``, and the stages after it are reported as skipped;
    nothing the server does escapes as an exception.
    """
    run = _Run(target, options, emit)
    try:
        _stages(run)
    finally:
        if run.control is not None:
            try:
                run.control.send("QUIT")
            except OSError:
                pass
            run.control.close()
    return run.results


def _stages(run: _Run) -> None:
    target, options = run.target, run.options
    # 1. resolution, bounded: getaddrinfo itself has no timeout.
    addresses, error = _resolve(target.host, target.port, options.timeout)
    if run.report(checks.resolution(target.host, addresses, error)).status is Status.FAIL:
        run.skip_rest(Stage.RESOLVE, "the name does not resolve")
        return
    run.dialed = addresses[0]
    dialed = ipaddress.ip_address(run.dialed)
    # 2. connect
    outcome, sock, seconds, _ = dial(run.dialed, target.port, options.timeout)
    own = sock.getsockname()[0] if sock else own_address(run.dialed, target.port)
    own_ip = ipaddress.ip_address(own.split("%")[0]) if own else None
    run.own = own_ip
    check = run.report(checks.connect(dialed, target.port, outcome, seconds, own_ip, options.private))
    if sock is None:
        run.skip_rest(Stage.CONNECT, "no control connection")
        return
    if target.tls == "implicit":
        # Implicit FTPS: TLS from the first byte, before any greeting.
        run.begin(Stage.TLS)
        sock.settimeout(options.timeout)
        try:
            sock = run.tls_context.wrap_socket(sock, server_hostname=sni(target.host))
        except (ssl.SSLError, OSError, ValueError) as error:
            sock.close()
            run.report(checks.tls(None, str(error) or type(error).__name__, asked=True))
            run.report(checks.skipped(Stage.GREETING, "no TLS"))
            run.skip_rest(Stage.TLS, "no TLS")
            return
    try:
        run.control = Control(sock, options.timeout)
        _session(run, check)
    except _Stop as stop:
        run.skip_rest(run.current, str(stop))
    except _Lost as lost:
        run.report(
            Check(
                run.current,
                Status.FAIL,
                f"the control connection failed: {lost}",
                "see the server's log; a proxy, firewall or NAT helper on the way may cut it",
            )
        )
        run.skip_rest(run.current, "the control connection failed")


def _session(run: _Run, connected: Check) -> None:
    target, options = run.target, run.options
    control = run.control
    assert control is not None
    # 3. greeting
    run.begin(Stage.GREETING)
    try:
        code, lines = control.past_preliminary(*control.reply())  # "120 ready in n minutes", then 220
        # A multi-line banner (pure-ftpd's is 5 lines) is summed up by its first.
        shown = lines[0].strip() + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")
        greeted = run.report(checks.greeting(code, shown))
    except (WireError, OSError) as error:
        greeted = run.report(checks.greeting(None, str(error)))
    if greeted.status is Status.FAIL:
        raise _Stop("no usable greeting")
    # 4. TLS: asked for (ftps://, --implicit), or offered in FEAT
    if target.tls != "off":
        run.begin(Stage.TLS)
    if target.tls == "explicit":
        code, lines = _ask(control, "AUTH TLS")
        if code != 234:
            run.report(checks.tls(None, f"AUTH TLS answered {text(lines)}", asked=True))
            raise _Stop("TLS was asked for and refused")
        try:
            control.sock = run.tls_context.wrap_socket(control.sock, server_hostname=sni(target.host))
        except (ssl.SSLError, OSError) as error:
            run.report(checks.tls(None, str(error), asked=True))
            raise _Stop("the TLS handshake failed") from None
    if target.tls != "off":
        seen, error = inspect_tls(
            target.host,
            run.dialed,
            target.port,
            implicit=target.tls == "implicit",
            timeout=options.timeout,
            ca=options.ca,
        )
        run.report(checks.tls(seen, error, asked=True))
        private = not options.insecure and target.user.lower() not in ANONYMOUS_USERS
        if seen is not None and private and (refusal := checks.password_withheld(seen)):
            run.begin(Stage.LOGIN)
            run.report(refusal)
            raise _Stop("the password was not sent")
    # 5. login
    run.begin(Stage.LOGIN)
    code, lines = _ask(control, f"USER {target.user}")
    if code == 331:
        code, lines = _ask(control, f"PASS {target.password}")
    if run.report(checks.login(target.user, code, text(lines))).status is Status.FAIL:
        raise _Stop("not logged in")
    if target.tls != "off":
        # RFC 4217 sections 8 and 9: data connections are TLS only after PROT P.
        _ask(control, "PBSZ 0")
        code, _ = _ask(control, "PROT P")
        run.protected = code == 200
    else:
        run.begin(Stage.TLS)
        code, lines = _ask(control, "FEAT")
        if code == 211 and any(line.strip().upper().startswith("AUTH") and "TLS" in line.upper() for line in lines):
            seen, error = inspect_tls(
                target.host,
                run.dialed,
                target.port,
                implicit=target.tls == "implicit",
                timeout=options.timeout,
                ca=options.ca,
            )
            run.report(checks.tls(seen, error, asked=False))
    # 6. PASV integrity, 7. the 227 address
    run.begin(Stage.PASV)
    _ask(control, "TYPE I")
    run.ftpfix = _site(control)
    code, lines = _ask(control, "PASV")
    pasv_text = text(lines)
    if run.ftpfix is not None:
        run.ftpfix = _site(control) or run.ftpfix
    run.pasv_ok = run.report(checks.pasv_integrity(code, pasv_text, run.ftpfix)).status is not Status.FAIL
    if run.pasv_ok:
        run.begin(Stage.ADDRESS)
        match = _227.search(pasv_text)
        numbers = [int(match.group(n)) for n in range(1, 7)] if match else []
        if not numbers or max(numbers) > 255:
            run.report(Check(Stage.ADDRESS, Status.FAIL, f"227 without a valid address: {pasv_text[:120]}"))
        else:
            advertised = ipaddress.ip_address(".".join(map(str, numbers[:4])))
            dialed = ipaddress.ip_address(run.dialed)
            check = checks.address_227(dialed, advertised, run.ftpfix, options.private, run.own)
            run.report(check)
        # 8. every passive port
        run.begin(Stage.PORTS)
        started = time.monotonic()
        seen = _ports(run)
        run.report(checks.passive_ports(seen, run.ftpfix, time.monotonic() - started))
    else:
        run.report(checks.skipped(Stage.ADDRESS, "PASV failed"))
        run.report(checks.skipped(Stage.PORTS, "PASV failed"))
    # 9. EPSV, and real round trips
    run.begin(Stage.EPSV)
    code, lines = _ask(control, "EPSV")
    epsv_ok = run.report(checks.epsv(code, text(lines))).status is not Status.FAIL and code == 229
    name = target.path or None
    run.begin(Stage.DATA_PASSIVE)
    if run.pasv_ok:
        trip = _round_trip(run, "PASV", name)
        name = name or trip.retr_name
        run.report(checks.data(Stage.DATA_PASSIVE, trip))
    else:
        run.report(checks.skipped(Stage.DATA_PASSIVE, "PASV failed"))
    run.begin(Stage.DATA_EPSV)
    if epsv_ok:
        run.report(checks.data(Stage.DATA_EPSV, _round_trip(run, "EPSV", name)))
    else:
        run.report(checks.skipped(Stage.DATA_EPSV, "EPSV failed"))
    if options.active:
        run.begin(Stage.ACTIVE)
        run.report(_active(run))
    run.begin(Stage.SAMPLE)
    # 10. latency and throughput
    latencies = []
    for _ in range(LATENCY_SAMPLES):
        started = time.monotonic()
        code, _ = _ask(control, "NOOP")
        if code == 200:
            latencies.append(time.monotonic() - started)
    run.report(checks.sample(latencies, run.retr_bytes, run.retr_seconds))


def _ask(control: Control, line: str) -> tuple[int, list[str]]:
    """``line``'s final reply; a lost connection ends the run (``_Lost``)."""
    try:
        return control.final(line)
    except (WireError, OSError) as error:
        raise _Lost(f"{line.split(' ')[0]}: {error}") from None


def _site(control: Control) -> FtpfixInfo | None:
    code, lines = _ask(control, "SITE FTPFIX")
    return checks.parse_site_ftpfix(code, lines)


def _resolve(host: str, port: int, timeout: float) -> tuple[list[str], str | None]:
    """getaddrinfo with a deadline: it has none of its own. The lookup runs in a
    daemon thread, so one that never returns cannot hold the process at exit."""
    answer: list[Any] = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except OSError as error:
            answer.append(error)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:
        return [], f"no answer in {timeout:g} s"
    if isinstance(answer[0], OSError):
        return [], answer[0].strerror or str(answer[0])
    infos = answer[0]
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    # IPv4 first: a 227 can only name IPv4, and most NAT setups are IPv4.
    addresses.sort(key=lambda a: ":" in a)
    return addresses, None


def _passive(control: Control) -> tuple[str, int] | None:
    code, lines = _ask(control, "PASV")
    match = _227.search(text(lines)) if code == 227 else None
    if match is None:
        return None
    numbers = [int(match.group(n)) for n in range(1, 7)]
    if any(n > 255 for n in numbers):
        return None
    return ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]


def _ports(run: _Run) -> PortsSeen:
    control = run.control
    assert control is not None
    known = run.ftpfix.ports if run.ftpfix else None
    # A range past MAX_SCAN (or one a hostile server claims: 1-65535) is tested in part; the rest is "untested".
    tested = known[:MAX_SCAN] if known else None
    scanned = scan(run.dialed, tested, run.options.port_timeout) if tested else {}
    deadline = time.monotonic() + PORTS_DEADLINE
    leased: dict[int, Outcome] = {}
    # Refused unleased says nothing yet (see the module): those are leased and dialed again.
    wanted = {port for port, outcome in scanned.items() if outcome is Outcome.REFUSED} if known else set()
    asks = min(len(known), MAX_LEASES) if known else SAMPLE_PASVS
    failures = 0
    for _ in range(asks):
        if known is not None and not wanted - set(leased):
            break
        if time.monotonic() > deadline:
            break  # what was not leased by now is reported untested
        mapping = _passive(control)
        if mapping is None:
            break
        port = mapping[1]
        if port in leased:
            continue
        if scanned.get(port) in (Outcome.TIMEOUT, Outcome.UNREACHABLE):
            leased[port] = scanned[port]  # dropped on the way: a second dial would only wait again
            continue
        outcome, sock, _, _ = dial(run.dialed, port, run.options.port_timeout)
        leased[port] = outcome
        if sock is None:
            failures += 1
            if known is None and failures >= 3:
                break  # a server without ftpfix: three of its ports say enough
            continue
        # Use the mapping, so ftpfix lets it go before the next PASV.
        try:
            code, _ = control.command("LIST")
        except (WireError, OSError) as error:
            sock.close()
            raise _Lost(f"LIST: {error}") from None
        try:
            if code < 300:
                sock = _secure(run, sock)
                read_all(sock, run.options.timeout, LIST_LIMIT, DATA_DEADLINE)
        except (WireError, OSError):
            pass  # the port was reached; the LIST only closes the mapping
        finally:
            sock.close()
        try:
            code, _ = control.past_preliminary(code, [])
        except (WireError, OSError) as error:
            raise _Lost(f"LIST: {error}") from None
    return PortsSeen(known, scanned, leased)


def _data_connect(run: _Run, mode: str) -> tuple[socket.socket, str] | str:
    """A data connection in ``mode`` (PASV or EPSV), or why there is none."""
    control = run.control
    assert control is not None
    if mode == "PASV":
        mapping = _passive(control)
        if mapping is None:
            return "PASV refused"
        host, port = mapping
        via = ""
        if host != run.dialed:
            # As curl does (--ftp-skip-pasv-ip): never where a 227 says but to the address dialed. Not
            # only when the first 227 was wrong: a hostile server could name the dialed address first,
            # then any host of this LAN, and have this host probe it.
            host, via = run.dialed, f"{run.dialed}, not the 227's {host}"
    else:
        code, lines = _ask(control, "EPSV")
        match = _229.search(text(lines)) if code == 229 else None
        if match is None or not 0 < int(match.group(2)) < 65536:  # (|||99999|) was a traceback
            return f"EPSV answered {text(lines)}"
        host, port, via = run.dialed, int(match.group(2)), ""
    outcome, sock, _, _ = dial(host, port, run.options.port_timeout)
    if sock is None:
        return f"the data connection to {host}:{port} {outcome.said}"
    return sock, via


def _secure(run: _Run, sock: socket.socket) -> socket.socket:
    """The data connection as TLS when the session is (PROT P), after the transfer
    command's 1xx, as ftplib and curl do: ftpfix starts its side only then."""
    if not run.protected:
        return sock
    try:
        return run.tls_context.wrap_socket(sock, server_hostname=sni(run.target.host), session=_session_of(run.control))
    except (ssl.SSLError, OSError, ValueError) as failure:
        sock.close()
        raise WireError(f"TLS on the data connection failed: {failure}") from None


def _session_of(control: Control | None) -> ssl.SSLSession | None:
    return control.sock.session if control is not None and isinstance(control.sock, ssl.SSLSocket) else None


class _Refusal(str):
    """A transfer command answered with an error reply, no data sent: why, and the code."""

    code: int

    def __new__(cls, code: int, why: str) -> Self:
        refusal = super().__new__(cls, why)
        refusal.code = code
        return refusal


#: Replies to a RETR that refuse the file, not the data connection: no such
#: file, a folder, no permission (450, 550), a name the server will not take (553).
FILE_REFUSALS = frozenset({450, 550, 553})


def _transfer(run: _Run, mode: str, command: str, limit: int, *, cut: bool = False) -> tuple[bytes, str] | str:
    """One transfer command over a fresh data connection: its bytes, or why it failed. With ``cut``,
    past ``limit`` bytes the connection is closed and what came counts (the server's 426 for it too)."""
    control = run.control
    assert control is not None
    made = _data_connect(run, mode)
    if isinstance(made, str):
        return made
    sock, via = made
    verb = command.split(" ")[0]
    try:
        code, lines = control.command(command)
    except (WireError, OSError) as error:
        sock.close()
        raise _Lost(f"{verb}: {error}") from None
    failure = None
    try:
        if code >= 300:
            return _Refusal(code, f"{verb} answered {text(lines)}")
        sock = _secure(run, sock)
        payload = read_all(sock, run.options.timeout, limit, DATA_DEADLINE, cut=cut)
    except (WireError, OSError) as error:
        failure = f"{verb}: {error}"
    finally:
        sock.close()
    try:
        # The 1xx came first; now the final reply, read even when the data connection failed (the
        # server's 426 for it), or every later command would read the reply before its own.
        code, lines = control.past_preliminary(code, lines)
    except (WireError, OSError) as error:
        raise _Lost(f"{failure or verb}: {error}") from None
    if failure is not None:
        return failure
    if cut and len(payload) >= limit and code in (426, 450, 451):
        return payload, via  # the server's word for the connection this host closed
    if code != 226 and code != 250:
        return f"{verb} ended with {text(lines)}"
    return payload, via


def _round_trip(run: _Run, mode: str, name: str | None) -> RoundTrip:
    started = time.monotonic()
    # A big folder's listing is cut at LIST_LIMIT: what came shows the data path works.
    listing = _transfer(run, mode, "LIST", LIST_LIMIT, cut=True)
    if isinstance(listing, str):
        # A 425 although this host's data connection was accepted: it reached something else.
        return RoundTrip(error=f"LIST: {listing}", elsewhere=isinstance(listing, _Refusal) and listing.code == 425)
    payload, via = listing
    if len(payload) >= LIST_LIMIT:
        payload = payload[: payload.rfind(b"\n") + 1]  # never a name cut short
    files = _small_files(payload.decode("utf-8", "surrogateescape"))  # RETR sends these bytes back
    if name is None:
        name = next(iter(files), None)
    if name is None:
        return RoundTrip(listing_bytes=len(payload), seconds=time.monotonic() - started, via=via)
    retr_started = time.monotonic()
    fetched = _transfer(run, mode, f"RETR {name}", RETR_LIMIT)
    if isinstance(fetched, str):
        refused = isinstance(fetched, _Refusal) and fetched.code in FILE_REFUSALS
        return RoundTrip(
            listing_bytes=len(payload),
            retr_name=name,
            error=f"RETR {name}: {fetched}",
            file_refused=refused,
            elsewhere=isinstance(fetched, _Refusal) and fetched.code == 425,
        )
    seconds = time.monotonic() - retr_started
    got, listed = len(fetched[0]), files.get(name)
    if listed is not None and got < listed:  # the 226 says nothing of a transfer cut short on the way
        return RoundTrip(
            len(payload), name, got, error=f"RETR {name}: {got} of the {listed} bytes the listing gives arrived"
        )
    if mode == "PASV" or run.retr_bytes == 0:
        run.retr_bytes, run.retr_seconds = got, seconds
    return RoundTrip(len(payload), name, got, time.monotonic() - started, via=via)


def _small_files(listing: str) -> dict[str, int]:
    """The regular files of at most RETR_LIMIT bytes in a Unix-style LIST, in its order, and their sizes."""
    files: dict[str, int] = {}
    for line in listing.splitlines():
        parts = line.split(None, 8)
        if len(parts) == 9 and parts[0].startswith("-") and parts[4].isdigit() and int(parts[4]) <= RETR_LIMIT:
            name = parts[8]
            if name and not any(ch in name for ch in "\r\n\x00") and len(name) < 256:
                files.setdefault(name, int(parts[4]))
    return files


def _active(run: _Run) -> Check:
    control = run.control
    assert control is not None
    local = control.sock.getsockname()[0]
    if ":" in local:
        return checks.active(None, "active mode over IPv6 (EPRT) is not tested")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((local, 0))
        listener.listen(1)
        listener.settimeout(run.options.timeout)
        port = listener.getsockname()[1]
        code, lines = _ask(control, f"PORT {local.replace('.', ',')},{port // 256},{port % 256}")
        if code != 200:
            return checks.active(None, f"PORT answered {text(lines)}")
        try:
            control.send("LIST")
            code, lines = control.reply()
            if code >= 300:
                return checks.active(None, f"LIST answered {text(lines)}")
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                return checks.active(None, f"the server never connected to {local}:{port}")
            with sock:
                payload = read_all(sock, run.options.timeout, LIST_LIMIT, DATA_DEADLINE)
            code, lines = control.reply()
        except (WireError, OSError) as error:
            raise _Lost(f"LIST: {error}") from None
    if code != 226 and code != 250:
        return checks.active(None, f"LIST ended with {text(lines)}")
    return checks.active(f"the server connected from {peer[0]}, LIST {len(payload)} bytes", None)


#: Longest password line read from --password-file.
MAX_PASSWORD = 4096


def read_password(path: Path) -> str:
    """The first line of a password file, without its end. Read as a stream, not by its size: a
    pipe (``--password-file <(pass show ftp)``) has none. ValueError past MAX_PASSWORD bytes."""
    with path.open("rb") as stream:
        line = stream.readline(MAX_PASSWORD + 1)
    if len(line.rstrip(b"\r\n")) > MAX_PASSWORD:
        raise ValueError(f"the first line is over {MAX_PASSWORD} bytes")
    return line.rstrip(b"\r\n").decode("utf-8")
