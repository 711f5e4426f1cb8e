"""Every event right: the defects users hit, each traced for real.

Zero-argument probes and every other record shape, names after exec and
prctl, floating-point uprobe arguments, labels across binaries, CPython's
function probes, procmem semaphores in a spawned command, folded totals,
(pointer, length) strings, and what the CLI does with a command's output and
exit status. Values are checked against what the fixtures print.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from apptrace import Session, Unavailable

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = ROOT / ".venv" / "bin" / "apptrace"
STRICT = os.environ.get("CI") == "true" or os.environ.get("APPTRACE_REQUIRE_BPF") == "1"
PYTHON311 = "/usr/bin/python3.11"


def run_cli(*args: Any, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(APPTRACE), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, input=input)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def need(path: str, why: str) -> None:
    if not os.path.exists(path):
        if STRICT:
            pytest.fail(f"{path} is missing in CI ({why})")
        pytest.skip(f"{path} not installed ({why})")


def shapes_printed(lines: list[str]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for ln in lines:
        word, *rest = ln.split()
        out.setdefault(word, []).append(rest)
    return out


SHAPES = ["usdt:fx_shapes:zero", "usdt:fx_shapes:one", "usdt:fx_shapes:twelve",
          "usdt:fx_shapes:strs(str,str)", "usdt:fx_shapes:sized(long,str[arg2],int,long)"]


def check_shapes(events: list[Any], printed: dict[str, list[list[str]]], n: int) -> None:
    by: dict[str, list[Any]] = {}
    for ev in events:
        by.setdefault(ev.probe.name.split(":")[1], []).append(ev)
    assert {k: len(v) for k, v in by.items()} == {
        "zero": n, "one": n, "twelve": n, "strs": n, "sized": n}
    assert all(ev.args == () for ev in by["zero"])
    assert [[str(a) for a in ev.args] for ev in by["one"]] == printed["one"]
    assert [ev.args[0] for ev in by["twelve"]] == [int(p[0]) for p in printed["twelve"]]
    assert all(list(ev.args) == [ev.args[0] + i for i in range(12)] for ev in by["twelve"])
    assert [list(ev.args) for ev in by["strs"]] == printed["strs"]
    assert [[str(ev.args[0]), ev.args[1], str(ev.args[2])] for ev in by["sized"]] \
        == printed["sized"]
    assert all(ev.truncated == () for ev in events)


@pytest.mark.parametrize("build", ["usdt_shapes_pie", "usdt_shapes_o2_nopie"])
@pytest.mark.parametrize("multi", [True, False], ids=["multi", "perf"])
def test_every_record_shape(fixtures_dir: Path, spawn: Any, build: str, multi: bool) -> None:
    """Zero, one and twelve arguments, strings only, (pointer, length) strings:
    every event arrives (the zero-argument probe once lost all of them)."""
    n = 40
    child = spawn([fixtures_dir / build, "probes", n, "wait"])
    with Session(pid=child.pid, multi=multi) as s:
        for p in SHAPES:
            s.add(p)
        s.start()
        child.send()
        lines = child.finish()
        events = list(s.events(timeout=10))
        st = s.stats()
    assert st.lost == 0 and st.decode_errors == 0 and st.read_faults == 0
    check_shapes(events, shapes_printed(lines[:-1]), n)


def test_zero_and_twelve_through_the_table_reader(fixtures_dir: Path, spawn: Any) -> None:
    child = spawn([fixtures_dir / "usdt_shapes_pie", "probes", 10, "wait"])
    with Session(pid=child.pid, arg_tables=True) as s:
        zero, twelve = s.add("usdt:fx_shapes:zero"), s.add("usdt:fx_shapes:twelve")
        s.start()
        child.send()
        lines = child.finish()
        events = list(s.events(timeout=10))
        st = s.stats()
    assert st.lost == 0 and st.decode_errors == 0
    assert sum(1 for e in events if e.probe.name == "fx_shapes:zero") == 10 == zero.count
    got = [list(e.args) for e in events if e.probe.name == "fx_shapes:twelve"]
    want = [int(ln.split()[1]) for ln in lines if ln.startswith("twelve")]
    assert got == [[t + i for i in range(12)] for t in want] and twelve.count == 10


def test_zero_argument_probe_cli(fixtures_dir: Path) -> None:
    r = run_cli("trace", "--json", "usdt:fx_shapes:zero", "--",
                fixtures_dir / "usdt_shapes_pie", "probes", 5)
    assert r.returncode == 0, r.stderr
    evs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [e["args"] for e in evs] == [[]] * 5
    assert "5 events, 0 lost" in r.stderr


def test_length_bounded_strings_truncate_on_the_event(fixtures_dir: Path) -> None:
    """HotSpot-style (pointer, length) names: exact bytes, and a cut marked per event."""
    r = run_cli("trace", "--json", "--str-max", 8,
                "usdt:fx_shapes:sized(long,str[arg2],int,long)", "--",
                fixtures_dir / "usdt_shapes_pie", "probes", 4)
    assert r.returncode == 0, r.stderr
    evs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [e["args"][1] for e in evs] == ["java/lan", "java/uti", "[B", "java/lan"]
    assert [e.get("truncated") for e in evs] == [[1], [1], None, [1]]
    assert "3 strings truncated" in r.stderr


def test_bytes_argument(fixtures_dir: Path) -> None:
    r = run_cli("trace", "--json", "usdt:fx_shapes:sized(long,bytes[5])", "--",
                fixtures_dir / "usdt_shapes_pie", "probes", 2)
    assert r.returncode == 0, r.stderr
    evs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [bytes.fromhex(e["args"][1]) for e in evs] == [b"java/", b"java/"]


@pytest.mark.parametrize("stack", [False, True], ids=["fast-reader", "general-reader"])
def test_names_after_prctl_and_exec(fixtures_dir: Path, stack: bool) -> None:
    """One thread hits the same probe as three names: the per-CPU 'same thread'
    shortcut must notice each rename. With a stack the records take the
    general decoder, which reads names on its own."""
    copy = fixtures_dir / "fx_exec2"
    with Session(command=[str(fixtures_dir / "usdt_shapes_pie"), "rename", str(copy)],
                 command_stdout=subprocess.DEVNULL) as s:
        s.add("uprobe:libc:getppid", stack=stack)
        events = list(s.events(timeout=20))
    if stack:
        assert all(e.stack and "getppid" in (e.stack[0].symbol or "") for e in events), events
    assert [e.comm for e in events] == ["usdt_shapes_pie", "fx-renamed", "fx_exec2"]
    assert len({e.pid for e in events}) == 1


def test_the_launcher_is_not_traced(fixtures_dir: Path) -> None:
    """apptrace's own launcher mallocs before exec: none of that is the command's."""
    with Session(command=["ls", "/"], command_stdout=subprocess.DEVNULL) as s:
        s.add("uprobe:libc:malloc")
        events = list(s.events(timeout=20))
    assert events and {e.comm for e in events} == {"ls"}


def test_float_uprobe_arguments_are_unavailable(fixtures_dir: Path, spawn: Any) -> None:
    child = spawn([fixtures_dir / "uprobe_funcs_pie", 3, "wait"])
    with Session(pid=child.pid) as s:
        s.add("uprobe:uprobe_funcs_pie:fx_half(double)")
        s.add("uretprobe:uprobe_funcs_pie:fx_half(double)")
        s.add("uprobe:uprobe_funcs_pie:fx_add(long,int,short,char)")
        s.start()
        child.send()
        lines = child.finish()
        events = list(s.events(timeout=10))
    halves = [e for e in events if e.probe.name == "fx_half"]
    assert len(halves) == 6
    for e in halves:
        assert isinstance(e.args[0], Unavailable) and "xmm" in e.args[0].reason
    adds = [list(e.args) for e in events if e.probe.name == "fx_add"]
    assert adds == [[int(x) for x in ln.split()[2:6]] for ln in lines
                    if ln.startswith("call fx_add")]


def test_one_symbol_in_two_binaries_keeps_two_labels(fixtures_dir: Path,
                                                     tmp_path: Path) -> None:
    # Private copies: system-wide probes on them see only this test's processes.
    a, b = tmp_path / "uprobe_funcs_pie", tmp_path / "uprobe_funcs_nopie"
    shutil.copy2(fixtures_dir / a.name, a)
    shutil.copy2(fixtures_dir / b.name, b)
    with Session() as s:
        s.add(f"uprobe:{a}:fx_neg")
        s.add(f"uprobe:{b}:fx_neg")
        s.start()
        subprocess.run([a, "2"], check=True, capture_output=True)
        subprocess.run([b, "3"], check=True, capture_output=True)
        events = list(s.events(timeout=1.0))
        st = s.stats()
    labels = {f"uprobe:{a}:fx_neg": 2, f"uprobe:{b}:fx_neg": 3}
    assert {k: st.per_probe[k] for k in labels} == labels
    assert sorted(e.probe.label for e in events) == sorted(
        lbl for lbl, n in labels.items() for _ in range(n))


def test_python_function_entry_sees_every_call() -> None:
    """CPython 3.11 reaches function__entry only on its tracing path: the probe
    raises python:line's semaphore too, and every recursive call fires."""
    need(PYTHON311, "Debian's python3.11 with USDT probes")
    script = ("import sys\nn = 0\ndef fib(k):\n    global n\n    n += 1\n"
              "    return k if k < 2 else fib(k - 1) + fib(k - 2)\n"
              "fib(12)\nprint(n)\n")
    with Session(command=[PYTHON311, "-c", script],
                 command_stdout=subprocess.PIPE) as s:
        s.add("usdt:python:function__entry(str,str,int)")
        s.add("usdt:python:function__return(str,str,int)")
        s.start()
        assert s.child is not None and s.child.stdout is not None
        events = list(s.events(timeout=30))
        printed = int(s.child.stdout.read())
    entries = [e for e in events if e.probe.name == "python:function__entry"
               and e.args[1] == "fib"]
    returns = [e for e in events if e.probe.name == "python:function__return"
               and e.args[1] == "fib"]
    assert printed == 465
    assert len(entries) == len(returns) == printed


