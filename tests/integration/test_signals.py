"""However `apptrace trace` ends, what it raised comes down and what it spawned dies.

The matrix: SIGINT, SIGTERM, SIGHUP, and a reader that closes the pipe
(SIGPIPE/EPIPE, as ``apptrace trace ... | head -2`` does) x kernel/procmem
(and SIGQUIT, SIGUSR1, SIGALRM: any signal that would end the process)
semaphores x a running process (-p) / a spawned command (-- CMD). Each case
runs the real CLI against usdt_sema (probes behind semaphores), checks the
semaphores are raised in the target's memory while attached, ends apptrace
that way, then checks, in the target's memory again, that they are down
(-p), or that the spawned command is gone (-- CMD), and that the procmem
record of what was raised is removed. SIGKILL is the one way out nothing can
catch: the last tests show what it leaves and that `apptrace semaphores
--reset` lowers exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import pytest

from apptrace.semaphores import read_semaphore, semaphore_address
from apptrace.usdt.notes import read_probes

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = ROOT / ".venv" / "bin" / "apptrace"
PROBES = ("usdt:apptrace_fx:sema_ping", "usdt:apptrace_fx:sema_pong")
ON, OFF = {"sema_ping": 1, "sema_pong": 1}, {"sema_ping": 0, "sema_pong": 0}
ENDINGS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE"]


def _binary(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A private copy: uprobes are per inode, so parallel tests do not share sites."""
    dst = tmp_path / "usdt_sema_pie"
    shutil.copy2(fixtures_dir / "usdt_sema_pie", dst)
    return dst


def _offsets(binary: Path) -> dict[str, int]:
    return {p.name: p.sites[0].semaphore_offset for p in read_probes(binary)}


def counters(pid: int, binary: Path) -> dict[str, int]:
    return {name: read_semaphore(pid, semaphore_address(pid, str(binary), off))
            for name, off in _offsets(binary).items()}


def _line(stream: Any, timeout: float) -> Optional[str]:
    # An unbuffered pipe (bufsize=0): readline takes no more than one line, so
    # select() still sees what follows.
    r, _, _ = select.select([stream], [], [], timeout)
    if not r:
        return None
    return stream.readline().decode("utf-8", "replace")


