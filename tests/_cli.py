"""The command line run inside the test process, for tests that check what a command does
and says, not the process around it (signals, a fresh interpreter, what it imports): a run
here costs no interpreter start and no second import of torch and timm (~7 s each on 2
cores). Tests of Ctrl-C, crashes and imports keep running the CLI as a subprocess."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from subprocess import CompletedProcess


def run_cli(*args: str | Path, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """``wsi-sampler ARGS`` via the console entry point in this process: its exit status,
    stdout and stderr (log lines included) as a subprocess run would give them."""
    from wsi_sampler.cli import main

    argv = ["wsi-sampler", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, os.getcwd(), dict(os.environ), sys.unraisablehook,
             signal.getsignal(signal.SIGINT))
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sys.argv = argv
    if env is not None:
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    code: int = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        sys.argv, cwd_before, env_before, sys.unraisablehook, sigint = saved
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env_before)
        signal.signal(signal.SIGINT, sigint)
    return CompletedProcess(argv, code, out.getvalue(), err.getvalue())
