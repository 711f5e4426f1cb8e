"""``apptrace jvm gc`` and :mod:`apptrace.jvm` against real JVMs and their own GC logs.

Every JDK with HotSpot probes on the machine is used (JDK 17 from Debian
and Temurin 25 are required in CI), with each collector it has. The JVM
writes ``-Xlog:gc*,safepoint`` with ``timenanos`` (CLOCK_MONOTONIC, the
BPF clock) while it is traced, and the two accounts are compared: pause
count, duration per pause kind, safepoint time, cause, heap before->after.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from helpers import missing

pytestmark = [pytest.mark.bpf, pytest.mark.jvm]

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = str(ROOT / ".venv" / "bin" / "apptrace")
JDK17 = "/usr/lib/jvm/java-17-openjdk-amd64"
LOG_DECOR = "uptime,timenanos,tid,level,tags"


def _temurin25() -> Optional[str]:
    for home in sorted(glob.glob("/usr/lib/jvm/temurin-25*") + glob.glob("/opt/*jdk-25*")
                       + glob.glob("/opt/java/*25*")):
        if os.access(os.path.join(home, "bin", "java"), os.X_OK):
            return home
    return None


JDKS = {"jdk17": JDK17, "temurin25": _temurin25() or "/usr/lib/jvm/temurin-25-jdk-amd64"}


def java_of(jdk: str) -> str:
    java = os.path.join(JDKS[jdk], "bin", "java")
    if not os.access(java, os.X_OK):
        missing(f"{jdk} is not installed ({java})")
    return java


_HAS_GC: dict[tuple[str, str], bool] = {}


def require_gc(java: str, gc: str) -> None:
    """ZGC and Shenandoah are only tested where the JDK was built with them."""
    key = (java, gc)
    if key not in _HAS_GC:
        r = subprocess.run([java, f"-XX:+Use{gc}GC", "-version"], capture_output=True)
        _HAS_GC[key] = r.returncode == 0
    if not _HAS_GC[key]:
        pytest.skip(f"{java} has no {gc} collector")


@pytest.fixture(scope="module")
def classes() -> str:
    """fixtures/java built with the JDK's javac (make is quiet when up to date)."""
    if not shutil.which("javac") and not glob.glob("/usr/lib/jvm/*/bin/javac"):
        missing("no javac (openjdk-17-jdk-headless) to build fixtures/java")
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures" / "java")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    out = ROOT / "fixtures" / "java" / "out"
    assert (out / "GcLoad.class").exists()
    return str(out)


class Jvm:
    """The GcLoad workload: prints ready, waits for a line, allocates for a
    fixed time (with System.gc() every ``gc_every_ms``), prints done, exits."""

    def __init__(self, java: str, classes: str, gc: str, log: Optional[Path],
                 seconds: float = 1.5, gc_every_ms: int = 400, heap: str = "256m",
                 wait: bool = True) -> None:
        argv = [java, f"-XX:+Use{gc}GC", f"-Xmx{heap}"]
        if log is not None:
            argv.append(f"-Xlog:gc*,safepoint:file={log}:{LOG_DECOR}")
        argv += ["-cp", classes, "GcLoad", str(seconds), "3", str(gc_every_ms)]
        if not wait:
            argv.append("nowait")
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"{argv}: {line!r} {self.proc.stderr.read() if not line else ''}"

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> None:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        assert out.startswith("done"), out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def jvms() -> Iterator[list[Jvm]]:
    started: list[Jvm] = []
    yield started
    for j in started:
        j.kill()


def _within(err_ns: float, log_ns: float) -> bool:
    """The issue's bar for a median: within 5% or within 100 us."""
    return abs(err_ns) <= max(0.05 * log_ns, 100_000)


def check_against_log(cmp: Any, *, min_pauses: int = 10) -> None:
    from apptrace.jvm.gclog import format_comparison

    report = "\n".join(format_comparison(cmp))
    assert cmp.log_pauses >= min_pauses, report
    # every pause line of the log is a traced collection, and nothing else was traced
    assert cmp.counts_equal, report
    assert cmp.unmatched_pauses == 0, report
    # durations: per kind (with enough samples for a median), and over all pauses
    for k in cmp.kinds:
        if k.count >= 5:
            assert _within(k.error_median_ns, k.log_median_ns), f"{k}\n{report}"
    errs = [e for _, _, e in cmp.errors]
    logged = [lg for _, lg, _ in cmp.errors]
    assert _within(statistics.median(errs), statistics.median(logged)), report
    # the safepoint (time to safepoint included) against the log's Total
    sp = cmp.safepoint
    assert sp is not None and sp.count == cmp.traced_pauses, report
    assert abs(sp.error_median_ns) <= 10_000, report
    # the cause read from hsperfdata; the heap summed over the pools (as JMX
    # sums them: G1 can differ from the log's figure by a region when full)
    assert not cmp.causes_differ, report
    assert cmp.heap_differ <= cmp.heap_agree // 50, report