def test_procmem_semaphores_in_a_spawned_command(fixtures_dir: Path) -> None:
    """Raised after the exec, before the command's first instruction."""
    r = run_cli("trace", "--json", "--semaphores", "procmem",
                "usdt:apptrace_fx:sema_ping(int,long)", "--", fixtures_dir / "usdt_sema_pie",
                input="\n\n\n")
    assert r.returncode == 0, r.stderr
    evs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [e["args"] for e in evs] == [[n * 7 - 3, n * -100000000007 + 42] for n in range(3)]
    assert r.stderr.count("sema sema_ping 1") == 3


def test_folded_totals_equal_event_counts(fixtures_dir: Path) -> None:
    r = run_cli("trace", "--folded", "usdt:apptrace_fx:tick", "--",
                fixtures_dir / "usdt_early_pie", 3000)
    assert r.returncode == 0, r.stderr
    folded = sum(int(ln.rsplit(" ", 1)[1]) for ln in r.stdout.splitlines())
    assert folded == 3000
    assert "3000 events, 0 lost" in r.stderr


def test_json_stdout_is_json_only(fixtures_dir: Path) -> None:
    r = run_cli("trace", "--json", "usdt:fx_shapes:one", "--",
                fixtures_dir / "usdt_shapes_pie", "probes", 3)
    assert r.returncode == 0
    assert [json.loads(ln)["args"] for ln in r.stdout.splitlines()] == [[0], [1], [2]]
    assert "one 2" in r.stderr  # the command's stdout went to stderr


