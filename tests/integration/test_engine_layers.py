"""Each engine layer on its own, and a probe family built only from their
public interfaces (its own C, its own decoder), traced against a fixture.

The family here times calls of ``fx_neg``: an entry uprobe saves the start
time and argument per thread, the return probe sends one record with the
duration and the return value. That is the shape of the TLS and GC families
(state across probes, their own records) in a few lines.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apptrace.bpf import Program
from apptrace.codegen import GATE, TASK_HOOKS
from apptrace.engine.attach import Resolver
from apptrace.engine.plan import Group
from apptrace.engine.program import TaskHooks
from apptrace.engine.stream import EventStream, Source
from apptrace.engine.target import Target
from apptrace.errors import CommandNotFoundError, OptionError
from apptrace.probes import parse_probe
from apptrace.ringbuf import RingReader
from apptrace.usdt.notes import ElfImage

pytestmark = pytest.mark.bpf

# -- the example family ---------------------------------------------------------

CALLS_C = "#include <uapi/linux/ptrace.h>\n" + TASK_HOOKS + """
struct start { u64 ts; u64 arg; };
struct call { u64 ts; u32 pid; u32 tid; u32 probe; u32 pad; u64 arg; s64 ret; u64 ns; };
BPF_HASH(starts, u32, struct start, 4096);
BPF_RINGBUF_OUTPUT(calls_rb, 16);
int calls_entry(struct pt_regs *ctx) {
""" + GATE + """
    u32 tid = id;
    struct start s = { bpf_ktime_get_ns(), ctx->di };
    starts.update(&tid, &s);
    return 0;
}
int calls_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    struct start *s = starts.lookup(&tid);
    if (!s) return 0;
    struct call *c = calls_rb.ringbuf_reserve(sizeof(*c));
    if (c) {
        u64 now = bpf_ktime_get_ns();
        c->ts = now; c->pid = id >> 32; c->tid = tid; c->probe = 0; c->pad = 0;
        c->arg = s->arg; c->ret = (s64)(s32)ctx->ax; c->ns = now - s->ts;
        calls_rb.ringbuf_submit(c, 0);
    }
    starts.delete(&tid);
    return 0;
}
"""
CALL = struct.Struct("<QIIIIQqQ")


@dataclass(frozen=True)
class Call:
    ts_ns: int
    tid: int
    arg: int
    ret: int
    ns: int


class CallDecoder:
    """This family's records → Call objects."""

    def decode(self, records: list[tuple[Any, ...]]) -> list[Call]:
        return [Call(ts, tid, arg - (1 << 32) if arg >> 31 & 1 and arg < 1 << 32 else arg,
                     ret, ns) for ts, _pid, tid, _probe, _pad, arg, ret, ns in records]


class CallTimer:
    """A probe family: a peer of Session made of the layers."""

    def __init__(self, binary: str, symbol: str, target: Target) -> None:
        self.target = target
        target.resolve()
        img = ElfImage(target.exe or binary)
        try:
            off = img.vaddr_to_offset(img.functions()[symbol], executable=True)
        finally:
            img.close()
        assert off is not None
        child = target.spawn() if target.command is not None else None
        self.prog = Program(CALLS_C)
        pid = target.pid if target.pid is not None else -1
        TaskHooks(self.prog).attach(child)  # the launcher is not traced; exec ends the hold
        for fn, ret in (("calls_entry", False), ("calls_return", True)):
            fd = self.prog.load(fn, multi=True)
            self.prog.attach_multi(fd, target.exe or binary, [off], [0], [0], pid, ret, fn)
        ring = RingReader(self.prog.map_fd("calls_rb"), 16 * 4096, CALL)
        self.stream = EventStream([Source(ring, CallDecoder(), [f"uprobe:{symbol}"])],
                                  batch_ms=1, alive=target.alive)
        if child is not None:
            child.release()

    def calls(self, timeout: float) -> list[Call]:
        return list(self.stream.events(timeout))

    def close(self) -> None:
        self.stream.close()
        self.prog.close()
        self.target.close()


def test_example_family_times_calls(fixtures_dir: Path) -> None:
    exe = fixtures_dir / "uprobe_funcs_pie"
    timer = CallTimer(str(exe), "fx_neg", Target(command=[str(exe), "20"],
                                                 command_stdout=subprocess.PIPE))
    try:
        calls = timer.calls(timeout=20)
        child = timer.target.child
        assert child is not None and child.proc.stdout is not None
        printed = [ln.split() for ln in child.proc.stdout.read().decode().splitlines()
                   if ln.startswith("call fx_neg")]
    finally:
        timer.close()
    assert [(c.arg, c.ret) for c in calls] == [(int(p[2]), int(p[4])) for p in printed]
    assert len(calls) == 20 and all(0 < c.ns < 10**9 for c in calls)
    assert timer.stream.counts.per_probe == {"uprobe:fx_neg": 20}
    assert timer.target.exit_status == 0


# -- the layers alone -------------------------------------------------------------


def test_target_holds_a_command_until_released(fixtures_dir: Path) -> None:
    t = Target(command=[str(fixtures_dir / "usdt_loop_pie"), "1"],
               command_stdout=subprocess.PIPE)
    t.resolve()
    child = t.spawn()
    try:
        assert child.held and t.alive() and t.pid == child.pid
        exe = Path(f"/proc/{child.pid}/exe").resolve()
        assert exe.name.startswith("python")  # still the launcher
        child.release()
        assert child.wait(20) == 0 and t.exit_status == 0
    finally:
        t.close()


def test_target_closes_what_it_spawned(fixtures_dir: Path) -> None:
    t = Target(command=["sleep", "30"])
    t.resolve()
    child = t.spawn()
    child.release()
    t.close()
    assert not t.alive() and t.exit_status is not None and t.exit_status < 0


def test_target_errors() -> None:
    with pytest.raises(OptionError):
        Target(pid=1, path="/bin/true")
    t = Target(command=["no-such-command-anywhere"])
    with pytest.raises(CommandNotFoundError):
        t.resolve()


def test_resolver_alone_gives_sites_without_bpf(fixtures_dir: Path) -> None:
    exe = str(fixtures_dir / "usdt_shapes_pie")
    resolver = Resolver(Target(path=exe))
    try:
        groups = [Group(0, parse_probe("usdt:fx_shapes:*"))]
        resolver.resolve(groups)
        names = sorted(p.info.name for p in groups[0].probes)
        offsets = {p.info.name: p.sites[0].file_offset for p in groups[0].probes}
        readelf = subprocess.run(["readelf", "-n", exe], capture_output=True, text=True).stdout
    finally:
        resolver.close()
    assert names == ["fx_shapes:one", "fx_shapes:sized", "fx_shapes:strs",
                     "fx_shapes:twelve", "fx_shapes:zero"]
    assert groups[0].nargs == 12
    # PIE: file offsets equal the note's addresses for this fixture's text segment.
    for name, off in offsets.items():
        assert f"Name: {name.split(':')[1]}\n    Location: {off:#018x}" in readelf
