"""ftpfix itself, run as a real process with a config file, the way users run it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .netns import in_netns

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Ftpfix:
    process: subprocess.Popen[bytes]
    log: Path
    host: str
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def events(self, name: str | None = None) -> list[dict]:
        """The JSON log lines written so far, or only those for event ``name``."""
        lines = self.log.read_text(errors="replace").splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [event for event in events if name is None or event["event"] == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        """Wait until event ``name`` has been logged ``count`` times."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(name)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name!r} logged {len(found)} times, not {count}:\n{self.log.read_text()}")
            time.sleep(0.02)
        return found


def config_text(
    *,
    listen: tuple[str | list[str], int],
    backend: tuple[str, int],
    public_address: str,
    ports: str,
    passive_extra: str = "",
    extra: str = "",
) -> str:
    return f"""\
[listen]
address = {json.dumps(listen[0])}
port = {listen[1]}

[backend]
address = "{backend[0]}"
port = {backend[1]}

[passive]
public_address = "{public_address}"
ports = "{ports}"
{passive_extra}
[log]
level = "debug"
format = "json"
{extra}"""


def start_ftpfix(
    workdir: Path, config: str, *, netns: str | None = None, wrapper: Sequence[str] = (), timeout: float = 15.0
) -> Ftpfix:
    """Run ``python -m ftpfix run`` on ``config``; wait for its listening line.

    ``wrapper`` is a command that runs the rest, such as ``unshare``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ftpfix.toml"
    path.write_text(config)
    log = workdir / "ftpfix.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            in_netns(netns, [*wrapper, sys.executable, "-m", "ftpfix", "run", "--config", str(path)]),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ftpfix exited with {process.returncode}:\n{log.read_text()}")
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and (event := json.loads(line)).get("event") == "listening":
                host, _, port = event["control"][0].rpartition(":")
                return Ftpfix(process, log, host, int(port))
        time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"ftpfix did not start listening:\n{log.read_text()}")
