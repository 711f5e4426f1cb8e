"""The pytest plugin (apptrace/pytest_plugin.py), run the way a user's suite
runs it: pytester writes a test file, a separate pytest process (which loads
the plugin through its pytest11 entry point) runs it against the real server
fixture, and we read its report, failure messages included.

The skip/fail policy is checked with a real process that cannot trace: root
with every capability dropped (setpriv), as in a container.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import missing

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "c" / "out"
SERVER = str(OUT / "server")
LOOP = str(OUT / "usdt_loop_pie")
PROBE = "usdt:myapp:request__done(str,int)"


@pytest.fixture(autouse=True)
def _built(fixtures_dir: Path) -> None:
    """The C fixtures, built once."""


def esc(text: str) -> str:
    """A literal for fnmatch_lines: ``[`` starts a character class there."""
    return text.replace("[", "[[]")


def run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


def test_the_issue_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        def test_request_probe(apptrace):
            run = apptrace.run([{SERVER!r}, "3"], probes=[{PROBE!r}])
            run.assert_fired("myapp:request__done", count=3,
                             where=lambda ev: ev.args[1] == 200)
            assert run.exit_status == 0
            assert run.args_of("myapp:request__done") == [
                ("/items/0", 200), ("/items/1", 200), ("/items/2", 200)]
            assert "request__done /items/2 200" in run.output
    """)
    result = run_inner(pytester)
    result.assert_outcomes(passed=1)


def test_a_failing_assertion_shows_expected_against_what_fired(pytester: pytest.Pytester
                                                               ) -> None:
    pytester.makepyfile(f"""
        def test_all_ok(apptrace):
            run = apptrace.run([{SERVER!r}, "6"], probes=[{PROBE!r}])
            run.assert_fired("myapp:request__done", count=6,
                             where=lambda ev: ev.args[1] == 200)
    """)
    result = run_inner(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        # the test's own line, not apptrace's internals
        ">*run.assert_fired(\"myapp:request__done\", count=6,",
        esc("E*TraceAssertionError: expected myapp:request__done to fire 6 times where"
            " lambda ev: ev.args[1] == 200; it fired 5 times"),
        "E*what fired (the events of myapp:request__done, in order; + matched, - did not):",
        "E*+ * ms server[[]*[]] usdt:myapp:request__done '/items/0' 200",
        "E*- * ms server[[]*[]] usdt:myapp:request__done '/missing/4' 404"
        "    <- where() is false",
        "E*+ * ms server[[]*[]] usdt:myapp:request__done '/items/5' 200",
        "E*per probe: usdt:myapp:request__done 6",
        "*apptrace runs*",
        f"{SERVER} 6: exited with status 0, recorded for * s",
        "6 probe events (usdt:myapp:request__done 6); 0 lost",
    ])
    result.stdout.no_fnmatch_line("*def _fail_probe*")  # internals hidden from the report


def test_argument_matching_and_order_failures_read_well(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        import re

        def test_args(apptrace):
            run = apptrace.run([{SERVER!r}, "5"], probes=[{PROBE!r}])
            run.assert_fired("myapp:request__done", args=(re.compile("^/missing/"), 404),
                             count=1)
            run.assert_not_fired("myapp:request__done", args={{1: 500}})
            run.assert_fired("myapp:request__done", args=("/items/9", ...))

        def test_order(apptrace):
            run = apptrace.run([{SERVER!r}, "5"],
                               probes=[{PROBE!r}, "usdt:myapp:request__start(str)"])
            run.assert_order("myapp:request__start", ("myapp:request__done", ("/items/0", 200)))
            run.assert_order(("myapp:request__done", {{1: 404}}),
                             ("myapp:request__done", ("/items/1", 200)))
    """)
    result = run_inner(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        esc("E*expected myapp:request__done to fire at least once with args [0] '/items/9';"
            " it fired 0 times"),
        "E*- * usdt:myapp:request__done '/items/0' 200    <- arg 0 is '/items/0',"
        " expected '/items/9'",
    ])
    result.stdout.fnmatch_lines([
        esc("E*expected the order myapp:request__done with args [1] 404 -> myapp:request__done"
            " with args [0] '/items/1', [1] 200; step 2 (*) did not happen after:"
            " * usdt:myapp:request__done '/missing/4' 404"),
        "E*what fired (every event, in order):",
    ])


def test_attach_to_a_pid_and_read_on_demand(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        import subprocess

        def test_attach(apptrace):
            proc = subprocess.Popen([{SERVER!r}, "5", "wait"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline() == "ready\\n"
            rec = apptrace.attach(proc.pid, probes=[{PROBE!r}])
            assert rec.snapshot().count("myapp:request__done") == 0
            proc.stdin.write("\\n")
            proc.stdin.flush()
            assert proc.wait(30) == 0
            run = rec.wait(30)
            run.assert_fired("myapp:request__done", count=5)
            run.assert_fired("myapp:request__done", count=1, args=(..., 404))
            assert run.pid == proc.pid and run.exit_status is None
    """)
    run_inner(pytester).assert_outcomes(passed=1)


