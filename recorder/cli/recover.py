"""``k2eg-recorder recover PATH...``: finalize files left by a crashed writer.

Files a running writer holds (its writer lock, :mod:`recorder.sinks.writelock`) are left
alone and named, so this is safe to run while the daemon records into the same directory.
Each ``.partial`` is checked against the file-format spec first (``recorder.verify``,
structure and index), and so is the file it becomes before it replaces the ``.partial``: a
file that does not pass is left as it was, byte for byte (``--no-verify`` skips both checks
and finalizes what can be read). Exit status 1 when a file could not be recovered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "make files left by a crashed writer clean and mark them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, help="*.h5.partial files or directories to scan"
    )
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check the .partial files nor the files they become "
                             "(k2eg-recorder verify): finalize what can be read")


def run(args: argparse.Namespace) -> int:
    from recorder.errors import (
        DamagedFileError,
        FileBusyError,
        FileFormatError,
        NothingToRecoverError,
    )
    from recorder.sinks.recover import find_partials, recover_file
    from recorder.sinks.writelock import writer_active

    files: list[Path] = []
    failures = busy = 0
    for p in args.paths:
        try:
            p.exists()
        except OSError as exc:  # a name too long, a directory on the way not searchable
            print(f"{p}: cannot look it up: {exc.strerror or exc}")
            failures += 1
            continue
        if not p.exists():
            print(f"{p}: no such file or directory")
            failures += 1
            continue
        try:
            files.extend(find_partials(p) if p.is_dir() else [p])
        except OSError as exc:  # a directory that cannot be listed
            print(f"{p}: cannot list the directory: {exc.strerror or exc}")
            failures += 1
    check = None if args.no_verify else _verify_problems
    gone = 0
    for p in files:
        if _finalized_meanwhile(p) or _already_final(p):
            gone += 1
            continue
        if not p.is_file():  # not opened: reading a FIFO waits for a writer for ever
            print(f"{p}: NOT recovered: not a regular file ({_not_regular(p)}); left as it is")
            failures += 1
            continue
        verified = False
        if check is not None and not writer_active(p) and not _superblock_only(p):
            # what verify finds in the .partial names the damage in the file's own terms;
            # finalizing would stop somewhere in it with HDF5's words, or not at all
            problems = check(p)
            if problems and _finalized_meanwhile(p):
                gone += 1
                continue
            if problems:
                print(f"{p}: NOT recovered: it does not pass k2eg-recorder verify "
                      f"({len(problems)} error(s)); the first: {problems[0]}; left as it was "
                      "(--no-verify finalizes what can be read)")
                failures += 1
                continue
            verified = True  # which scanned its global heap
        try:
            out = recover_file(p, check=check, heap_checked=verified)
        except FileBusyError:
            print(f"{p}: left alone: a running writer is writing it")
            busy += 1
            continue
        except NothingToRecoverError as exc:
            print(exc)
            gone += 1
            continue
        except (OSError, ValueError, RuntimeError, FileFormatError) as exc:
            if _finalized_meanwhile(p):
                gone += 1
                continue
            why = str(exc).removeprefix(f"{p}: ")
            foreign = isinstance(exc, FileFormatError) and not isinstance(exc, DamagedFileError)
            if check is not None and not foreign and "k2eg-recorder verify" not in why:
                # damage the structure check did not reach (data chunks, text): the data
                # check says where, in the file's own terms
                found = _verify_problems(p, data=True)
                if found:
                    why += f"; k2eg-recorder verify --data: {found[0]}"
            print(f"{p}: NOT recovered: {why}")
            failures += 1
            continue
        print(f"{p} -> {out}" if check is None else f"{p} -> {out} (verified)")
    if (not files or busy + gone == len(files)) and not failures:
        print("nothing to recover")
    return 1 if failures else 0


def _not_regular(path: Path) -> str:
    """What ``path``, not a regular file, is (its name says ``.partial``)."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:  # a symbolic link to nothing, a loop of them; removed since
        return f"{'a symbolic link: ' if path.is_symlink() else ''}{exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket or a device"


def _superblock_only(path: Path) -> bool:
    """Left by a writer killed while it created it, empty or its superblock only
    (recover_file removes it): verify would call it truncated, or not an HDF5 file."""
    from recorder.sinks.recover import holds_nothing

    try:
        return holds_nothing(path)
    except OSError:
        return False


def _already_final(path: Path) -> bool:
    """``path`` (given by name, e.g. ``recover data/*``) is a finalized k2eg-recorder file:
    nothing to do, said so (it was reported NOT recovered, exit 1)."""
    from recorder.sinks.describe import plain
    from recorder.sinks.h5open import open_for_reading
    from recorder.sinks.options import PARTIAL_SUFFIX

    if path.name.endswith(PARTIAL_SUFFIX):
        return False
    try:
        with open_for_reading(path) as f:
            ours = plain(f.attrs.get("format")) == "k2eg-recorder"
            status = plain(f.attrs.get("status"))
    except (OSError, RuntimeError, ValueError):
        return False  # not HDF5, damaged, a live file: recover_file says why
    if not ours or status == "recording":
        return False
    print(f"{path}: already finalized (status {status}): nothing to do")
    return True


def _finalized_meanwhile(path: Path) -> bool:
    """``path`` (listed as a ``.partial``) is gone and its final file is there: its writer
    finalized it after it was listed (said so). Files a running writer is writing are
    listed too, and a rotation or a stop finalizes them at any time."""
    from recorder.sinks.options import PARTIAL_SUFFIX, final_path

    final = final_path(path)
    if not path.name.endswith(PARTIAL_SUFFIX) or path.exists() or not final.exists():
        return False
    print(f"{path}: finalized meanwhile by its writer: {final}")
    return True


def _verify_problems(path: Path, *, data: bool = False) -> list[str]:
    """The errors ``k2eg-recorder verify`` finds in ``path`` (structure and index; with
    ``data``, every value read back too)."""
    from recorder.verify import verify_file

    return [str(e) for e in verify_file(path, data=data).errors]
