"""The command line: ``ftpfix run`` and ``ftpfix check``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from . import logs
from .config import ENVIRONMENT_VARIABLE, ConfigError, default_path, load_config, render


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftpfix",
        description="A transparent FTP proxy that makes passive mode work for an FTP server behind NAT.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the proxy in the foreground"),
        ("check", "validate the config file and print the effective config"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"the TOML config file (default: ${ENVIRONMENT_VARIABLE}, else {default_path()})",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    path = arguments.config or default_path()
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"ftpfix: {error}", file=sys.stderr)
        return 2
    if arguments.command == "check":
        print(f"# {path}: OK\n")
        print(render(config), end="")
        return 0
    from .net.server import run

    logs.configure(config.log.level, config.log.format)
    try:
        trio.run(run, config)
    except OSError as error:
        # Typically the control port: taken, or privileged without the right.
        print(f"ftpfix: cannot listen on {config.listen.address}:{config.listen.port}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0