def trace_run(java: str, classes: str, gc: str, tmp_path: Path, jvms: list[Jvm],
              **tracer_args: Any) -> tuple[Any, list[Any], Any, Path]:
    """One workload traced from its first allocation to its exit."""
    from apptrace.jvm import GcTracer, compare_with_log, read_gc_log

    log = tmp_path / f"{gc}.log"
    jvm = Jvm(java, classes, gc, log)
    jvms.append(jvm)
    with GcTracer(pid=jvm.pid, **tracer_args) as tracer:
        jvm.go()
        events = list(tracer)  # ends by itself when the JVM exits
        summary = tracer.summary()
        assert tracer.lost == 0, tracer.counters()
    jvm.finish()
    cmp = compare_with_log(events, read_gc_log(str(log)), tracer.start_ns, pid=jvm.pid)
    return cmp, events, summary, log


# -- accuracy against the GC log, every JDK and collector -------------------------------------

@pytest.mark.parametrize("gc", ["G1", "Parallel", "Serial", "Z", "Shenandoah"])
@pytest.mark.parametrize("jdk", ["jdk17", "temurin25"])
def test_pauses_match_the_gc_log(jdk: str, gc: str, classes: str, tmp_path: Path,
                                 jvms: list[Jvm]) -> None:
    java = java_of(jdk)
    require_gc(java, gc)
    cmp, events, summary, _ = trace_run(java, classes, gc, tmp_path, jvms)
    check_against_log(cmp)
    pauses = [e for e in events if e.type == "pause"]
    assert summary.pauses == len(pauses)
    assert all(e.pid == jvms[0].pid for e in events)
    assert all(p.safepoint_ns is not None and p.safepoint_ns >= p.duration_ns > 0
               for p in pauses)
    if gc in ("G1", "Parallel", "Serial"):
        # young vs full from the memory manager; System.gc() is full on every JDK
        assert any(p.full for p in pauses) and any(not p.full for p in pauses)
        assert all(p.full for p in pauses if p.cause == "System.gc()")
        # A G1 concurrent cycle, when the heap fills enough to start one, adds
        # Remark and Cleanup pauses: not full, and without pools on JDK 17
        # (no memory-pool probes fire in them). The young collections have pools.
        young = [p for p in pauses if p.kind == "Young"]
        assert young and all(p.kind in ("Young", "Remark", "Cleanup")
                             for p in pauses if not p.full)
        assert all(p.pools and p.heap_after is not None and p.heap_before is not None
                   for p in young)
        assert statistics.median(p.heap_before - p.heap_after for p in young) > 0
        assert {"G1 Evacuation Pause", "Allocation Failure"} & {p.cause for p in young}
    else:
        # ZGC/Shenandoah: short pauses, and their concurrent cycles with the pools
        cycles = [e for e in events if e.type == "cycle"]
        assert cycles and summary.cycles == len(cycles)
        assert all(c.duration_ns > 0 and c.pools for c in cycles)
        assert statistics.median(p.duration_ns for p in pauses) < 2_000_000


