"""User stacks at probes, symbolized with blazesym: real BPF, real processes."""

from __future__ import annotations

import errno
import glob
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from apptrace.session import Session

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = str(ROOT / ".venv" / "bin" / "apptrace")


def _expected_lines(child) -> dict[str, int]:  # type: ignore[no-untyped-def]
    lines = {}
    for _ in range(4):
        kind, func, num = child.readline().split()
        assert kind == "line"
        lines[func] = int(num)
    assert child.readline() == "ready"
    return lines


@pytest.mark.parametrize("variant", ["pie", "nopie"])
def test_call_chain_names_files_lines(fixtures_dir, spawn, variant):  # type: ignore[no-untyped-def]
    child = spawn([fixtures_dir / f"stack_chain_{variant}", 3, "wait"], wait=False)
    lines = _expected_lines(child)
    with Session(pid=child.pid) as s:
        s.add("usdt:apptrace_fx:deep", stack=True)
        s.start()
        child.send()
        events = list(s.events(timeout=15))
    assert [e.args[0] for e in events] == [3, 4, 5]
    for ev in events:
        frames = ev.stack
        assert frames is not None and len(frames) >= 4
        top = [(f.symbol, os.path.basename(f.file or ""), f.line, f.inlined) for f in frames[:4]]
        assert top == [
            ("fire_here", "stack_chain.cpp", lines["fire_here"], True),
            ("inner", "stack_chain.cpp", lines["inner"], False),
            ("fx::Walker::outer(int)", "stack_chain.cpp", lines["outer"], False),
            ("main", "stack_chain.cpp", lines["main"], False),
        ]
        assert frames[0].module and frames[0].module.endswith(f"stack_chain_{variant}")
        # fire_here is inlined into inner: both frames are the probe's IP. The
        # next frame is a return address, reported as captured (looked up at -1).
        assert frames[0].addr == frames[1].addr == ev.raw_stack[0]  # type: ignore[index]
        assert frames[2].addr == ev.raw_stack[1]  # type: ignore[index]


