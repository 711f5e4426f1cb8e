"""A session's life: spawned commands end with it, sessions are single-use."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from helpers import fails_after

from apptrace.errors import ApptraceError, SessionStateError
from apptrace.session import Session

pytestmark = pytest.mark.bpf


def test_spawned_command_is_terminated_with_the_session(fixtures_dir):  # type: ignore[no-untyped-def]
    s = Session(command=[str(fixtures_dir / "usdt_loop_pie"), "0"])  # loops forever
    s.add("usdt:apptrace_fx:loop")
    events = list(s.events(timeout=0.5))
    child = s.child
    assert child is not None and child.poll() is None and len(events) > 50
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 5
    assert child.returncode == -signal.SIGTERM == s.exit_status


def test_sessions_are_single_use(fixtures_dir):  # type: ignore[no-untyped-def]
    with Session(command=[str(fixtures_dir / "usdt_early_pie"), "1"]) as s:
        s.add("usdt:apptrace_fx:early")
        assert len(list(s.events(timeout=10))) == 1
        with pytest.raises(ApptraceError, match="before the session starts"):
            s.add("usdt:apptrace_fx:tick")
    with pytest.raises(ApptraceError, match="single-use"):
        s.start()
    assert s.stats().per_probe == {"usdt:apptrace_fx:early": 1}  # still readable


def test_typed_add_methods_and_callback_reading(fixtures_dir):  # type: ignore[no-untyped-def]
    binary = str(fixtures_dir / "uprobe_funcs_nopie")
    seen = []
    with Session(command=[binary, "4"]) as s:
        neg = s.uprobe(binary, "fx_neg", types="int")
        ret = s.uretprobe(binary, "fx_neg", type="int")
        greet = s.uprobe(binary, "fx_gre*", types="str")
        stats = s.run(seen.append, duration=20)
    assert [p.name for p in neg.probes] == ["fx_neg"] and greet.probes[0].name == "fx_greet"
    args = [(e.probe.label, e.args[0]) for e in seen if e.probe.name == "fx_neg"]
    # Each call's argument, then its return value: x, then -x.
    assert len(args) == 8
    for (k1, x), (k2, r) in zip(args[::2], args[1::2]):
        assert (k1, k2) == ("uprobe:fx_neg", "uretprobe:fx_neg") and r == -x
    assert all(e.args[0].startswith("user") for e in seen if e.probe.name == "fx_greet")
    assert neg.count == ret.count == 4 and greet.count == 4
    assert stats.events == len(seen) == 12


@pytest.mark.parametrize("stack", [False, True])
def test_usdt_method_with_types(fixtures_dir, spawn, stack):  # type: ignore[no-untyped-def]
    """Strings, and strings followed by a stack in the same record (the
    stack's words start after the string buffer)."""
    child = spawn([fixtures_dir / "usdt_args_pie", 2, "wait"])
    with Session(pid=child.pid) as s:
        h = s.usdt("apptrace_fx", "strs", types="str,str", stack=stack)
        s.start()
        child.send()
        events = list(s.events(timeout=10))
    printed = [ln.split()[1:] for ln in child.finish() if ln.startswith("strs ")]
    assert [list(e.args) for e in events] == printed and h.count == 2
    assert all(e.comm == "usdt_args_pie" and e.truncated == () for e in events)
    if stack:
        for e in events:  # the probe's function, then its caller
            assert [f.symbol for f in e.stack or ()][:2] == ["fire_strs", "main"], e.stack


def test_run_stops_after_count_events(fixtures_dir):  # type: ignore[no-untyped-def]
    """run(count=N) hands over exactly N events and returns (the fixture makes 50 calls)."""
    binary = str(fixtures_dir / "uprobe_funcs_nopie")
    seen = []
    with Session(command=[binary, "50"]) as s:
        s.uprobe(binary, "fx_neg", types="int")
        stats = s.run(seen.append, count=3, duration=20)
        assert len(seen) == 3 and stats.events >= 3
        assert all(e.probe.name == "fx_neg" for e in seen)


def test_timeouts_hold_when_nothing_fires(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    """A target that fires nothing: poll_raw(), run() and wait_child() come
    back when their timeout is up instead of waiting for an event, and a
    session without a command has no child to wait for."""
    quiet = spawn([fixtures_dir / "usdt_loop_pie", 5, "wait"])  # blocked before its loop
    with fails_after(10), Session(pid=quiet.pid) as s:
        s.add("usdt:apptrace_fx:loop")
        s.start()
        t0 = time.monotonic()
        assert s.poll_raw(0.3) == []
        stats = s.run(lambda ev: None, duration=0.3)
        took = time.monotonic() - t0
        assert stats.events == 0 and 0.5 <= took < 10
        assert s.child is None and s.wait_child(0.1) is None
    with fails_after(10), Session(command=[str(fixtures_dir / "usdt_loop_pie"), "0"]) as s:
        s.add("usdt:apptrace_fx:loop")  # the command loops forever
        s.start()
        t0 = time.monotonic()
        assert s.wait_child(0.3) is None  # still running: no status yet
        assert 0.25 <= time.monotonic() - t0 < 10
        assert s.child is not None and s.child.poll() is None


def test_session_options_reach_the_stream(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    """batch_ms sets how often the rings are read (a poll right after
    another waits out the interval); events() waits ``idle`` at a time, so
    a gone target is noticed within it; a closed session says so."""
    loop = str(fixtures_dir / "usdt_loop_pie")
    with fails_after(20), Session(command=[loop, "0"], batch_ms=400,  # fires every 1 ms
                                  command_stdout=subprocess.DEVNULL) as s:
        s.add("usdt:apptrace_fx:loop")
        s.start()
        assert 0 < s.attach_seconds < 30
        s.poll(2)
        t0 = time.monotonic()
        got = s.poll(2)
        assert got and 0.3 <= time.monotonic() - t0 < 1.5
    with pytest.raises(ApptraceError, match="this session is closed"):
        s.poll(0)
    with fails_after(20), Session(command=[str(fixtures_dir / "usdt_early_pie"), "1"]) as s:
        s.add("usdt:apptrace_fx:early")
        s.start()
        assert s.wait_child(10) == 0
        t0 = time.monotonic()
        assert len(list(s.events(idle=1.5))) == 1
        assert 1.2 <= time.monotonic() - t0 < 5  # one idle wait after the last event
    with fails_after(20), Session(command=[str(fixtures_dir / "usdt_early_pie"), "1"]) as s:
        s.add("usdt:apptrace_fx:early")
        s.start()
        assert s.wait_child(10) == 0
        t0 = time.monotonic()
        assert len(list(s.events())) == 1
        assert time.monotonic() - t0 < 0.8  # the default idle wait is 0.2 s


def test_a_fold_only_probe_does_not_hide_the_next(fixtures_dir):  # type: ignore[no-untyped-def]
    """A folded probe string has no ring; the probe strings after it still
    deliver their events."""
    with Session(command=[str(fixtures_dir / "stack_chain_nopie"), "3"]) as s:
        s.add("usdt:apptrace_fx:deep", stack=True, fold=True)
        s.add(f"uprobe:{fixtures_dir / 'stack_chain_nopie'}:inner")
        events = list(s.events(timeout=20))
        folded = s.folded()
    assert [e.probe.name for e in events] == ["inner"] * 3
    assert sum(folded.values()) == 3


def test_without_symbolization_stacks_stay_addresses(fixtures_dir):  # type: ignore[no-untyped-def]
    with Session(command=[str(fixtures_dir / "stack_chain_nopie"), "2"], symbolize=False) as s:
        s.add("usdt:apptrace_fx:deep", stack=True)
        events = list(s.events(timeout=20))
    assert len(events) == 2
    assert all(e.stack is None and e.raw_stack and len(e.raw_stack) >= 3 for e in events)


def test_detach_stops_the_counts(fixtures_dir):  # type: ignore[no-untyped-def]
    """After detach() nothing fires: the target runs on, the counts and the
    rings stay as they were."""
    with fails_after(20), Session(command=[str(fixtures_dir / "usdt_loop_pie"), "0"],
                                  command_stdout=subprocess.DEVNULL) as s:
        s.add("usdt:apptrace_fx:loop")
        s.start()
        assert s.poll(2)
        s.detach()
        s.poll(0, flush=True)
        before = s.stats().events
        time.sleep(0.3)  # the loop fires every 1 ms
        assert s.poll(0, flush=True) == [] and s.stats().events == before > 0
        assert s.child is not None and s.child.poll() is None



def test_start_without_probes_says_so(fixtures_dir):  # type: ignore[no-untyped-def]
    s = Session(command=[str(fixtures_dir / "usdt_early_pie"), "1"])
    with pytest.raises(SessionStateError, match="^no probes added$"):
        s.start()
    with pytest.raises(SessionStateError, match="^no probes added$"):
        list(s.events(timeout=1))
    s.close()
    with pytest.raises(SessionStateError, match="^this session is closed; it is single-use$"):
        s.start()


def test_event_fields_on_the_general_decode_path(fixtures_dir, tmp_path):  # type: ignore[no-untyped-def]
    """Records with stacks or strings take the general decoder: the comm of
    a program whose name is not UTF-8 is decoded with replacement, each
    event names its probe site, and an event without a stack or a cut
    string says so (None, no indexes)."""
    link = os.path.join(os.fsencode(tmp_path), b"\xffinl")
    os.symlink(fixtures_dir / "usdt_inline_pie", link)
    with fails_after(30), Session(command=[os.fsdecode(link), "2"],
                                  command_stdout=subprocess.DEVNULL) as s:
        s.add("usdt:apptrace_fx:inl", stack=True)
        events = list(s.events(timeout=20))
    assert len(events) == 8
    assert {e.comm for e in events} == {"\ufffdinl"}
    assert sorted(e.site for e in events) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(e.raw_stack and e.truncated == () and len(e.args) == 2 for e in events)
    binary = str(fixtures_dir / "uprobe_funcs_nopie")
    with fails_after(30), Session(command=[binary, "2"], command_stdout=subprocess.DEVNULL) as s:
        s.uprobe(binary, "fx_greet", types="str")
        events = list(s.events(timeout=20))
    assert [e.args[0] for e in events] == ["user-3", "user4"]  # as the fixture prints
    assert all(e.raw_stack is None and e.stack is None and e.truncated == () for e in events)
