"""Hardening that needs no BPF: private output files, terminal escaping, option
ranges, and one exception hierarchy for everything the API raises.

The output-file cases use a sticky world-writable directory (like /tmp) with
files and links made by another user (``nobody``, through setpriv), as an
attacker would prepare them for root.
"""

from __future__ import annotations

import ast
import errno
import math
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from apptrace import errors as E
from apptrace.events import Event, ProbeInfo, Unavailable
from apptrace.options import check_event_fits, check_int, check_seconds
from apptrace.output import (
    EscapingWriter,
    escape_text,
    open_output,
    open_private,
    read_regular,
    replace_private,
)

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# --- output files ---------------------------------------------------------------------

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A /tmp-like directory: sticky and writable by everyone (in /tmp, which
    another user can reach; pytest's own tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="apptrace-shared-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(*argv: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("making files as another user needs root")  # CI runs as root
    subprocess.run([*NOBODY, *argv], check=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_is_0600_whatever_the_umask(shared_dir: Path) -> None:
    old = os.umask(0)
    try:
        fd = open_private(str(shared_dir / "out.txt"))
        os.close(fd)
    finally:
        os.umask(old)
    assert _mode(shared_dir / "out.txt") == 0o600


def test_existing_own_file_is_truncated_and_made_private(shared_dir: Path) -> None:
    p = shared_dir / "out.txt"
    p.write_text("old contents\n")
    p.chmod(0o644)
    out = open_output(str(p))
    out.write("new\n")
    out.close()
    assert p.read_text() == "new\n" and _mode(p) == 0o600


def test_symlink_planted_by_another_user_is_refused(shared_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    as_nobody("ln", "-s", str(victim), str(shared_dir / "out.txt"))
    with pytest.raises(E.OutputError) as info:
        open_private(str(shared_dir / "out.txt"))
    assert "symbolic link owned by uid 65534" in str(info.value)
    assert victim.read_text() == "precious\n"
    # A dangling one (the classic: make root create a file where it should not) too.
    as_nobody("ln", "-s", str(tmp_path / "created-by-root"), str(shared_dir / "dangling"))
    with pytest.raises(E.OutputError):
        open_private(str(shared_dir / "dangling"))
    assert not (tmp_path / "created-by-root").exists()


def test_symlinked_directory_of_another_user_is_refused(shared_dir: Path,
                                                        tmp_path: Path) -> None:
    secret = tmp_path / "etc"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0\n")
    as_nobody("mkdir", str(shared_dir / "d"))
    as_nobody("ln", "-s", str(secret), str(shared_dir / "d" / "etc"))
    for name in ("passwd", "newfile"):
        with pytest.raises(E.OutputError, match="symbolic link owned by uid 65534"):
            open_private(str(shared_dir / "d" / "etc" / name))
    assert (secret / "passwd").read_text() == "root:x:0:0\n"
    assert not (secret / "newfile").exists()


def test_own_symlink_is_followed(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    os.symlink(target, tmp_path / "link.txt")
    fd = open_private(str(tmp_path / "link.txt"))
    os.write(fd, b"x")
    os.close(fd)
    assert target.read_bytes() == b"x" and _mode(target) == 0o600


def test_existing_file_of_another_user_is_refused(shared_dir: Path) -> None:
    as_nobody("sh", "-c", f"echo theirs > {shared_dir}/out.txt")
    with pytest.raises(E.OutputError, match="belongs to uid 65534") as info:
        open_private(str(shared_dir / "out.txt"))
    assert isinstance(info.value, OSError)
    assert (shared_dir / "out.txt").read_text() == "theirs\n"


def test_hard_link_to_another_file_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.link(victim, tmp_path / "out.txt")
    with pytest.raises(E.OutputError, match="2 hard links"):
        open_private(str(tmp_path / "out.txt"))
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("path, why", [
    ("", "empty"),
    ("/proc/version", "kernel interface file (procfs)"),
    ("/proc/sys/kernel/core_pattern", "kernel interface file (procfs)"),
    ("/sys/kernel/mm/transparent_hugepage/enabled", "kernel interface file (sysfs)"),
    ("/", "not a file path"),
    ("/tmp", "is a directory"),
    ("/nonexistent-dir/out", "does not exist"),
])
def test_paths_that_are_not_output_files(path: str, why: str) -> None:
    if path.startswith("/sys/") and not os.path.exists(path):
        pytest.skip(f"{path} does not exist on this kernel")
    with pytest.raises(E.OutputError) as info:
        open_private(path)
    assert why in str(info.value)


def test_read_only_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "ro.txt"
    p.write_text("keep\n")
    p.chmod(0o444)
    with pytest.raises(E.OutputError, match="read-only"):
        open_private(str(p))
    assert p.read_text() == "keep\n"


def test_devices_and_fifos(tmp_path: Path) -> None:
    fd = open_private("/dev/null")
    os.close(fd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(E.OutputError, match="FIFO no process reads"):  # no hang
        open_private(str(fifo))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    fd = -1
    for _ in range(200):
        try:
            fd = open_private(str(fifo))
            break
        except E.OutputError:
            threading.Event().wait(0.01)
    os.write(fd, b"through the fifo")
    os.close(fd)
    reader.join(5)
    assert got == [b"through the fifo"]


def test_write_errors_are_one_output_error() -> None:
    out = open_output("/dev/full")
    out.write("x" * 100)
    with pytest.raises(E.OutputError) as info:
        out.flush()
    assert str(info.value) == "cannot write /dev/full: No space left on device"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    with pytest.raises(E.OutputError):
        out.close()
    assert out.closed


def test_replace_private_and_read_regular(shared_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dst = shared_dir / "perf-1.map"
    as_nobody("ln", "-s", str(victim), str(dst))
    replace_private(str(dst), "1000 10 f\n")  # replaces the link, never follows it
    assert victim.read_text() == "precious\n"
    assert dst.read_text() == "1000 10 f\n" and not dst.is_symlink() and _mode(dst) == 0o600
    assert read_regular(str(dst), 4) == b"1000"
    os.mkfifo(shared_dir / "fifo")
    for bad in (shared_dir / "fifo", Path("/dev/zero")):
        with pytest.raises(OSError, match="not a regular file"):
            read_regular(str(bad), 10)
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(OSError):
        read_regular(str(tmp_path / "link"), 10)


# --- terminal escapes ------------------------------------------------------------------

HOSTILE_COMM = "\x1b]0;OWNED\x07\x1b[2J"


def test_escape_text() -> None:
    assert escape_text("plain text é ü") == "plain text é ü"
    assert escape_text(HOSTILE_COMM) == "\\x1b]0;OWNED\\x07\\x1b[2J"
    assert escape_text("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert escape_text("\u202egnp.exe\udcff\U000e0001") == "\\u202egnp.exe\\udcff\\U000e0001"
    assert escape_text("\x7f\x9b") == "\\x7f\\x9b"  # DEL and the 8-bit CSI


def test_event_text_is_escaped_and_json_is_exact() -> None:
    probe = ProbeInfo("usdt", "/bin/x", "p\x1b[31m:n", "usdt:p:n")
    ev = Event(1_500_000_000, 7, 8, HOSTILE_COMM, probe,
               ("str\x1b[2J", 5, Unavailable("reason\x1b[2J\n#")))
    line = ev.format()
    assert "\x1b" not in line and "\x07" not in line and "\n" not in line
    assert line.startswith("1.500000 \\x1b]0;OWNED\\x07\\x1b[2J[7/8] usdt:p\\x1b[31m:n ")
    assert line.endswith("'str\\x1b[2J' 5 <unavailable: reason\\x1b[2J\\n#>")
    doc = ev.to_json()
    assert doc["comm"] == HOSTILE_COMM and doc["probe"] == "usdt:p\x1b[31m:n"
    assert doc["args"][0] == "str\x1b[2J" and doc["unavailable"] == {2: "reason\x1b[2J\n#"}


def test_escaping_writer_keeps_lines() -> None:
    import io

    buf = io.StringIO()
    EscapingWriter(buf).write(f"  usdt:{HOSTILE_COMM}: 3\nnext\n")
    assert buf.getvalue() == "  usdt:\\x1b]0;OWNED\\x07\\x1b[2J: 3\nnext\n"


# --- option ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, 65537, 10**12, 1.5, "x", None, True, math.nan])
def test_check_int_refuses(value: Any) -> None:
    with pytest.raises(E.OptionError) as info:
        check_int("--str-max", value, 1, 65536)
    assert "--str-max must be an integer from 1 to 65536" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, -math.inf, "soon", None, True])
def test_check_seconds_refuses(value: Any) -> None:
    with pytest.raises(E.OptionError, match="finite number of seconds > 0"):
        check_seconds("-d/--duration", value)


def test_accepted_values() -> None:
    assert check_int("n", 3, 1) == 3 and check_int("n", "7", 1) == 7 and check_int("n", 2.0, 1) == 2
    assert check_seconds("d", 0.5) == 0.5 and check_seconds("d", 0, allow_zero=True) == 0
    check_event_fits(4096, 32768)
    with pytest.raises(E.OptionError, match="lower the string size"):
        check_event_fits(4097, 32768)


def test_session_checks_its_arguments() -> None:
    from apptrace.session import Session

    cases = [
        (dict(pid=1, path="/bin/true"), "at most one of pid, path, command"),
        (dict(str_max=0), "str_max must be an integer from 1 to 65536"),
        (dict(str_max=-1), "str_max must be"),
        (dict(str_max=1 << 40), "str_max must be"),
        (dict(ringbuf_kb=-1), "ringbuf_kb must be an integer from 4 to 1048576"),
        (dict(ringbuf_kb=0), "ringbuf_kb must be"),
        (dict(ringbuf_kb=5000 * 1024), "ringbuf_kb must be"),
        (dict(stack_depth=0), "stack_depth must be an integer from 1 to 127"),
        (dict(batch_ms=math.nan), "batch_ms must be a finite number of milliseconds"),
        (dict(semaphores="both"), "'kernel' or 'procmem'"),
        (dict(semaphores="procmem"), "procmem writes one process's memory"),
    ]
    for kw, text in cases:
        with pytest.raises(E.OptionError) as info:
            Session(**kw)  # type: ignore[arg-type]
        assert text in str(info.value), (kw, str(info.value))
        assert isinstance(info.value, ValueError)
    with pytest.raises(E.OptionError) as info:
        Session(semaphores="both")
    assert str(info.value) == "semaphores must be 'kernel' or 'procmem' (got 'both')"
    with pytest.raises(E.OptionError) as info:
        Session(semaphores="procmem")
    assert str(info.value) == ("semaphores must be 'kernel' without a pid or command:"
                               " procmem writes one process's memory (got 'procmem')")
    with pytest.raises(E.OptionError) as info:
        Session().add("usdt:x:p:n", fold=True, where="arg0 > 1")
    assert str(info.value) == ("where must be left out with fold (stacks are counted in the"
                               " kernel without reading arguments) (got 'arg0 > 1')")
    s = Session()  # the documented defaults
    assert (s.str_max, s.stack_depth, s.batch_ms, s.symbolize) == (64, 32, 5.0, True)
    assert s.probes == [] and s.warnings == []  # nothing resolved before start()
    # String slots are whole 8-byte words; batch_ms may be 0 (read at once),
    # up to 10 s.
    assert [Session(str_max=n).str_max for n in (1, 8, 9, 63)] == [8, 8, 16, 64]
    assert Session(batch_ms=0).batch_ms == 0 and Session(batch_ms=10_000).batch_ms == 10_000
    with pytest.raises(E.OptionError, match="batch_ms must be"):
        Session(batch_ms=10_001)


# --- one exception hierarchy -------------------------------------------------------------

NEW = [
    (E.OptionError("--str-max", 0, "an integer from 1 to 65536"), ValueError),
    (E.SessionStateError("closed"), RuntimeError),
    (E.SpawnError("cannot start x", command="x", errno=13), OSError),
    (E.CommandNotFoundError("x"), FileNotFoundError),
    (E.BinaryNotFoundError("x: no such file", probe="x"), FileNotFoundError),
    (E.ElfNotFoundError("/x"), FileNotFoundError),
    (E.KernelThreadError(2, "kthreadd"), ValueError),
    (E.OutputError("cannot write /x", path="/x", errno=28), OSError),
    (E.SemaphoreError("cannot", pid=3, errno=1), OSError),
    (E.BpfError("refused", errno=7), OSError),
]


@pytest.mark.parametrize("err, builtin", NEW)
def test_new_errors_subclass_builtins_and_pickle(err: E.ApptraceError, builtin: type) -> None:
    assert isinstance(err, E.ApptraceError) and isinstance(err, builtin)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert back.__dict__ == err.__dict__
    if isinstance(err, OSError):
        assert back.errno == err.errno  # type: ignore[attr-defined]


def test_every_error_class_is_exported() -> None:
    import apptrace

    for name in E.__all__:
        assert getattr(apptrace, name) is getattr(E, name), name
        assert name in apptrace.__all__


# Raises of these inside the package mean an error that is not an ApptraceError
# subclass (or a bare ApptraceError that subclasses no builtin).
_BARE = {"ApptraceError", "ValueError", "RuntimeError", "TypeError", "OSError", "KeyError",
         "LookupError", "IOError", "Exception"}
# Raised and caught inside the package, never seen by an API caller (the cache
# format check; read_regular's OSError, which its callers turn into their error),
# and a wrong keyword argument, a TypeError as in any Python call.
_INTERNAL = {("apptrace/bpfobj.py", "ValueError"), ("apptrace/output.py", "OSError"),
             ("apptrace/symbolize.py", "TypeError"), ("apptrace/events.py", "TypeError")}
# Packages written under other issues that still raise bare errors (reported to
# the lead; remove each from here once its raises use apptrace.errors classes).
_PENDING = ("apptrace/jvm/", "apptrace/ssl/")


def test_no_bare_errors_escape_the_api() -> None:
    found = []
    for path in sorted((ROOT / "apptrace").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(_PENDING) or rel.startswith("apptrace/cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                fn = node.exc.func
                name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
                if name in _BARE and (rel, name) not in _INTERNAL:
                    found.append(f"{rel}:{node.lineno}: raise {name}(...)")
    assert found == [], "\n".join(found)
