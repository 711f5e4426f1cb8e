"""USDT semaphores (is-enabled probes), kernel and procmem modes, in the real kernel.

Every check looks at the semaphore twice: through the fixture's own
``*_ENABLED()`` test (usdt_sema prints ``sema <probe> <0|1>`` per stdin line)
and by reading the 16-bit counter in the target's memory through
/proc/PID/mem.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from apptrace.errors import ApptraceError
from apptrace.events import Event
from apptrace.semaphores import read_semaphore, semaphore_address
from apptrace.session import Session
from apptrace.usdt.notes import read_probes

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
SEMA_PROBES = ("sema_ping", "sema_pong")


def _private_copy(src: Path, dst_dir: Path) -> Path:
    """A copy with its own inode: uprobes are per inode, so this keeps other
    tracers of the shared fixture (and our system-wide sessions) apart."""
    dst = dst_dir / src.name
    shutil.copy2(src, dst)
    return dst


def _sema_offsets(binary: Path) -> dict[str, int]:
    out = {}
    for p in read_probes(binary):
        [site] = p.sites
        assert site.semaphore_offset, f"{p.name} has no semaphore"
        out[p.name] = site.semaphore_offset
    return out


class SemaChild:
    """usdt_sema plus the counters of its semaphores in its memory."""

    def __init__(self, spawn: Any, binary: Path) -> None:
        self.binary = binary
        self.child = spawn([binary])
        self.pid = self.child.pid
        self.n = 0  # stdin lines sent so far (the fixture's loop counter)
        self.addrs = {name: semaphore_address(self.pid, str(binary), off)
                      for name, off in _sema_offsets(binary).items()}
        assert set(self.addrs) == set(SEMA_PROBES)

    def counters(self) -> dict[str, int]:
        return {name: read_semaphore(self.pid, a) for name, a in self.addrs.items()}

    def ask(self) -> tuple[dict[str, int], dict[str, list[str]], int]:
        """One stdin line: (is-enabled per probe, fired probe values, n)."""
        n = self.n
        self.child.send("\n")
        self.n += 1
        enabled: dict[str, int] = {}
        fired: dict[str, list[str]] = {}
        for probe in SEMA_PROBES:
            line = self.child.readline()
            word, name, flag = line.split(" ")
            assert (word, name) == ("sema", probe), line
            enabled[probe] = int(flag)
            if enabled[probe]:
                vals = self.child.readline().split(" ")
                assert vals[0] == probe, vals
                fired[probe] = vals[1:]
        return enabled, fired, n


def _expected(n: int) -> dict[str, tuple[Any, ...]]:
    return {"sema_ping": (7 * n - 3, -100000000007 * n + 42), "sema_pong": (f"pong-{n}",)}


def _collect(s: Session, want: int, timeout: float = 10.0) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        events.extend(s.poll(0.1))
    events.extend(s.poll(0.05))  # anything extra would be a bug; keep it visible
    return events


def _add_sema_probes(s: Session) -> None:
    s.add("usdt:apptrace_fx:sema_ping")
    s.add("usdt:apptrace_fx:sema_pong(str)")


OFF = {"sema_ping": 0, "sema_pong": 0}
ON = {"sema_ping": 1, "sema_pong": 1}


@pytest.mark.parametrize("build", ["pie", "nopie"])
@pytest.mark.parametrize("mode", ["kernel", "procmem"])
def test_semaphores_on_while_attached_only(fixtures_dir: Path, spawn: Any, tmp_path: Path,
                                           mode: str, build: str) -> None:
    sc = SemaChild(spawn, _private_copy(fixtures_dir / f"usdt_sema_{build}", tmp_path))
    assert sc.counters() == OFF
    enabled, fired, _ = sc.ask()
    assert enabled == OFF and fired == {}

    with Session(pid=sc.pid, semaphores=mode) as s:
        _add_sema_probes(s)
        s.start()
        assert sc.counters() == ON
        rounds = [sc.ask() for _ in range(3)]
        for enabled, fired, n in rounds:
            assert enabled == ON
            assert fired == {"sema_ping": [str(v) for v in _expected(n)["sema_ping"]],
                             "sema_pong": [f"pong-{n}"]}
        events = _collect(s, 6)
        assert sc.counters() == ON
        stats = s.stats()

    # Detached: both views say off again, and nothing fires.
    assert sc.counters() == OFF
    enabled, fired, _ = sc.ask()
    assert enabled == OFF and fired == {}

    assert stats.lost == 0
    assert all(ev.pid == sc.pid for ev in events)
    got = {p: [ev.args for ev in events if ev.probe.name == f"apptrace_fx:{p}"]
           for p in SEMA_PROBES}
    assert got == {p: [_expected(n)[p] for _, _, n in rounds] for p in SEMA_PROBES}


def test_kernel_mode_covers_process_started_after_attach(fixtures_dir: Path, spawn: Any,
                                                        tmp_path: Path) -> None:
    binary = _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path)
    with Session(path=str(binary), semaphores="kernel") as s:
        _add_sema_probes(s)
        s.start()
        sc = SemaChild(spawn, binary)   # exec'd after the probes were attached
        assert sc.counters() == ON
        rounds = [sc.ask() for _ in range(2)]
        assert all(enabled == ON for enabled, _, _ in rounds)
        events = _collect(s, 4)
        later = SemaChild(spawn, binary)  # a second late process, too
        assert later.counters() == ON
        assert later.ask()[0] == ON
        events += _collect(s, 2)
    assert sc.counters() == OFF and later.counters() == OFF
    assert sc.ask()[0] == OFF

    mine = [ev for ev in events if ev.pid == sc.pid]
    assert [ev.args for ev in mine] == [
        _expected(n)[p] for _, _, n in rounds for p in SEMA_PROBES]
    assert [ev.args for ev in events if ev.pid == later.pid] == [
        _expected(0)[p] for p in SEMA_PROBES]
    assert len(events) == 6


@pytest.mark.parametrize("build", ["pie", "nopie"])
def test_kernel_mode_library_dlopened_after_attach(fixtures_dir: Path, spawn: Any,
                                                   tmp_path: Path, build: str) -> None:
    # usdt_dlopen loads libfxprobes.so from its own directory: copy both.
    exe = _private_copy(fixtures_dir / f"usdt_dlopen_{build}", tmp_path)
    lib = _private_copy(fixtures_dir / "libfxprobes.so", tmp_path).resolve()
    [lib_sema] = [p.sites[0].semaphore_offset for p in read_probes(lib)
                  if p.name == "lib_probe"]
    assert lib_sema
    count = 5
    child = spawn([exe, count, "wait", "hold"])
    assert "libfxprobes" not in Path(f"/proc/{child.pid}/maps").read_text()
    with Session(pid=child.pid, semaphores="kernel") as s:
        s.add(f"usdt:{lib}:apptrace_fx:lib_probe")
        s.add(f"usdt:{lib}:apptrace_fx:lib_plain")
        s.start()
        with pytest.raises(ApptraceError):
            semaphore_address(child.pid, str(lib), lib_sema)  # not mapped yet
        child.send("\n")                                     # dlopen
        assert child.readline() == "loaded"
        addr = semaphore_address(child.pid, str(lib), lib_sema)
        assert read_semaphore(child.pid, addr) == 1
        child.send("\n")                                     # fx_lib_run(count)
        lines = []
        while (line := child.readline()) != "done":
            assert line, "fixture ended early"
            lines.append(line)
        events = _collect(s, 2 * count)
        stats = s.stats()
    assert [ln for ln in lines if ln.startswith("sema ")] == ["sema lib_probe 1"] * count
    assert stats.lost == 0
    assert all(ev.pid == child.pid for ev in events)
    assert all(ev.probe.binary == str(lib) for ev in events)
    probe_ev = [ev.args for ev in events if ev.probe.name == "apptrace_fx:lib_probe"]
    plain_ev = [ev.args for ev in events if ev.probe.name == "apptrace_fx:lib_plain"]
    assert probe_ev == [(3 * k - 7, -4000000000 * k - 1) for k in range(count)]
    assert probe_ev == [tuple(int(v) for v in ln.split()[1:]) for ln in lines
                        if ln.startswith("lib_probe ")]
    assert plain_ev == [(-1000 * k - 1,) for k in range(count)]


TRACER = """
import sys, time
from apptrace.session import Session
s = Session(pid=int(sys.argv[1]), semaphores="kernel")
s.add("usdt:apptrace_fx:sema_ping")
s.add("usdt:apptrace_fx:sema_pong")
s.start()
print("attached", flush=True)
time.sleep(300)
"""


def _readline(proc: subprocess.Popen[str], timeout: float) -> Optional[str]:
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if r else None


def test_sigkill_of_tracer_drops_kernel_semaphores(fixtures_dir: Path, spawn: Any,
                                                   tmp_path: Path) -> None:
    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(sc.pid)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        line = _readline(tracer, 30)
        assert line == "attached", (line, tracer.poll())
        assert sc.counters() == ON
        assert sc.ask()[0] == ON
        os.kill(tracer.pid, signal.SIGKILL)
        assert tracer.wait(10) == -signal.SIGKILL
    finally:
        if tracer.poll() is None:
            tracer.kill()
        tracer.communicate()
    deadline = time.monotonic() + 5
    while sc.counters() != OFF and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sc.counters() == OFF
    enabled, fired, _ = sc.ask()
    assert enabled == OFF and fired == {}


# -- records a dead tracer leaves, read and reset in this process ------------------------
# (the CLI's `apptrace semaphores` runs these in a subprocess; here each step
# is checked in-process against the fixture's own is-enabled answer)

_DEAD_TRACER = """
import os, sys
from apptrace.semaphores import ProcMemSemaphores
sems = ProcMemSemaphores(int(sys.argv[1]))
for off in sys.argv[3:]:
    sems.add(sys.argv[2], int(off))
