"""Run the ``crimpl`` command, or ``invoke`` in this checkout, in-process.

As invoke's own tests do (``tests/_util.py``), the Program runs in this process
with its output captured, which spares a subprocess and its ~0.5 s of imports
per call. ``Program.run`` ends with ``sys.exit(code)`` on an error, so the exit
code is read from ``SystemExit`` (``exit=False`` would hide it).
"""

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from invoke import Program

from crimpl import cli

REPO = Path(__file__).resolve().parents[1]


@dataclass
class CliResult:
    """What a command did: its exit code and its output."""

    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: str | os.PathLike | None = None, stdin: str = "",
            program: Program | None = None, argv0: str = "crimpl") -> CliResult:
    """Run ``crimpl ARGS`` in-process, in ``cwd``, with ``stdin`` as its input (empty: EOF).

    :param program: the Program to run (default: the ``crimpl`` command's).
    :param argv0: the name the command is called by.
    """
    program = program or cli.program()
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    here = os.getcwd()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    # crimpl's progress handler holds the stderr of its import time: point it here too.
    handlers = [h for h in logging.getLogger("crimpl").handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    for handler in handlers:
        handler.setStream(stderr)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if cwd is not None:
                os.chdir(cwd)
            program.run([argv0, *map(str, args)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = old_stdin
        os.chdir(here)
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
    return CliResult(int(code), stdout.getvalue(), stderr.getvalue())


def run_invoke(*args: str, cwd: str | os.PathLike | None = None, stdin: str = "") -> CliResult:
    """Run ``invoke ARGS`` with this checkout's tasks.py, in-process, as a developer runs it."""
    return run_cli("--search-root", REPO, *args, cwd=cwd, stdin=stdin, program=Program(), argv0="invoke")
