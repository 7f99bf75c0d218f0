import io
import json

import structlog

from ftpfix import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_when_stdout_is_not_a_terminal() -> None:
    stream = io.StringIO()
    logs.configure("info", "auto", stream)
    structlog.contextvars.bind_contextvars(session=7, client="198.51.100.10:4242")
    try:
        structlog.get_logger().info("session opened")
    finally:
        structlog.contextvars.clear_contextvars()
    event = json.loads(stream.getvalue())
    assert event["event"] == "session opened" and event["session"] == 7 and event["level"] == "info"


def test_console_output_on_a_terminal() -> None:
    stream = Terminal()
    logs.configure("info", "auto", stream)
    structlog.get_logger().info("listening", control="0.0.0.0:21")
    text = stream.getvalue()
    assert "listening" in text and not text.lstrip().startswith("{")


def test_passwords_are_masked_whoever_logs_them() -> None:
    stream = io.StringIO()
    logs.configure("debug", "json", stream)
    structlog.get_logger().debug("command", line="PASS hunter2", password="hunter2")
    assert "hunter2" not in stream.getvalue()


def test_level_filters() -> None:
    stream = io.StringIO()
    logs.configure("warning", "json", stream)
    structlog.get_logger().info("quiet")
    assert stream.getvalue() == ""
