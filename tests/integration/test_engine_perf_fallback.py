"""The attach path for kernels without uprobe_multi: one perf event per site."""

from __future__ import annotations

import pytest

from apptrace.session import Session

pytestmark = pytest.mark.bpf


def test_per_site_perf_events_decode_the_same(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    child = spawn([fixtures_dir / "usdt_inline_pie", 50, "wait"])
    with Session(pid=child.pid, multi=False) as s:
        s.add("usdt:apptrace_fx:inl")
        s.start()
        assert s.multi is False
        child.send()
        events = list(s.events(timeout=20))
    printed = [ln.split() for ln in child.finish() if ln.startswith("inl ")]
    got = [[str(a) for a in e.args] for e in events if e.probe.name == "apptrace_fx:inl"]
    assert got == [p[1:] for p in printed] and len(got) >= 200
    assert {e.site for e in events if e.probe.name == "apptrace_fx:inl"} == {0, 1, 2, 3}


def test_spawned_command_uprobe_and_uretprobe(fixtures_dir):  # type: ignore[no-untyped-def]
    binary = fixtures_dir / "usdt_early_nopie"
    with Session(command=[str(binary), "2"], multi=False) as s:
        s.add("usdt:apptrace_fx:early")
        s.add(f"uprobe:{binary}:main(int)")
        s.add(f"uretprobe:{binary}:main(int)")
        events = list(s.events(timeout=20))
    assert [(e.probe.label, e.args) for e in events] == [
        ("uprobe:main", (2,)), ("usdt:apptrace_fx:early", (2, 0x5EED)), ("uretprobe:main", (0,))]


def test_semaphore_raised_through_perf_event_ref_ctr(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    child = spawn([fixtures_dir / "usdt_sema_nopie"])
    child.send()
    before = [child.readline(), child.readline()]
    with Session(pid=child.pid, multi=False) as s:
        s.add("usdt:apptrace_fx:sema_*")
        s.start()
        child.send()
        during = [child.readline() for _ in range(4)]
        events = s.poll(2)
    child.send()
    after = [child.readline(), child.readline()]
    assert all(ln.endswith(" 0") for ln in before + after), (before, after)
    assert "sema sema_ping 1" in during and "sema sema_pong 1" in during, during
    assert {e.probe.name for e in events} == {"apptrace_fx:sema_ping", "apptrace_fx:sema_pong"}
