"""pytest plugin: assert on the probes, TLS bytes and GC pauses of the programs
a test runs (registered through the ``pytest11`` entry point as ``apptrace``).

Opt-in: it changes nothing unless a test asks for the ``apptrace`` fixture
or carries the ``apptrace`` marker::

    def test_request_probe(apptrace):
        run = apptrace.run(["fixtures/c/out/server", "3"],
                           probes=["usdt:myapp:request__done(str,int)"])
        run.assert_fired("myapp:request__done", count=3,
                         where=lambda ev: ev.args[1] == 200)

    @pytest.mark.apptrace(jvm=True)      # needs tracing and a JDK with probes
    def test_gc(apptrace): ...

Where tracing cannot work (not root, no BPF), such tests are skipped with
the reason, except in CI (``CI=true``) or with ``--apptrace-require``, where
they fail. Built on :mod:`apptrace.testing` alone; imported lazily, so the
plugin costs nothing in test suites that do not use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterator, Optional, Sequence

import pytest

if TYPE_CHECKING:
    from apptrace.testing import Recorder, Run

__all__ = ["ApptraceFixture"]

# Each option: ini name, command-line flag, help, default (as the ini holds it).
_OPTIONS = {
    "timeout": ("apptrace_timeout", "--apptrace-timeout",
                "seconds a program run by the apptrace fixture may take (default 60)", "60"),
    "runs_dir": ("apptrace_runs_dir", "--apptrace-runs-dir",
                 "save the runs of apptrace tests in this directory as JSON lines"
                 " (apptrace.testing.load reads them back)", ""),
    "keep": ("apptrace_keep", "--apptrace-keep",
             "which tests' runs to save there: failed (default) or all", "failed"),
}
_REQUIRE = ("apptrace_require", "--apptrace-require",
            "fail, not skip, apptrace tests when this machine cannot trace"
            " (the default when CI=true)")

_STATE = pytest.StashKey[dict[str, Any]]()
_FIXTURE = pytest.StashKey["ApptraceFixture"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("apptrace", "apptrace: assert on probes, TLS and GC pauses")
    for ini, flag, help_text, default in _OPTIONS.values():
        group.addoption(flag, dest=ini, default=None, metavar=ini.split("_", 1)[1].upper(),
                        help=help_text)
        parser.addini(ini, help_text, default=default)
    ini, flag, help_text = _REQUIRE
    group.addoption(flag, dest=ini, action="store_true", default=None, help=help_text)
    parser.addini(ini, help_text, type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "apptrace(jvm=False): the test traces with apptrace (root or CAP_BPF+CAP_PERFMON,"
        " BPF; jvm=True: also a JDK with HotSpot probes); skipped with the reason where"
        " that is missing, failed instead in CI (CI=true) or with --apptrace-require")
    config.stash[_STATE] = {}


def _option(config: pytest.Config, key: str) -> str:
    ini, flag, _help, _default = _OPTIONS[key]
    value = config.getoption(ini, default=None)
    return str(value if value is not None else config.getini(ini))


def _required(config: pytest.Config) -> bool:
    if config.getoption(_REQUIRE[0], default=None):
        return True
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        return True
    return bool(config.getini(_REQUIRE[0]))


def _timeout(config: pytest.Config) -> float:
    text = _option(config, "timeout")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise pytest.UsageError(f"apptrace_timeout / --apptrace-timeout must be a number of"
                                f" seconds > 0 (got {text!r})")
    return value


def _missing(config: pytest.Config, *, jvm: bool = False, java: str = "java") -> Optional[str]:
    """Why this machine cannot run the test, or None (looked up once per session)."""
    from apptrace.testing import jvm_unavailable, tracing_unavailable

    state = config.stash[_STATE]
    if "tracing" not in state:
        state["tracing"] = tracing_unavailable()
    if state["tracing"]:
        return str(state["tracing"])
    if jvm:
        key = f"jvm:{java}"
        if key not in state:
            state[key] = jvm_unavailable(java)
        return state[key]  # type: ignore[no-any-return]
    return None


def _skip_or_fail(config: pytest.Config, reason: str) -> None:
    if _required(config):
        pytest.fail(f"apptrace: this test must trace here (CI=true or --apptrace-require),"
                    f" but {reason}", pytrace=False)
    pytest.skip(f"apptrace: {reason}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("apptrace")
    if marker is None:
        return
    unknown = set(marker.kwargs) - {"jvm"}
    if marker.args or unknown:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.apptrace takes only jvm=True"
                                f" (got {marker.args or ''}{sorted(unknown) or ''})")
    reason = _missing(item.config, jvm=bool(marker.kwargs.get("jvm", False)))
    if reason:
        _skip_or_fail(item.config, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    fx = item.stash.get(_FIXTURE, None)
    if fx is None:
        return
    rep = outcome.get_result()
    if rep.failed:
        fx.failed = True
        text = fx.describe()
        if text:
            rep.sections.append(("apptrace runs", text))


class ApptraceFixture:
    """What the ``apptrace`` fixture gives a test: :mod:`apptrace.testing` with
    the session's defaults (timeout, where runs are saved), and every program
    it started stopped at the end of the test."""

    def __init__(self, config: pytest.Config, nodeid: str) -> None:
        self.config = config
        self.nodeid = nodeid
        self.timeout = _timeout(config)
        self.recorders: list[Recorder] = []
        self.failed = False

    def __repr__(self) -> str:
        return f"<apptrace fixture: timeout {self.timeout} s, {len(self.recorders)} recordings>"

    def run(self, argv: Sequence[str], *, probes: Sequence[str] = (), tls: bool = False,
            gc: bool = False, stack: bool = False, timeout: Optional[float] = None,
            **options: Any) -> Run:
        """Run ``argv`` to its end under tracing (see :func:`apptrace.testing.run`)."""
        rec = self.start(argv, probes=probes, tls=tls, gc=gc, stack=stack, **options)
        return rec.wait(self.timeout if timeout is None else timeout)

    def start(self, argv: Sequence[str], *, probes: Sequence[str] = (), tls: bool = False,
              gc: bool = False, stack: bool = False, **options: Any) -> Recorder:
        """Start ``argv`` under tracing; wait for it or stop it later."""
        from apptrace.testing import start

        if gc and argv:
            reason = _missing(self.config, jvm=True, java=str(argv[0]))
            if reason:
                _skip_or_fail(self.config, reason)
        rec = start(argv, probes=probes, tls=tls, gc=gc, stack=stack, **options)
        self.recorders.append(rec)
        return rec

    def attach(self, pid: int, *, probes: Sequence[str] = (), tls: bool = False,
               gc: bool = False, stack: bool = False, **options: Any) -> Recorder:
        """Record a running process until ``.stop()`` (or the end of the test)."""
        from apptrace.testing import attach

        rec = attach(pid, probes=probes, tls=tls, gc=gc, stack=stack, **options)
        self.recorders.append(rec)
        return rec

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Run:
        """A run saved earlier (:meth:`apptrace.testing.Run.save`)."""
        from apptrace.testing import load

        return load(path)

    @property
    def runs(self) -> list[Run]:
        """The runs finished so far in this test, in the order they started."""
        return [r.result for r in self.recorders if r.result is not None]

    def run_path(self, index: int) -> Optional[Path]:
        """Where run ``index`` of this test is saved (None: runs are not saved)."""
        where = _option(self.config, "runs_dir")
        if not where:
            return None
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.nodeid).strip("_") or "test"
        return Path(where) / (f"{name}.jsonl" if index == 0 else f"{name}-{index}.jsonl")

    def describe(self) -> str:
        saving = self._saving(failed=True)
        parts = []
        for i, r in enumerate(self.recorders):
            got = r.result
            text = got.summary() if got is not None else f"run {i}: still recording"
            path = self.run_path(i) if saving else None
            parts.append(text + (f"\nsaved to {path}" if path else ""))
        return "\n\n".join(parts)

    def _saving(self, *, failed: bool) -> bool:
        keep = _option(self.config, "keep")
        return bool(_option(self.config, "runs_dir")) and (keep == "all" or failed)

    def close(self) -> None:
        """Stop every recorder still running; save runs as configured."""
        errors: list[BaseException] = []
        for r in self.recorders:
            try:
                r.stop()
            except Exception as err:  # noqa: BLE001 - the first is raised after the rest
                errors.append(err)
        if self._saving(failed=self.failed):
            for i, r in enumerate(self.recorders):
                path = self.run_path(i)
                if r.result is not None and path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    r.result.save(path)
        if errors:
            raise errors[0]


@pytest.fixture
def apptrace(request: pytest.FixtureRequest) -> Iterator[ApptraceFixture]:
    """Run or attach to programs under tracing and assert on what they did
    (:mod:`apptrace.testing`); skipped with the reason where this machine
    cannot trace (failed instead in CI)."""
    config = request.config
    keep = _option(config, "keep")
    if keep not in ("failed", "all"):
        raise pytest.UsageError(f"apptrace_keep / --apptrace-keep must be 'failed' or 'all'"
                                f" (got {keep!r})")
    reason = _missing(config)
    if reason:
        _skip_or_fail(config, reason)
    fx = ApptraceFixture(config, request.node.nodeid)
    request.node.stash[_FIXTURE] = fx
    try:
        yield fx
    finally:
        fx.close()
