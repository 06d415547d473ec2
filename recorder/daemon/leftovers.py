"""Files a crashed process left: :func:`finalize_leftover` recovers the ``.partial`` file of
a recording a restart resumes, and :func:`offsets_in_file` reads the Kafka offsets a finalized
file holds, so the resumed recording goes on after the last message that file holds.

The recovery runs in a child process (``python -m recorder.daemon.leftovers PARTIAL``) that is
killed after a deadline: HDF5 2.0 loops for ever, holding the GIL, on some damaged files (a
zero-filled global-heap block, as a power loss can leave). In the daemon's own process that
would stop every run and the systemd watchdog pings, and the restart that followed would meet
the same file again.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from recorder.errors import (
    DamagedFileError,
    FileBusyError,
    NothingToRecoverError,
    RecorderError,
)
from recorder.sinks.superblock import restore_superblock, superblock_bytes

_log = structlog.get_logger("recorder.daemon")

RESUMED_BY = ("the daemon at its restart, which resumed the recording in the next segment "
              "from the first message this file does not hold")
"""How a file left by a crash and recovered at a restart says so (its ``reason``)."""
LEFTOVER_ATTEMPTS = 5  # recovering a .partial a dying writer process may still hold
LEFTOVER_RETRY_S = 1.0
LEFTOVER_TIMEOUT_S = 300.0  # RECORDER_LEFTOVER_TIMEOUT_S: the child's deadline ...
LEFTOVER_BYTES_PER_S = 20e6  # ... plus a second per 20 MB of the file (measured: ~35 MB/s)
RESULT = "RESULT "  # the child's answer on stdout: this, then JSON
STACKS_FD_ENV = "K2EG_RECORDER_STACKS_FD"  # where the child writes its stacks at SIGUSR1
PARENT_ENV = "K2EG_RECORDER_RECOVERY_PARENT"  # the daemon's pid: the child ends with it
_PR_SET_PDEATHSIG = 1
CHILD_IGNORES: frozenset[signal.Signals] = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
"""The child ignores them: the daemon decides when a recovery ends (its deadline)."""
MAX_RECOVERING = max(2, os.cpu_count() or 2)
"""Recovery processes running at once, at most (each imports h5py: ~35 MB, ~0.4 s of CPU).
A daemon of 200 runs killed: at the next start every run recovered its leftover at once,
200 processes (~7 GB) sharing the cores, each one's deadline running while it waited for
the CPU, so that large leftovers all passed it and were all left ``.partial``. A recovery
waits for a place (:data:`_TURNS`), and its deadline counts from then."""
_TURNS = threading.BoundedSemaphore(MAX_RECOVERING)


def finalize_leftover(partial: Path, run: str, *, timeout_s: float = LEFTOVER_TIMEOUT_S
                      ) -> Path | None:
    """Recover the ``.partial`` file a crashed process left (status aborted, open iterations
    marked ``writer_crashed``): its committed data stays, the resumed recording continues in a
    new segment from the first offset that file does not hold. None when it cannot be
    recovered (logged; the file is left for ``k2eg-recorder recover``)."""
    if not partial.exists():
        return None
    for attempt in range(1, LEFTOVER_ATTEMPTS + 1):
        try:
            final = recover_in_child(partial, timeout_s=timeout_s)
        except FileBusyError as exc:
            # the writer process of the killed daemon may still be flushing it (file lock)
            if attempt < LEFTOVER_ATTEMPTS:
                _log.warning("leftover file busy; retrying", run=run, path=str(partial),
                             error=str(exc), attempt=attempt)
                time.sleep(LEFTOVER_RETRY_S)
                continue
            error = str(exc)
        except NothingToRecoverError as exc:  # removed: its writer died creating it
            _log.info("leftover file held nothing", run=run, path=str(partial),
                      detail=str(exc))
            return None
        except (OSError, RuntimeError, ValueError, RecorderError) as exc:
            error = str(exc)  # a full disk, a final name taken, damage: trying again won't do
        else:
            _log.info("leftover file recovered", run=run, path=str(final))
            return final
        break
    _log.error("could not recover a leftover file (left for `k2eg-recorder recover`)",
               run=run, path=str(partial), error=error)
    return None


def recording_uid_in_file(path: Path) -> str | None:
    """The ``recording_uid`` of a finalized file; None when it cannot be read or has none."""
    import h5py

    from recorder.sinks.describe import plain

    try:
        with h5py.File(path, "r") as f:
            uid = plain(f.attrs.get("recording_uid"))
    except (OSError, KeyError, ValueError) as exc:
        _log.warning("cannot read the recording of a file", path=str(path), error=str(exc))
        return None
    return uid if isinstance(uid, str) else None


def offsets_in_file(path: Path, topic: str) -> dict[int, int]:
    """Partition -> highest Kafka offset of ``topic`` whose data a finalized file holds (its
    ``/kafka`` commit log); ``{}`` when it cannot be read."""
    import h5py
    import numpy as np

    from recorder.sinks.filters import register_plugins

    try:
        with h5py.File(path, "r") as f:
            register_plugins(f.attrs.get("required_plugins"))  # /kafka zstd / blosc2
            if "kafka" not in f:
                return {}
            g = f["kafka"]
            if _plugin_filtered(g["topic"]):
                # a plugin filter: 5.1 writers before 2026-11-24 did not name it
                register_plugins(["hdf5plugin"])
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


def _plugin_filtered(dataset: Any) -> bool:
    """Whether ``dataset`` has a filter neither HDF5 (ids below 256) nor h5py (LZF) provides.
    Not ``Dataset.compression``: before h5py 3.16 it is None for a plugin filter."""
    from h5py import h5z

    dcpl = dataset.id.get_create_plist()
    return any(
        (fid := dcpl.get_filter(i)[0]) >= 256 and fid != h5z.FILTER_LZF
        for i in range(dcpl.get_nfilters())
    )


_RECOVERING: dict[subprocess.Popen[str], tuple[Path, bytes]] = {}  # child -> its file
_RECOVERING_LOCK = threading.Lock()
_EXITING = threading.Event()  # the daemon exits: no recovery starts (one waiting for its turn)


@atexit.register
def _end_recoveries() -> None:
    """Recoveries still running when the daemon exits (its shutdown budget ran out): killed,
    each file left as it was for the next start. Orphaned, nothing ended one at its
    deadline (one looping in HDF5 held a core for good)."""
    with _RECOVERING_LOCK:
        _EXITING.set()
        running = list(_RECOVERING.items())
        _RECOVERING.clear()
    for proc, (partial, original) in running:
        proc.kill()
        proc.wait()
        # the superblock only: importing h5py (for the final file begun, which the next
        # recovery removes) while the interpreter exits crashed it (SIGSEGV)
        with contextlib.suppress(OSError):
            if original and superblock_bytes(partial) != original:
                restore_superblock(partial, original)


def recover_in_child(partial: Path, *, timeout_s: float = LEFTOVER_TIMEOUT_S) -> Path:
    """:func:`recorder.sinks.recover.recover_file` of ``partial`` in a child process, killed
    after ``timeout_s`` plus a second per 20 MB, once it has its turn (at most
    :data:`MAX_RECOVERING` at once; a recovery that has to wait says so). Raises what
    recover_file raises: OSError (FileBusyError: a writer still holds the file),
    DamagedFileError (also when the child was killed) or RecorderError."""
    if not _TURNS.acquire(blocking=False):
        # a start after a crash of many runs: without a word, a run whose recording does not
        # resume for minutes looked hung
        _log.info("leftover recovery waits its turn", path=str(partial),
                  at_once=MAX_RECOVERING)
        _TURNS.acquire()
    try:
        return _recover_in_child(partial, timeout_s)
    finally:
        _TURNS.release()


def _recover_in_child(partial: Path, timeout_s: float) -> Path:
    """:func:`recover_in_child`, its turn taken."""
    try:
        size = partial.stat().st_size
    except OSError:
        size = 0
    deadline = timeout_s + size / LEFTOVER_BYTES_PER_S
    original = superblock_bytes(partial)
    cmd = [sys.executable, "-m", "recorder.daemon.leftovers", str(partial)]
    # its stacks at SIGUSR1 go where the daemon's go (its own stderr is read for errors)
    stacks = os.dup(2)
    try:
        # it starts with the signals it ignores blocked (the mask survives exec), as a writer
        # does: a terminal's Ctrl-C (SIGINT to the whole foreground group) or `systemctl
        # kill` ended the recovery, and the intact file was left for the operator
        with _RECOVERING_LOCK:  # not started once the daemon exits (_end_recoveries)
            if _EXITING.is_set():
                raise RecorderError(f"{partial}: not recovered: the daemon is exiting")
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_IGNORES)
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, pass_fds=(stacks,),
                                        env={**os.environ, STACKS_FD_ENV: str(stacks),
                                             PARENT_ENV: str(os.getpid())})
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _RECOVERING[proc] = (partial, original)
        with proc:
            try:
                stdout, stderr = proc.communicate(timeout=deadline)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
            finally:
                with _RECOVERING_LOCK:
                    _RECOVERING.pop(proc, None)
    except subprocess.TimeoutExpired:
        # as recover_file leaves a file it did not recover: byte for byte, nothing else
        from recorder.sinks.finalize import FINAL_SUFFIX  # h5py: not in the daemon's import
        from recorder.sinks.options import final_path

        if original and superblock_bytes(partial) != original:
            restore_superblock(partial, original)
        final = final_path(partial)
        final.with_name(final.name + FINAL_SUFFIX).unlink(missing_ok=True)
        raise DamagedFileError(
            f"{partial}: recovering it did not end within {deadline:.0f} s (HDF5 loops for "
            "ever on some damaged files); the process was killed") from None
    finally:
        os.close(stacks)
    answers = [line for line in stdout.splitlines() if line.startswith(RESULT)]
    if not answers:
        raise RecorderError(f"{partial}: the recovery process ended (exit {proc.returncode}) "
                            f"without an answer: {stderr.strip()[-500:]}")
    answer = json.loads(answers[-1][len(RESULT):])
    if "final" in answer:
        return Path(answer["final"])
    error, kind = str(answer["error"]), answer["kind"]
    if kind == "busy":
        raise FileBusyError(error)
    if kind == "os":
        raise OSError(error)
    if kind == "damaged":
        raise DamagedFileError(error)
    if kind == "nothing":
        raise NothingToRecoverError(error)
    raise RecorderError(error)


def _child(argv: list[str]) -> int:
    """The child process of :func:`recover_in_child`: one answer line on stdout."""
    from recorder.sinks.recover import recover_file

    partial = Path(argv[0])
    try:
        answer = {"final": str(recover_file(partial, by=RESUMED_BY))}
    except DamagedFileError as exc:  # before OSError: a HeapLoopError is one too
        answer = {"error": str(exc), "kind": "damaged"}
    except FileBusyError as exc:
        answer = {"error": str(exc), "kind": "busy"}
    except NothingToRecoverError as exc:
        answer = {"error": str(exc), "kind": "nothing"}
    except OSError as exc:
        answer = {"error": str(exc), "kind": "os"}
    except (ValueError, RuntimeError, RecorderError) as exc:
        kind = "damaged" if isinstance(exc, (ValueError, RuntimeError)) else "recorder"
        answer = {"error": str(exc), "kind": kind}
    print(RESULT + json.dumps(answer), flush=True)
    return 0


def _dump_stacks_on_sigusr1() -> None:
    """SIGUSR1 (`systemctl kill -s USR1 k2eg-recorder` reaches every process of the unit):
    this process's stacks, as the daemon and its writers do; by default it killed the
    recovery, and the leftover was left .partial."""
    fd = os.environ.get(STACKS_FD_ENV)
    with contextlib.suppress(ValueError, OSError):
        if fd is not None:
            faulthandler.register(signal.SIGUSR1, file=int(fd), all_threads=True)
            return
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _end_with_the_daemon() -> None:
    """Be killed (SIGKILL) when the daemon that started this recovery dies. A daemon killed
    again (kill -9) while it recovered a leftover left it running alone, holding the file's
    lock, for as long as a large file takes: the next daemon found the file busy, gave up
    and resumed from its state file, before what the file holds (iterations recorded
    twice). Killed, the file is recovered again by the next start (it stays a .partial
    until the final file, synced whole, takes its place)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and parent.isdigit() and os.getppid() != int(parent):
        os._exit(1)  # it died before prctl: nobody waits for this recovery


if __name__ == "__main__":
    _end_with_the_daemon()
    for _sig in CHILD_IGNORES:  # blocked until now (see recover_in_child)
        signal.signal(_sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_IGNORES)
    _dump_stacks_on_sigusr1()
    sys.exit(_child(sys.argv[1:]))
