"""Bad input, as a careless user or an attacker gives it: one line, non-zero exit,
never a traceback or a hang -- through the CLI and through the API.

Also the end-to-end halves of the security items: a binary whose USDT note
tries to inject C into the BPF program traces with that argument reported
unavailable (and the injected code absent: the traced process is not
killed, the other arguments keep their values); a process named with
terminal escape sequences is printed escaped in text and exactly in JSON;
output files are private and never follow another user's links; a disk that
fills mid-trace (``-o /dev/full``) is one line, after the cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from apptrace import errors as E
from apptrace.probes import parse_probe
from apptrace.procs import resolve_binary
from apptrace.session import Session
from apptrace.usdt import list_probes, read_probes

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = ROOT / ".venv" / "bin" / "apptrace"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run(*args: Any, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(APPTRACE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, errors="backslashreplace", **kw)


def one_line(r: subprocess.CompletedProcess[str], status: int, *want: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == status, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in want:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


@pytest.fixture
def bad_elf(tmp_path: Path, fixtures_dir: Path) -> Path:
    """A real binary whose e_phoff has its top bit set."""
    data = bytearray((fixtures_dir / "usdt_loop_pie").read_bytes())
    data[32:40] = (1 << 63).to_bytes(8, "little")
    p = tmp_path / "bad_phoff"
    p.write_bytes(bytes(data))
    return p


# --- the CLI -----------------------------------------------------------------------------

def _cli_cases(fx: Path, fifo: Path, bad_elf: Path, tmp: Path) -> list[tuple[list[Any], int,
                                                                                tuple[str, ...]]]:
    tick = "usdt:apptrace_fx:tick"
    early = [fx / "usdt_early_pie", 3]
    return [
        (["usdt", "list", "/dev/null"], 1, ("/dev/null", "is a character device")),
        (["usdt", "list", "/dev/zero"], 1, ("is a character device",)),
        (["usdt", "list", fifo], 1, ("is a FIFO, not a regular file",)),
        (["usdt", "list", tmp], 1, ("is a directory",)),
        (["usdt", "list", bad_elf], 1, ("program headers", "run past the end")),
        (["usdt", "list", "-p", 2], 1, ("PID 2 (kthreadd) is a kernel thread",)),
        (["trace", "-p", 2, "uprobe:/bin/true:main"], 1, ("kernel thread",)),
        (["trace", "-p", 2, "usdt:a:b"], 1, ("kernel thread",)),
        (["trace", "-p", 0, "usdt:a:b"], 1, ("no process with PID 0",)),
        (["trace", "-p", -5, "usdt:a:b"], 1, ("no process with PID -5",)),
        (["trace", "-p", 4194305, "usdt:a:b"], 1, ("no process with PID 4194305",)),
        (["trace", "--path", fifo, "usdt:a:b"], 1, ("is a FIFO",)),
        (["trace", f"usdt:{fifo}:a:b"], 1, ("is a FIFO",)),
        (["trace", "--path", "/dev/zero", "usdt:a:b"], 1, ("is a character device",)),
        (["trace", f"uprobe:{fx / 'uprobe_funcs_pie'}:fx_add+0xZZ"], 1,
         ("fx_add+0xZZ", "SYMBOL+OFFSET")),
        (["trace", "--semaphores", "procmem", "--path", "/bin/true", "usdt:a:b"], 1,
         ("procmem",)),
        (["trace", tick, "--", "/etc/passwd"], 1, ("/etc/passwd is not executable",)),
        (["trace", tick, "--", "/tmp"], 1, ("/tmp is a directory",)),
        (["trace", tick, "--", "no-such-command-xyz"], 1,
         ("'no-such-command-xyz': command not found",)),
        (["trace", "-o", "/proc/version", tick, "--", *early], 1,
         ("/proc/version", "kernel interface file")),
        (["trace", "-o", tmp, tick, "--", *early], 1, ("is a directory",)),
        (["trace", "-o", tmp / "no" / "such" / "dir", tick, "--", *early], 1,
         ("does not exist",)),
        # option ranges: usage errors (2), with the range in the message
        (["trace", "-d", -1, tick, "--", *early], 2, ("-d/--duration", "> 0", "-1")),
        (["trace", "-d", "nan", tick, "--", *early], 2, ("finite", "nan")),
        (["trace", "-d", "inf", tick, "--", *early], 2, ("finite", "inf")),
        (["trace", "--str-max", 0, tick, "--", *early], 2, ("--str-max", "1 to 65536")),
        (["trace", "--str-max", -1, tick, "--", *early], 2, ("--str-max", "1 to 65536")),
        (["trace", "--str-max", 10**9, tick, "--", *early], 2, ("1 to 65536",)),
        (["trace", "--ring-mb", -1, tick, "--", *early], 2, ("--ring-mb", "1 to 1024")),
        (["trace", "--ring-mb", 0, tick, "--", *early], 2, ("--ring-mb", "1 to 1024")),
        (["trace", "--ring-mb", 5000, tick, "--", *early], 2, ("1 to 1024", "5000")),
        (["trace", "-n", 0, tick, "--", *early], 2, ("-n/--max-events", ">= 1")),
        (["trace", "-o", "", tick, "--", *early], 2, ("-o/--output", "file name")),
        (["trace", "-p", 1, "--path", "/bin/true", tick], 2, ("only one of",)),
        (["semaphores", "-p", 2], 1, ("kernel thread",)),
    ]


@pytest.mark.bpf
def test_cli_bad_input_table(fixtures_dir: Path, fifo: Path, bad_elf: Path,
                             tmp_path: Path) -> None:
    """Each row: one line naming the problem, the right exit status, within seconds."""
    for args, status, want in _cli_cases(fixtures_dir, fifo, bad_elf, tmp_path):
        t0 = time.monotonic()
        r = run(*args, timeout=30)
        one_line(r, status, *want)
        assert time.monotonic() - t0 < 20, args
        assert r.stdout == "", (args, r.stdout)


@pytest.mark.bpf
def test_ring_too_small_for_one_event_is_said_up_front(fixtures_dir: Path) -> None:
    types = ",".join(["str"] * 6)
    r = run("trace", "--str-max", 65536, "--ring-mb", 1,
            f"uprobe:{fixtures_dir / 'uprobe_funcs_pie'}:fx_*({types})", "-d", 1)
    line = one_line(r, 1, "event size", "1024 KiB ring buffer", "--str-max", "--ring-mb")
    assert "kernel headers" not in line


@pytest.mark.bpf
def test_largest_ring_and_strings_trace(fixtures_dir: Path, tmp_path: Path) -> None:
    """The top of each range works (the old failure blamed the kernel headers)."""
    r = run("trace", "--json", "-q", "--str-max", 65536, "--ring-mb", 1024,
            "usdt:apptrace_fx:strs(str,str)", "--", fixtures_dir / "usdt_args_pie", 2)
    assert r.returncode == 0, r.stderr
    evs = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    printed = [ln.split(" ")[1:] for ln in r.stderr.splitlines() if ln.startswith("strs ")]
    assert [e["args"] for e in evs] == printed and len(printed) == 2


def test_non_utf8_binary_path(fixtures_dir: Path, tmp_path: Path) -> None:
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/early\xff\xfe")
    shutil.copy2(fixtures_dir / "usdt_early_pie", odd)
    r = run("usdt", "list", odd)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "\\udcff\\udcfe" in r.stdout and "apptrace_fx:tick" in r.stdout


@pytest.mark.bpf
def test_non_utf8_command_path_traces(fixtures_dir: Path, tmp_path: Path) -> None:
    odd = os.fsencode(tmp_path) + b"/early\xff"
    shutil.copy2(fixtures_dir / "usdt_early_pie", odd)
    r = subprocess.run([os.fsencode(APPTRACE), b"trace", b"--json", b"-q",
                        b"usdt:apptrace_fx:tick", b"--", odd, b"3"], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    evs = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith(b"{")]
    assert [e["args"] for e in evs] == [[0], [1], [2]]


# --- the API ------------------------------------------------------------------------------

def _started(spec: str = "usdt:apptrace_fx:tick", **kw: Any) -> Callable[[], None]:
    def go() -> None:
        s = Session(**kw)
        s.add(spec)
        s.start()
        s.close()
    return go


def _closed_start() -> None:
    s = Session(path="/bin/true")
    s.close()
    s.start()


@pytest.mark.bpf
def test_api_bad_input_table(fixtures_dir: Path, fifo: Path, bad_elf: Path) -> None:
    cases: list[tuple[Callable[[], Any], type, type, str]] = [
        (lambda: Session(pid=1, path="/bin/true"), E.OptionError, ValueError, "at most one"),
        (lambda: Session(pid=2), E.KernelThreadError, ValueError, "kernel thread"),
        (lambda: list_probes(pid=2), E.KernelThreadError, ValueError, "kernel thread"),
        (lambda: Session(pid=0), E.ProcessNotFoundError, ProcessLookupError, "PID 0"),
        (lambda: Session(path=str(fifo)), E.ElfError, ValueError, "is a FIFO"),
        (lambda: Session(path="/no/such/binary"), E.BinaryNotFoundError, FileNotFoundError,
         "no such file"),
        (lambda: read_probes("/no/such/file"), E.ElfNotFoundError, FileNotFoundError,
         "no such file"),
        (lambda: read_probes(fifo), E.ElfError, ValueError, "is a FIFO"),
        (lambda: read_probes("/dev/zero"), E.ElfError, ValueError, "character device"),
        (lambda: read_probes(bad_elf), E.ElfError, ValueError, "program headers"),
        (lambda: resolve_binary("libno-such-library-xyz"), E.BinaryNotFoundError,
         FileNotFoundError, "cannot find"),
        (lambda: parse_probe("uprobe:/bin/true:main+0xZZ"), E.ProbeSpecError, ValueError,
         "SYMBOL+OFFSET"),
        (_started(command=["no-such-command-xyz"]), E.CommandNotFoundError,
         FileNotFoundError, "command not found"),
        (_started(command=["/etc/passwd"]), E.SpawnError, OSError, "not executable"),
        (_started("usdt:apptrace_fx:tick(str)", command=[str(fixtures_dir / "usdt_early_pie")],
                  str_max=65536, ringbuf_kb=64), E.OptionError, ValueError, "event size"),
        (_closed_start, E.SessionStateError, RuntimeError, "closed"),
        (lambda: Session(str_max=0), E.OptionError, ValueError, "str_max"),
    ]
    for fn, cls, builtin, text in cases:
        with pytest.raises(E.ApptraceError) as info:
            fn()
        err = info.value
        assert type(err) is cls or isinstance(err, cls), (cls, repr(err))
        assert isinstance(err, builtin), (builtin, repr(err))
        assert text in str(err) and "\n" not in str(err), str(err)


# --- a note that tries to write the BPF C -------------------------------------------------

CONSTS = b"-1@$-5 1@$-56 -2@$-300 2@$-536 4@$-294967296 -8@$-1 8@$-81985529216486896 -8@-8(%rbp)"
HOSTILE = b"-1@$-5 8@*/e->a[0]=7;bpf_send_signal(9);/* -2@$-300"


@pytest.mark.bpf
def test_hostile_note_traces_with_the_argument_unavailable(fixtures_dir: Path,
                                                          tmp_path: Path) -> None:
    """Before the fix this note's text was pasted into a C comment: the `*/` ended
    it, and the code after set arg0 to 7 and SIGKILLed the traced process."""
    data = (fixtures_dir / "usdt_args_pie").read_bytes()
    assert data.count(CONSTS + b"\0") == 1
    patched = tmp_path / "usdt_args_hostile"
    patched.write_bytes(data.replace(CONSTS + b"\0", HOSTILE.ljust(len(CONSTS)) + b"\0"))
    patched.chmod(0o755)
    [probe] = [p for p in read_probes(patched) if p.name == "consts"]
    assert [a.available for a in probe.sites[0].args] == [True, False, True]

    r = run("trace", "--json", "usdt:apptrace_fx:consts", "--", patched, 3)
    assert r.returncode == 0, r.stderr  # the command was not killed
    evs = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(evs) == 3
    for ev in evs:
        assert ev["args"] == [-5, None, -300]
        assert "bpf_send_signal(9)" in ev["unavailable"]["1"]  # reported exactly, in JSON
    assert "command exited with status 0" in r.stderr

    r = run("trace", "-q", "usdt:apptrace_fx:consts", "--", patched, 1)
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stdout.splitlines() if "usdt:apptrace_fx:consts" in ln]
    assert line.split(" ", 3)[3].startswith("-5 <unavailable: cannot parse operand")
    assert line.endswith("-300")


# --- a process that names itself with escape sequences -----------------------------------

HOSTILE_COMM = "\x1b]0;OWNED\x07\x1b[2J"


@pytest.mark.bpf
def test_process_name_with_escape_sequences(fixtures_dir: Path, tmp_path: Path) -> None:
    exe = tmp_path / HOSTILE_COMM
    shutil.copy2(fixtures_dir / "usdt_early_pie", exe)
    r = run("trace", "-n", 2, "usdt:apptrace_fx:tick", "--", exe, 5)
    assert r.returncode == 0, r.stderr
    for text in (r.stdout, r.stderr):
        assert "\x1b" not in text and "\x07" not in text, repr(text)
    events = [ln for ln in r.stdout.splitlines() if "usdt:apptrace_fx:tick" in ln]
    assert len(events) == 2
    assert all("\\x1b]0;OWNED\\x07\\x1b[2J[" in ln for ln in events), events
    r = run("trace", "--json", "-n", 2, "usdt:apptrace_fx:tick", "--", exe, 5)
    evs = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [e["comm"] for e in evs] == [HOSTILE_COMM] * 2  # JSON stays exact


# --- output files --------------------------------------------------------------------------

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="apptrace-shared-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.bpf
def test_output_file_private_and_planted_links_refused(fixtures_dir: Path, shared_dir: Path,
                                                       tmp_path: Path) -> None:
    early = [fixtures_dir / "usdt_early_pie", 3]
    out = shared_dir / "new.txt"
    r = run("trace", "-q", "-o", out, "usdt:apptrace_fx:tick", "--", *early)
    assert r.returncode == 0, r.stderr
    assert (os.stat(out).st_mode & 0o777) == 0o600 and len(out.read_text().splitlines()) == 3

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    subprocess.run([*NOBODY, "ln", "-s", str(victim), str(shared_dir / "planted")],
                   check=True)
    subprocess.run([*NOBODY, "sh", "-c", f"echo theirs > {shared_dir}/theirs"], check=True)
    for name, want in (("planted", "symbolic link owned by uid 65534"),
                       ("theirs", "belongs to uid 65534")):
        r = run("trace", "-o", shared_dir / name, "usdt:apptrace_fx:tick", "--", *early)
        one_line(r, 1, want)
    assert victim.read_text() == "precious\n"
    assert (shared_dir / "theirs").read_text() == "theirs\n"


@pytest.mark.bpf
def test_full_disk_mid_trace_is_one_line_after_cleanup(fixtures_dir: Path,
                                                       tmp_path: Path) -> None:
    loop = tmp_path / "usdt_loop_pie"  # a private copy, to find it afterwards
    shutil.copy2(fixtures_dir / "usdt_loop_pie", loop)
    r = run("trace", "-q", "-o", "/dev/full", "usdt:apptrace_fx:loop", "--", loop, 0,
            timeout=60)
    line = one_line(r, 1, "cannot write /dev/full: No space left on device")
    assert line.startswith("apptrace: error: ")
    time.sleep(0.2)
    left = [p for p in psutil.process_iter(["exe"]) if p.info["exe"] == str(loop)]
    assert left == [], "the spawned command survived"


# --- two tracers on one semaphore probe ----------------------------------------------------

@pytest.mark.bpf
@pytest.mark.parametrize("first, second", [("kernel", "procmem"), ("procmem", "kernel")])
def test_semaphore_modes_conflict_clearly_in_both_orders(fixtures_dir: Path, tmp_path: Path,
                                                         spawn: Any, first: str,
                                                         second: str) -> None:
    from apptrace.semaphores import read_semaphore, semaphore_address

    binary = tmp_path / "usdt_sema_pie"
    shutil.copy2(fixtures_dir / "usdt_sema_pie", binary)
    child = spawn([binary])
    [ping] = [p for p in read_probes(binary) if p.name == "sema_ping"]
    addr = semaphore_address(child.pid, str(binary), ping.sites[0].semaphore_offset)
    with Session(pid=child.pid, semaphores=first) as a:
        a.add("usdt:apptrace_fx:sema_ping")
        a.start()
        assert read_semaphore(child.pid, addr) == 1
        b = Session(pid=child.pid, semaphores=second)
        b.add("usdt:apptrace_fx:sema_ping")
        with pytest.raises(E.SemaphoreConflictError) as info:
            b.start()
        err = info.value
        assert isinstance(err, OSError) and err.errno == 22
        assert "ref_ctr_offset" in str(err)
        assert f"--semaphores {first}" in str(err)  # the fix: the other tracer's mode
        assert read_semaphore(child.pid, addr) == 1  # the failed tracer left nothing
    assert read_semaphore(child.pid, addr) == 0


# --- doctor without privilege --------------------------------------------------------------

NOCAPS = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]


def _unprivileged() -> list[str]:
    """nobody, if nobody can run the checkout's interpreter; else root without
    capabilities (a checkout under a private home)."""
    probe = subprocess.run([*NOBODY, str(ROOT / ".venv" / "bin" / "python"), "-c",
                            "import apptrace"], capture_output=True, cwd="/", timeout=60)
    return NOBODY if probe.returncode == 0 else NOCAPS


@pytest.mark.bpf
def test_doctor_without_privilege_says_what_it_could_not_check() -> None:
    who = _unprivileged()
    r = subprocess.run([*who, str(ROOT / ".venv" / "bin" / "python"), "-m", "apptrace",
                        "doctor", "--json"], capture_output=True, text=True, cwd="/",
                       timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1  # the privileges check fails, and names the fix
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert not checks["privileges"]["ok"] and "CAP_BPF" in checks["privileges"]["fix"]
    for name in ("BPF ring buffer", "uprobe_multi link"):
        c = checks[name]
        assert c["checked"] is False and c["detail"].startswith("not checked"), c
        assert "kernel >=" not in c["detail"] + c["fix"], c
    assert checks["bcc"]["checked"] is False and "importable" in checks["bcc"]["detail"]
    tracefs = checks["tracefs"]
    if who is NOBODY:  # tracefs itself is root-only: it is mounted, just not readable
        assert tracefs["checked"] is False and "mounted at" in tracefs["detail"], tracefs
    assert "not mounted" not in tracefs["detail"]
    failed = [n for n, c in checks.items() if c["required"] and not c["ok"] and c["checked"]]
    assert set(failed) <= {"privileges", "bpf program load"}, failed
    text = subprocess.run([*who, str(ROOT / ".venv" / "bin" / "python"), "-m", "apptrace",
                           "doctor"], capture_output=True, text=True, cwd="/", timeout=120)
    skipped = [ln for ln in text.stdout.splitlines() if ln.startswith("skip")]
    assert len(skipped) >= 3 and all("not checked" in ln for ln in skipped), text.stdout
