"""apptrace.testing from plain unittest: no pytest imported, nothing of the
plugin used. pytest collects these TestCases like any other; test_testing_api.py
also runs this file with ``python -m unittest`` to show it needs nothing more.

The skip policy is unittest's own here: where this machine cannot trace, the
tests are skipped with the reason, except in CI (CI=true), where setUpModule
fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import unittest
from pathlib import Path

import apptrace.testing
from apptrace.errors import TraceAssertionError

ROOT = Path(__file__).resolve().parents[2]
SERVER = str(ROOT / "fixtures" / "c" / "out" / "server")
DONE = "usdt:myapp:request__done(str,int)"
START = "usdt:myapp:request__start(str)"


def setUpModule() -> None:  # noqa: N802 - unittest's name
    subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures" / "c")], check=True)
    why = apptrace.testing.tracing_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"these tests must trace in CI, but {why}")
        raise unittest.SkipTest(why)


class ServerRequests(unittest.TestCase):
    def test_every_request_fires_done_with_its_path_and_status(self) -> None:
        run = apptrace.testing.run([SERVER, "10"], probes=[DONE], timeout=30)
        run.assert_exit_status(0)
        run.assert_fired("myapp:request__done", count=8, args=(re.compile(r"^/items/\d$"), 200))
        run.assert_fired("myapp:request__done", count=2, args={1: 404})
        self.assertEqual(run.args_of("myapp:request__done", where=lambda e: e.args[1] == 404),
                         [("/missing/4", 404), ("/missing/9", 404)])
        self.assertIn("request__done /missing/9 404", run.output)
        self.assertEqual(run.stats.lost, 0)
        self.assertEqual(run.stats.per_probe["usdt:myapp:request__done"], 10)

    def test_the_semaphore_probe_fires_from_the_first_request(self) -> None:
        # The command is held until both probes are attached, so the semaphore
        # is raised before main runs: request 0 already builds its argument.
        run = apptrace.testing.run([SERVER, "3"], probes=[START, DONE], timeout=30)
        first = run.assert_order(("myapp:request__start", ("GET /items/0",)),
                                 ("myapp:request__done", ("/items/0", 200)))
        self.assertLess(first[0].ts_ns, first[1].ts_ns)
        self.assertIn("request__start GET /items/0", run.output)

    def test_a_failed_expectation_is_an_assertion_error_naming_what_fired(self) -> None:
        run = apptrace.testing.run([SERVER, "5"], probes=[DONE], timeout=30)
        with self.assertRaises(AssertionError) as cm:
            run.assert_not_fired("myapp:request__done", args=(..., 404))
        self.assertIsInstance(cm.exception, TraceAssertionError)
        text = str(cm.exception)
        self.assertIn("expected myapp:request__done not to fire with args [1] 404;"
                      " it fired once", text)
        self.assertRegex(text, r"\+ +[\d.]+ ms server\[\d+\] usdt:myapp:request__done"
                               r" '/missing/4' 404\n")

    def test_attach_records_a_running_process_until_it_exits(self) -> None:
        with subprocess.Popen([SERVER, "3", "wait"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            self.assertEqual(proc.stdout.readline(), "ready\n")
            with apptrace.testing.attach(proc.pid, probes=[DONE, START]) as rec:
                self.assertEqual(rec.pid, proc.pid)
                self.assertEqual(rec.snapshot().events, ())
                proc.stdin.write("\n")
                proc.stdin.close()
                self.assertEqual(proc.wait(30), 0)
                run = rec.wait(30)
        run.assert_fired("myapp:request__done", count=3)
        run.assert_fired("myapp:request__start", count=3)
        self.assertIsNone(run.exit_status)  # not ours: attached to, not started

    def test_a_saved_run_loads_back_equal_and_still_asserts(self) -> None:
        run = apptrace.testing.run([SERVER, "4"], probes=[DONE], stack=True, timeout=30)
        with tempfile.TemporaryDirectory() as d:
            back = apptrace.testing.load(run.save(Path(d) / "run.jsonl"))
        self.assertEqual(back, run)
        back.assert_fired("myapp:request__done", count=4)
        frames = [f.symbol for f in back.events[0].stack or ()]
        self.assertEqual(frames[:3], ["myapp_done", "handle", "in_process"])


if __name__ == "__main__":
    unittest.main()
