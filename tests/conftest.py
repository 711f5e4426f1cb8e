"""Shared test plumbing: fixture binaries, privilege gating, child processes.

Privileged tests carry ``@pytest.mark.bpf``. Outside CI they skip with the
precise reason (not root, bcc missing...). In CI (``CI=true``) or with
``APPTRACE_REQUIRE_BPF=1`` a missing capability fails them instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "c" / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))

STRICT = os.environ.get("CI") == "true" or os.environ.get("APPTRACE_REQUIRE_BPF") == "1"


def _bpf_missing() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root to load BPF programs and attach uprobes"
    from apptrace.capabilities import bcc_status, can_load_bpf

    ok, why = can_load_bpf()
    if not ok:
        return why
    ok, why = bcc_status(False)
    if not ok:
        return why
    return None


_missing: Optional[str] = None
_checked = False


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _missing, _checked
    if item.get_closest_marker("bpf") is None:
        return
    if not _checked:
        _missing = _bpf_missing()
        _checked = True
    if _missing:
        if STRICT:
            pytest.fail(f"BPF test cannot run in CI: {_missing}")
        pytest.skip(_missing)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Build fixtures/c once (make is a no-op when up to date)."""
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures" / "c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building fixtures failed:\n{r.stdout}\n{r.stderr}")
    return FIXTURES


class Child:
    """A fixture process with the ``ready``/newline handshake."""

    def __init__(self, argv: list[str], *, wait: bool = True) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        if wait:
            line = self.readline()
            assert line == "ready", f"{argv}: expected 'ready', got {line!r}"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().rstrip("\n")

    def send(self, text: str = "\n") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> list[str]:
        """Close stdin, wait for exit, return the remaining stdout lines."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"{self.argv} exited {self.proc.returncode}: {err}"
        return out.splitlines()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def spawn() -> Iterator[object]:
    """``spawn(argv, wait=True) -> Child``; every child is killed at teardown."""
    children: list[Child] = []

    def make(argv: list[str], *, wait: bool = True) -> Child:
        c = Child([str(a) for a in argv], wait=wait)
        children.append(c)
        return c

    yield make
    for c in children:
        c.kill()


@pytest.fixture(autouse=True)
def _no_hang_under_mutation() -> Iterator[None]:
    """Under mutation testing, a mutant that makes a wait endless fails the
    first test it stalls within 20 s, instead of holding it until mutmut's
    timeout for the whole run (minutes per mutant). Tests take 3 s at most."""
    if "MUTANT_UNDER_TEST" not in os.environ:
        yield
        return
    from helpers import fails_after

    with fails_after(20):
        yield


@pytest.fixture(autouse=True)
def _subprocesses_run_the_mutant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under mutation testing, a test that runs the CLI in a subprocess
    must run the mutated tree, not the one the venv's editable install
    points at. Only for a mutant: the stats run records calls in-process,
    and its bookkeeping cannot run in a subprocess with another cwd or user."""
    if "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", ""):
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture(autouse=True)
def _no_memo_across_mutants() -> None:
    """Under mutation testing (mutmut sets MUTANT_UNDER_TEST once it has
    chosen a mutant), a result memoized before, at collection in mutmut's
    fork server, would hide the mutant."""
    if "MUTANT_UNDER_TEST" in os.environ:
        from apptrace.usdt.args import parse_argument

        parse_argument.cache_clear()