def test_process_exiting_right_after_probe_is_symbolized(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    child = spawn([fixtures_dir / "stack_chain_pie", 1, "wait", "exit"], wait=False)
    lines = _expected_lines(child)
    with Session(pid=child.pid) as s:
        s.add("usdt:apptrace_fx:deep", stack=True)
        s.start()
        child.send()
        child.proc.wait(timeout=10)
        time.sleep(0.3)  # the process is gone before we read its event
        assert not os.path.exists(f"/proc/{child.pid}/maps") or \
            open(f"/proc/{child.pid}/maps").read() == ""
        events = list(s.events(timeout=5))
    assert len(events) == 1
    names = [f.symbol for f in events[0].stack or ()]
    assert names[:4] == ["fire_here", "inner", "fx::Walker::outer(int)", "main"]
    assert events[0].stack[3].line == lines["main"]  # type: ignore[index]
    # libc's frame below main comes from the snapshot taken while it ran.
    assert any(n and "libc_start" in n for n in names[4:]), names


def test_spawned_command_stack_and_folded_cli(fixtures_dir):  # type: ignore[no-untyped-def]
    r = subprocess.run([APPTRACE, "trace", "--folded", "usdt:apptrace_fx:deep", "--",
                        str(fixtures_dir / "stack_chain_nopie"), "200"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    folded = [ln for ln in r.stdout.splitlines() if ln.startswith("stack_chain_")]
    assert len(folded) == 1, r.stdout
    stack, count = folded[0].rsplit(" ", 1)
    assert int(count) == 200
    # The command is stopped at its entry point for a map snapshot, so even
    # libc's frame resolves although the process exits right after.
    assert stack.endswith(";__libc_start_call_main;main;fx::Walker::outer(int);inner;fire_here")
    assert "200 events, 0 lost" in r.stderr


@pytest.mark.parametrize("symbolize", [True, False])
def test_folded_counts_in_process(fixtures_dir, symbolize):  # type: ignore[no-untyped-def]
    """Session.folded() itself (the CLI test above runs it in a subprocess):
    one line per distinct stack with its kernel count, outermost first, comm
    first; without symbolization the raw addresses, the probe's own last.
    After close() the same counts stay readable."""
    binary = str(fixtures_dir / "stack_chain_nopie")
    with Session(command=[binary, "40"], symbolize=symbolize) as s:
        s.add("usdt:apptrace_fx:deep", stack=True, fold=True)
        s.start()
        assert s.wait_child(15) == 0
        folded = s.folded()
    [(line, count)] = folded.items()
    assert count == 40
    parts = line.split(";")
    assert parts[0] == "stack_chain_nop"  # comm: 15 bytes at most
    if symbolize:
        assert parts[-4:] == ["main", "fx::Walker::outer(int)", "inner", "fire_here"]
        assert "__libc_start_call_main" in parts
    else:  # outermost first, the probe's own address last
        addrs = [int(p, 16) for p in parts[1:]]
        assert len(addrs) >= 4 and all(addrs)
        assert 0x400000 <= addrs[-1] < 0x800000  # non-PIE: the probe's IP in the binary
    assert s.folded() == folded  # after close: the last counts
    assert s.warnings == []  # readable after close too


def test_folded_many_stacks_lost_ones_named_and_separators_kept(  # type: ignore[no-untyped-def]
        fixtures_dir, tmp_path):
    """4096 distinct stacks at one probe, in a stack map of 16384 buckets:
    some collide, and the kernel refuses them (EEXIST). Those are counted
    under one "[stack lost: ...]" line, never dropped or given another
    stack; every other stack keeps its own line. A ';' in a symbol name
    (folded output's separator) becomes ':'. The program runs under a short
    name that is not UTF-8: its comm is decoded with replacement, up to its
    first NUL."""
    link = os.path.join(os.fsencode(tmp_path), b"\xfffan")
    os.symlink(fixtures_dir / "stack_fanout_pie", link)
    depth = 12
    with Session(command=[os.fsdecode(link), str(depth)]) as s:
        s.add("usdt:apptrace_fx:fan", stack=True, fold=True)
        s.start()
        assert s.wait_child(60) == 0
        folded = s.folded()
        stats = s.stats()
    assert sum(folded.values()) == 1 << depth  # every firing counted
    assert stats.events == stats.per_probe["usdt:apptrace_fx:fan"] == 1 << depth
    lost = f"\ufffdfan;[stack lost: {os.strerror(errno.EEXIST)}]"
    assert folded.get(lost, 0) > 0, sorted(folded)[:3]
    paths = set()
    for line, count in folded.items():
        if line == lost:
            continue
        parts = line.split(";")
        assert parts[0] == "\ufffdfan" and count == 1, line
        assert parts[-1].strip('"') == "fx:leaf", line  # gcc quotes the asm name
        turns = [p for p in parts if p in ("go_left", "go_right")]
        assert len(turns) == depth, line
        # Outermost first: level k's turn is bit k of the iteration.
        paths.add(sum(1 << k for k, t in enumerate(turns) if t == "go_right"))
    assert len(paths) == len(folded) - 1  # no two lines share a stack
    assert len(paths) + folded[lost] == 1 << depth


def test_events_of_a_process_gone_before_its_maps_were_read(fixtures_dir):  # type: ignore[no-untyped-def]
    """The event path's fallback for a process never seen alive (traced by
    path, read after it exited): each stack is placed through its own
    event's probe site, and decoding leaves the collector enabled."""
    import gc

    binary = fixtures_dir / "usdt_inline_pie"
    with Session(path=str(binary)) as s:
        s.add("usdt:apptrace_fx:inl", stack=True)
        s.start()
        subprocess.run([binary, "2"], check=True, stdout=subprocess.DEVNULL, timeout=30)
        events = list(s.events(timeout=2))
    assert gc.isenabled()
    funcs = ["site_regs", "site_global", "site_stack", "site_const"]
    assert sorted(e.site for e in events) == [0, 0, 1, 1, 2, 2, 3, 3]
    for e in events:
        names = [f.symbol for f in e.stack or ()]
        assert names[:2] == ["fire_inl", funcs[e.site]], (e.site, names)


def test_folded_cli_says_how_many_stacks_were_lost(fixtures_dir):  # type: ignore[no-untyped-def]
    """The summary's "0 lost" counts events; stacks the kernel refused get a
    warning of their own, with the number on the "[stack lost: ...]" line."""
    r = subprocess.run([APPTRACE, "trace", "--folded", "usdt:apptrace_fx:fan", "--",
                        str(fixtures_dir / "stack_fanout_pie"), "12"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    [lost_line] = [ln for ln in r.stdout.splitlines() if "[stack lost: " in ln]
    lost = int(lost_line.rsplit(" ", 1)[1])
    assert lost > 0
    assert (f"apptrace: warning: {lost} of 4096 events have no stack: the kernel's stack"
            " map refused them") in r.stderr, r.stderr


def test_folded_for_a_process_gone_before_its_maps_were_read(  # type: ignore[no-untyped-def]
        fixtures_dir):
    """Traced by path, the program runs and exits before folded() is read:
    its memory map was never seen. Each stack is placed through its own
    probe site (four sites of one probe, each in another function), so the
    program's frames still resolve."""
    binary = fixtures_dir / "usdt_inline_pie"
    with Session(path=str(binary)) as s:
        s.add("usdt:apptrace_fx:inl", stack=True, fold=True)
        s.start()
        subprocess.run([binary, "3"], check=True, stdout=subprocess.DEVNULL, timeout=30)
        folded = s.folded()
        stats = s.stats()
    assert sum(folded.values()) == 12
    assert stats.per_probe == {"usdt:apptrace_fx:inl": 12} and stats.events == 12
    leaves = {}
    for line, count in folded.items():
        parts = line.split(";")
        assert parts[0] == "usdt_inline_pie"
        # The leaf through the probe site; libc's frames stay addresses.
        assert parts[-1] == "fire_inl" and parts[1].startswith("0x"), line
        leaves[parts[-2]] = leaves.get(parts[-2], 0) + count
    assert leaves == {"site_regs": 3, "site_global": 3, "site_stack": 3, "site_const": 3}


def test_folded_sums_one_stack_seen_in_two_processes(fixtures_dir):  # type: ignore[no-untyped-def]
    """Counts are kept per process in the kernel; two processes with the
    same stack (one binary, run twice without address randomization) make
    one folded line with the sum of both counts."""
    binary = str(fixtures_dir / "stack_chain_nopie")
    with Session(path=binary, symbolize=False) as s:
        s.add("usdt:apptrace_fx:deep", stack=True, fold=True)
        s.start()
        for n in (5, 7):
            subprocess.run(["setarch", "x86_64", "-R", binary, str(n)], check=True,
                           stdout=subprocess.DEVNULL, timeout=30)
        folded = s.folded()
    assert list(folded.values()) == [12], folded


def test_library_loaded_after_the_snapshot_then_exit(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    """The process's memory map was read when tracing began; then it
    dlopen()s a library, fires the library's probe and exits before a
    stack is read. The library is placed through the probe's site (its path
    through /proc/PID/root died with the process: our own path is used when
    the process saw our root), the program's frames through the snapshot.
    Every frame of every stack used to come out unknown."""
    lib = fixtures_dir / "libfxprobes.so"
    child = spawn([fixtures_dir / "usdt_dlopen_pie", 3])  # holds before dlopen()
    with Session(pid=child.pid) as s:
        s.add(f"usdt:{lib}:apptrace_fx:lib_plain", stack=True)
        s.start()
        child.send()
        assert child.proc.wait(30) == 0
        events = list(s.events(timeout=30))
    assert len(events) == 3
    for ev in events:
        names = [f.symbol for f in ev.stack or ()]
        assert names[:3] == ["fx_lib_plain_fire", "fx_lib_run", "main"], names
        assert ev.stack[0].module == str(lib)  # type: ignore[index]


def test_snapshot_refreshed_while_polling(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    """A library loaded after tracing began, calling into libc where the
    probe is: the probe's own frame resolves through the first snapshot,
    the library's frames only through a fresh one, which polling takes."""
    from apptrace.stacks import StackTracker

    child = spawn([fixtures_dir / "usdt_dlopen_pie", 3, "wait", "hold"])
    with Session(pid=child.pid) as s:
        s.add("uprobe:libc:printf", stack=True)
        s.start()
        child.send()
        assert child.readline() == "loaded"
        time.sleep(StackTracker.REFRESH + 0.3)  # the first snapshot is stale now
        assert s.poll(0) == []  # a poll refreshes it (the process runs)
        child.send()
        assert child.proc.wait(30) == 0
        events = list(s.events(timeout=30))
    # At a function's first instruction the frame-pointer walk skips its
    # direct caller: printf called by fx_lib_plain_fire shows fx_lib_run,
    # and printf called by fx_lib_run itself (its "sema" line) shows main.
    stacks = [[f.symbol for f in ev.stack or ()] for ev in events]
    through_lib = [names for names in stacks if "fx_lib_run" in names]
    assert len(through_lib) == 3, stacks
    assert all(names[1:3] == ["fx_lib_run", "main"] for names in through_lib), through_lib


def test_stack_json_schema(fixtures_dir):  # type: ignore[no-untyped-def]
    r = subprocess.run([APPTRACE, "trace", "--json", "--stack", "usdt:apptrace_fx:deep", "--",
                        str(fixtures_dir / "stack_chain_pie"), "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(events) == 1
    frames = events[0]["frames"]
    assert set(frames[0]) >= {"addr", "symbol", "offset", "file", "line", "inlined", "module"}
    assert isinstance(frames[0]["addr"], int) and frames[0]["inlined"] is True
    assert [f["symbol"] for f in frames[:4]] == ["fire_here", "inner",
                                                  "fx::Walker::outer(int)", "main"]


JAVA_SRC = textwrap.dedent("""
    import java.util.*;
    public class ApptraceAlloc {
        static List<byte[]> keep = new ArrayList<>();
        static long churnBytes(int n) {
            long s = 0;
            for (int i = 0; i < n; i++) {
                byte[] b = new byte[256 + (i % 512)];
                s += b.length;
                if (i % 64 == 0) { keep.add(b); if (keep.size() > 4000) keep.clear(); }
            }
            return s;
        }
        public static void main(String[] a) throws Exception {
            long end = System.currentTimeMillis() + 60000;
            for (int i = 0; i < 50; i++) churnBytes(100000);  // warm up: get JIT-compiled
            System.out.println("ready");
            System.out.flush();
            while (System.currentTimeMillis() < end) churnBytes(100000);
        }
    }
""")


def _java() -> str:
    for cand in ["/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                 *sorted(glob.glob("/usr/lib/jvm/*/bin/java"))]:
        if os.path.exists(cand):
            return cand
    if os.environ.get("CI") == "true":
        pytest.fail("no JDK under /usr/lib/jvm in CI")
    pytest.skip("no JDK under /usr/lib/jvm")


@pytest.mark.jvm
def test_jvm_stacks_have_java_method_names(tmp_path):  # type: ignore[no-untyped-def]
    java = _java()
    src = tmp_path / "ApptraceAlloc.java"
    src.write_text(JAVA_SRC)
    proc = subprocess.Popen([java, "-XX:+PreserveFramePointer", "-XX:+ExtendedDTraceProbes",
                             str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        with Session(pid=proc.pid) as s:
            s.add("usdt:hotspot:object__alloc", stack=True)
            s.start()
            found: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not found:
                for ev in s.poll(0.5):
                    names = [f.symbol or "" for f in ev.stack or ()]
                    if any("ApptraceAlloc.churnBytes" in n for n in names):
                        found = names
                        break
            assert found, "no stack with the Java method name"
            # Mixed: the JVM's own C++ frames sit above the Java frame.
            assert any("::" in n for n in found[:found.index(next(
                n for n in found if "ApptraceAlloc.churnBytes" in n))])
            assert s.stats().per_probe["usdt:hotspot:object__alloc"] > 0
        # The perf map apptrace asked for is gone with the session.
        assert not os.path.exists(f"/tmp/perf-{proc.pid}.map")
    finally:
        proc.terminate()  # a JVM that exits normally removes its attach socket
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not os.path.exists(f"/tmp/.java_pid{proc.pid}")


def test_system_wide_short_lived_process_resolved_through_the_probe_binary(  # type: ignore[no-untyped-def]
        fixtures_dir):
    binary = str(fixtures_dir / "stack_chain_nopie")
    with Session(path=binary) as s:
        s.add("usdt:apptrace_fx:deep", stack=True)
        s.start()
        # Started after attach, gone before its event is read: no map snapshot.
        out = subprocess.run([binary, "1"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        events = []
        for _ in range(20):
            events += s.poll(0.2)
            if events:
                break
        # The failed process lookup is reported, not swallowed.
        assert any("process" in w for w in s.warnings), s.warnings
    assert len(events) == 1
    frames = events[0].stack or ()
    # The probe IP anchors the binary's load bias: its own frames still resolve...
    assert [f.symbol for f in frames[:4]] == ["fire_here", "inner", "fx::Walker::outer(int)",
                                              "main"]
    assert all(f.module == binary for f in frames[:4])
    # ...and what lies outside it says why it could not be named.
    rest = frames[4:]
    assert rest and all(f.symbol is None and f.reason for f in rest)
