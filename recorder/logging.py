"""structlog configuration: JSON lines under systemd, readable console output on a terminal.

Call :func:`configure_logging` once at startup. Modules log with
``log = structlog.get_logger(__name__)``; context bound with :func:`bind_run` (or
``structlog.contextvars.bound_contextvars``) appears on every line logged inside it::

    with bind_run(run="bpm-10hz", snapshot="bpm_10hz"):
        with bind_run(iteration=123):
            log.info("iteration_closed", status="complete")
    # {"run": "bpm-10hz", "snapshot": "bpm_10hz", "iteration": 123, "status": "complete",
    #  "event": "iteration_closed", "level": "info", "logger": "recorder.service",
    #  "timestamp": "2024-11-21T12:00:00.123456Z"}

Lines from the standard ``logging`` module (libraries) go through the same renderer, so the
journal gets one format. Output is written and flushed line by line (no block buffering
under systemd, where stdout is not a tty).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

__all__ = ["LOG_FORMATS", "bind_run", "configure_logging", "resolve_json"]

LOG_FORMATS = ("auto", "json", "console")


def resolve_json(json: bool | str | None, stream: TextIO) -> bool:
    """JSON or console? ``True``/``"json"`` and ``False``/``"console"`` force it; ``None`` or
    ``"auto"``: console on a terminal, JSON otherwise (systemd, pipes, files)."""
    if isinstance(json, bool):
        return json
    if json in ("json", "console"):
        return json == "json"
    if json not in (None, "auto"):
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {json!r}")
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or fake stream
        return True


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    json: bool | str | None = None,
    level: int | str = "INFO",
    *,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and route stdlib ``logging`` through it) to write to ``stream``
    (default ``sys.stdout``). Safe to call again (tests, reconfiguration)."""
    out = sys.stdout if stream is None else stream
    as_json = resolve_json(json, out)
    threshold = _level_number(level)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        # without the frames' local variables (structlog's default shows them): they hold
        # secrets (the admin secret, sasl.password in a librdkafka configuration)
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        colors = False
        with suppress(AttributeError, ValueError):
            colors = out.isatty()
        renderer = structlog.dev.ConsoleRenderer(colors=colors)

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _FlushingHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FlushingHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


class _FlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler (which flushes each record) that we can find again to replace."""


@contextmanager
def bind_run(**context: Any) -> Iterator[None]:
    """Bind ``run=``, ``snapshot=``, ``iteration=``, ... to every line logged inside."""
    with structlog.contextvars.bound_contextvars(**context):
        yield