@pytest.mark.parametrize("argv,status", [(["sh", "-c", "exit 3"], 3),
                                         (["sh", "-c", "kill -SEGV $$"], 128 + 11),
                                         (["true"], 0)])
def test_exit_status_is_the_commands(argv: list[str], status: int) -> None:
    r = run_cli("trace", "-q", "uprobe:libc:getpid", "--", *argv)
    assert r.returncode == status, r.stderr


def test_silent_probe_is_in_the_summary(fixtures_dir: Path) -> None:
    r = run_cli("trace", "usdt:fx_shapes:one", "uprobe:libc:getppid", "--",
                fixtures_dir / "usdt_shapes_pie", "probes", 2)
    assert r.returncode == 0, r.stderr
    assert "  usdt:fx_shapes:one: 2" in r.stderr
    assert "  uprobe:getppid: 0" in r.stderr


def test_usdt_list_several_targets_some_without_probes(fixtures_dir: Path) -> None:
    r = run_cli("usdt", "list", fixtures_dir / "usdt_shapes_pie", "/usr/bin/ls")
    assert r.returncode == 0
    assert "fx_shapes:zero" in r.stdout
    assert "/usr/bin/ls" in r.stderr and "no USDT probes" in r.stderr
    r = run_cli("usdt", "list", "/usr/bin/ls", "/usr/bin/cat")
    assert r.returncode == 1 and r.stderr.count("no USDT probes") >= 2


def test_names_on_path_are_executables() -> None:
    need(PYTHON311, "Debian's python3.11")
    from apptrace.procs import resolve_binary

    assert resolve_binary("python3.11") == shutil.which("python3.11", path="/usr/bin")
    assert "libc.so" in resolve_binary("libc")
    assert "libssl.so" in resolve_binary("libssl.so.3")
    r = run_cli("usdt", "list", "python3.11")
    assert r.returncode == 0 and r.stdout.splitlines()[1].startswith(PYTHON311)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_final_flush_drains_within_the_batch_interval(fixtures_dir: Path) -> None:
    """A flush right after a drain still reads the rings: the last events of a
    trace (`-d`, Ctrl-C, detach) were left unread when the previous drain was
    less than a batch interval ago."""
    exe = fixtures_dir / "usdt_shapes_pie"
    with Session(path=str(exe), batch_ms=900) as s:
        s.add("usdt:fx_shapes:one")
        s.start()
        assert s.poll(0) == []          # a drain: the interval starts now
        subprocess.run([exe, "probes", "25"], check=True, capture_output=True)
        s.detach()
        got = [e.args[0] for e in s.poll(0, flush=True)]
        st = s.stats()
    assert got == list(range(25)) and st.events == 25 and st.lost == 0
