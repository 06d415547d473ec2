"""``k2eg-recorder`` command line: one sub-command per module in this package.

Each sub-command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). Every module is imported to build ``--help``, so a module
imports its heavy dependencies (confluent_kafka, h5py) inside ``run`` only.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from recorder import __version__
from recorder.errors import FileFormatError

# command name -> module (in recorder.cli) implementing it
COMMANDS: dict[str, str] = {
    "run": "run",
    "demo": "demo",
    "sim": "sim",
    "validate": "validate",
    "inspect": "inspect_cmd",
    "export": "export",
    "ls": "ls_cmd",
    "recover": "recover",
    "verify": "verify_cmd",
    "replay": "replay",
    "start": "admin",
    "stop": "admin",
    "trigger": "admin",
    "status": "admin",
    "reload": "admin",
}

# one-line help, kept here so `--help` does not import every module
HELP: dict[str, str] = {
    "run": "run the recorder daemon",
    "demo": "embedded broker + gateway simulator + example runs -> real .h5 files",
    "sim": "run the k2eg gateway simulator",
    "validate": "check run definitions and show what they would record",
    "inspect": "summarize a recorded HDF5 file",
    "export": "PVs side by side, one CSV row per iteration",
    "ls": "list the recordings on disk (run, time span, status, files)",
    "recover": "make files left by a crashed writer clean and mark them",
    "verify": "check recorded files against the file-format spec",
    "replay": "publish a recorded file back to Kafka as the gateway's snapshot stream",
    "start": "admin: start a run",
    "stop": "admin: stop a run",
    "trigger": "admin: trigger a triggered run",
    "status": "admin: show daemon and run status",
    "reload": "admin: reload run definitions",
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(f"recorder.cli.{module}") is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2eg-recorder",
        description="Record k2eg gateway snapshots from Kafka into chunked HDF5 files.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if _available(module):
            p = sub.add_parser(name, help=HELP.get(name, ""), description=HELP.get(name, ""))
            p.set_defaults(_module=module, _name=name)
            mod = importlib.import_module(f"recorder.cli.{module}")
            add = getattr(mod, "add_arguments", None)
            if add is not None:
                if getattr(mod, "ADD_ARGUMENTS_TAKES_NAME", False):
                    add(p, name)
                else:
                    add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(f"recorder.cli.{args._module}")
    try:
        return int(mod.run(args))
    except KeyboardInterrupt:
        return 130
    except FileFormatError as exc:  # a file found damaged part-way (it names the file)
        sys.stdout.flush()
        print(f"k2eg-recorder {args._name}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `k2eg-recorder ls --json | head`: the reader left, fine
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a killed writer
    except OSError as exc:  # `k2eg-recorder export FILE > out.csv` on a full filesystem
        if exc.errno not in OUTPUT_FULL:
            raise
        _drop_stdout()
        print(f"k2eg-recorder {args._name}: cannot write the output: {exc.strerror}",
              file=sys.stderr)
        return 1


OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Why standard output cannot take what a command prints: said in one line, exit 1."""


def _drop_stdout() -> None:
    """Point standard output at /dev/null: no second error when Python flushes it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
