#!/usr/bin/env python3
"""How fast apptrace.symbolize turns addresses into frames, next to addr2line.

A C file with many functions (each with an inlined helper) is generated and
compiled with -g at run time, so the numbers do not depend on what happens to
be installed. Random addresses inside those functions are drawn without
replacement into disjoint sets, so "unseen" really means unseen. Three
situations are measured separately, each next to ``addr2line -f -i -a`` (one
process, addresses on stdin) on the very same addresses:

* cold: a new Symbolizer (ELF and DWARF parsed during the call);
* warm, unseen: a Symbolizer that has already symbolized other addresses of
  the binary (files parsed), given addresses it has not seen: what a
  long-running tracer pays for each new address. Per ELF and per process
  (absolute addresses in a running copy of the binary);
* cached: the same addresses again, every one a hit in the Symbolizer's
  result cache (labelled as such: this is a dict lookup, not symbolization).

The bare blazesym call on the unseen addresses shows what the Python side
adds. Every measurement is the best of several runs (shared machines are
noisy); each warm-unseen run has its own fresh address set. A self-check
compares apptrace's frames with addr2line's (function names, innermost
first) before any number is reported.

Usage: python bench/bench_symbolize.py [--quick] [--json]
``run(quick)`` returns the results as a dict for bench/run.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from apptrace.symbolize import Symbolizer  # noqa: E402

GOAL_WARM_UNSEEN_PER_S = 1_000_000
GOAL_CACHED_VS_ADDR2LINE = 10.0
REPEATS = 8  # best-of, to ride out noise on shared machines (217k distinct addresses allow 10 sets)


def generate_source(nfuncs: int) -> str:
    """C source with `nfuncs` small functions, each calling an inlined helper."""
    parts = [
        "#include <stdio.h>",
        "static inline __attribute__((always_inline)) int mix(int a, int b) {",
        "    int t = a * 31 + b;",
        "    t ^= t >> 7;",
        "    return t + 3;",
        "}",
    ]
    for i in range(nfuncs):
        parts += [
            f"__attribute__((noinline)) int fn_{i}(int x) {{",
            f"    int acc = x + {i};",
            "    for (int k = 0; k < 3; k++) {",
            f"        acc = mix(acc, k + {i % 17});",
            "    }",
            f"    if (acc & 1) acc += {i * 7 % 101};",
            "    return acc;",
            "}",
        ]
    parts.append("typedef int (*fn_t)(int);")
    parts.append("static fn_t table[] = {" + ", ".join(f"fn_{i}" for i in range(nfuncs)) + "};")
    parts += [
        "int main(void) {",
        "    int s = 0;",
        f"    for (int i = 0; i < {nfuncs}; i++) s += table[i](i);",
        '    printf("ready %d\\n", s);',
        "    fflush(stdout);",
        "    char buf[8];",
        "    return fgets(buf, sizeof buf, stdin) == NULL;",
        "}",
    ]
    return "\n".join(parts) + "\n"


def function_ranges(binary: Path) -> list[tuple[int, int]]:
    """(start, size) of every fn_* in the binary's .symtab."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(binary, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(table, SymbolTableSection):
            raise RuntimeError(f"{binary} has no .symtab")
        return [(s["st_value"], s["st_size"]) for s in table.iter_symbols()
                if s.name.startswith("fn_") and s["st_size"] > 0]


def load_base(pid: int, binary: Path) -> int:
    """Where the binary's file offset 0 is mapped in the process (PIE load bias)."""
    real = os.path.realpath(binary)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError(f"{binary} not mapped in {pid}")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


@contextlib.contextmanager
def python_frames() -> Iterator[None]:
    """Frames built by the Python loops instead of apptrace/_frames.c."""
    from apptrace import symbolize

    b = symbolize._binding()
    saved, b.frames = b.frames, None
    try:
        yield
    finally:
        b.frames = saved


def native_only(symz: Symbolizer, path: str, addrs: list[int]) -> float:
    """Seconds for the bare blazesym call on a warm symbolizer, no Python frames built.

    Uses the binding's internals on purpose: it splits the warm time into
    what blazesym costs and what building frames costs. The addresses go in
    ascending, as the Symbolizer passes them.
    """
    from apptrace import symbolize

    b = symbolize._binding()
    src = b.ffi.new("struct blaze_symbolize_src_elf *")
    cpath = b.ffi.new("char[]", path.encode())
    src.type_size = b.src_elf_size
    src.path = cpath
    src.debug_syms = True
    arr = b.ffi.new("uint64_t[]", sorted(addrs))
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        res = b.lib.blaze_symbolize_elf_virt_offsets(symz._ptr, src, arr, len(addrs))
        best = min(best, time.perf_counter() - t0)
        if res == b.null:
            raise RuntimeError("blazesym failed in the native-only measurement")
        b.lib.blaze_syms_free(res)
    return best


