"""Events: immutable, the fast constructor makes the same object as the class."""

from __future__ import annotations

import json
import pickle

import pytest

from apptrace.events import Event, ProbeInfo, Unavailable, make_event


def test_make_event_equals_the_constructor() -> None:
    p = ProbeInfo("usdt", "/bin/x", "prov:name", "usdt:prov:name", 2)
    fast = make_event(10, 20, 21, "x", p, (1, "s", Unavailable("why")), 1, (0x10, 0x20))
    slow = Event(10, 20, 21, "x", p, (1, "s", Unavailable("why")), 1, None, (0x10, 0x20))
    assert fast == slow and hash(fast.probe) == hash(slow.probe)
    assert repr(fast) == repr(slow)
    with pytest.raises(AttributeError):
        fast.pid = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        fast.extra = 1  # type: ignore[attr-defined]
    changed = fast.replace(site=0, stack=())
    assert (changed.site, changed.stack, changed.args) == (0, (), fast.args)
    with pytest.raises(TypeError):
        fast.replace(nope=1)
    assert pickle.loads(pickle.dumps(fast)) == fast
    assert [f for f in Event._fields] == ["ts_ns", "pid", "tid", "comm", "probe", "args",
                                          "site", "stack", "raw_stack", "truncated"]


def test_event_json_marks_unavailable_arguments() -> None:
    p = ProbeInfo("uprobe", "/bin/x", "f", "uprobe:/bin/x:f")
    ev = make_event(1, 2, 3, "c", p, (5, Unavailable("memory read faulted"), "s"))
    doc = json.loads(json.dumps(ev.to_json()))
    assert doc == {"ts_ns": 1, "pid": 2, "tid": 3, "comm": "c", "probe": "uprobe:f",
                   "args": [5, None, "s"], "unavailable": {"1": "memory read faulted"}}
    assert "<unavailable: memory read faulted>" in ev.format()


def test_thread_names_lookup_reads_proc_and_remembers() -> None:
    """A record that says "same thread as before" for a thread whose named
    record was never decoded: the name comes from /proc, "?" once gone."""
    import os
    import threading

    from apptrace.engine.decode import ThreadNames

    names = ThreadNames()
    me = threading.get_native_id()
    with open(f"/proc/{os.getpid()}/task/{me}/comm") as f:
        want = f.read().strip()
    assert names.lookup(os.getpid(), me) == want and names.by_tid[me] == want
    assert names.lookup(os.getpid(), 1 << 30) == "?" and names.by_tid[1 << 30] == "?"
