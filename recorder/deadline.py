"""Calls that may never return, made in a forked worker process killed after a deadline.

HDF5 loops for ever, holding the GIL, on some damaged files (a zero-filled global-heap
collection; decision 0014). Files that may hold such damage are scanned before they open, but
a finalized file is not scanned on every open (that would read it whole). Commands that go
through many files, like ``k2eg-recorder ls``, and ``inspect`` (HDF5's loop does not heed
Ctrl-C: the worker is killed then too), make their per-file call through a
:class:`DeadlineWorker` instead: one forked worker process serves the calls one at a time, and
a call that does not answer in time gets the worker killed and replaced, and an
:class:`OSError` naming the file, so one damaged file is reported and the others are listed.

Only for command-line tools: the worker is forked (no interpreter start-up, ~10 ms), which is
safe in a process without other threads; the daemon recovers files in a child process of its
own (:mod:`recorder.daemon.leftovers`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DeadlineWorker"]

T = TypeVar("T")


class DeadlineWorker:
    """``call(fn, path)`` runs ``fn(path)`` in the worker and returns what it returns (or
    raises what it raises); after ``timeout_s`` without an answer the worker is killed and
    OSError raised. Without ``fork`` (not Linux) calls run in this process, unguarded."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool: multiprocessing.pool.Pool | None = None

    def call(self, fn: Callable[[Any], T], path: str | os.PathLike[str]) -> T:
        if "fork" not in multiprocessing.get_all_start_methods():
            return fn(path)
        if self._pool is None:
            sys.stdout.flush()  # what this process has buffered is not the worker's to write
            sys.stderr.flush()
            self._pool = multiprocessing.get_context("fork").Pool(1)
        pending = self._pool.apply_async(fn, (path,))
        try:
            return pending.get(self.timeout_s)
        except multiprocessing.TimeoutError:
            self._kill()
            raise OSError(
                f"Unable to read {os.fspath(path)} (no answer within {self.timeout_s:g} s: "
                "HDF5 loops for ever on some damaged files; `k2eg-recorder verify` checks it "
                "for the damage it knows)") from None
        except BaseException:  # Ctrl-C: the worker may never end by itself
            self._kill()
            raise

    def _kill(self) -> None:
        """Kill the worker (stuck in HDF5 with its GIL held, it cannot end on its own)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> DeadlineWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