print(sems.record_path, flush=True)
os.kill(os.getpid(), 9)  # a tracer killed before it could lower them
"""


def _kill_a_tracer(pid: int, binary: Path, offsets: list[int], env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-c", _DEAD_TRACER, str(pid), str(binary),
                        *map(str, offsets)], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    return r.stdout.strip()


def test_left_raised_records_listed_and_reset(fixtures_dir: Path, spawn: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from apptrace import semaphores as sm

    state = tmp_path / "state"
    monkeypatch.setenv("APPTRACE_STATE_DIR", str(state))
    env = dict(os.environ)
    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    offs = _sema_offsets(sc.binary)
    record = _kill_a_tracer(sc.pid, sc.binary, [offs["sema_ping"]], env)
    # Two dead tracers of the same semaphore add up; one of another process
    # (gone by now) is dropped when records are read.
    _kill_a_tracer(sc.pid, sc.binary, [offs["sema_ping"]], env)
    other = SemaChild(spawn, sc.binary)
    gone = _kill_a_tracer(other.pid, sc.binary, [offs["sema_pong"]], env)
    other.child.proc.kill()
    other.child.proc.wait()
    (state / "procmem-junk.json").write_text("{not json")
    assert sc.counters() == {"sema_ping": 2, "sema_pong": 0}
    assert sc.ask()[0] == {"sema_ping": 1, "sema_pong": 0}

    left = sm.find_left_raised(sc.pid)
    assert sorted(r.record for r in left) == sorted(
        str(p) for p in state.glob(f"procmem-*-{sc.pid}-*.json"))
    assert record in [r.record for r in left] and not os.path.exists(gone)
    assert all(r.tracer_pid != os.getpid() and len(r.entries) == 1 for r in left)
    assert sm.find_left_raised(other.pid) == []
    shown = {(v.probe, v.value, v.left_raised) for v in sm.list_semaphores(sc.pid)}
    assert shown == {("apptrace_fx:sema_ping", 2, 2), ("apptrace_fx:sema_pong", 0, 0)}
    assert sm.list_semaphores(sc.pid)[0].to_json()["binary"] == str(sc.binary)

    done = sm.reset_left_raised(sc.pid)
    assert sorted(d[2:] for d in done) == [(1, 0), (1, 1)]  # lowered by 1 twice, to 0
    assert {d[1] for d in done} == {sc.addrs["sema_ping"]}
    assert sc.counters() == {"sema_ping": 0, "sema_pong": 0}
    assert sc.ask()[0] == {"sema_ping": 0, "sema_pong": 0}
    assert sm.find_left_raised(sc.pid) == [] and sm.reset_left_raised(sc.pid) == []
    assert [p.name for p in state.iterdir() if not p.name.startswith("lock-")] == [
        "procmem-junk.json"]


def test_reset_refuses_a_replaced_binary(fixtures_dir: Path, spawn: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A record names the file by device and inode: a different file at that
    path (a new build) is not written through the old record."""
    from apptrace import semaphores as sm
    from apptrace.errors import SemaphoreError

    monkeypatch.setenv("APPTRACE_STATE_DIR", str(tmp_path / "state"))
    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    off = _sema_offsets(sc.binary)["sema_ping"]
    _kill_a_tracer(sc.pid, sc.binary, [off], dict(os.environ))
    new = tmp_path / "new"
    shutil.copy2(sc.binary, new)
    os.replace(new, sc.binary)  # same path, another inode; the process keeps the old one
    with pytest.raises(SemaphoreError, match="does not map|not the file"):
        sm.reset_left_raised(sc.pid)
    assert sc.counters()["sema_ping"] == 1 and len(sm.find_left_raised(sc.pid)) == 1


