"""apptrace.testing against real programs: timeouts, snapshots, bad input,
several kinds at once on a PID, TLS and GC runs saved and loaded, and the
unittest file run by plain ``python -m unittest``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import missing

import apptrace
import apptrace.testing as T

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "c" / "out"
SERVER = str(OUT / "server")
LOOP = str(OUT / "usdt_loop_pie")
DONE = "usdt:myapp:request__done(str,int)"


@pytest.fixture(autouse=True)
def _built(fixtures_dir: Path) -> None:
    """The C fixtures, built once."""


def test_the_unittest_file_runs_without_pytest() -> None:
    code = ("import sys, unittest\n"
            "sys.path.insert(0, 'tests/integration')\n"
            "import test_testing_unittest as m\n"
            "suite = unittest.defaultTestLoader.loadTestsFromModule(m)\n"
            "res = unittest.TextTestRunner(verbosity=2).run(suite)\n"
            "print('pytest imported:', 'pytest' in sys.modules)\n"
            "sys.exit(0 if res.wasSuccessful() and not res.skipped else 1)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Ran 5 tests" in r.stderr and "OK" in r.stderr
    assert "pytest imported: False" in r.stdout


def test_a_program_past_its_timeout_is_stopped_and_what_it_did_is_kept() -> None:
    t0 = time.monotonic()
    with pytest.raises(apptrace.RunTimeoutError) as info:
        T.run([LOOP, "0"], probes=["usdt:apptrace_fx:loop(long,int)"], timeout=1.0)
    assert time.monotonic() - t0 < 10
    err = info.value
    assert isinstance(err, TimeoutError) and err.timeout == 1.0
    assert f"{LOOP} 0 still ran after 1.0 s; stopped" in str(err)
    got = err.run
    assert got.finished and got.exit_status == -15  # terminated by the recorder
    n = got.count("apptrace_fx:loop")
    assert n > 50 and got.stats.per_probe["usdt:apptrace_fx:loop"] == n
    # every hit until the probes were detached, in order, none lost; the loop
    # prints (and flushes) a line per hit, and ran on a little until terminated
    assert [ev.args[0] for ev in got.events] == list(range(n))
    assert got.stats.lost == 0
    assert got.output.count("loop ") >= n
    assert f"loop {n - 1} {got.pid}\n" in got.output


def test_snapshots_on_demand_while_the_program_runs() -> None:
    with T.start([LOOP, "0"], probes=["usdt:apptrace_fx:loop(long,int)"]) as rec:
        assert rec.running and rec.result is None
        deadline = time.monotonic() + 10
        snap = rec.snapshot()
        while snap.count("apptrace_fx:loop") < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
            snap = rec.snapshot()
        assert not snap.finished and snap.exit_status is None
        assert [ev.args[0] for ev in snap.events[:20]] == list(range(20))
        with pytest.raises(AssertionError, match="note: this is a snapshot; the program was"
                                                 " still running"):
            snap.assert_fired("apptrace_fx:loop", count=1)
        final = rec.stop()
    assert rec.stop() is final  # the same run again
    assert final.finished and final.exit_status == -15
    assert final.events[:len(snap.events)] == snap.events
    assert final.count() >= snap.count()


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(apptrace.OptionError, match="something to record"):
        T.run([SERVER, "1"])
    with pytest.raises(apptrace.OptionError, match=r"a command as a list of strings"):
        T.run(SERVER, probes=[DONE])  # type: ignore[arg-type]
    with pytest.raises(apptrace.OptionError, match="one kind per started command"):
        T.run([SERVER, "1"], probes=[DONE], tls=True)
    with pytest.raises(apptrace.OptionError, match="a process ID"):
        T.attach(0, probes=[DONE])
    with pytest.raises(apptrace.CommandNotFoundError):
        T.run(["/nonexistent/prog"], probes=[DONE])
    with pytest.raises(apptrace.ProbeNotFoundError):
        T.run([SERVER, "1"], probes=["usdt:myapp:no_such_probe"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(apptrace.ProcessNotFoundError):
        T.attach(gone.pid, probes=[DONE])
    run = T.run([SERVER, "1"], probes=DONE)  # type: ignore[arg-type]  # one string is one probe
    with pytest.raises(apptrace.OptionError, match="count must be a count"):
        run.assert_fired("myapp:request__done", count=-1)


def test_a_failing_program_shows_its_output_in_the_failure() -> None:
    run = T.run([SERVER, "2", "extra", "words"], probes=[DONE], timeout=30)
    run.assert_exit_status(0)
    crash = T.run([SERVER, "https", "0"], probes=[DONE], timeout=30)  # usage error: exit 1
    assert crash.exit_status == 1
    with pytest.raises(AssertionError, match=r"to exit with status 0; it exited with status 1"):
        crash.assert_exit_status(0)


def test_probes_and_tls_of_one_pid_together_saved_and_loaded(tmp_path: Path) -> None:
    srv = subprocess.Popen([SERVER, "https", "0", str(OUT / "tls_cert.pem"),
                            str(OUT / "tls_key.pem")], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = srv.stdout.readline().split()[1]
        with T.attach(srv.pid, probes=[DONE], tls=True) as rec:
            client = subprocess.run([SERVER, "get", port, "/items/3", "/admin"],
                                    capture_output=True, text=True, timeout=30)
            assert client.stdout == "status 200 /items/3\nstatus 404 /admin\n"
            assert srv.wait(30) == 0
            run = rec.wait(30)
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()
        if srv.stdout is not None:
            srv.stdout.close()
    run.assert_fired("myapp:request__done", count=1, args=("/admin", 404))
    run.assert_received(b"GET /items/3 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    run.assert_sent(b"HTTP/1.1 404 Not Found\r\n")
    assert run.received() == (b"GET /items/3 HTTP/1.1\r\nHost: localhost\r\n\r\n"
                              b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert len(run.connections) == 1 and run.tls_lost == 0
    assert run.stream(run.connections[0], "write").complete
    # the request was read before the probe for it fired, the answer written after
    first_read = next(it for it in run.tls if it.direction == "read")
    assert first_read.ts_ns < run.events[0].ts_ns
    back = T.load(run.save(tmp_path / "tls.jsonl"))
    assert back == run and back.sent() == run.sent()
    with pytest.raises(AssertionError, match="expected b'DELETE' to be received over TLS"):
        back.assert_received(b"DELETE")


def test_gc_run_of_a_real_jvm(tmp_path: Path) -> None:
    why = T.jvm_unavailable()
    if why:
        missing(f"GC helpers need a JDK with HotSpot probes: {why}")
    java_out = ROOT / "fixtures" / "java" / "out"
    if not (java_out / "GcLoad.class").exists():
        missing("fixtures/java is not built (make -C fixtures/java needs javac)")
    run = T.run(["java", "-Xmx64m", "-cp", str(java_out), "GcLoad", "0.5", "3", "100",
                 "nowait"], gc=True, timeout=60)
    run.assert_exit_status(0)
    pauses = run.assert_gc(max_pause_ms=5000, min_pauses=5)
    assert run.max_pause_ms == max(p.duration_ns for p in pauses) / 1e6 > 0
    assert any(p.full for p in pauses)  # System.gc() every 100 ms
    assert "done " in run.output
    with pytest.raises(AssertionError, match="expected no full collection"):
        run.assert_gc(full=False)
    back = T.load(run.save(tmp_path / "gc.jsonl"))
    assert back == run and back.pauses == run.pauses


def test_the_flat_api_names_the_module() -> None:
    assert apptrace.testing is T
    assert issubclass(apptrace.TraceAssertionError, AssertionError)
    assert os.path.basename(T.__file__) == "testing.py"
