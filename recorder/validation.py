"""Validation errors that point at a field inside the value being validated.

A model validator (``mode="after"``) that finds a problem in one of its fields raises
:func:`invalid` with that field as ``subloc``; the run-definition loader appends it to the
error's location, so the message names that field and its own YAML line, not its parent.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic_core import PydanticCustomError


def invalid(message: str, *subloc: str | int) -> PydanticCustomError:
    """A validation error whose location is refined by ``subloc`` (read by the loader)."""
    return PydanticCustomError(
        "recorder_invalid", "{message}", {"message": message, "subloc": subloc}
    )


def invalid_all(problems: Sequence[tuple[str, tuple[str | int, ...]]]) -> PydanticCustomError:
    """Every problem a model validator found, ``(message, subloc)`` each, as one error (a
    validator can raise one) that the loader reports as one problem each."""
    (message, subloc), *more = problems
    return PydanticCustomError(
        "recorder_invalid", "{message}",
        {"message": message, "subloc": subloc, "more": [(m, tuple(loc)) for m, loc in more]},
    )