def test_state_dir_is_only_ever_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apptrace.semaphores import state_dir

    d = tmp_path / "st"
    monkeypatch.setenv("APPTRACE_STATE_DIR", str(d))
    assert state_dir() is None and not d.exists()  # not created unless asked
    assert state_dir(create=True) == str(d) and (d.stat().st_mode & 0o777) == 0o700
    d.chmod(0o777)
    assert state_dir() is None  # world-writable: someone could plant records
    d.chmod(0o700)
    os.chown(d, 65534, 65534)
    assert state_dir() is None  # someone else's
    f = tmp_path / "file"
    f.write_text("")
    monkeypatch.setenv("APPTRACE_STATE_DIR", str(f))
    assert state_dir() is None
    monkeypatch.delenv("APPTRACE_STATE_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # not for root
    default = state_dir(create=True)  # root's default
    assert not (tmp_path / "apptrace").exists()
    assert default in ("/run/apptrace", None)  # None: /run/apptrace is not ours
    if default is not None:
        st = os.stat(default)
        assert st.st_uid == 0 and not st.st_mode & 0o022


def test_procmem_raises_are_counted_recorded_and_lowered_exactly(
        fixtures_dir: Path, spawn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raising one semaphore twice lowers it by two, no more (another raiser's
    count stays); the record on disk says what is raised until it is lowered,
    including after a failure in the middle of lowering."""
    import json

    from apptrace import semaphores as sm
    from apptrace.errors import SemaphoreError
    from apptrace.procs import start_ticks

    monkeypatch.setenv("APPTRACE_STATE_DIR", str(tmp_path / "state"))
    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    offs = _sema_offsets(sc.binary)
    other = sm.ProcMemSemaphores(sc.pid)  # someone else's raise, which must survive ours
    other.add(str(sc.binary), offs["sema_ping"])
    mine = sm.ProcMemSemaphores(sc.pid)
    ping = mine.add(str(sc.binary), offs["sema_ping"])
    assert mine.add(str(sc.binary), offs["sema_ping"]) == ping == sc.addrs["sema_ping"]
    pong = mine.add(str(sc.binary), offs["sema_pong"])
    assert sc.counters() == {"sema_ping": 3, "sema_pong": 1}

    assert mine.record_path is not None and mine.record_path != other.record_path
    with open(mine.record_path) as f:
        doc = json.load(f)
    st = os.stat(sc.binary)
    assert doc["tracer"] == {"pid": os.getpid(), "start": start_ticks(os.getpid())}
    assert doc["target"] == {"pid": sc.pid, "start": start_ticks(sc.pid)}
    assert sorted(doc["semaphores"], key=lambda e: e["address"]) == sorted([
        {"binary": str(sc.binary), "offset": offs[name], "dev": st.st_dev, "inode": st.st_ino,
         "address": sc.addrs[name], "count": count}
        for name, count in (("sema_ping", 2), ("sema_pong", 1))], key=lambda e: e["address"])
    # A live tracer's record is not "left raised".
    assert sm.find_left_raised(sc.pid) == []
    assert {(v.probe, v.value, v.left_raised) for v in sm.list_semaphores(sc.pid)} == {
        ("apptrace_fx:sema_ping", 3, 0), ("apptrace_fx:sema_pong", 1, 0)}
    v = next(v for v in sm.list_semaphores(sc.pid) if v.probe.endswith("pong"))
    assert v.to_json() == {"binary": str(sc.binary), "probe": "apptrace_fx:sema_pong",
                           "address": pong, "value": 1, "left_raised": 0}

    # Lowering fails at the second address: what is still raised stays recorded.
    real_bump, calls = sm._bump, []

    def failing(pid: int, addr: int, delta: int) -> int:
        calls.append(addr)
        if len(calls) == 2:
            raise SemaphoreError("injected", pid=pid)
        return real_bump(pid, addr, delta)

    monkeypatch.setattr(sm, "_bump", failing)
    with pytest.raises(SemaphoreError, match="injected"):
        mine.close()
    monkeypatch.setattr(sm, "_bump", real_bump)
    first, second = calls
    with open(mine.record_path) as f:
        left = json.load(f)["semaphores"]
    assert [(e["address"], e["count"]) for e in left] == [(second, 2 if second == ping else 1)]
    mine.close()
    assert sc.counters() == {"sema_ping": 1, "sema_pong": 0}  # only the other raiser's
    assert not os.path.exists(mine.record_path)
    other.close()
    assert sc.counters() == {"sema_ping": 0, "sema_pong": 0}
    assert sc.ask()[0] == {"sema_ping": 0, "sema_pong": 0}


def test_counter_arithmetic_and_errors(fixtures_dir: Path, spawn: Any, tmp_path: Path) -> None:
    """The counter is an unsigned 16-bit value, clamped at both ends; an
    address that is not mapped is a SemaphoreError naming it, a process that
    is gone is ProcessGoneError."""
    import errno

    from apptrace import semaphores as sm
    from apptrace.errors import ProcessGoneError, SemaphoreError

    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    a = sc.addrs["sema_pong"]
    assert sm._bump(sc.pid, a, 40000) == 40000 and sm._bump(sc.pid, a, 1) == 40001
    assert sm.read_semaphore(sc.pid, a) == 40001
    assert sm._bump(sc.pid, a, 30000) == 0xFFFF and sm._bump(sc.pid, a, -0xFFFF) == 0
    assert sm._bump(sc.pid, a, -1) == 0 and sc.counters()["sema_pong"] == 0
    with pytest.raises(SemaphoreError) as info:
        sm._bump(sc.pid, 0x10, 1)
    assert info.value.pid == sc.pid and info.value.errno == errno.EIO
    assert "cannot update semaphore at 0x10 in" in str(info.value)
    assert not isinstance(info.value, ProcessGoneError)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(ProcessGoneError) as gone_info:
        sm._bump(gone.pid, a, 1)
    assert gone_info.value.pid == gone.pid


def test_only_our_record_files_are_read(fixtures_dir: Path, spawn: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are ``procmem-*.json`` regular files of ours: a copy under
    another name or behind a symlink is not one, and a broken record that
    sorts first does not hide the ones after it."""
    from apptrace import semaphores as sm

    state = tmp_path / "state"
    monkeypatch.setenv("APPTRACE_STATE_DIR", str(state))
    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    record = Path(_kill_a_tracer(sc.pid, sc.binary, [_sema_offsets(sc.binary)["sema_ping"]],
                                 dict(os.environ)))
    outside = tmp_path / "elsewhere.json"
    outside.write_text(record.read_text())
    (state / "backup.json").write_text(record.read_text())
    (state / "procmem-backup.txt").write_text(record.read_text())
    (state / "procmem-0-broken.json").write_text("[]")
    (state / "procmem-1-link.json").symlink_to(outside)
    assert [r.record for r in sm.find_left_raised(sc.pid)] == [str(record)]
    assert [d[2:] for d in sm.reset_left_raised(sc.pid)] == [(1, 0)]
    assert sc.counters()["sema_ping"] == 0


def test_state_dir_for_other_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: ``$XDG_RUNTIME_DIR/apptrace``, or nowhere; a directory that
    others may enter but not write is fine."""
    from apptrace.semaphores import state_dir

    monkeypatch.delenv("APPTRACE_STATE_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1000)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert state_dir(create=True) is None
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    assert state_dir(create=True) is None  # made, but owned by the real (root) uid
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid())
    monkeypatch.setenv("APPTRACE_STATE_DIR", str(run / "apptrace"))
    (run / "apptrace").chmod(0o701)
    assert state_dir() == str(run / "apptrace")
    (run / "apptrace").chmod(0o720)
    assert state_dir() is None


def test_read_semaphore_errors(spawn: Any, fixtures_dir: Path, tmp_path: Path) -> None:
    from apptrace import semaphores as sm
    from apptrace.errors import ProcessGoneError, SemaphoreError

    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    with pytest.raises(SemaphoreError) as info:
        sm.read_semaphore(sc.pid, 0x10)
    assert info.value.pid == sc.pid and info.value.errno == 5
    assert str(info.value).startswith(f"cannot read 0x10 in process {sc.pid}: ")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(ProcessGoneError) as gone_info:
        sm.read_semaphore(gone.pid, 0x10)
    assert gone_info.value.pid == gone.pid


def test_semaphore_address_checks_the_mapping(spawn: Any, fixtures_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a writable mapping of that very file holds a semaphore; its first
    and last byte are in, the byte after is not. In a container the device
    may differ: then inode and file name must both match."""
    import errno

    from apptrace import semaphores as sm
    from apptrace.errors import SemaphoreError
    from apptrace.procs import read_maps

    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    st = os.stat(sc.binary)
    mine = [m for m in read_maps(sc.pid) if m.inode == st.st_ino]
    rw = next(m for m in mine if "w" in m.perms)
    size = rw.end - rw.start
    assert sm.semaphore_address(sc.pid, str(sc.binary), rw.offset) == rw.start
    assert sm.semaphore_address(sc.pid, str(sc.binary), rw.offset + size - 1) == rw.end - 1
    ro = next(m for m in mine if "w" not in m.perms and m.offset == 0)
    for off in (ro.offset, rw.offset + size + 4096 * 64):
        with pytest.raises(SemaphoreError, match="no writable mapping holds file offset") as info:
            sm.semaphore_address(sc.pid, str(sc.binary), off)
        assert info.value.pid == sc.pid and f"{off:#x}; refusing" in str(info.value)
    with pytest.raises(SemaphoreError) as info:
        sm.semaphore_address(sc.pid, "/bin/true", 0)
    t = os.stat("/bin/true")
    assert str(info.value).startswith(
        f"process {sc.pid} does not map /bin/true (device {os.major(t.st_dev)}:"
        f"{os.minor(t.st_dev)}, inode {t.st_ino})")
    assert info.value.pid == sc.pid and "kernel mode covers that" in (info.value.hint or "")
    with pytest.raises(SemaphoreError, match="cannot stat") as info:
        sm.semaphore_address(sc.pid, str(tmp_path / "nope"), 0)
    assert info.value.errno == errno.ENOENT and info.value.pid == sc.pid

    # Another device number (an overlay or a bind mount): inode and name decide.
    real = sm.read_maps

    def other_dev(pid: int) -> list[Any]:
        return [m.replace(dev=(m.dev[0] + 1, m.dev[1])) if m.inode == st.st_ino else m
                for m in real(pid)]

    monkeypatch.setattr(sm, "read_maps", other_dev)
    assert sm.semaphore_address(sc.pid, str(sc.binary), rw.offset) == rw.start
    twin = tmp_path / "twin"
    os.link(sc.binary, twin)  # same inode, another name
    with pytest.raises(SemaphoreError, match="does not map"):
        sm.semaphore_address(sc.pid, str(twin), rw.offset)


_BUMPER = """
import sys
from apptrace.semaphores import _bump
for _ in range(int(sys.argv[3])):
    _bump(int(sys.argv[1]), int(sys.argv[2]), +1)
"""


def test_concurrent_tracers_do_not_lose_raises(fixtures_dir: Path, spawn: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/PID/mem has no atomic add: tracers raising at once must not both
    read 0 and write 1 (CI saw 1 where two procmem tracers had raised)."""
    monkeypatch.setenv("APPTRACE_STATE_DIR", str(tmp_path / "state"))
    sc = SemaChild(spawn, _private_copy(fixtures_dir / "usdt_sema_pie", tmp_path))
    a, n = sc.addrs["sema_pong"], 5000
    procs = [subprocess.Popen([sys.executable, "-c", _BUMPER, str(sc.pid), str(a), str(n)],
                              env=dict(os.environ)) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert sc.counters()["sema_pong"] == 3 * n


def test_procmem_semaphores_in_a_spawned_command_in_process(fixtures_dir: Path,
                                                            tmp_path: Path) -> None:
    """procmem semaphores for a command: raised in the new image right
    after its exec, before its first instruction, so its first checks see
    them (the CLI's test in test_every_event.py, through Session itself)."""
    out = tmp_path / "out.txt"
    r, w = os.pipe()
    os.write(w, b"\n\n\n")  # a line per round; then EOF ends the program
    os.close(w)
    saved = os.dup(0)
    os.dup2(r, 0)  # the command inherits our stdin
    os.close(r)
    try:
        with open(out, "wb") as f, Session(command=[str(fixtures_dir / "usdt_sema_pie")],
                                           semaphores="procmem", command_stdout=f) as s:
            s.usdt("apptrace_fx", "sema_ping", types="int,long")
            s.start()
            os.dup2(saved, 0)
            events = list(s.events(timeout=30))
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert [list(e.args) for e in events] == [[n * 7 - 3, n * -100000000007 + 42]
                                              for n in range(3)]
    assert out.read_text().count("sema sema_ping 1") == 3