def run_addr2line(binary: Path, addrs: list[int]) -> tuple[float, str]:
    """Seconds for one addr2line process to resolve all addresses, and its output."""
    feed = "".join(f"{a:#x}\n" for a in addrs)
    t0 = time.perf_counter()
    out = subprocess.run(["addr2line", "-f", "-i", "-a", "-e", str(binary)], input=feed,
                         capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, out


def addr2line_names(out: str) -> list[list[str]]:
    """Function names per address (innermost first) from ``addr2line -f -i -a``."""
    groups: list[list[str]] = []
    lines = out.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("0x"):
            groups.append([])
            i += 1
            continue
        groups[-1].append(lines[i])  # function name, then file:line
        i += 2
    return groups


def best_addr2line(binary: Path, sets: list[list[int]]) -> float:
    """Best seconds over the sets (one run each), the same addresses apptrace got."""
    return min(run_addr2line(binary, s)[0] for s in sets)


def run(quick: bool = False) -> dict[str, Any]:
    """Build the test binary, measure, and return the numbers."""
    nfuncs = 500 if quick else 2000
    naddrs = 5_000 if quick else 20_000
    rng = random.Random(1234)
    have_a2l = shutil.which("addr2line") is not None
    with tempfile.TemporaryDirectory(prefix="apptrace-bench-sym-") as tmp:
        src = Path(tmp) / "many.c"
        src.write_text(generate_source(nfuncs))
        binary = Path(tmp) / "many"
        subprocess.run(["gcc", "-g", "-O0", "-fno-omit-frame-pointer", str(src), "-o",
                        str(binary)], check=True)
        ranges = function_ranges(binary)
        pool = sorted({start + off for start, size in ranges for off in range(size)})
        rng.shuffle(pool)
        nsets = 2 + REPEATS  # warm-up, cold, one per warm-unseen run
        if len(pool) < nsets * naddrs:
            raise RuntimeError(f"only {len(pool)} distinct addresses for {nsets} sets")
        sets = [pool[i * naddrs:(i + 1) * naddrs] for i in range(nsets)]
        warmup, cold_set, unseen = sets[0], sets[1], sets[2:]
        path = str(binary)

        results: dict[str, Any] = {
            "binary_bytes": binary.stat().st_size,
            "functions": len(ranges),
            "addresses": naddrs,
            "repeats": REPEATS,
        }

        # Cold: a new symbolizer has to open and parse the ELF and DWARF.
        def cold() -> list[Any]:
            with Symbolizer() as s:
                return s.symbolize_elf(path, cold_set)

        cold_runs = [timed(cold) for _ in range(REPEATS)]
        results["cold_s"] = min(t for t, _ in cold_runs)
        cold_frames = cold_runs[0][1]

        with Symbolizer() as symz:
            symz.symbolize_elf(path, warmup)  # files parsed; these addresses are not reused
            # Side by side on the same sets: frames built by apptrace/_frames.c,
            # and by the Python loops it replaces (a second warm symbolizer).
            unseen_runs, py_runs = [], []
            with Symbolizer() as py_symz:
                py_symz.symbolize_elf(path, warmup)
                for s in unseen:
                    unseen_runs.append(timed(lambda s=s: symz.symbolize_elf(path, s)))
                    with python_frames():
                        py_runs.append(timed(lambda s=s: py_symz.symbolize_elf(path, s)))
            if py_runs[0][1] != unseen_runs[0][1]:
                raise RuntimeError("benchmark self-check failed: C and Python frames differ")
            results["warm_unseen_s"] = min(t for t, _ in unseen_runs)
            results["warm_unseen_pyframes_s"] = min(t for t, _ in py_runs)
            frames = unseen_runs[0][1]
            results["native_s"] = native_only(symz, path, unseen[0])
            # Every address of unseen[0] is now in the result cache.
            cached_runs = [timed(lambda: symz.symbolize_elf(path, unseen[0]))
                           for _ in range(REPEATS)]
            results["cached_s"] = min(t for t, _ in cached_runs)
            if cached_runs[0][1] != frames:
                raise RuntimeError("benchmark self-check failed: cached frames differ")
            again = symz.symbolize_elf(path, cold_set)  # warm now, same answer as cold
            if again != cold_frames:
                raise RuntimeError("benchmark self-check failed: cold and warm frames differ")

        with Symbolizer() as symz:
            proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None and proc.stdin is not None
                proc.stdout.readline()
                base = load_base(proc.pid, binary)
                # Offset 0 maps to vaddr 0 for gcc's PIE output, so base + vaddr.
                symz.symbolize_process(proc.pid, [base + a for a in warmup])
                # Absolute addresses made before the clock starts, as a tracer
                # has them in its stacks.
                absolute = [[base + a for a in s] for s in unseen]
                proc_runs = [timed(lambda s=s: symz.symbolize_process(proc.pid, s))
                             for s in absolute]
                results["warm_unseen_process_s"] = min(t for t, _ in proc_runs)
                proc_frames = proc_runs[0][1]
                proc.stdin.close()
            finally:
                proc.kill()
                proc.wait()

        results["frames"] = sum(len(g) for g in frames)
        results["inlined_frames"] = sum(f.inlined for g in frames for f in g)
        unresolved = sum(g[0].symbol is None for g in frames)
        if unresolved:
            raise RuntimeError(f"benchmark self-check failed: {unresolved} unresolved")
        if [[f.symbol for f in g] for g in proc_frames] != \
                [[f.symbol for f in g] for g in frames]:
            raise RuntimeError("benchmark self-check failed: process and ELF results differ")

        if have_a2l:
            _, out = run_addr2line(binary, unseen[0])
            if addr2line_names(out) != [[f.symbol for f in g] for g in frames]:
                raise RuntimeError("benchmark self-check failed: addr2line names differ")
            results["addr2line_cold_set_s"] = best_addr2line(binary, [cold_set] * REPEATS)
            results["addr2line_unseen_sets_s"] = best_addr2line(binary, unseen)
            results["addr2line_cached_set_s"] = best_addr2line(binary, [unseen[0]] * REPEATS)

    for key in ("cold", "warm_unseen", "warm_unseen_pyframes", "warm_unseen_process", "cached",
                "native"):
        results[f"{key}_per_s"] = naddrs / results[f"{key}_s"]
    if have_a2l:
        for key in ("addr2line_cold_set", "addr2line_unseen_sets", "addr2line_cached_set"):
            results[f"{key}_per_s"] = naddrs / results[f"{key}_s"]
        results["cold_vs_addr2line"] = results["addr2line_cold_set_s"] / results["cold_s"]
        a2l = results["addr2line_unseen_sets_s"]
        results["warm_unseen_vs_addr2line"] = a2l / results["warm_unseen_s"]
        results["warm_unseen_pyframes_vs_addr2line"] = a2l / results["warm_unseen_pyframes_s"]
        results["warm_unseen_process_vs_addr2line"] = a2l / results["warm_unseen_process_s"]
        results["native_vs_addr2line"] = a2l / results["native_s"]
        results["cached_vs_addr2line"] = results["addr2line_cached_set_s"] / results["cached_s"]
        results["goal_cached_vs_addr2line_met"] = \
            results["cached_vs_addr2line"] >= GOAL_CACHED_VS_ADDR2LINE
    results["goal_warm_unseen_met"] = results["warm_unseen_per_s"] >= GOAL_WARM_UNSEEN_PER_S
    results["goal_warm_unseen_process_met"] = \
        results["warm_unseen_process_per_s"] >= GOAL_WARM_UNSEEN_PER_S
    return results


ROWS = (
    ("cold (new Symbolizer)", "cold", "cold_vs_addr2line", "addr2line_cold_set"),
    ("warm, unseen addresses (ELF)", "warm_unseen", "warm_unseen_vs_addr2line",
     "addr2line_unseen_sets"),
    ("  same, frames built in Python", "warm_unseen_pyframes",
     "warm_unseen_pyframes_vs_addr2line", "addr2line_unseen_sets"),
    ("warm, unseen (process)", "warm_unseen_process", "warm_unseen_process_vs_addr2line",
     "addr2line_unseen_sets"),
    ("  blazesym C call alone", "native", "native_vs_addr2line", "addr2line_unseen_sets"),
    ("cached (result cache hits)", "cached", "cached_vs_addr2line", "addr2line_cached_set"),
)


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"symbolize: {r['addresses']} addresses per set in {r['functions']} functions "
        f"({r['binary_bytes'] // 1024} KiB binary, {r['frames']} frames, "
        f"{r['inlined_frames']} inlined), best of {r['repeats']}",
        f"{'method':<32}{'seconds':>10}{'addr/s':>14}{'addr2line':>12}{'vs addr2line':>14}",
    ]
    for label, key, ratio, a2l in ROWS:
        secs = r[f"{key}_s"]
        other = f"{r[f'{a2l}_per_s']:,.0f}" if f"{a2l}_per_s" in r else "-"
        vs = f"{r[ratio]:.1f}x" if ratio in r else "-"
        lines.append(f"{label:<32}{secs:>10.4f}{r[f'{key}_per_s']:>14,.0f}{other:>12}{vs:>14}")
    lines.append("(addr2line: one `addr2line -f -i -a` process on the same addresses)")
    for key, what in (("goal_warm_unseen_met", "ELF"),
                      ("goal_warm_unseen_process_met", "process")):
        goal = "met" if r[key] else "MISSED"
        lines.append(f"goal >= {GOAL_WARM_UNSEEN_PER_S:,} addr/s warm on unseen addresses"
                     f" ({what}): {goal}")
    if "goal_cached_vs_addr2line_met" in r:
        goal = "met" if r["goal_cached_vs_addr2line_met"] else "MISSED"
        lines.append(f"goal >= {GOAL_CACHED_VS_ADDR2LINE:.0f}x addr2line from the cache: {goal}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller binary and fewer addresses")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
