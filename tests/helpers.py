"""Helpers several test modules share (tests/ is on sys.path; see conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from typing import Any, Iterator, NoReturn, Optional

import pytest

from apptrace.errors import SymbolizerError
from apptrace.symbolize import library_path


class OutputDrain:
    """Read a child's stdout to the end on a thread (its output can exceed a pipe)."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.text = ""
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.text = self.child.proc.stdout.read()

    def lines(self, timeout: float = 60) -> list[str]:
        self._t.join(timeout)
        assert not self._t.is_alive(), "fixture output did not end"
        assert self.child.proc.wait(timeout) == 0, self.child.proc.stderr.read()
        return self.text.splitlines()


STRICT = os.environ.get("CI") == "true" or os.environ.get("APPTRACE_REQUIRE_BPF") == "1"


def missing(reason: str) -> NoReturn:
    """Something a test needs is not here: a failure in CI, a skip with the reason elsewhere.

    CI installs everything the suite uses (`make setup`), so there a missing
    program is a broken set-up, never a reason to pass quietly.
    """
    if STRICT:
        pytest.fail(f"{reason} (required in CI: `make setup` installs it)")
    pytest.skip(reason)


def require_program(name: str, path: Optional[str] = None) -> str:
    """The path of a program (``path`` if given, else ``name`` on PATH), or :func:`missing`."""
    if path is None:
        found = shutil.which(name)
    else:
        found = path if os.access(path, os.X_OK) else None
    if not found:
        missing(f"{path or name} is not installed")
    return found


def require_symbolizer() -> None:
    """Skip without a built blazesym, except in CI where that is a failure."""
    try:
        library_path()
    except SymbolizerError as exc:
        missing(f"blazesym library not built: {exc}")


@contextlib.contextmanager
def fails_after(seconds: float) -> Iterator[None]:
    """A call that ignores its timeout fails the test instead of hanging it
    (main thread only: SIGALRM interrupts a blocking wait there)."""
    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"still waiting after {seconds} s: a timeout was ignored")

    old = signal.signal(signal.SIGALRM, expired)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:  # an enclosing guard goes on with what it had left
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 0.001))