def test_runs_are_saved_as_json_lines_flag_and_ini(pytester: pytest.Pytester,
                                                   tmp_path: Path) -> None:
    from apptrace.testing import load

    pytester.makepyfile(f"""
        def test_one(apptrace):
            apptrace.run([{SERVER!r}, "2"], probes=[{PROBE!r}])

        def test_two_fails(apptrace):
            run = apptrace.run([{SERVER!r}, "3"], probes=[{PROBE!r}])
            run.assert_not_fired("myapp:request__done")
    """)
    runs = tmp_path / "runs"
    result = run_inner(pytester, f"--apptrace-runs-dir={runs}")  # keep: failed (default)
    result.assert_outcomes(passed=1, failed=1)
    saved = sorted(p.name for p in runs.iterdir())
    assert saved == ["test_runs_are_saved_as_json_lines_flag_and_ini.py_test_two_fails.jsonl"]
    result.stdout.fnmatch_lines([f"saved to {runs}/*test_two_fails.jsonl"])
    back = load(runs / saved[0])
    back.assert_fired("myapp:request__done", count=3)
    assert back.argv == (SERVER, "3") and back.exit_status == 0

    ini_runs = tmp_path / "ini-runs"
    pytester.makeini(f"[pytest]\napptrace_runs_dir = {ini_runs}\napptrace_keep = all\n")
    run_inner(pytester).assert_outcomes(passed=1, failed=1)
    assert len(list(ini_runs.iterdir())) == 2
    one = load(next(ini_runs.glob("*test_one.jsonl")))
    assert one.args_of("myapp:request__done") == [("/items/0", 200), ("/items/1", 200)]
    # the flag wins over the ini file
    flag_runs = tmp_path / "flag-runs"
    run_inner(pytester, f"--apptrace-runs-dir={flag_runs}", "--apptrace-keep=failed")
    assert [p.name for p in flag_runs.iterdir()] == [saved[0]]


def test_timeout_flag_stops_a_program_that_runs_too_long(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        def test_forever(apptrace):
            apptrace.run([{LOOP!r}, "0"], probes=["usdt:apptrace_fx:loop"])
    """)
    result = run_inner(pytester, "--apptrace-timeout=1.5")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"E*RunTimeoutError: {LOOP} 0 still ran after 1.5 s; stopped (raise the timeout*",
    ])
    pytester.makeini("[pytest]\napptrace_timeout = soon\n")
    bad = run_inner(pytester)
    assert bad.ret != 0
    bad.stdout.fnmatch_lines(["*apptrace_timeout / --apptrace-timeout must be a number of"
                              " seconds > 0 (got 'soon')*"])


def test_marker_and_fixture_run_where_tracing_works(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        import apptrace

        @pytest.mark.apptrace
        def test_marked():
            with apptrace.Session(command=["true"]) as s:
                s.add("uprobe:libc:getpid")
                s.start()

        @pytest.mark.apptrace(jvm=True)
        def test_needs_a_jdk():
            pass
    """)
    from apptrace.testing import jvm_unavailable

    if jvm_unavailable():
        missing(f"no JDK to check the jvm=True marker with: {jvm_unavailable()}")
    run_inner(pytester, "-rs").assert_outcomes(passed=2)


