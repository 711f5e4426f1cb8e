"""Engine robustness in the real kernel: repeated attach/detach, targets that exit,
clear errors for bad input, and a clear refusal without root."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from apptrace.errors import (
    ApptraceError,
    AttachError,
    ElfError,
    ProbeNotFoundError,
    ProbeSpecError,
    ProcessNotFoundError,
)
from apptrace.semaphores import read_semaphore, semaphore_address
from apptrace.session import Session
from apptrace.usdt.notes import read_probes

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv" / "bin" / "python"


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _uprobe_events_file() -> Path:
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        p = Path(base) / "uprobe_events"
        if p.exists():
            return p
    pytest.fail("no tracefs uprobe_events file")


def _our_uprobe_events() -> list[str]:
    """tracefs uprobe entries made by this process (apptrace names them apptrace_PID_...)."""
    mine = f"apptrace_{os.getpid()}_"
    return [ln for ln in _uprobe_events_file().read_text().splitlines() if mine in ln]


def _remove_our_uprobe_events() -> None:
    """Clean up after a known leak, so a failing run leaves the machine as it was."""
    path = str(_uprobe_events_file())
    for ln in _our_uprobe_events():
        name = ln.split()[0].split(":", 1)[1]   # p:uprobes/NAME PATH:OFF
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # no seek: tracefs refuses that
        try:
            os.write(fd, f"-:{name}\n".encode())
        finally:
            os.close(fd)


def _private_copy(src: Path, dst_dir: Path) -> Path:
    """A copy with its own inode, so uprobes other tracers hold on the shared
    fixture (a plain uprobe conflicts with a semaphore one) cannot interfere."""
    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    return dst


def _sema_state(child: Any) -> dict[str, int]:
    """One stdin line to usdt_sema: its is-enabled result per probe (fired lines skipped)."""
    child.send("\n")
    out = {}
    for probe in ("sema_ping", "sema_pong"):
        word, name, flag = child.readline().split(" ")
        assert (word, name) == ("sema", probe)
        out[probe] = int(flag)
        if out[probe]:
            assert child.readline().startswith(probe + " ")
    return out


def _sema_session_cycle(pid: int, addr: int, multi: bool) -> Session:
    """Create, start (checking the semaphore is raised) and close one session."""
    s = Session(pid=pid, semaphores="kernel", multi=multi)
    try:
        s.add("usdt:apptrace_fx:sema_ping")
        s.start()
        assert read_semaphore(pid, addr) == 1
    finally:
        s.close()
    return s


def _sema_fixture(fixtures_dir: Path, spawn: Any, tmp: Path) -> tuple[Any, int]:
    binary = _private_copy(fixtures_dir / "usdt_sema_pie", tmp)
    [ping] = [p for p in read_probes(binary) if p.name == "sema_ping"]
    child = spawn([binary])
    return child, semaphore_address(child.pid, str(binary), ping.sites[0].semaphore_offset)


@pytest.mark.slow
def test_200_attach_detach_cycles_leak_nothing(fixtures_dir: Path, spawn: Any,
                                              tmp_path: Path) -> None:
    child, addr = _sema_fixture(fixtures_dir, spawn, tmp_path)
    _sema_session_cycle(child.pid, addr, True)   # warm up: the first session loads bcc
    _sema_session_cycle(child.pid, addr, False)
    gc.collect()
    fds = _fd_count()
    assert _our_uprobe_events() == []

    for n in range(200):
        # uprobe_multi links and perf-event uprobes alike
        _sema_session_cycle(child.pid, addr, multi=n % 2 == 0)
        if n % 50 == 49:
            # Closed sessions keep their ELF mmaps until collected (see
            # test_closed_session_holds_no_fds), so count after a collection.
            gc.collect()
            assert _fd_count() == fds, f"fds grew after {n + 1} cycles"
            assert _our_uprobe_events() == []

    assert read_semaphore(child.pid, addr) == 0
    assert _sema_state(child) == {"sema_ping": 0, "sema_pong": 0}

    # And the 201st session still works end to end.
    with Session(pid=child.pid, semaphores="kernel") as s:
        s.add("usdt:apptrace_fx:sema_ping")
        s.start()
        assert _sema_state(child)["sema_ping"] == 1
        deadline = time.monotonic() + 5
        got: list[Any] = []
        while not got and time.monotonic() < deadline:
            got = s.poll(0.1)
        assert [ev.probe.name for ev in got] == ["apptrace_fx:sema_ping"]
    assert read_semaphore(child.pid, addr) == 0
    del s
    gc.collect()
    assert _fd_count() == fds
    assert _our_uprobe_events() == []


def test_closed_session_holds_no_fds(fixtures_dir: Path, spawn: Any,
                                     tmp_path: Path) -> None:
    child, addr = _sema_fixture(fixtures_dir, spawn, tmp_path)
    _sema_session_cycle(child.pid, addr, True)
    gc.collect()
    fds = _fd_count()
    gc.disable()
    try:
        closed = [_sema_session_cycle(child.pid, addr, multi=True) for _ in range(3)]
        held = _fd_count() - fds
    finally:
        gc.enable()
    assert all(s.exit_status is None for s in closed)  # still usable objects
    assert held == 0, f"3 closed sessions still hold {held} fds"


def test_target_killed_mid_trace_ends_events_cleanly(fixtures_dir: Path, spawn: Any) -> None:
    child = spawn([fixtures_dir / "usdt_loop_pie", 0, "wait"])
    seen = []
    killed_at = None
    with Session(pid=child.pid) as s:
        s.add("usdt:apptrace_fx:loop")
        s.start()
        child.send("\n")
        t0 = time.monotonic()
        for ev in s.events(timeout=30):
            seen.append(ev)
            if len(seen) == 50:
                child.proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
        ended = time.monotonic()
        assert s.stats().lost == 0
    assert killed_at is not None, f"only {len(seen)} events in {ended - t0:.1f}s"
    assert ended - killed_at < 5, "events() kept waiting after the target died"
    child.proc.wait(5)
    printed = [ln.split(" ") for ln in child.proc.stdout.read().splitlines()  # type: ignore
               if ln.startswith("loop ")]
    got = [ev.args for ev in seen]
    # Every iteration printed before the kill was delivered, in order, none twice.
    assert got == [(i, child.pid) for i in range(len(got))]
    assert len(printed) <= len(got) <= len(printed) + 1
    assert [(int(i), int(p)) for _, i, p in printed] == got[:len(printed)]


def test_target_exiting_normally_ends_events(fixtures_dir: Path, spawn: Any) -> None:
    child = spawn([fixtures_dir / "usdt_loop_nopie", 200, "wait"])
    with Session(pid=child.pid) as s:
        s.add("usdt:apptrace_fx:loop")
        s.start()
        child.send("\n")
        t0 = time.monotonic()
        got = [ev.args for ev in s.events(timeout=30)]
        assert time.monotonic() - t0 < 15
    assert got == [(i, child.pid) for i in range(200)]
    assert child.finish()[-1] == "done"


def test_failed_perf_attach_leaves_no_tracefs_entry(fixtures_dir: Path) -> None:
    """A perf-event uprobe for a PID that is gone (the target died while we compiled)."""
    from apptrace.bpf import Program, attach_uprobe_perf

    binary = fixtures_dir / "usdt_loop_pie"
    [loop] = [p for p in read_probes(binary) if p.name == "loop"]
    gone = subprocess.Popen(["/bin/true"])
    gone.wait()
    prog = Program("#include <uapi/linux/ptrace.h>\n"
                   "int apptrace_t(struct pt_regs *ctx) { return 0; }\n")
    before = _our_uprobe_events()
    try:
        fd = prog.load("apptrace_t")
        with pytest.raises(AttachError) as ei:
            attach_uprobe_perf(fd, str(binary), loop.sites[0].file_offset, gone.pid, 0,
                               False, "usdt:apptrace_fx:loop")
        assert "exited" in str(ei.value)
        assert _our_uprobe_events() == before
    finally:
        prog.close()
        _remove_our_uprobe_events()


def test_missing_pid() -> None:
    with pytest.raises(ProcessNotFoundError) as ei:
        Session(pid=2**22 + 777)
    assert ei.value.pid == 2**22 + 777
    assert str(2**22 + 777) in str(ei.value)


def test_missing_probe_and_symbol(fixtures_dir: Path, spawn: Any) -> None:
    binary = fixtures_dir / "usdt_sema_pie"
    child = spawn([binary])
    s = Session(pid=child.pid)
    s.add("usdt:apptrace_fx:no_such_probe")
    with pytest.raises(ProbeNotFoundError) as ei:
        s.start()
    assert "no_such_probe" in str(ei.value)
    assert ei.value.hint and "apptrace usdt list" in ei.value.hint
    with pytest.raises(ApptraceError):
        s.start()  # a failed session is closed, not half-started

    s = Session(path=str(binary))
    s.add(f"uprobe:{binary}:no_such_function")
    with pytest.raises(ProbeNotFoundError) as ei:
        s.start()
    assert "no_such_function" in str(ei.value) and ei.value.hint

    s = Session(pid=child.pid)
    s.add("usdt:/no/such/binary:apptrace_fx:sema_ping")
    with pytest.raises(ProbeNotFoundError):
        s.start()
    # Nothing was left attached: the fixture's semaphores are still off.
    assert _sema_state(child) == {"sema_ping": 0, "sema_pong": 0}


@pytest.mark.parametrize("spec", ["bogus", "kprobe:do_sys_open", "usdt:onlyname",
                                  "usdt:apptrace_fx:loop(nosuchtype)",
                                  "uretprobe:/bin/true:main(int,int)"])
def test_bad_probe_spec(spec: str) -> None:
    s = Session()
    with pytest.raises(ProbeSpecError) as ei:
        s.add(spec)
    assert ei.value.reason and spec.strip() in str(ei.value)


def test_non_elf_path(tmp_path: Path) -> None:
    with pytest.raises(ElfError):
        Session(path="/etc/passwd")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    with pytest.raises(ElfError) as ei:
        Session(path=str(script))
    assert "not an ELF" in str(ei.value)


def test_command_never_runs_when_attach_fails(fixtures_dir: Path, tmp_path: Path) -> None:
    # An offset far past the end of the file: the kernel refuses the uprobe.
    bad = f"uprobe:{fixtures_dir / 'usdt_early_pie'}:0x7ffffff0"
    ran = []
    for k in range(3):
        marker = tmp_path / f"ran{k}"
        s = Session(command=["/bin/sh", "-c", f"echo ran > {marker}"])
        s.add(bad)
        with pytest.raises(ApptraceError):
            s.start()
        time.sleep(0.2)
        ran.append(marker.exists())
    assert ran == [False, False, False]


_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# Root with every capability dropped: for a checkout nobody may not enter
# (a clone under a 0700 directory); the kernel refuses it the same way.
_NO_CAPS = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]


def _unprivileged() -> list[str]:
    r = subprocess.run([*_NOBODY, str(VENV_PY), "-c", "import apptrace"], capture_output=True,
                       cwd="/tmp", env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return _NOBODY if r.returncode == 0 else _NO_CAPS


def _as_nobody(args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_unprivileged(), str(VENV_PY), "-m", "apptrace", *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/tmp",
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def _check_refusal(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("apptrace: error:")
    assert "root" in lines[0] or "permission" in lines[0].lower()


def test_no_root_pid_target(fixtures_dir: Path, spawn: Any) -> None:
    child = spawn([fixtures_dir / "usdt_loop_pie", 0, "wait"])
    r = _as_nobody(["trace", "-p", str(child.pid), "usdt:apptrace_fx:loop"])
    _check_refusal(r)
    assert r.stdout == ""


def test_no_root_path_target(fixtures_dir: Path) -> None:
    r = _as_nobody(["trace", "--path", str(fixtures_dir / "usdt_loop_pie"),
                    "usdt:apptrace_fx:loop"])
    _check_refusal(r)


def test_no_root_command_target(fixtures_dir: Path) -> None:
    r = _as_nobody(["trace", "usdt:apptrace_fx:tick", "--",
                    str(fixtures_dir / "usdt_early_pie"), "3"])
    assert "early" not in r.stdout and "tick" not in r.stdout, "the command ran"
    _check_refusal(r)

