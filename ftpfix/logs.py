"""Logging: structlog, JSON lines when stdout is not a terminal, console when it is.

A container's stdout goes to a log collector, which wants one JSON object a
line; a person at a terminal wants colours and aligned columns. Session fields
(``session``, ``client``) are bound once per session with
``structlog.contextvars``, so every line a session's tasks write carries them.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .protocol.commands import Level

#: Field names whose values are never written, whoever logs them.
SECRET_FIELDS = frozenset({"password", "pass", "passwd", "secret"})

#: A PASS or ACCT command inside any text: however the verb is cased or
#: separated from its argument (a server may split on tabs), and also in the
#: repr() of bytes, where a tab reads as "\t". Everything after it is masked.
_SECRET_COMMAND = re.compile(r"(?i)(?<![A-Za-z])(PASS|ACCT)((?:[ \t\x0b\x0c]|\\[tx](?:0b|0c)?)+)[^\r\n]*")


def _mask(text: str) -> str:
    return _SECRET_COMMAND.sub(lambda match: match.group(1) + " ****", text)


def mask_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor that masks passwords, wherever they appear.

    The core already masks the arguments of PASS and ACCT; this is the second
    lock, for a command line that reaches a log some other way (an error
    message, a reply quoted back): every string field is searched.
    """
    for key, value in event.items():
        if key in SECRET_FIELDS:
            event[key] = "****"
        elif isinstance(value, str):
            event[key] = _mask(value)
    return event


class LogFormat(enum.StrEnum):
    """How log lines are written."""

    AUTO = "auto"  # console on a terminal, JSON elsewhere
    JSON = "json"
    CONSOLE = "console"


def configure(level: str = Level.INFO, format: str = LogFormat.AUTO, stream: TextIO | None = None) -> None:
    """Set up structlog for the process."""
    stream = stream if stream is not None else sys.stdout
    if format == LogFormat.AUTO:
        format = LogFormat.CONSOLE if stream.isatty() else LogFormat.JSON
    renderer: Any
    if format == LogFormat.JSON:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
