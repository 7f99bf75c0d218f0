"""The interop matrix: which client, in which mode, moved files through
ftpfix to which server, on loopback and across the NAT lab.

The transfer tests record each cell; at the end of the run the results are
written to tests/.cache/matrix.json. ``python -m tests.harness.matrix`` prints
them as the Markdown table the README shows.
"""

from __future__ import annotations

import json
import sys

from .clients import CLIENTS, MODES, NOT_APPLICABLE
from .legacy import CACHE, SERVERS

RESULTS = CACHE / "matrix.json"
ENVIRONMENTS = {"loopback": "Loopback", "nat": "NAT lab (WAN client, SMC P@SW bug on)"}

_results: dict[str, str] = {}


def record(environment: str, server: str, client: str, mode: str, passed: bool) -> None:
    _results[f"{environment}/{server}/{client}/{mode}"] = "pass" if passed else "FAIL"


def save() -> None:
    if not _results:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**previous, **_results}, indent=1, sort_keys=True))


def render(results: dict[str, str]) -> str:
    columns = [(client, mode) for client in CLIENTS for mode in MODES]
    lines = []
    for environment, title in ENVIRONMENTS.items():
        lines += [f"**{title}**: RETR and STOR of 16 MiB each, sha256-checked.", ""]
        lines.append("| server | " + " | ".join(f"{client} {mode.upper()}" for client, mode in columns) + " |")
        lines.append("| --- |" + " --- |" * len(columns))
        for server in SERVERS:
            cells = []
            for client, mode in columns:
                if (client, mode) in NOT_APPLICABLE:
                    cells.append("n/a")
                else:
                    outcome = results.get(f"{environment}/{server}/{client}/{mode}")
                    cells.append({"pass": "✓", "FAIL": "✗", None: "not run"}[outcome])
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"n/a: {reason}." for (client, mode), reason in NOT_APPLICABLE.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    if not RESULTS.exists():
        sys.exit(f"no results at {RESULTS}: run ./tests/run first")
    print(render(json.loads(RESULTS.read_text())))
