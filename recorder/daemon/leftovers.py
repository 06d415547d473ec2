"""Files a crashed process left: :func:`finalize_leftover` recovers the ``.partial`` file of
a recording a restart resumes, and :func:`offsets_in_file` reads the Kafka offsets a finalized
file holds, so the resumed recording goes on after the last message that file holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from recorder.errors import RecorderError

_log = structlog.get_logger("recorder.daemon")

RESUMED_BY = ("the daemon at its restart, which resumed the recording in the next segment "
              "from the first message this file does not hold")
"""How a file left by a crash and recovered at a restart says so (its ``reason``)."""
LEFTOVER_ATTEMPTS = 5  # recovering a .partial a dying writer process may still hold
LEFTOVER_RETRY_S = 1.0


def finalize_leftover(partial: Path, run: str) -> Path | None:
    """Recover the ``.partial`` file a crashed process left (status aborted, open iterations
    marked ``writer_crashed``): its committed data stays, the resumed recording continues in a
    new segment from the first offset that file does not hold."""
    if not partial.exists():
        return None
    from recorder.sinks.recover import recover_file

    for attempt in range(1, LEFTOVER_ATTEMPTS + 1):
        try:
            final = recover_file(partial, by=RESUMED_BY)
        except OSError as exc:
            # the writer process of the killed daemon may still be flushing it (file lock)
            if attempt < LEFTOVER_ATTEMPTS:
                _log.warning("leftover file busy; retrying", run=run, path=str(partial),
                             error=str(exc), attempt=attempt)
                time.sleep(LEFTOVER_RETRY_S)
                continue
            error = str(exc)
        except (RuntimeError, ValueError, RecorderError) as exc:
            error = str(exc)
        else:
            _log.info("leftover file recovered", run=run, path=str(final))
            return final
        break
    _log.error("could not recover a leftover file (left for `k2eg-recorder recover`)",
               run=run, path=str(partial), error=error)
    return None


def offsets_in_file(path: Path, topic: str) -> dict[int, int]:
    """Partition -> highest Kafka offset of ``topic`` whose data a finalized file holds (its
    ``/kafka`` commit log); ``{}`` when it cannot be read."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            if "kafka" not in f:
                return {}
            g = f["kafka"]
            topics = np.asarray(g["topic"][()])
            partitions = np.asarray(g["partition"][()])
            offsets = np.asarray(g["offset"][()])
    except (OSError, KeyError, ValueError) as exc:
        _log.warning("cannot read the Kafka offsets of a recovered file", path=str(path),
                     error=str(exc))
        return {}
    out: dict[int, int] = {}
    wanted = topic.encode("utf-8")[:255]
    for t, p, o in zip(topics.tolist(), partitions.tolist(), offsets.tolist(), strict=True):
        if bytes(t) == wanted:
            out[int(p)] = max(int(o), out.get(int(p), -1))
    return out
