"""Process symbolization of a live child, after it exits, and of JIT perf maps.

The child is compiled here. It prints its own function addresses and a
backtrace() taken inside an inlined function, then waits on stdin, so the
test decides when it exits. No root is needed for our own child.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import missing, require_symbolizer

from apptrace.errors import SymbolizerError
from apptrace.symbolize import Symbolizer

CHILD_SOURCE = r"""
#include <execinfo.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static void *frames[16];
static int nframes;

static inline __attribute__((always_inline)) void bz_capture(void) {
    nframes = backtrace(frames, 16);    /* MARK:capture */
}

__attribute__((noinline)) int bz_middle(int x) {   /* MARK:middle_def */
    bz_capture();                       /* MARK:middle_call */
    return x + 1;
}

__attribute__((noinline)) int bz_outer(int x) {
    int v = bz_middle(x);               /* MARK:outer_call */
    return v * 2;
}

int main(void) {
    int r = bz_outer(3);                /* MARK:main_call */
    /* Stand-in for JIT code: anonymous executable memory. */
    void *jit = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("middle %p\nouter %p\njit %p\n", (void *)bz_middle, (void *)bz_outer, jit);
    for (int i = 0; i < nframes; i++)
        printf("frame %p\n", frames[i]);
    printf("ready %d\n", r);
    fflush(stdout);
    char buf[16];
    if (!fgets(buf, sizeof buf, stdin))
        return 1;
    return 0;
}
"""


def marker_line(mark: str) -> int:
    pattern = re.compile(rf"MARK:{re.escape(mark)}\b")
    for number, text in enumerate(CHILD_SOURCE.splitlines(), start=1):
        if pattern.search(text):
            return number
    raise AssertionError(f"marker {mark} not in source")


@dataclass
class Child:
    proc: subprocess.Popen[str]
    exe: Path
    addrs: dict[str, int]
    frames: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self) -> None:
        """Let the child exit and reap it."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("bye\n")
            self.proc.stdin.close()
            assert self.proc.wait(timeout=10) == 0


@pytest.fixture(scope="module")
def child_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_symbolizer()
    if shutil.which("gcc") is None:
        missing("gcc is not installed")
    tmp = tmp_path_factory.mktemp("bzchild")
    src = tmp / "bzchild.c"
    src.write_text(CHILD_SOURCE)
    exe = tmp / "bzchild"
    subprocess.run(["gcc", "-g", "-O0", "-fno-omit-frame-pointer", str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    return exe


@pytest.fixture
def child(child_exe: Path) -> Iterator[Child]:
    proc = subprocess.Popen([str(child_exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    c = Child(proc, child_exe, {})
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            key, value = line.split()
            if key == "ready":
                break
            if key == "frame":
                c.frames.append(int(value, 16))
            else:
                c.addrs[key] = int(value, 16)
        else:
            pytest.fail(f"child exited early with {proc.wait()}")
        yield c
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _check_functions(symz: Symbolizer, c: Child) -> None:
    groups = symz.symbolize_process(c.pid, [c.addrs["middle"], c.addrs["outer"]])
    assert [[f.symbol for f in g] for g in groups] == [["bz_middle"], ["bz_outer"]]
    middle = groups[0][0]
    assert middle.addr == c.addrs["middle"]
    assert middle.offset == 0
    assert middle.module == str(c.exe)
    assert middle.file is not None and os.path.basename(middle.file) == "bzchild.c"
    assert middle.line == marker_line("middle_def")


def _wait_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)
    pytest.fail(f"process {pid} did not exit")


def test_live_process(child: Child) -> None:
    with Symbolizer() as symz:
        _check_functions(symz, child)


def test_return_addresses_map_to_call_lines(child: Child) -> None:
    """backtrace() entries are return addresses: looked up at addr-1 they hit the call."""
    with Symbolizer() as symz:
        groups = symz.symbolize_process(child.pid, child.frames[:3], return_addresses=True)
    # frames[0] returns into bz_capture, inlined into bz_middle.
    assert [(f.symbol, f.inlined, f.line) for f in groups[0]] == [
        ("bz_capture", True, marker_line("capture")),
        ("bz_middle", False, marker_line("middle_call")),
    ]
    assert [(f.symbol, f.line) for f in groups[1]] == [("bz_outer", marker_line("outer_call"))]
    assert [(f.symbol, f.line) for f in groups[2]] == [("main", marker_line("main_call"))]
    # The original address is reported, and the offset is measured from it.
    for addr, group in zip(child.frames, groups):
        assert all(f.addr == addr for f in group)
    middle_start = child.addrs["middle"]
    assert groups[0][-1].offset == child.frames[0] - middle_start


def test_symbolize_stack(child: Child) -> None:
    """Frame 0 is an exact IP (not adjusted), the rest are return addresses."""
    # A function's first byte minus one belongs to whatever precedes it, so
    # an adjusted frame 0 would not come back as bz_middle+0.
    stack = [child.addrs["middle"], *child.frames[1:3], 0, 0]
    with Symbolizer() as symz:
        frames = symz.symbolize_stack(child.pid, stack)
    assert [(f.symbol, f.offset, f.line) for f in frames] == [
        ("bz_middle", 0, marker_line("middle_def")),
        ("bz_outer", child.frames[1] - child.addrs["outer"], marker_line("outer_call")),
        ("main", frames[2].offset, marker_line("main_call")),
    ]
    assert [f.addr for f in frames] == stack[:3]


def test_exited_process_needs_cache(child: Child) -> None:
    child.finish()
    with Symbolizer() as symz, pytest.raises(SymbolizerError) as info:
        symz.symbolize_process(child.pid, [child.addrs["middle"]])
    assert info.value.code == -2  # not found


def test_cached_process_after_exit(child: Child) -> None:
    with Symbolizer() as symz:
        symz.cache_process(child.pid)
        assert child.proc.stdin is not None
        child.proc.stdin.write("bye\n")
        child.proc.stdin.flush()
        _wait_zombie(child.pid)  # exited, not yet reaped: its maps are empty
        _check_functions(symz, child)
        child.finish()  # reaped: /proc/PID is gone
        assert not os.path.exists(f"/proc/{child.pid}")
        _check_functions(symz, child)
        stack = symz.symbolize_stack(child.pid, child.frames[:3])
        assert [f.symbol for f in stack] == ["bz_capture", "bz_middle", "bz_outer", "main"]


def test_perf_map(child: Child) -> None:
    """Anonymous executable memory is named from /tmp/perf-PID.map, before and after exit."""
    jit = child.addrs["jit"]
    perf_map = Path(f"/tmp/perf-{child.pid}.map")
    perf_map.write_text(f"{jit:x} 40 LFoo;::bar\n{jit + 0x40:x} 80 Interpreter\n")
    try:
        with Symbolizer() as symz:
            groups = symz.symbolize_process(child.pid, [jit + 0x10, jit + 0x50, jit + 0x200])
            assert [(g[0].symbol, g[0].offset) for g in groups[:2]] == [
                ("LFoo;::bar", 0x10), ("Interpreter", 0x10)]
            assert groups[2][0].symbol is None and groups[2][0].reason
            assert groups[0][0].file is None and not groups[0][0].inlined
            [[off]] = symz.symbolize_process(child.pid, [jit + 0x10], perf_map=False)
            assert off.symbol is None

            symz.cache_process(child.pid)
            child.finish()
            [[after]] = symz.symbolize_process(child.pid, [jit + 0x10])
            assert (after.symbol, after.offset) == ("LFoo;::bar", 0x10)
    finally:
        perf_map.unlink()
