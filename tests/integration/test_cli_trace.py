"""`apptrace trace` end to end: the real CLI, real BPF, real fixture processes.

Each test runs the installed ``.venv/bin/apptrace`` in a subprocess (the CLI
spawns commands and owns stdout). A spawned command's stdout goes to
apptrace's stderr while events go to stdout (to the command's stdout with
``-o FILE``); JSON events are the lines that start with ``{``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = ROOT / ".venv" / "bin" / "apptrace"
SCHEMA = {"ts_ns", "pid", "tid", "comm", "probe", "args"}


def apptrace(*args: Any, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(APPTRACE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def json_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def check_schema(ev: dict[str, Any]) -> None:
    assert set(ev) == SCHEMA or set(ev) == SCHEMA | {"unavailable"}, ev
    for key in ("ts_ns", "pid", "tid"):
        assert type(ev[key]) is int and ev[key] > 0, ev
    assert isinstance(ev["comm"], str) and ev["comm"]
    assert isinstance(ev["probe"], str) and ev["probe"].count(":") >= 2
    assert isinstance(ev["args"], list)


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


def summary(stderr: str) -> tuple[int, int, dict[str, int]]:
    """(events, lost, per-probe counts) from the summary apptrace prints."""
    events = lost = -1
    per: dict[str, int] = {}
    for ln in stderr.splitlines():
        if ln.startswith("apptrace: ") and " events, " in ln:
            a, b = ln[len("apptrace: "):].split(", ")[:2]
            events, lost = int(a.split()[0]), int(b.split()[0])
        elif ln.startswith("  ") and ": " in ln:
            label, _, count = ln.strip().rpartition(": ")
            per[label] = int(count.split()[0])
    assert events >= 0, f"no summary in stderr:\n{stderr}"
    return events, lost, per


def test_json_lines_and_count(fixtures_dir: Path) -> None:
    r = apptrace("trace", "--json", "-n", 5, "usdt:apptrace_fx:tick", "--",
                 fixtures_dir / "usdt_early_pie", 50)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    evs = json_events(r.stdout)
    assert len(evs) == 5
    for ev in evs:
        check_schema(ev)
        assert set(ev) == SCHEMA
        assert ev["probe"] == "usdt:apptrace_fx:tick"
        assert ev["comm"] == "usdt_early_pie"
        assert ev["pid"] == ev["tid"] == evs[0]["pid"]
    assert [ev["args"] for ev in evs] == [[i] for i in range(5)]
    assert [ev["ts_ns"] for ev in evs] == sorted(ev["ts_ns"] for ev in evs)
    # stdout is JSON only; the command's own output went to stderr, untouched.
    assert all(ln.startswith("{") for ln in r.stdout.splitlines()), r.stdout
    mine = [ln for ln in r.stderr.splitlines() if not ln.startswith(("apptrace", "  "))]
    assert mine == ["early 2 24301"] + [f"tick {i}" for i in range(50)] + ["done"]


def test_json_value_types(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    r = apptrace("trace", "--json", "-q", "-o", out, "usdt:apptrace_fx:strs(str,str)",
                 "usdt:apptrace_fx:floats", "usdt:apptrace_fx:consts",
                 "usdt:apptrace_fx:xmm_arg", "--", fixtures_dir / "usdt_args_pie", 4)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # -q: no banner, no summary
    assert not json_events(r.stdout)  # -o: events went to the file
    printed: dict[str, list[list[str]]] = {}
    for ln in r.stdout.splitlines():
        word, _, rest = ln.partition(" ")
        printed.setdefault(word, []).append(rest.split(" "))
    evs = json_events(out.read_text())
    assert len(evs) == 16
    by: dict[str, list[dict[str, Any]]] = {}
    for ev in evs:
        check_schema(ev)
        by.setdefault(ev["probe"].rsplit(":", 1)[1], []).append(ev)
    assert [e["args"] for e in by["strs"]] == printed["strs"]
    assert all(type(a) is str for e in by["strs"] for a in e["args"])
    assert [e["args"] for e in by["floats"]] == [[float.fromhex(v) for v in row]
                                                 for row in printed["floats"]]
    assert all(type(a) is float for e in by["floats"] for a in e["args"])
    assert [e["args"] for e in by["consts"]] == [[int(v) for v in row]
                                                 for row in printed["consts"]]
    assert all(type(a) is int for e in by["consts"] for a in e["args"])
    for e in by["xmm_arg"]:
        assert e["args"] == [None]
        assert set(e["unavailable"]) == {"0"} and "xmm" in e["unavailable"]["0"]


def test_command_exit_ends_trace_with_summary(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.txt"
    t0 = time.monotonic()
    r = apptrace("trace", "-o", out, "usdt:apptrace_fx:tick", "usdt:apptrace_fx:early", "--",
                 fixtures_dir / "usdt_early_nopie", 20)
    assert time.monotonic() - t0 < 30
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 21
    assert lines[0].endswith("usdt:apptrace_fx:early 2 24301")
    assert [ln.split(" ", 2)[2] for ln in lines[1:]] == [
        f"usdt:apptrace_fx:tick {i}" for i in range(20)]
    assert all("usdt_early_nopi[" in ln or "usdt_early_nopie[" in ln for ln in lines)
    events, lost, per = summary(r.stderr)
    assert (events, lost) == (21, 0)
    assert per == {"usdt:apptrace_fx:early": 1, "usdt:apptrace_fx:tick": 20}
    assert "apptrace: command exited with status 0" in r.stderr.splitlines()


def _loop_fixture(fixtures_dir: Path) -> subprocess.Popen[str]:
    loop = subprocess.Popen([str(fixtures_dir / "usdt_loop_pie"), "0", "wait"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert loop.stdout is not None and loop.stdout.readline() == "ready\n"
    return loop


def _stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.communicate()


def test_duration_stops_a_pid_trace(fixtures_dir: Path) -> None:
    loop = _loop_fixture(fixtures_dir)
    try:
        loop.stdin.write("\n")  # type: ignore[union-attr]
        loop.stdin.flush()  # type: ignore[union-attr]
        t0 = time.monotonic()
        r = apptrace("trace", "--json", "-d", 1.5, "-p", loop.pid, "usdt:apptrace_fx:loop",
                     timeout=30)
        elapsed = time.monotonic() - t0
        assert loop.poll() is None, "the target should outlive the trace"
    finally:
        _stop(loop)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert 1.5 <= elapsed < 15
    evs = json_events(r.stdout)
    assert len(evs) >= 50  # ~1 ms per iteration
    first = evs[0]["args"][0]
    assert [e["args"] for e in evs] == [[first + k, loop.pid] for k in range(len(evs))]
    events, lost, per = summary(r.stderr)
    assert events == len(evs) and lost == 0
    assert per == {"usdt:apptrace_fx:loop": len(evs)}
    assert "command exited" not in r.stderr


def _readline(stream: Any, timeout: float) -> Optional[str]:
    r, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if r else None


def test_pid_target_killed_mid_trace(fixtures_dir: Path) -> None:
    loop = _loop_fixture(fixtures_dir)
    tracer = subprocess.Popen([str(APPTRACE), "trace", "--json", "-p", str(loop.pid),
                               "usdt:apptrace_fx:loop"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        # Wait until attached, then let the loop run.
        assert tracer.stderr is not None and tracer.stdout is not None
        banner = _readline(tracer.stderr, 30)
        assert banner and banner.startswith("apptrace: attached"), banner
        loop.stdin.write("\n")  # type: ignore[union-attr]
        loop.stdin.flush()  # type: ignore[union-attr]
        seen: list[dict[str, Any]] = []
        while len(seen) < 20:
            ln = _readline(tracer.stdout, 10)
            assert ln, "no events from the tracer"
            seen.append(json.loads(ln))
        os.kill(loop.pid, signal.SIGKILL)
        t0 = time.monotonic()
        tracer.wait(timeout=20)
        assert time.monotonic() - t0 < 10
        # Read through the same text streams: readline() may have buffered more.
        out, err = tracer.stdout.read(), tracer.stderr.read()
    finally:
        _stop(tracer)
        _stop(loop)
    assert "Traceback" not in err
    assert tracer.returncode == 0, err
    evs = seen + json_events(out)
    assert [e["args"][0] for e in evs] == list(range(len(evs)))
    events, lost, _ = summary(err)
    assert events == len(evs) and lost == 0


@pytest.mark.parametrize("probe", ["bogus", "usdt:apptrace_fx:tick(nosuchtype)",
                                   "uretprobe:/bin/true:main(int,int)"])
def test_bad_probe_spec_is_one_line(fixtures_dir: Path, probe: str) -> None:
    r = apptrace("trace", probe, "--", fixtures_dir / "usdt_early_pie", 1)
    no_traceback(r)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptrace: error: "), r.stderr
    assert "probe spec" in lines[0]
    assert r.stdout == ""  # the command never ran


def test_missing_probe_is_one_line_and_command_never_runs(fixtures_dir: Path) -> None:
    r = apptrace("trace", "usdt:apptrace_fx:no_such_probe", "--",
                 fixtures_dir / "usdt_early_pie", 1)
    no_traceback(r)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptrace: error: "), r.stderr
    assert "no_such_probe" in lines[0] and "apptrace usdt list" in lines[0]
    assert r.stdout == ""


def test_usage_errors_exit_2() -> None:
    r = apptrace("trace", "-n", 0, "usdt:apptrace_fx:tick", "--", "/bin/true")
    no_traceback(r)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "apptrace: trace: -n/--max-events must be an integer >= 1 (got 0)"]
    r = apptrace("trace", "-p", 1, "--path", "/bin/true", "usdt:apptrace_fx:tick")
    assert r.returncode == 2 and "only one of" in r.stderr
