"""What every command shares."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator, Optional, TextIO


class CommandError(Exception):
    """A usage problem the CLI reports as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Command:
    """Base of the CLI commands: ``name`` is the words after ``apptrace``."""

    name = ""

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def print_json(obj: Any, out: Optional[TextIO] = None) -> None:
    """One compact JSON document and a newline, in a single write."""
    import json  # here: only --json output needs it

    (out or sys.stdout).write(json.dumps(obj, separators=(",", ":")) + "\n")


# -- ending: every way out but SIGKILL runs the cleanup ----------------------------------

class SignalExit(BaseException):
    """SIGTERM, SIGHUP or another terminating signal, raised where the program is,
    so every ``finally`` (session close: detach, lower procmem semaphores, stop
    a spawned command) runs. A BaseException, like KeyboardInterrupt, so
    ``except Exception`` lets it by."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Ending:
    ending = False               # a signal already started the way out: ignore more
    depth = 0                    # inside deferred_signals()
    deferred: Optional[int] = None


def _on_signal(signum: int, frame: Any) -> None:
    if _Ending.depth:
        if _Ending.deferred is None:
            _Ending.deferred = signum
        return
    if _Ending.ending:
        return  # the cleanup the first signal started must not be cut short
    _Ending.ending = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SignalExit(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Let a block (a session's close) finish before SIGINT/SIGTERM/SIGHUP act."""
    _Ending.depth += 1
    try:
        yield
    finally:
        _Ending.depth -= 1
        if not _Ending.depth and _Ending.deferred is not None:
            signum, _Ending.deferred = _Ending.deferred, None
            _on_signal(signum, None)


def install_signal_handlers() -> Callable[[], None]:
    """SIGINT, SIGTERM, SIGHUP and every other signal that would end the process
    (SIGQUIT, SIGUSR1, SIGALRM, ...) unwind (see :class:`SignalExit`); SIGPIPE is
    ignored, so a closed pipe is an EPIPE the CLI handles after cleaning up
    rather than a death that leaves semaphores raised and a command running.
    Returns a function that puts the previous handlers back."""
    from apptrace.procs import TERMINATING_SIGNALS

    _Ending.ending, _Ending.depth, _Ending.deferred = False, 0, None
    saved: dict[int, Any] = {}
    wanted: list[tuple[int, Any]] = [(sig, _on_signal) for sig in TERMINATING_SIGNALS]

    def restore() -> None:
        for sig, old in saved.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)

    try:
        for sig, handler in [*wanted, (signal.SIGPIPE, signal.SIG_IGN)]:
            try:
                old = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                break
            except OSError:
                continue
            saved[sig] = old
    except BaseException:
        # A signal caught by a handler installed a moment ago: put the old
        # ones back and let the caller end the way that signal says.
        restore()
        raise

    return restore


def say(text: str, stream: Optional[TextIO] = None) -> None:
    """One line on stderr, escaped for the terminal; a vanished terminal is not an error."""
    from apptrace.output import escape_text

    try:
        (stream or sys.stderr).write(escape_text(text) + "\n")
        (stream or sys.stderr).flush()
    except (OSError, ValueError):
        pass


def command_status(status: Optional[int]) -> int:
    """apptrace's exit status for a traced command's: its own, or 128+N for a
    signal N (as the shell, time, timeout and strace report it)."""
    if status is None:
        return 0
    return 128 - status if status < 0 else status
