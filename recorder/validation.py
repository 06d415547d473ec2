"""Validation errors that point at a field inside the value being validated.

A model validator (``mode="after"``) that finds a problem in one of its fields raises
:func:`invalid` with that field as ``subloc``; the run-definition loader appends it to the
error's location, so the message names that field and its own YAML line, not its parent.
"""

from __future__ import annotations

from pydantic_core import PydanticCustomError


def invalid(message: str, *subloc: str | int) -> PydanticCustomError:
    """A validation error whose location is refined by ``subloc`` (read by the loader)."""
    return PydanticCustomError(
        "recorder_invalid", "{message}", {"message": message, "subloc": subloc}
    )
