"""ftpfix diagnose's verdicts from observations alone (``diagnose/checks.py``), and the host checks' pure parts."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from ftpfix.diagnose import UsageError, parse_target, without_password
from ftpfix.diagnose import checks as c
from ftpfix.diagnose.checks import Outcome, PortsSeen, Stage, Status
from ftpfix.diagnose.host import certificate_expiry, conntrack_helper

ip = ipaddress.ip_address
LAB_LAN = (ipaddress.ip_network("192.0.2.0/24"),)
FTPFIX = c.FtpfixInfo("0.1.0", range(50000, 50020), "PASV")


def test_site_ftpfix_reply_is_parsed() -> None:
    lines = ["211-ftpfix 0.1.0", " passive-ports: 50000-50019", " last-pasv: P@SW (repaired)", "211 End."]
    info = c.parse_site_ftpfix(211, lines)
    assert info == c.FtpfixInfo("0.1.0", range(50000, 50020), "P@SW (repaired)")
    assert info.repaired


@pytest.mark.parametrize(
    ("code", "lines"),
    [
        (500, ["500 'SITE FTPFIX': command not understood"]),
        (211, ["211-vsftpd"]),
        (211, []),
    ],
)
def test_any_other_answer_means_no_ftpfix(code: int, lines: list[str]) -> None:
    assert c.parse_site_ftpfix(code, lines) is None


def test_a_bogus_range_is_no_range() -> None:
    info = c.parse_site_ftpfix(211, ["211-ftpfix 9", " passive-ports: 70000-1", "211 End."])
    assert info is not None and info.ports is None


def test_spans() -> None:
    assert c.spans([50012, 50010, 50011, 50015]) == "50010-50012, 50015"
    assert c.spans([]) == ""


def test_private_is_rfc1918_and_friends_not_documentation_networks() -> None:
    assert c.is_private(ip("192.168.1.10")) and c.is_private(ip("100.64.0.1")) and c.is_private(ip("fd00::1"))
    assert not c.is_private(ip("203.0.113.1")) and not c.is_private(ip("192.0.2.20"))
    assert c.is_private(ip("192.0.2.20"), LAB_LAN)


def test_connect_refused_from_outside_names_the_port() -> None:
    check = c.connect(ip("203.0.113.1"), 21, Outcome.REFUSED, 0.01, ip("198.51.100.10"), LAB_LAN)
    assert check.status is Status.FAIL and "forward TCP port 21" in check.hint
    assert not check.data.get("hairpin")


def test_connect_timeout_says_dropped() -> None:
    check = c.connect(ip("203.0.113.1"), 21, Outcome.TIMEOUT, 10, ip("198.51.100.10"))
    assert "timed out" in check.summary and "not forwarded, or filtered" in check.summary


@pytest.mark.parametrize("outcome", [Outcome.REFUSED, Outcome.TIMEOUT])
def test_from_a_private_address_to_a_public_one_is_the_hairpin_trap(outcome: Outcome) -> None:
    check = c.connect(ip("203.0.113.1"), 21, outcome, 1, ip("192.168.1.30"))
    assert check.data["hairpin"] and "run ftpfix diagnose from outside" in check.hint
    assert c.verdict([check]).text.startswith("HAIRPIN at connect")


def test_a_router_that_loops_back_is_reached_but_said_to_be_a_detour() -> None:
    check = c.connect(ip("203.0.113.1"), 21, Outcome.OPEN, 0.001, ip("192.168.1.30"))
    assert check.status is Status.WARN and "hairpin NAT" in check.summary
    assert c.verdict([check]).text.startswith("WORKS, but connect")
    later = c.Check(Stage.PORTS, Status.FAIL, "50010 not forwarded", "forward 50010")
    assert c.verdict([check, later]).text.endswith("run from outside to be sure)")


def test_from_the_lan_to_the_lan_address_is_no_hairpin() -> None:
    check = c.connect(ip("192.168.1.10"), 21, Outcome.REFUSED, 0, ip("192.168.1.30"))
    assert not check.data.get("hairpin")


def test_greetings() -> None:
    assert c.greeting(220, "220 ready").status is Status.OK
    down = c.greeting(421, "421 Service not available, the FTP server cannot be reached.")
    assert down.status is Status.FAIL and "behind it is down" in down.summary and "[backend]" in down.hint
    busy = c.greeting(421, "421 Too many users")
    assert "the server refuses" in busy.summary
    assert c.greeting(None, "no reply in time").status is Status.FAIL


def test_pasv_integrity() -> None:
    smc = c.pasv_integrity(500, "500 P@SW not understood", None)
    assert smc.status is Status.FAIL and "SMC Barricade" in smc.summary and "put ftpfix in front" in smc.hint
    repaired = c.pasv_integrity(227, "227 ok", c.FtpfixInfo("0.1.0", None, "P@SW (repaired)"))
    assert repaired.status is Status.WARN and "ftpfix repaired it" in repaired.summary
    assert c.pasv_integrity(227, "227 ok", FTPFIX).status is Status.OK
    assert c.pasv_integrity(227, "227 ok", None).status is Status.OK
    assert c.pasv_integrity(502, "502 no", None).status is Status.FAIL


def test_address_227() -> None:
    assert c.address_227(ip("203.0.113.1"), ip("203.0.113.1"), FTPFIX).status is Status.OK
    private = c.address_227(ip("203.0.113.1"), ip("192.168.1.20"), None)
    assert "a private address" in private.summary and "put ftpfix in front" in private.hint
    wrong = c.address_227(ip("203.0.113.1"), ip("203.0.113.99"), FTPFIX)
    assert "not 203.0.113.1" in wrong.summary
    assert 'set [passive] public_address = "203.0.113.1"' in wrong.hint


def test_a_lan_address_told_to_a_lan_client_through_a_looping_router_is_only_a_warning() -> None:
    through_loop = c.address_227(ip("203.0.113.1"), ip("192.168.1.10"), FTPFIX, own=ip("192.168.1.30"))
    assert through_loop.status is Status.WARN and "split horizon" not in through_loop.summary
    assert "as ftpfix tells LAN clients" in through_loop.summary
    # Without ftpfix nothing tells LAN clients apart: the server names its private address to everyone.
    legacy = c.address_227(ip("203.0.113.1"), ip("192.168.1.10"), None, own=ip("192.168.1.30"))
    assert legacy.status is Status.FAIL


def test_ports_missing_from_a_known_range() -> None:
    scanned = dict.fromkeys(range(50000, 50020), Outcome.REFUSED)
    leased = {port: Outcome.OPEN if port < 50010 else Outcome.REFUSED for port in range(50000, 50020)}
    check = c.passive_ports(PortsSeen(range(50000, 50020), scanned, leased), FTPFIX)
    assert check.status is Status.FAIL
    assert check.data["not_forwarded"] == list(range(50010, 50020))
    assert "forward TCP ports 50010-50019" in check.hint


def test_a_timeout_in_the_scan_is_not_forwarded_without_a_lease() -> None:
    scanned = {50000: Outcome.TIMEOUT, 50001: Outcome.REFUSED}
    check = c.passive_ports(PortsSeen(range(50000, 50002), scanned, {50001: Outcome.OPEN}), FTPFIX)
    assert check.data["not_forwarded"] == [50000]


def test_ports_held_by_other_sessions_are_untested() -> None:
    scanned = {50000: Outcome.REFUSED, 50001: Outcome.REFUSED, 50002: Outcome.OPEN}
    check = c.passive_ports(PortsSeen(range(50000, 50003), scanned, {50000: Outcome.OPEN}), FTPFIX)
    assert check.status is Status.WARN and check.data["untested"] == [50001]


def test_ports_a_server_without_ftpfix_named() -> None:
    seen = PortsSeen(None, {}, {31000: Outcome.REFUSED, 42000: Outcome.REFUSED})
    check = c.passive_ports(seen, None)
    assert check.status is Status.FAIL and "2 of 2 ports the server named" in check.summary
    assert "put ftpfix in front" in check.hint


def test_tls_verdicts() -> None:
    good = c.TlsSeen("TLSv1.3", 80, True, True, False)
    assert c.tls(good, None, asked=True).status is Status.OK
    self_signed = c.TlsSeen("TLSv1.3", 80, False, True, True, "self-signed certificate")
    assert "self-signed" in c.tls(self_signed, None, asked=True).summary
    expired = c.TlsSeen("TLSv1.2", -3, False, True, False, "certificate has expired")
    assert c.tls(expired, None, asked=True).status is Status.FAIL
    wrong_name = c.TlsSeen("TLSv1.3", 80, False, False, False, "Hostname mismatch")
    assert "does not name the host" in c.tls(wrong_name, None, asked=True).summary
    assert c.tls(c.TlsSeen("TLSv1.3", 5, True, True, False), None, asked=True).status is Status.WARN
    assert c.tls(None, "handshake failure", asked=False).status is Status.WARN


def test_the_verdict_names_the_first_failure_then_the_first_warning() -> None:
    ok = c.Check(Stage.RESOLVE, Status.OK, "fine")
    warn = c.Check(Stage.PASV, Status.WARN, "repaired", "nothing to do")
    fail = c.Check(Stage.PORTS, Status.FAIL, "50010 not forwarded", "forward 50010")
    later = c.Check(Stage.DATA_EPSV, Status.FAIL, "later")
    assert c.verdict([ok, warn, fail, later]).text == "FAIL at passive ports: 50010 not forwarded; forward 50010"
    assert c.verdict([ok, warn, fail]).exit_status == 1
    assert c.verdict([ok, warn]).exit_status == 0 and c.verdict([ok, warn]).text.startswith("WORKS, but")
    assert c.verdict([ok]).text == "OK: every stage passed"


def test_lines_on_a_terminal_and_off() -> None:
    check = c.Check(Stage.PORTS, Status.FAIL, "50010 not forwarded", "forward 50010")
    assert check.line(terminal=True) == "✗ passive ports   50010 not forwarded\n  → forward 50010"
    assert check.line(terminal=False) == "FAIL passive ports: 50010 not forwarded\n     to fix: forward 50010"


def test_urls() -> None:
    target = parse_target("ftp://bob:s%40cret@ftp.example.org:2121/pub/a.txt")
    assert (target.host, target.port, target.user, target.password, target.path, target.tls) == (
        "ftp.example.org",
        2121,
        "bob",
        "s@cret",
        "pub/a.txt",
        "off",
    )
    anonymous = parse_target("ftp.example.org")
    assert anonymous.user == "anonymous" and anonymous.port == 21
    assert parse_target("ftps://h").tls == "explicit"
    assert parse_target("ftp://h", implicit=True).port == 990


def test_user_and_password_file_override_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\nignored\n")
    target = parse_target("ftp://x:y@h", user="carol", password_file=secret)
    assert (target.user, target.password) == ("carol", "hunter2")


@pytest.mark.parametrize("url", ["http://h", "ftp://", "ftp://h:99999", "ftp://u%0d%0aDELE%20x@h"])
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        parse_target(url)


def test_conntrack_helper(tmp_path: Path) -> None:
    modules, automatic = tmp_path / "modules", tmp_path / "helper"
    modules.write_text("nf_nat 1 0 - Live 0x0\n")
    automatic.write_text("0\n")
    assert conntrack_helper(modules, automatic, ruleset="").status is Status.OK
    modules.write_text("nf_conntrack_ftp 24576 0 - Live 0x0\n")
    assert "nothing assigns it" in conntrack_helper(modules, automatic, ruleset="").summary
    assert conntrack_helper(modules, automatic, ruleset='ct helper set "ftp-standard"').status is Status.WARN
    automatic.write_text("1\n")
    assert "nf_conntrack_helper=1" in conntrack_helper(modules, automatic, ruleset="").summary


def test_certificate_expiry(tmp_path: Path) -> None:
    ca = trustme.CA()
    now = datetime.now(UTC)
    for days, status in ((90, Status.OK), (5, Status.WARN), (-2, Status.FAIL)):
        leaf = ca.issue_cert(
            "ftp.example.org", not_before=now - timedelta(days=30), not_after=now + timedelta(days=days)
        )
        path = tmp_path / f"cert{days}.pem"
        leaf.cert_chain_pems[0].write_to_path(str(path))
        assert certificate_expiry(path).status is status, days
    assert certificate_expiry(tmp_path / "missing.pem").status is Status.FAIL


@pytest.mark.parametrize(
    ("said", "printed"),
    [
        ("220 hello", "220 hello"),
        ("220 café 日本 ✓", "220 café 日本 ✓"),
        ("220 \x1b[2J\x1b]0;x\x07", "220 \\x1b[2J\\x1b]0;x\\x07"),
        ("a\u202eb\x9bc", "a\\u202eb\\x9bc"),
        ("two\nlines\u2028", "two\\nlines\\u2028"),
        ("caf\udce9", "caf\\udce9"),
    ],
)
def test_what_a_server_said_is_shown_never_obeyed(said: str, printed: str) -> None:
    assert c.shown(said) == printed
    check = c.Check(Stage.GREETING, Status.OK, said, said)
    assert check.line(terminal=False) == f"ok   greeting: {printed}\n     to fix: {printed}"


def test_over_ipv6_only_pasv_failures_are_warnings() -> None:
    failed = c.Check(Stage.ADDRESS, Status.FAIL, "227 names 192.0.2.1")
    assert c.over_ipv6(failed, range_known=True).status is Status.WARN
    assert c.over_ipv6(c.Check(Stage.EPSV, Status.FAIL, "x"), range_known=True).status is Status.FAIL
    ports = c.Check(Stage.PORTS, Status.FAIL, "50001 not forwarded")
    assert c.over_ipv6(ports, range_known=True) is ports  # ftpfix's range serves EPSV too
    assert c.over_ipv6(ports, range_known=False).status is Status.WARN


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://bob:s3cret@h:21/x", "ftp://bob:***@h:21/x"),
        ("bob:p@ss@h", "bob:***@h"),
        ("ftp://bob@h", "ftp://bob@h"),
        ("ftp://h/a:b@c", "ftp://h/a:b@c"),
    ],
)
def test_urls_in_errors_hide_the_password(url: str, shown: str) -> None:
    assert without_password(url) == shown