def test_tls_and_gc_helpers_through_the_fixture(pytester: pytest.Pytester) -> None:
    from apptrace.testing import jvm_unavailable

    why = jvm_unavailable()
    if why:
        missing(f"GC helpers need a JDK with HotSpot probes: {why}")
    java_out = ROOT / "fixtures" / "java" / "out"
    pytester.makepyfile(f"""
        import subprocess

        def test_tls(apptrace):
            srv = subprocess.Popen([{SERVER!r}, "https", "0", {str(OUT / "tls_cert.pem")!r},
                                    {str(OUT / "tls_key.pem")!r}], stdout=subprocess.PIPE,
                                   text=True)
            port = srv.stdout.readline().split()[1]
            run = apptrace.run([{SERVER!r}, "get", port, "/items/7"], tls=True)
            srv.wait(30)
            run.assert_sent(b"GET /items/7 HTTP/1.1")
            run.assert_received(b"item /items/7")
            run.assert_sent(b"GET /admin HTTP/1.1")

        def test_gc(apptrace):
            run = apptrace.run(["java", "-Xmx64m", "-cp", {str(java_out)!r}, "GcLoad", "0.3",
                                "3", "100", "nowait"], gc=True)
            run.assert_gc(max_pause_ms=2000)
            assert run.max_pause_ms > 0
            run.assert_gc(max_pause_ms=0.001)
    """)
    result = run_inner(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "E*expected b'GET /admin HTTP/1.1' to be sent over TLS; it was not",
        "E*connection 1 (tcp 127.0.0.1:* -> 127.0.0.1:*) sent 42 bytes:",
        "E*b'GET /items/7 HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n'",
    ])
    result.stdout.fnmatch_lines([
        "E*expected no GC pause over 0.001 ms; * of * were (the longest * ms)",
        "E*pauses recorded, * ms in all; the longest:",
    ])


# -- where tracing cannot work: a real process without capabilities ------------------------


@pytest.fixture
def inner_dir(pytester: pytest.Pytester) -> Path:
    """A test file using the fixture, one using the marker, one using neither."""
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux) is not installed")
    pytester.makepyfile(test_inner=f"""
        import pytest

        def test_uses_fixture(apptrace):
            apptrace.run([{SERVER!r}, "1"], probes=[{PROBE!r}])

        @pytest.mark.apptrace
        def test_marked():
            pass

        def test_untouched():
            pass
    """)
    return pytester.path


def run_without_caps(d: Path, *args: str, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "APPTRACE_REQUIRE_BPF")}
    if ci:
        env["CI"] = "true"
    return subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable,
                           "-m", "pytest", "-p", "no:cacheprovider", "-rsf", "-q",
                           "test_inner.py", *args], cwd=d, env=env, capture_output=True,
                          text=True, timeout=120)


def test_outside_ci_tests_that_cannot_trace_skip_with_the_reason(inner_dir: Path) -> None:
    r = run_without_caps(inner_dir, ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 2 skipped" in r.stdout, r.stdout
    reason = ("apptrace: tracing needs CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON, and this"
              " process runs as root without them")
    assert r.stdout.count(reason) == 2, r.stdout
    assert "run `apptrace doctor`" in r.stdout


def test_in_ci_they_fail_and_other_tests_are_untouched(inner_dir: Path) -> None:
    r = run_without_caps(inner_dir, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 passed, 2 errors" in r.stdout, r.stdout  # failed at set-up: errors
    assert r.stdout.count("apptrace: this test must trace here (CI=true or"
                          " --apptrace-require), but tracing needs CAP_SYS_ADMIN") == 2, r.stdout
    # the same outside CI with the flag
    r = run_without_caps(inner_dir, "--apptrace-require", ci=False)
    assert "1 passed, 2 errors" in r.stdout, r.stdout  # failed at set-up: errors
    # a test that uses neither the fixture nor the marker is not affected at all
    r = run_without_caps(inner_dir, "-k", "untouched", ci=True)
    assert r.returncode == 0 and "1 passed, 2 deselected" in r.stdout, r.stdout


def test_help_lists_every_option_as_flag_and_ini(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines([
        "apptrace: assert on probes, TLS and GC pauses:",
        "*--apptrace-timeout=TIMEOUT*",
        "*--apptrace-runs-dir=RUNS_DIR*",
        "*--apptrace-keep=KEEP*",
        "*--apptrace-require*",
    ])
    for ini in ("apptrace_timeout", "apptrace_runs_dir", "apptrace_keep", "apptrace_require"):
        result.stdout.fnmatch_lines([f"  {ini} (*"])
    markers = pytester.runpytest_subprocess("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.apptrace(jvm=False): the test traces with"
                                  " apptrace*"])
