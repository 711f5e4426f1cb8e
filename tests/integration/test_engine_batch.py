"""The throughput interface: poll_raw() batches, counted like events."""

from __future__ import annotations

import pytest

from apptrace.events import RawBatch
from apptrace.session import Session

pytestmark = pytest.mark.bpf


def test_poll_raw_batches_carry_every_record(fixtures_dir, spawn):  # type: ignore[no-untyped-def]
    child = spawn([fixtures_dir / "usdt_bench_pie", 200_000, "wait"])
    with Session(pid=child.pid) as s:
        h = s.add("usdt:apptrace_fx:bench")
        s.start()
        child.send()
        records = []
        while True:
            alive = s.target_alive()  # checked first: the last poll drains the rest
            for batch in s.poll_raw(0.2):
                assert isinstance(batch, RawBatch)
                assert [p.name for p in batch.probes] == ["apptrace_fx:bench"]
                assert batch.nargs == 3
                records.extend(batch.records)
            if not alive:
                break
        st = s.stats()
        assert h.count == st.per_probe["usdt:apptrace_fx:bench"] == len(records)
    assert st.lost == 0 and len(records) == 200_000
    # (ts, pid, tid, probe, site, flags, nstack, comm, i, j, k): i counts up.
    assert [r[8] for r in records[:5]] == [0, 1, 2, 3, 4]
    assert all(r[1] == child.pid and r[3] == 0 and r[5] & 0xFFFF == 0 for r in records[:1000])
    # The kernel copies the thread name only when it changes on a CPU.
    assert records[0][7].rstrip(b"\0") == b"usdt_bench_pie"
    same = [r for r in records if r[5] & (1 << 31)]
    assert len(same) > len(records) // 2 and all(r[7][:1] == b"\0" for r in same)
    assert all(a[0] <= b[0] for a, b in zip(records, records[1:]))  # in time order


def test_truncated_strings_are_counted(fixtures_dir):  # type: ignore[no-untyped-def]
    binary = str(fixtures_dir / "uprobe_funcs_pie")
    with Session(command=[binary, "3"], str_max=8) as s:
        s.add(f"uretprobe:{binary}:fx_greet(str)")
        events = list(s.events(timeout=20))
        st = s.stats()
    # "hello-<name>" does not fit in 8 bytes: 7 characters and the NUL arrive.
    assert [len(e.args[0]) for e in events] == [7, 7, 7]
    assert all(e.args[0] == "hello-u" and e.truncated == (0,) for e in events)
    assert st.truncated_strings == 3 and st.lost == 0


def test_events_carry_the_thread_name_even_when_the_kernel_skipped_it(  # type: ignore[no-untyped-def]
        fixtures_dir, spawn):
    child = spawn([fixtures_dir / "usdt_bench_nopie", 20_000, "wait"])
    with Session(pid=child.pid) as s:
        s.add("usdt:apptrace_fx:bench")
        s.start()
        child.send()
        events = list(s.events(timeout=20))
    assert len(events) == 20_000
    assert {e.comm for e in events} == {"usdt_bench_nopi"}  # comm is 15 characters
