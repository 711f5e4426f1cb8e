#!/usr/bin/env python3
"""In-kernel aggregation: cost per hit against the bare uprobe floor and bpftrace.

All measured in this run, on ``fixtures/c/out/agg_loop_pie``: a tight loop
calling ``fx_hit(i & 15)`` (16 distinct arguments). Per-hit cost is
``ns_per_iter(traced) - ns_per_iter(untraced)``, medians over rounds that run
every variant once each (drift hits all alike).

1. **Counting** ``uprobe:fx_hit`` per argument: a bare uprobe running an
   empty BPF program (the floor: what any uprobe costs), apptrace's
   ``Aggregator(keys="arg0")`` (``apptrace trace --count arg0``), and
   bpftrace's ``@[arg0] = count()``. Goal: apptrace <= 1.1x the floor and no
   slower than bpftrace; every hit counted (zero loss by construction).
2. **Latency** of ``fx_hit`` (entry + return per call): bare uprobe + bare
   uretprobe, apptrace's ``Latency`` (``apptrace latency``), and a
   funclatency-style bpftrace script (start time per thread, log2 histogram
   of the difference).

Usage: python bench/bench_agg.py [--quick] [--json]
``run(quick)`` returns the results as a dict for bench/run.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIXTURES = REPO / "fixtures" / "c"
LOOP = FIXTURES / "out" / "agg_loop_pie"
BPFTRACE = shutil.which("bpftrace") or "/usr/bin/bpftrace"
GOAL_COUNT_VS_FLOOR = 1.1
SYMBOL = "fx_hit"


def _median(xs: list[Optional[float]]) -> Optional[float]:
    got = [x for x in xs if x is not None]
    return statistics.median(got) if got else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b is not None and b > 0 else None


def run_loop(n: int) -> float:
    """Run agg_loop N; its ns_per_iter."""
    r = subprocess.run([str(LOOP), str(n)], capture_output=True, text=True, timeout=600,
                       check=True)
    m = re.search(r"^ns_per_iter ([0-9.]+)$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"agg_loop printed no ns_per_iter: {r.stdout!r}")
    return float(m.group(1))


def build_fixtures() -> None:
    r = subprocess.run(["make", "-s", "-C", str(FIXTURES)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building fixtures failed:\n{r.stdout}\n{r.stderr}")


def _offset() -> int:
    from apptrace.usdt.notes import ElfImage

    with ElfImage(str(LOOP)) as img:
        off = img.vaddr_to_offset(img.functions()[SYMBOL], executable=True)
    assert off is not None
    return off


@contextlib.contextmanager
def bare(retprobe_too: bool) -> Iterator[None]:
    """Empty BPF programs on fx_hit's entry (and return), attached the way
    apptrace attaches on this kernel: the floor every uprobe tool pays."""
    from apptrace import capabilities
    from apptrace.bpf import Program

    multi = capabilities.has_uprobe_multi()
    prog = Program("#include <uapi/linux/ptrace.h>\n"
                   "int bench_bare(struct pt_regs *ctx) { return 0; }\n")
    try:
        fd = prog.load("bench_bare", multi=multi)
        off = _offset()
        for ret in (False, True) if retprobe_too else (False,):
            if multi:
                prog.attach_multi(fd, str(LOOP), [off], [0], [0], -1, ret, "bare")
            else:
                prog.attach_perf(fd, str(LOOP), off, -1, 0, ret, "bare")
        yield
    finally:
        prog.close()


def _apptrace_count(n: int) -> dict[str, Any]:
    from apptrace.agg import Aggregator

    with Aggregator(path=str(LOOP), keys="arg0") as agg:
        agg.add(f"uprobe:{LOOP}:{SYMBOL}(long)")
        agg.start()
        ns = run_loop(n)
        agg.detach()
        res = agg.read()
    return {"ns": ns, "counted": res.count, "keys": len(res.rows),
            "not_counted": res.not_counted}


def _apptrace_latency(n: int) -> dict[str, Any]:
    from apptrace.agg import Latency

    with Latency(f"uprobe:{LOOP}:{SYMBOL}", path=str(LOOP)) as lat:
        lat.start()
        ns = run_loop(n)
        lat.detach()
        res = lat.read()
    return {"ns": ns, "counted": res.count, "unmatched": res.unmatched_exits,
            "abandoned": res.abandoned, "in_flight": res.in_flight}


class Bpftrace:
    """One bpftrace process; its output collected on a thread."""

    def __init__(self, program: str) -> None:
        self.proc = subprocess.Popen([BPFTRACE, "-e", program], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == "bench-ready":
                self._ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        # bpftrace prints "Attaching N probes..." before attaching; BEGIN runs
        # once every probe is attached, so its line is the real "ready".
        if not self._ready.wait(timeout):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""  # type: ignore[union-attr]
            raise RuntimeError(f"bpftrace did not start: {err[-2000:]}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._t.join(30)
        return "\n".join(self.lines)


def _bpftrace_count(n: int) -> dict[str, Any]:
    bt = Bpftrace('BEGIN { printf("bench-ready\\n"); } '
                  f"uprobe:{LOOP}:{SYMBOL} {{ @[arg0] = count(); }}")
    try:
        bt.wait_ready()
        ns = run_loop(n)
    finally:
        out = bt.stop()
    counts = [int(v) for v in re.findall(r"^@\[\d+\]: (\d+)$", out, re.M)]
    return {"ns": ns, "counted": sum(counts), "keys": len(counts)}


def _bpftrace_latency(n: int) -> dict[str, Any]:
    bt = Bpftrace('BEGIN { printf("bench-ready\\n"); } '
                  f"uprobe:{LOOP}:{SYMBOL} {{ @start[tid] = nsecs; }} "
                  f"uretprobe:{LOOP}:{SYMBOL} /@start[tid]/ "
                  "{ @ns = hist(nsecs - @start[tid]); delete(@start[tid]); }")
    try:
        bt.wait_ready()
        ns = run_loop(n)
    finally:
        out = bt.stop()
    counted = sum(int(v) for v in re.findall(r"^[\[(][^|\n]*?\s(\d+) \|", out, re.M))
    return {"ns": ns, "counted": counted}


def _measure(rounds: int, variants: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = defaultdict(list)
    for _ in range(rounds):
        for name, fn in variants.items():
            rows[name].append(fn())
    return rows


def _ns(x: Any) -> Optional[float]:
    return x["ns"] if isinstance(x, dict) else x


def _section(rows: dict[str, list[Any]], floor: str) -> dict[str, Any]:
    med = {k: _median([_ns(x) for x in v]) for k, v in rows.items()}
    base = med["untraced"] or 0.0
    per_hit = {k: (v - base if v is not None else None) for k, v in med.items()
               if k != "untraced"}
    return {"ns_per_iter": {k: [_ns(x) for x in v] for k, v in rows.items()},
            "median_ns_per_iter": med, "per_hit_ns": per_hit,
            "vs_floor": {k: _ratio(v, per_hit[floor]) for k, v in per_hit.items()},
            "details": {k: [x for x in v if isinstance(x, dict)] for k, v in rows.items()
                        if any(isinstance(x, dict) for x in v)}}


def bench_count(n: int, rounds: int) -> dict[str, Any]:
    def with_bare() -> float:
        with bare(False):
            return run_loop(n)

    rows = _measure(rounds, {"untraced": lambda: run_loop(n), "floor": with_bare,
                             "apptrace": lambda: _apptrace_count(n),
                             "bpftrace": lambda: _bpftrace_count(n)})
    out = _section(rows, "floor")
    ph = out["per_hit_ns"]
    r_floor = out["vs_floor"]["apptrace"]
    r_bt = _ratio(ph["apptrace"], ph["bpftrace"])
    zero_loss = all(d["counted"] == n and d["not_counted"] == 0
                    for d in out["details"]["apptrace"])
    out.update(iterations=n, rounds=rounds, ratio_vs_bpftrace=r_bt,
               goal_vs_floor=GOAL_COUNT_VS_FLOOR, zero_loss=zero_loss,
               goal_met=bool(r_floor is not None and r_floor <= GOAL_COUNT_VS_FLOOR
                             and r_bt is not None and r_bt <= 1.0 and zero_loss))
    return out


def bench_latency(n: int, rounds: int) -> dict[str, Any]:
    def with_bare() -> float:
        with bare(True):
            return run_loop(n)

    rows = _measure(rounds, {"untraced": lambda: run_loop(n), "floor": with_bare,
                             "apptrace": lambda: _apptrace_latency(n),
                             "bpftrace": lambda: _bpftrace_latency(n)})
    out = _section(rows, "floor")
    out.update(iterations=n, rounds=rounds,
               ratio_vs_bpftrace=_ratio(out["per_hit_ns"]["apptrace"],
                                        out["per_hit_ns"]["bpftrace"]),
               all_paired=all(d["counted"] == n and d["unmatched"] == 0
                              for d in out["details"]["apptrace"]))
    return out


def run(quick: bool = False) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (BPF)"}
    if not os.path.exists(BPFTRACE):
        return {"skipped": f"bpftrace not found ({BPFTRACE}); apt-get install bpftrace"}
    build_fixtures()
    from apptrace import capabilities

    ver = subprocess.run([BPFTRACE, "--version"], capture_output=True, text=True).stdout
    n = 300_000 if quick else 2_000_000
    rounds = 1 if quick else 3
    out: dict[str, Any] = {"quick": quick, "host": {
        "cpus": os.cpu_count(), "kernel": platform.release(), "bpftrace": ver.strip(),
        "uprobe_multi": capabilities.has_uprobe_multi()}}
    for name, fn in (("count", bench_count), ("latency", bench_latency)):
        try:
            out[name] = fn(n, rounds)
        except Exception as err:  # noqa: BLE001 - the other section still runs
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


def _f(v: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"agg: skipped ({r['skipped']})"
    h = r["host"]
    lines = [f"agg: {h['cpus']} CPUs, kernel {h['kernel']}, {h['bpftrace']},"
             f" uprobe_multi={h['uprobe_multi']}{' (quick)' if r['quick'] else ''}"]
    titles = {"count": ("1. count uprobe:fx_hit per arg0 (16 keys)",
                        {"floor": "bare uprobe, empty program",
                         "apptrace": "apptrace --count arg0",
                         "bpftrace": "bpftrace @[arg0] = count()"}),
              "latency": ("2. latency of fx_hit (entry + return per call)",
                          {"floor": "bare uprobe + uretprobe, empty",
                           "apptrace": "apptrace latency",
                           "bpftrace": "bpftrace funclatency-style"})}
    for key, (title, labels) in titles.items():
        s = r.get(key, {})
        lines.append("")
        if "error" in s:
            lines.append(f"{title}: ERROR {s['error']}")
            continue
        lines.append(f"{title}, {s['iterations']:,} calls, median of {s['rounds']}")
        lines.append(f"   {'variant':<34}{'ns/iter':>9}{'per hit ns':>12}{'vs floor':>10}")
        med, ph, vs = s["median_ns_per_iter"], s["per_hit_ns"], s["vs_floor"]
        lines.append(f"   {'untraced':<34}{_f(med['untraced'], '{:.2f}'):>9}")
        for k, label in labels.items():
            lines.append(f"   {label:<34}{_f(med[k], '{:.1f}'):>9}{_f(ph[k]):>12}"
                         f"{_f(vs[k], '{:.2f}x'):>10}")
        lines.append(f"   apptrace/bpftrace {_f(s['ratio_vs_bpftrace'], '{:.2f}x')}")
        if key == "count":
            lines.append(f"   counted: apptrace {[d['counted'] for d in s['details']['apptrace']]}"
                         f", bpftrace {[d['counted'] for d in s['details']['bpftrace']]}"
                         f"; zero loss: {s['zero_loss']}")
            lines.append(f"   goal apptrace <= {s['goal_vs_floor']}x floor and <= bpftrace:"
                         f" {'met' if s['goal_met'] else 'NOT met'}")
        else:
            lines.append(f"   paired: apptrace {[d['counted'] for d in s['details']['apptrace']]}"
                         f", bpftrace {[d['counted'] for d in s['details']['bpftrace']]}"
                         f"; all paired: {s['all_paired']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t = time.monotonic()
    r = run(args.quick)
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    print(f"({time.monotonic() - t:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
