"""Filters on event tracing, decided in the kernel; and a hot probe beside a
rare one in one probe string, where the rare one must not be starved."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import apptrace.engine.program as program_layer
from apptrace import Session
from apptrace.errors import ExpressionError, OptionError

pytestmark = pytest.mark.bpf

REQ = "usdt:{exe}:apptrace_fx:req(long,str[arg2],long,long)"


def events(exe: Path, probe: str, n: int, where: Any = None, **kw: Any) -> list[Any]:
    with Session(command=[str(exe), str(n)], command_stdout=subprocess.DEVNULL, **kw) as s:
        s.add(probe.format(exe=exe), where=where)
        out = list(s.events())
        st = s.stats()
        assert st.lost == 0 and s.exit_status == 0
    return out


@pytest.mark.parametrize("where,keep", [
    ('arg0 > 16 && (prefix(arg1, "sm") || arg1 == "big") || arg3 % 7 == 0',
     lambda a: a[0] > 16 and (a[1].startswith("sm") or a[1] == "big") or a[3] % 7 == 0),
    ('comm == "agg_calls_pie" && arg1 != "page" && -arg0 < -100',
     lambda a: a[1] != "page" and -a[0] < -100),
    ("pid == 1", lambda a: False),
    ("tid > 0 && arg2 == 5", lambda a: a[2] == 5),
])
def test_filter_keeps_what_passes_unfiltered(fixtures_dir: Path, where: str,
                                             keep: Callable[[tuple[Any, ...]], bool]) -> None:
    exe = fixtures_dir / "agg_calls_pie"
    everything = events(exe, REQ, 40)
    assert len(everything) == 40
    want = [e.args for e in everything if keep(e.args)]
    got = events(exe, REQ, 40, where=where)
    assert [e.args for e in got] == want
    assert all(e.comm == "agg_calls_pie" for e in got)


def test_filter_on_a_uprobe_glob(fixtures_dir: Path) -> None:
    exe = fixtures_dir / "uprobe_funcs_pie"
    probe = "uprobe:{exe}:fx_[am]*(long)"   # fx_add(a, ...), fx_mul(a, ...)
    where = "arg0 > 0 && arg0 % 3 == 0"
    got = events(exe, probe, 30, where=where)
    everything = events(exe, probe, 30)
    assert len(everything) == 60
    want = [(e.probe.name, e.args[0]) for e in everything
            if e.args[0] > 0 and e.args[0] % 3 == 0]
    assert want and [(e.probe.name, e.args[0]) for e in got] == want


def test_filter_errors(fixtures_dir: Path) -> None:
    exe = fixtures_dir / "agg_calls_pie"
    with pytest.raises(ExpressionError) as info:
        Session(path=str(exe)).add(REQ.format(exe=exe), where="arg0 >")
    assert info.value.column == 7
    with pytest.raises(ExpressionError) as info:
        events(exe, REQ, 1, where="arg0 > 1 && arg7 == 2")
    assert info.value.column == 13 and "no arg7 here" in str(info.value)
    with pytest.raises(OptionError, match="fold"):
        Session(path=str(exe)).add(REQ.format(exe=exe), fold=True, where="arg0 > 1")


def test_cli_where(fixtures_dir: Path) -> None:
    exe = fixtures_dir / "agg_calls_pie"
    r = subprocess.run([sys.executable, "-m", "apptrace", "trace", "--json", "--where",
                        'arg0 >= 4096 && arg1 == "page"', REQ.format(exe=exe), "--", str(exe),
                        "32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = [json.loads(ln)["args"] for ln in r.stdout.splitlines()]
    assert [a[:2] for a in got] == [[4096, "page"], [4097, "page"]] * 4


# -- a hot probe beside a rare one ------------------------------------------------------


def _hot_and_rare(loop: Path, n: int,
                  stall: float = 0.0) -> tuple[dict[str, int], dict[str, int], int]:
    """Trace agg_loop's hot and rare probes (one glob, one small ring) while a
    reader drains as usual, or pauses ``stall`` seconds between reads:
    (events per probe, lost per probe, rare fired)."""
    with Session(path=str(loop), ringbuf_kb=256) as s:
        s.add(f"usdt:{loop}:apptrace_fx:*")
        s.start()
        proc = subprocess.Popen([str(loop), str(n)], stdout=subprocess.PIPE, text=True)
        got: dict[str, int] = {}
        while proc.poll() is None:
            time.sleep(stall)
            for e in s.poll(0.05):
                got[e.probe.name] = got.get(e.probe.name, 0) + 1
        s.detach()
        for e in s.poll(0, flush=True):
            got[e.probe.name] = got.get(e.probe.name, 0) + 1
        out = proc.communicate()[0]
        lost = dict(s.stats().lost_per_probe)
    fired = int(out.split("rare ")[1].split()[0])
    return got, lost, fired


def test_rare_probe_not_starved_by_a_hot_one(fixtures_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    loop = fixtures_dir / "agg_loop_pie"
    n = 1_000_000
    # Without the spare ring, the hot probe keeps the shared ring full and
    # the rare one loses most of its events: the starvation reproduced.
    monkeypatch.setattr(program_layer, "FAIR_SHARE", False)
    got, lost, fired = _hot_and_rare(loop, n)
    assert lost.get("usdt:apptrace_fx:rare", 0) > 0, (got, lost)
    assert got.get("apptrace_fx:rare", 0) + lost["usdt:apptrace_fx:rare"] == fired
    # With it, every rare event arrives; the hot probe's losses are counted.
    monkeypatch.setattr(program_layer, "FAIR_SHARE", True)
    got, lost, fired = _hot_and_rare(loop, n)
    assert fired == n // 1024 + 1
    assert got["apptrace_fx:rare"] == fired and "usdt:apptrace_fx:rare" not in lost
    assert lost["usdt:apptrace_fx:hot"] > 0
    assert got["apptrace_fx:hot"] + lost["usdt:apptrace_fx:hot"] == n
    # A reader that falls behind (a busy machine): the hot probe, which
    # overflowed its spare budget, is kept out of the spare ring, which
    # holds the rare probe's records until the reader comes back.
    got, lost, fired = _hot_and_rare(loop, n, stall=0.2)
    assert got["apptrace_fx:rare"] == fired and "usdt:apptrace_fx:rare" not in lost, (got, lost)
    assert got["apptrace_fx:hot"] + lost["usdt:apptrace_fx:hot"] == n


def test_spare_ring_batches_name_their_probes(fixtures_dir: Path) -> None:
    """poll_raw() over the hot and rare probes: the rare probe's records come
    through the spare ring while the main one is full, in batches that name
    their probes like the main ring's."""
    loop = fixtures_dir / "agg_loop_pie"
    n = 1_000_000
    got: dict[str, int] = {}
    with Session(path=str(loop), ringbuf_kb=256) as s:
        s.add(f"usdt:{loop}:apptrace_fx:*")
        s.start()
        proc = subprocess.Popen([str(loop), str(n)], stdout=subprocess.PIPE, text=True)
        while True:
            alive = proc.poll() is None
            for batch in s.poll_raw(0.05):
                for r in batch.records:
                    name = batch.probes[r[3]].name
                    got[name] = got.get(name, 0) + 1
            if not alive:
                break
        out = proc.communicate()[0]
        lost = dict(s.stats().lost_per_probe)
    fired = int(out.split("rare ")[1].split()[0])
    assert got["apptrace_fx:rare"] == fired == n // 1024 + 1
    assert "usdt:apptrace_fx:rare" not in lost
    assert lost["usdt:apptrace_fx:hot"] > 0
    assert got["apptrace_fx:hot"] + lost["usdt:apptrace_fx:hot"] == n