def test_aggregation_counts_what_per_event_sees(classes: str, tmp_path: Path,
                                                jvms: list[Jvm]) -> None:
    """Both modes on one JVM at once: the in-kernel histograms count exactly
    the pauses the per-event tracer delivers, with the same times."""
    from apptrace.jvm import GcTracer, compare_with_log, read_gc_log

    java = java_of("jdk17")
    log = tmp_path / "agg.log"
    jvm = Jvm(java, classes, "G1", log)
    jvms.append(jvm)
    with GcTracer(pid=jvm.pid, aggregate=True) as agg, GcTracer(pid=jvm.pid) as ev:
        jvm.go()
        events = list(ev)
        assert list(agg) == []  # aggregation delivers no events, and ends with the JVM
        s_agg, s_ev = agg.summary(), ev.summary()
        heap = agg.heap_after_gc()
    jvm.finish()
    assert compare_with_log(events, read_gc_log(str(log)), ev.start_ns).counts_equal
    rows_ev = {(c.manager, c.type): c for c in s_ev.collectors}
    rows_agg = {(c.manager, c.type): c for c in s_agg.collectors}
    assert set(rows_ev) == set(rows_agg) and s_agg.pauses == s_ev.pauses > 10
    for key, e in rows_ev.items():
        a = rows_agg[key]
        assert (a.count, a.safepoint_count, a.full) == (e.count, e.safepoint_count, e.full)
        # one probe hit runs both programs: their clocks are read microseconds apart
        assert abs(a.total_ns - e.total_ns) <= 20_000 * e.count
        assert sum(a.hist) == a.count and not a.exact and e.exact
        assert a.p50_ns <= a.max_ns and abs(a.p50_ns - e.p50_ns) <= 0.25 * e.p50_ns
    pools = {pool: used for (pid, pool), (_m, used, _c, _x) in heap.items() if pid == jvm.pid}
    assert {"G1 Eden Space", "G1 Old Gen", "G1 Survivor Space"} <= set(pools)
    last = max((e for e in events if e.type == "pause"), key=lambda e: e.end_ns)
    old = next(p for p in last.pools if p.name == "G1 Old Gen")
    assert pools["G1 Old Gen"] == old.used_after


def test_without_uprobe_multi_per_site_probes_agree(classes: str, tmp_path: Path,
                                                    jvms: list[Jvm]) -> None:
    """Kernels without uprobe_multi: one perf uprobe per site (JDK 25 has two
    gc__begin and two gc__end sites; all are attached)."""
    java = java_of("temurin25")
    cmp, events, _, _ = trace_run(java, classes, "G1", tmp_path, jvms, multi=False)
    check_against_log(cmp)
    assert any(p.full_arg for p in events if p.type == "pause")  # the constant-arg site


# -- the command line ----------------------------------------------------------------------------

def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([APPTRACE, "jvm", "gc", *args], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 90), **kw)


ISSUE_FIELDS = {"ts_ns", "pid", "type", "vm_op", "manager", "full", "duration_ns",
                "safepoint_ns", "cause", "heap_before", "heap_after", "pools"}


