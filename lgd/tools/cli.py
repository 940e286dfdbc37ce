"""How lgd's commands (lgd-train, lgd-eval, lgd-export, lgd-demo) succeed and fail.

Exit status: 0 on success (nothing else printed by this layer); 2 on a usage error (a malformed or
contradictory command line, a config key that does not exist, an output that would overwrite an earlier
run or file); 1 on any other failure (a file missing or unreadable, an invalid dataset or checkpoint, an
error while training); 130 on Ctrl-C; 143 when SIGTERM or SIGUSR1 stopped a run after it saved a checkpoint
(`PROG: stopped by SIGTERM at iteration N; resume with --resume`). A failure prints one line on stderr,
`PROG: error: WHAT`, naming the file, key or argument and what was expected, sometimes followed by one
`PROG: hint: ...` line; no traceback unless `--debug` is on the command line (anywhere) or LGD_DEBUG=1 is set.

The Python API of each command (its module's run(argv)) raises instead and returns its results; run_command
turns it into the console script: run_command(prog, api, argv) -> int.
"""
import contextlib
import logging
import os
import sys
import traceback
from typing import Callable, List, Optional, Sequence

from ..errors import CommandError
from ..runner.stopping import Preempted

__all__ = ["console_progress", "console_without_tracebacks", "debug_requested", "run_command"]

DEBUG_FLAG = "--debug"
DEBUG_HELP = "print the traceback of a failure (also LGD_DEBUG=1)"


def debug_requested(argv: Sequence[str] = ()) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("LGD_DEBUG", "").strip() not in ("", "0")


class _WithoutTraceback(logging.Formatter):
    """A console formatter that leaves a record's traceback out (the log file's formatter keeps it)."""

    def __init__(self, inner: Optional[logging.Formatter]):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record):
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def console_without_tracebacks() -> None:
    """Unless debug_requested(): the console handlers of every logger (detectron2's "Exception during
    training" among them) print messages without tracebacks, which stay in OUTPUT/log.txt; the command's
    own line says what failed. Call it after the loggers are set up."""
    if debug_requested():
        return
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            console = getattr(handler, "stream", None) in (sys.stdout, sys.stderr)  # detectron2's file: a stream too
            if console and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))


@contextlib.contextmanager
def _debug_environment(debug: bool):
    """LGD_DEBUG=1 while a --debug command runs, for console_without_tracebacks in its processes."""
    if not debug:
        yield
        return
    previous = os.environ.get("LGD_DEBUG")
    os.environ["LGD_DEBUG"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LGD_DEBUG"]
        else:
            os.environ["LGD_DEBUG"] = previous


@contextlib.contextmanager
def console_progress(name: str = "lgd.data"):
    """The INFO messages of logger `name` (the dataset checks' progress on large sets) on the console while
    open: the checks run before the run's own loggers are set up."""
    logger = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", "%m/%d %H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[-1]  # a wrapped exception: its last line


def _expected(exc: BaseException) -> bool:
    """Failures whose message says it all (ours, bad values, files); others get their type and a --debug hint.
    A child process's failure (torch.multiprocessing) carries the child's traceback as its message."""
    return isinstance(exc, (CommandError, ValueError, OSError)) or type(exc).__name__ == "ProcessRaisedException"


def _message(exc: BaseException) -> str:
    text = _one_line(str(exc)) or type(exc).__name__
    return text if _expected(exc) else f"{type(exc).__name__}: {text}"


def run_command(prog: str, api: Callable[[List[str]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Runs api(argv without --debug) as the command `prog`; returns the exit status (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        with _debug_environment(debug):
            api(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error it already printed (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Preempted as exc:  # not a failure: the run saved its checkpoint and stopped as asked
        sys.stdout.flush()
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the one place failures become a line and a status
        if debug:
            traceback.print_exc()
        sys.stdout.flush()
        print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
        hint = getattr(exc, "hint", None)
        if hint:
            print(f"{prog}: hint: {hint}", file=sys.stderr)
        elif not debug and not isinstance(exc, (CommandError, FileNotFoundError)) and not hasattr(exc, "hint"):
            print(f"{prog}: hint: rerun with {DEBUG_FLAG} (or LGD_DEBUG=1) for the traceback", file=sys.stderr)
        return exc.exit_code if isinstance(exc, CommandError) else 1
    return 0
