"""Helpers several test modules share (tests/ is on sys.path; see conftest.py)."""

from __future__ import annotations

import os
import threading
from typing import Any

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


def require_symbolizer() -> None:
    """Skip without a built blazesym, except in CI where that is a failure."""
    try:
        library_path()
    except SymbolizerError as exc:
        if os.environ.get("CI") == "true" or os.environ.get("APPTRACE_REQUIRE_BPF") == "1":
            pytest.fail(f"blazesym library missing in CI: {exc}")
        pytest.skip(f"blazesym not built: {exc}")