def test_cli_json_check_and_the_jvm_exiting_mid_trace(classes: str, tmp_path: Path,
                                                      jvms: list[Jvm]) -> None:
    """-p PID without -d: the trace ends cleanly when the JVM exits, with every
    pause as a JSON line, the summary, and the GC log check."""
    java = java_of("jdk17")
    log = tmp_path / "cli.log"
    jvm = Jvm(java, classes, "Parallel", log, seconds=1.2)
    jvms.append(jvm)
    proc = subprocess.Popen([APPTRACE, "jvm", "gc", "--json", "-p", str(jvm.pid),
                             "--check-gc-log", str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_line(proc, "apptrace: tracing GC of")
    jvm.go()
    out, err = proc.communicate(timeout=60)
    jvm.finish()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "the traced JVM exited" in err
    docs = [json.loads(line) for line in out.splitlines()]
    pauses = [d for d in docs if d["type"] == "pause"]
    summary, check = docs[-2], docs[-1]
    assert pauses and all(ISSUE_FIELDS <= set(d) for d in pauses)
    assert all(d["pid"] == jvm.pid and d["duration_ns"] > 0 for d in pauses)
    assert all({"manager", "pool", "used_before", "used_after", "committed_before",
                "committed_after", "max", "init"} <= set(p) for d in pauses for p in d["pools"])
    assert {d["manager"] for d in pauses} >= {"PS Scavenge"}
    assert summary["type"] == "summary" and summary["pauses"] == len(pauses)
    assert summary["lost"] == 0 and summary["main_class"] == {str(jvm.pid): "GcLoad"}
    coll = summary["collectors"][0]
    assert {"count", "total_ns", "p50_ns", "p90_ns", "p99_ns", "max_ns", "log2_hist"} <= set(coll)
    assert check["type"] == "gc_log_check" and check["counts_equal"], check
    assert check["pid"] == jvm.pid and check["log_pauses"] >= 10


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 30) -> str:
    """The first stderr line starting with ``prefix`` (the CLI says when it is attached)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line: {''.join(seen)}")


def test_cli_spawned_java_is_traced_from_its_first_gc(classes: str, tmp_path: Path) -> None:
    """-- java ...: held until attached, so even GC(0) is in the trace; its
    stdout goes to stderr (stdout stays JSON) and its exit status is ours."""
    java = java_of("temurin25")
    log = tmp_path / "spawn.log"
    r = _cli("--json", "--check-gc-log", str(log), "--", java, "-XX:+UseSerialGC",
             "-Xmx64m", f"-Xlog:gc*,safepoint:file={log}:{LOG_DECOR}", "-cp", classes,
             "GcLoad", "1", "3", "300", "nowait")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]  # nothing else on stdout
    assert "ready" in r.stderr and "done 3" in r.stderr
    check = docs[-1]
    assert check["type"] == "gc_log_check" and check["counts_equal"], check
    # the window is the whole run: every pause line of the log, from GC(0) on
    from apptrace.jvm import read_gc_log

    logged = read_gc_log(str(log)).pauses
    assert logged[0].gc_id == 0 and check["log_pauses"] == len(logged)
    # the cause is known from the first pause on (hsperfdata found as the JVM starts)
    with_cause = [p for p in logged if p.cause]
    assert check["causes_agree"] == len(with_cause) and not check["causes_differ"], (
        check, [p for p in logged if not p.cause])
    assert docs[-2]["pauses"] == check["traced_pauses"]
    bad = _cli("--", java, "-cp", classes, "NoSuchClass")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr  # java's own status


def test_cli_all_sees_a_jvm_started_later(classes: str, tmp_path: Path,
                                          jvms: list[Jvm]) -> None:
    """--all attaches by libjvm path, system-wide: a JVM started after the
    tracer is traced, each event with its PID."""
    java = java_of("jdk17")
    log = tmp_path / "all.log"
    proc = subprocess.Popen([APPTRACE, "jvm", "gc", "--all", "--json", "-d", "8",
                             "--check-gc-log", str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc, "apptrace: tracing GC of every JVM")
        jvm = Jvm(java, classes, "G1", log, seconds=1.0, wait=False)
        jvms.append(jvm)
        jvm.finish()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    docs = [json.loads(line) for line in out.splitlines()]
    mine = [d for d in docs if d.get("type") == "pause" and d["pid"] == jvm.pid]
    check = docs[-1]
    assert mine and check["pid"] == jvm.pid and check["counts_equal"], check
    assert check["traced_pauses"] == len(mine)


def test_cli_prometheus_metrics_scraped_while_tracing(classes: str, tmp_path: Path,
                                                      jvms: list[Jvm]) -> None:
    """--prometheus serves /metrics during the run (here with --name and the
    in-kernel aggregation): pause histograms, counts, safepoint time and the
    heap after GC, labelled with pid and main class."""
    from prometheus_client.parser import text_string_to_metric_families

    java = java_of("jdk17")
    jvm = Jvm(java, classes, "G1", None, seconds=3.0)
    jvms.append(jvm)
    proc = subprocess.Popen([APPTRACE, "jvm", "gc", "--name", "GcLoad", "--histogram",
                             "--prometheus", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = _wait_for_line(proc, "apptrace: serving metrics on").rsplit(" ", 1)[1]
        jvm.go()
        time.sleep(1.5)
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    jvm.finish()
    assert proc.returncode == 0, err
    samples: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("pid", str(jvm.pid)) == str(jvm.pid):
                samples.setdefault(s.name, []).append(s)
    young = {"pid": str(jvm.pid), "main_class": "GcLoad", "gc": "G1 Young Generation",
             "action": "end of minor GC"}
    count = next(s.value for s in samples["jvm_gc_pause_seconds_count"]
                 if s.labels == young)
    inf = next(s.value for s in samples["jvm_gc_pause_seconds_bucket"]
               if s.labels == {**young, "le": "+Inf"})
    total = next(s.value for s in samples["jvm_gc_pause_seconds_sum"] if s.labels == young)
    assert count == inf >= 5 and 0 < total < 3
    buckets = [s.value for s in samples["jvm_gc_pause_seconds_bucket"]
               if {k: v for k, v in s.labels.items() if k != "le"} == young]
    assert buckets == sorted(buckets)  # cumulative
    sp = next(s.value for s in samples["jvm_safepoint_duration_seconds_count"]
              if s.labels == young)
    assert sp == count
    pools = {s.labels["pool"]: s.value for s in samples["jvm_memory_used_after_last_gc_bytes"]}
    assert pools.get("G1 Old Gen", 0) > 0 and "G1 Eden Space" in pools
    assert next(s.value for s in samples["apptrace_jvm_gc_lost_total"]) == 0
    assert "GC summary" in out


def test_cli_ctrl_c_prints_the_summary(classes: str, tmp_path: Path, jvms: list[Jvm]) -> None:
    java = java_of("jdk17")
    jvm = Jvm(java, classes, "Serial", None, seconds=8.0, gc_every_ms=0)
    jvms.append(jvm)
    proc = subprocess.Popen([APPTRACE, "jvm", "gc", "-p", str(jvm.pid)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_line(proc, "apptrace: tracing GC of")
    jvm.go()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    lines = out.splitlines()
    live = [ln for ln in lines if re.match(rf"\d\d:\d\d:\d\d\.\d{{3}} {jvm.pid} Pause Young"
                                            r" \(Allocation Failure\) \d+[KMG]->\d+[KMG]"
                                            r"\(\d+[KMG]\) \d+\.\d{3}ms safepoint", ln)]
    assert len(live) >= 5, out
    summary = lines[lines.index(next(ln for ln in lines if ln.startswith("GC summary"))):]
    assert re.search(rf"{jvm.pid}\s+GcLoad\s+Copy\s+young\s+{len(live)}\s", "\n".join(summary))
    assert any("usecs" in ln for ln in summary) and jvm.proc.poll() is None  # JVM untouched


# -- JVMs that cannot be traced -------------------------------------------------------------

@pytest.fixture(scope="module")
def jdk_without_probes(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JDK 17 whose libjvm.so lost its .note.stapsdt (as Oracle's and
    Corretto's builds ship): the launcher is copied, the rest linked."""
    if not shutil.which("objcopy"):
        missing("objcopy (binutils) is not installed")
    src = JDKS["jdk17"]
    java_of("jdk17")
    home = tmp_path_factory.mktemp("jdk-noprobes") / "jdk"
    (home / "lib" / "server").mkdir(parents=True)
    (home / "bin").mkdir()
    for e in os.listdir(src):
        if e not in ("bin", "lib"):
            os.symlink(os.path.join(src, e), home / e)
    shutil.copy2(os.path.join(src, "bin", "java"), home / "bin" / "java")
    for e in os.listdir(os.path.join(src, "lib")):
        if e != "server":
            os.symlink(os.path.join(src, "lib", e), home / "lib" / e)
    for e in os.listdir(os.path.join(src, "lib", "server")):
        if e != "libjvm.so":
            os.symlink(os.path.join(src, "lib", "server", e), home / "lib" / "server" / e)
    subprocess.run(["objcopy", "--remove-section", ".note.stapsdt",
                    os.path.join(src, "lib", "server", "libjvm.so"),
                    str(home / "lib" / "server" / "libjvm.so")], check=True)
    return str(home / "bin" / "java")


def test_jvm_without_probes_gets_a_clear_message(jdk_without_probes: str, classes: str,
                                                 jvms: list[Jvm]) -> None:
    from apptrace.errors import JvmProbesMissingError
    from apptrace.jvm import GcTracer, read_hsperfdata

    jvm = Jvm(jdk_without_probes, classes, "G1", None)
    jvms.append(jvm)
    for r in (_cli("-p", str(jvm.pid), "-d", "1"),
              _cli("-d", "1", "--", jdk_without_probes, "-version")):
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "was built without HotSpot's USDT probes" in r.stderr
        assert ".note.stapsdt" in r.stderr and "Corretto" in r.stderr
        assert "ExtendedDTraceProbes" not in r.stderr  # no flag can add them
    with pytest.raises(JvmProbesMissingError):
        GcTracer(pid=jvm.pid).start()
    # the counters are there all the same, read without attaching to the JVM
    perf = read_hsperfdata(jvm.pid)
    assert perf is not None and perf.main_class == "GcLoad"
    assert perf.string("sun.gc.lastCause") is not None


def test_not_a_jvm_and_bad_usage() -> None:
    r = _cli("-p", str(os.getpid()), "-d", "1")
    assert r.returncode == 1 and "is not a HotSpot JVM" in r.stderr, r.stderr
    for args, text in ((["-p", "1", "--all"], "exactly one target"),
                       ([], "exactly one target"),
                       (["--all", "--histogram", "--check-gc-log", "x.log"], "--histogram"),
                       (["--all", "--prometheus", "host:port"], "--prometheus"),
                       (["--all", "-d", "nan"], "-d/--duration")):
        r = _cli(*args)
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, r.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
