"""Damage copies of a recorder file and see how the reading tools take it (a developer tool).

Run::

    .venv/bin/python scripts/damage_probe.py FILE [--step 2048] [--start 0] [--stop 65536]
        [--length 64] [--mode rand|zero] [--timeout 40] [--jobs 2]

For each offset from ``--start`` to ``--stop`` in steps of ``--step``, a copy of FILE (a
``.h5`` or a ``.h5.partial``) gets ``--length`` bytes overwritten (``rand``: bytes of
``random.Random(offset)``, so a finding can be rebuilt; ``zero``: zeros), and ``inspect``,
``verify --data``, ``ls``, ``export``, ``recover`` (``.partial`` only) and the reader
(``open_file``, every PV's values, ``trains()``) run on it, each in its own process. A line per
offset: ``ok``, or what went wrong: a hang (``--timeout`` seconds), a traceback, an exit
status other than 0/1, or ``recover`` changing a file it says it did not recover. Files are
written to a temporary directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READER = """
import sys
from recorder.errors import RecorderError
from recorder.reader import open_file
try:
    with open_file(sys.argv[1]) as f:
        for pv in f.pv_names:
            f.values(pv)
        for _ in f.trains():
            pass
except (RecorderError, OSError) as exc:
    print(exc)
    sys.exit(1)
"""


def probe(src: bytes, name: str, offset: int, args: argparse.Namespace) -> list[str]:
    """What went wrong with the copy damaged at ``offset`` (empty: nothing)."""
    work = Path(tempfile.mkdtemp(prefix="damage-"))
    try:
        path = work / name
        data = bytearray(src)
        n = min(args.length, len(data) - offset)
        data[offset : offset + n] = (bytes(n) if args.mode == "zero" else
                                     random.Random(offset).randbytes(n))
        path.write_bytes(data)
        cli = [sys.executable, "-m", "recorder.cli"]
        runs = [("inspect", [*cli, "inspect", str(path)]),
                ("verify", [*cli, "verify", "--data", str(path)]),
                ("ls", [*cli, "ls", str(path)]),
                ("export", [*cli, "export", str(path), "-o", str(work / "x.csv")]),
                ("reader", [sys.executable, "-c", READER, str(path)])]
        if name.endswith(".partial"):
            runs.append(("recover", [*cli, "recover", str(path)]))
        found = []
        for tool, cmd in runs:
            before = path.read_bytes() if tool == "recover" else b""
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                     timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                found.append(f"{tool}: no answer in {args.timeout} s")
                continue
            last = (out.stderr.strip().splitlines() or [""])[-1][:160]
            if "Traceback" in out.stderr or out.returncode not in (0, 1):
                found.append(f"{tool}: exit {out.returncode}: {last}")
            if tool == "recover" and "NOT recovered" in out.stdout \
                    and path.read_bytes() != before:
                found.append("recover: changed a file it did not recover")
        return found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=65536)
    parser.add_argument("--step", type=int, default=2048)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--mode", choices=("rand", "zero"), default="rand")
    parser.add_argument("--timeout", type=float, default=40.0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    src = args.file.read_bytes()
    offsets = range(args.start, min(args.stop, len(src)), args.step)
    bad = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda o: (o, probe(src, args.file.name, o, args)), offsets)
        for offset, found in results:
            bad += bool(found)
            print(offset, "ok" if not found else "; ".join(found), flush=True)
    print(f"{len(offsets)} offset(s), {bad} with findings")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