def wait_attached(tracer: subprocess.Popen[bytes], timeout: float = 60) -> list[str]:
    """stderr lines up to apptrace's 'attached' banner."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = _line(tracer.stderr, deadline - time.monotonic())
        if line is None or line == "":
            break
        seen.append(line)
        if line.startswith("apptrace: attached"):
            return seen
    tracer.kill()
    raise AssertionError(f"apptrace did not attach: {seen} rc={tracer.poll()}")


def _state_env(tmp_path: Path) -> dict[str, str]:
    state = tmp_path / "state"
    return dict(os.environ, APPTRACE_STATE_DIR=str(state))


def records(tmp_path: Path) -> list[str]:
    state = tmp_path / "state"
    return sorted(p.name for p in state.glob("procmem-*.json")) if state.exists() else []


def end(tracer: subprocess.Popen[bytes], how: str, fire: Any) -> tuple[int, str]:
    """End apptrace by a signal, or by closing the pipe it writes events to and
    making the target fire; (exit status, rest of stderr)."""
    if how == "SIGPIPE":
        assert tracer.stdout is not None
        tracer.stdout.close()
        fire()  # an event to write into the closed pipe
    else:
        os.kill(tracer.pid, getattr(signal, how))
    try:
        tracer.wait(30)  # not communicate(): that would close a command's stdin (EOF)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait()
        raise AssertionError(f"apptrace did not end after {how}") from None
    assert tracer.stderr is not None
    return tracer.returncode, tracer.stderr.read().decode("utf-8", "replace")


def check_ended(status: int, err: str, how: str) -> None:
    assert "Traceback" not in err, err
    assert status >= 0, f"apptrace was killed by signal {-status} after {how}: {err}"
    if how in ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGALRM"):
        assert status == 128 + getattr(signal, how)
    if how == "SIGPIPE":
        assert status == 128 + signal.SIGPIPE
        assert "Broken pipe" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("mode", ["kernel", "procmem"])
@pytest.mark.parametrize("how", [*ENDINGS, "SIGQUIT", "SIGUSR1", "SIGALRM"])
def test_pid_target_semaphores_down_however_apptrace_ends(fixtures_dir: Path, tmp_path: Path,
                                                          spawn: Any, how: str,
                                                          mode: str) -> None:
    binary = _binary(fixtures_dir, tmp_path)
    child = spawn([binary])

    def fire() -> None:  # one stdin line: the fixture checks its semaphores, fires if on
        child.send("\n")
        lines = [child.readline() for _ in range(2)]
        while lines[-1] != "sema sema_pong 0" and not lines[-1].startswith("sema_pong "):
            lines.append(child.readline())

    assert counters(child.pid, binary) == OFF
    tracer = subprocess.Popen([str(APPTRACE), "trace", "--semaphores", mode, "-p",
                               str(child.pid), *PROBES], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_state_env(tmp_path), bufsize=0)
    try:
        wait_attached(tracer)
        assert counters(child.pid, binary) == ON
        assert len(records(tmp_path)) == (1 if mode == "procmem" else 0)
        fire()
        status, err = end(tracer, how, fire)
    finally:
        if tracer.poll() is None:
            tracer.kill()
    check_ended(status, err, how)
    assert counters(child.pid, binary) == OFF, f"{how}/{mode}: semaphores left raised"
    assert records(tmp_path) == []
    child.send("\n")  # and the target sees them off: no probe fires
    assert [child.readline(), child.readline()] == ["sema sema_ping 0", "sema sema_pong 0"]


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _gone(p: psutil.Process, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["kernel", "procmem"])
@pytest.mark.parametrize("how", ENDINGS)
def test_spawned_command_does_not_survive_however_apptrace_ends(fixtures_dir: Path,
                                                                tmp_path: Path, how: str,
                                                                mode: str) -> None:
    binary = _binary(fixtures_dir, tmp_path)
    tracer = subprocess.Popen([str(APPTRACE), "trace", "--semaphores", mode, *PROBES, "--",
                               str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_state_env(tmp_path), bufsize=0)
    assert tracer.stdin is not None

    def fire() -> None:
        tracer.stdin.write(b"\n")  # type: ignore[union-attr]
        tracer.stdin.flush()  # type: ignore[union-attr]

    kids: list[psutil.Process] = []
    try:
        wait_attached(tracer)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = [k for k in _children(tracer.pid) if k.exe() == str(binary)]
            if kids:
                break
            time.sleep(0.02)
        assert len(kids) == 1, _children(tracer.pid)
        assert counters(kids[0].pid, binary) == ON
        assert len(records(tmp_path)) == (1 if mode == "procmem" else 0)
        fire()
        status, err = end(tracer, how, fire)
    finally:
        if tracer.poll() is None:
            tracer.kill()
        for k in kids:
            if not _gone(k, 0):
                with contextlib.suppress(psutil.NoSuchProcess):
                    k.kill()
    check_ended(status, err, how)
    assert _gone(kids[0]), f"{how}/{mode}: the spawned command survived apptrace"
    assert records(tmp_path) == [], err


def _catches_sighup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return True  # gone: nothing to wait for
    return bool(caught >> (signal.SIGHUP - 1) & 1)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_while_starting_leaves_nothing(fixtures_dir: Path, tmp_path: Path, spawn: Any,
                                              how: str) -> None:
    """Signals at a few points of start-up (compile, attach, release): whatever was
    done by then is undone."""
    binary = _binary(fixtures_dir, tmp_path)
    child = spawn([binary])
    for delay in (0, 0.02, 0.05, 0.1, 0.2, 0.4):
        tracer = subprocess.Popen([str(APPTRACE), "trace", "--semaphores", "procmem", "-p",
                                   str(child.pid), *PROBES], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=_state_env(tmp_path), bufsize=0)
        # From the moment the CLI has its handlers (before that, Python's own
        # startup is all there is to interrupt): they catch SIGHUP.
        deadline = time.monotonic() + 30
        while not _catches_sighup(tracer.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(tracer.pid, getattr(signal, how))
        try:
            _, err = tracer.communicate(timeout=30)
        finally:
            if tracer.poll() is None:
                tracer.kill()
        text = err.decode("utf-8", "replace")
        assert "Traceback" not in text, text
        assert tracer.returncode >= 0, (delay, tracer.returncode, text)
        assert counters(child.pid, binary) == OFF, (how, delay, text)
        assert records(tmp_path) == []


def _semaphores_cli(pid: int, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(APPTRACE), "semaphores", "-p", str(pid), *extra],
                          capture_output=True, text=True, timeout=60,
                          env=_state_env(tmp_path))


def test_sigkill_leaves_procmem_semaphores_and_reset_lowers_exactly_those(
        fixtures_dir: Path, tmp_path: Path, spawn: Any) -> None:
    binary = _binary(fixtures_dir, tmp_path)
    child = spawn([binary])
    ping, pong = PROBES

    def tracer(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(APPTRACE), "trace", "-p", str(child.pid), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=_state_env(tmp_path), bufsize=0)

    # Counts a reset must leave alone: the kernel's (a kernel-mode tracer of
    # sema_pong) and a live procmem tracer's (sema_ping). Then the one we kill.
    live_kernel = tracer(pong)
    live_procmem = tracer("--semaphores", "procmem", ping)
    killed = tracer("--semaphores", "procmem", ping)
    everyone = (live_kernel, live_procmem, killed)
    try:
        for t in everyone:
            wait_attached(t)
        assert counters(child.pid, binary) == {"sema_ping": 2, "sema_pong": 1}
        assert len(records(tmp_path)) == 2
        # Nothing is "left" while its tracer lives: reset touches nothing.
        r = _semaphores_cli(child.pid, tmp_path, "--reset", "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["reset"] == [] and doc["dead_tracers"] == []
        assert counters(child.pid, binary) == {"sema_ping": 2, "sema_pong": 1}

        killed.kill()  # SIGKILL: no handler runs
        killed.wait(10)
        assert counters(child.pid, binary) == {"sema_ping": 2, "sema_pong": 1}
        assert len(records(tmp_path)) == 2

        r = _semaphores_cli(child.pid, tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr
        rows = {ln.split()[1]: ln.split()[3:] for ln in r.stdout.splitlines()[1:]}
        assert rows == {"apptrace_fx:sema_ping": ["2", "1"],
                        "apptrace_fx:sema_pong": ["1"]}, r.stdout
        assert f"tracers {killed.pid} died with semaphores raised" in r.stderr

        r = _semaphores_cli(child.pid, tmp_path, "--reset")
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("lowered") == 1 and "by 1 (now 1)" in r.stderr, r.stderr
        assert counters(child.pid, binary) == {"sema_ping": 1, "sema_pong": 1}
        assert len(records(tmp_path)) == 1  # the live procmem tracer's
        r = _semaphores_cli(child.pid, tmp_path, "--reset", "--json")  # idempotent
        assert json.loads(r.stdout)["reset"] == []
    finally:
        for p in everyone:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    assert counters(child.pid, binary) == OFF
    assert records(tmp_path) == []
    child.send("\n")
    assert [child.readline(), child.readline()] == ["sema sema_ping 0", "sema sema_pong 0"]


def test_records_of_gone_targets_are_dropped(fixtures_dir: Path, tmp_path: Path,
                                            spawn: Any) -> None:
    binary = _binary(fixtures_dir, tmp_path)
    child = spawn([binary])
    other = spawn([binary])
    tracer = subprocess.Popen([str(APPTRACE), "trace", "--semaphores", "procmem", "-p",
                               str(child.pid), *PROBES], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=_state_env(tmp_path), bufsize=0)
    wait_attached(tracer)
    tracer.kill()
    tracer.wait(10)
    assert len(records(tmp_path)) == 1
    child.kill()
    # Asking about any process sweeps records whose target is gone.
    r = _semaphores_cli(other.pid, tmp_path)
    assert r.returncode == 0, r.stderr
    assert records(tmp_path) == []


def test_semaphores_command_bad_pids(tmp_path: Path) -> None:
    for pid, want in ((2, "kernel thread"), (0, "no process"), (999999999, "no process")):
        r = _semaphores_cli(pid, tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and want in r.stderr, r.stderr
