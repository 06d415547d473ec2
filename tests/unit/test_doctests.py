"""The examples in the docstrings of the pure modules run and hold (``>>>``)."""

from __future__ import annotations

import doctest
import importlib

import pytest

# recorder.sim.gateway's example needs a broker: tests/integration covers it
MODULES = ["recorder.daemon.backoff", "recorder.daemon.silence", "recorder.reader_align"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
