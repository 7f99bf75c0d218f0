"""Debian's own fail2ban-regex, run on the log lines of a real ftpfix.

``tests/install-servers`` unpacks the fail2ban package into
``tests/.cache/debs/fail2ban/`` as it does the FTP servers: nothing is
installed and no service starts. fail2ban-regex is then the very code a
fail2ban server runs on each line (date detection, ``<ADDR>``, the filter
file's failregex), here on a file of real lines, with the repository's
filter (``deploy/fail2ban/filter.d/ftpfix.conf``).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .legacy import DEBS
from .proxy import ROOT

PACKAGE = DEBS / "fail2ban"
SCRIPT = PACKAGE / "usr/bin/fail2ban-regex"
LIBRARY = PACKAGE / "usr/lib/python3/dist-packages"
#: The package's scripts name Debian's interpreter, which is what they run on.
PYTHON = "/usr/bin/python3"

FILTER = ROOT / "deploy/fail2ban/filter.d/ftpfix.conf"
JAIL = ROOT / "deploy/fail2ban/jail.d/ftpfix.conf"

#: What fail2ban's systemd backend puts before a journal entry's MESSAGE
#: (``filtersystemd.formatJournalEntry``: host, identifier[pid], colon).
JOURNAL_PREFIX = "gateway ftpfix[4711]: "


@dataclass(frozen=True)
class Match:
    """One failure fail2ban found: the address it would count, and when."""

    address: str
    time: float


def installed() -> bool:
    return SCRIPT.exists() and Path(PYTHON).exists()


def regex(log: Path, filter_file: Path = FILTER, *, datepattern: str | None = None) -> list[Match]:
    """The failures ``filter_file`` finds in ``log``, in order (fail2ban-regex ``-o row``).

    ``-r``: addresses are never looked up in DNS, as ``<ADDR>`` promises.
    """
    command = [PYTHON, str(SCRIPT), "-r", "-o", "row"]
    if datepattern is not None:
        command += ["-d", datepattern]
    environment = {**os.environ, "PYTHONPATH": str(LIBRARY)}
    result = subprocess.run(
        [*command, str(log), str(filter_file)], check=False, capture_output=True, text=True, env=environment, timeout=60
    )
    assert result.returncode == 0, f"fail2ban-regex failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    matches = []
    for line in result.stdout.splitlines():
        # ['203.0.113.5', 1795581197, {'ip4': '203.0.113.5', 'ip6': None}],
        if line.startswith("["):
            address, time, _ = ast.literal_eval(line.rstrip(","))
            matches.append(Match(address, float(time)))
    return matches


def as_journal(log: Path, out: Path) -> str:
    """Write ``log``'s lines to ``out`` as fail2ban's systemd backend shows them.

    The journal keeps the time apart from the text; here it stays in front of
    each line and the returned date pattern, given to ``regex``, takes it away
    with its space, so the filter sees what it would see from the journal:
    "host identifier[pid]: MESSAGE".
    """
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        stamp = _timestamp(line)
        if stamp is not None:
            lines.append(f"{stamp} {JOURNAL_PREFIX}{line}")
    out.write_text("\n".join(lines) + "\n")
    # The group makes the space part of what is taken away (fail2ban trims
    # a pattern's trailing space otherwise).
    return "^(%Y-%m-%dT%H:%M:%S\\.%f%z )"


def _timestamp(line: str) -> str | None:
    """The timestamp ftpfix wrote on ``line``, JSON or console."""
    if line.startswith("{"):
        return json.loads(line).get("timestamp")
    head = line.split(" ", 1)[0]
    return head if head[:4].isdigit() else None


def load_jail(confdir: Path, logpath: Path) -> list[str]:
    """fail2ban-client's dump (``-d``) of Debian's config with the repository's filter and jail.

    The file log (a) is pointed at ``logpath``; nothing starts, nothing is banned.
    """
    shutil.copytree(PACKAGE / "etc/fail2ban", confdir)
    (confdir / "jail.d/defaults-debian.conf").unlink(missing_ok=True)  # its sshd jail needs a log
    shutil.copy(FILTER, confdir / "filter.d/ftpfix.conf")
    (confdir / "jail.d/ftpfix.conf").write_text(JAIL.read_text().replace("/var/log/ftpfix.log", str(logpath)))
    environment = {**os.environ, "PYTHONPATH": str(LIBRARY)}
    result = subprocess.run(
        [PYTHON, str(PACKAGE / "usr/bin/fail2ban-client"), "-c", str(confdir), "-d"],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert result.returncode == 0, f"fail2ban-client -d failed:\n{result.stdout}{result.stderr}"
    return result.stdout.splitlines()
