"""Argument types the sub-commands share: a refused value is argparse's one-line usage error
(exit 2), never a traceback or a silently odd run."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


def count(text: str) -> int:
    """A whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def kafka_topic(text: str) -> str:
    """A name Kafka accepts for a topic (1 to 249 of ``[A-Za-z0-9._-]``, not ``.`` or ``..``)."""
    from recorder.admin.protocol import TOPIC_RE, TOPIC_RULE

    if not TOPIC_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is {TOPIC_RULE}")
    return text


def given_path(text: str) -> Path:
    """A path that is not empty: ``Path("")`` is the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


def not_empty(text: str) -> str:
    """A value that is not blank (``--bootstrap``): refused here, under the option's name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 to 65535")
    return value
