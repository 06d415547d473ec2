"""structlog configuration: JSON lines vs console, bound run context, stdlib routing."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from recorder.logging import bind_run, configure_logging, resolve_json


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_FlushingHandler":
            root.removeHandler(handler)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_bound_run_context() -> None:
    out = io.StringIO()
    configure_logging(json=None, level="INFO", stream=out)  # not a tty -> JSON
    log = structlog.get_logger("recorder.service")
    with bind_run(run="bpm-10hz", snapshot="bpm_10hz"):
        log.info("run_started", file="/data/a.h5")
        with bind_run(iteration=7):
            log.warning("iteration_incomplete", reason="timeout")
    log.info("outside")
    first, second, third = lines(out)
    assert first["event"] == "run_started"
    assert first["run"] == "bpm-10hz"
    assert first["snapshot"] == "bpm_10hz"
    assert first["file"] == "/data/a.h5"
    assert first["level"] == "info"
    assert first["logger"] == "recorder.service"
    assert str(first["timestamp"]).endswith("Z")
    assert second["iteration"] == 7
    assert second["run"] == "bpm-10hz"
    assert second["level"] == "warning"
    assert "run" not in third and "iteration" not in third


def test_level_filters() -> None:
    out = io.StringIO()
    configure_logging(json=True, level="WARNING", stream=out)
    log = structlog.get_logger("x")
    log.info("hidden")
    log.debug("hidden too")
    log.error("shown")
    assert [line["event"] for line in lines(out)] == ["shown"]


def test_stdlib_logging_goes_through_the_same_renderer() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    with bind_run(run="r1"):
        logging.getLogger("confluent_kafka").warning("broker %s down", "b1")
    (line,) = lines(out)
    assert line["event"] == "broker b1 down"
    assert line["logger"] == "confluent_kafka"
    assert line["run"] == "r1"
    assert line["level"] == "warning"


def test_exceptions_are_structured_in_json() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    try:
        raise ValueError("bad value")
    except ValueError:
        structlog.get_logger("x").exception("failed")
    (line,) = lines(out)
    assert line["event"] == "failed"
    assert "bad value" in json.dumps(line["exception"])


def test_json_tracebacks_carry_no_local_variables() -> None:
    """structlog's dict tracebacks show every frame's local variables by default: an
    exception logged under systemd wrote them to the journal, e.g. the admin codec's
    ``policy`` (its repr holds RECORDER_ADMIN_SECRET) or a librdkafka configuration with
    ``sasl.password``, and made one journal line of kilobytes per frame."""
    from recorder.admin.protocol import CommandPolicy

    out = io.StringIO()
    configure_logging(json=True, stream=out)

    def decode(policy: CommandPolicy) -> None:
        conf = {"sasl.password": "kafka-pass-word"}
        raise ValueError(f"codec bug ({len(conf)})")

    try:
        decode(CommandPolicy(secret=b"admin-secret-0123456789"))
    except ValueError:
        structlog.get_logger("x").exception("admin command not decoded")
    try:
        decode(CommandPolicy(secret=b"admin-secret-0123456789"))
    except ValueError:
        logging.getLogger("lib").exception("stdlib too")
    text = out.getvalue()
    assert "codec bug (1)" in text and len(lines(out)) == 2
    assert "admin-secret" not in text and "kafka-pass" not in text
    assert '"locals"' not in text


def test_console_on_a_tty() -> None:
    out = TtyStream()
    configure_logging(json=None, stream=out)
    with bind_run(run="bpm"):
        structlog.get_logger("x").info("hello")
    text = out.getvalue()
    assert "hello" in text
    assert "run" in text and "bpm" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_reconfiguring_does_not_duplicate_lines() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=io.StringIO())
    configure_logging(json=True, stream=out)
    structlog.get_logger("x").info("once")
    assert len(lines(out)) == 1


@pytest.mark.parametrize(
    ("value", "tty", "expected"),
    [
        (None, True, False),
        (None, False, True),
        ("auto", True, False),
        ("json", True, True),
        ("console", False, False),
        (True, True, True),
        (False, False, False),
    ],
)
def test_resolve_json(value: bool | str | None, tty: bool, expected: bool) -> None:
    stream = TtyStream() if tty else io.StringIO()
    assert resolve_json(value, stream) is expected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        resolve_json("xml", io.StringIO())
    with pytest.raises(ValueError, match="log level"):
        configure_logging(json=True, level="LOUD", stream=io.StringIO())
