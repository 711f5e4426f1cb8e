"""``apptrace usdt list`` through ``apptrace.cli.main(argv)``, on the C fixtures
and on processes started here. No root needed: listing only reads files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import missing, require_program

from apptrace.cli import main
from apptrace.usdt.notes import ElfImage

ROOT = Path(__file__).resolve().parents[2]
PYTHON311 = "/usr/bin/python3.11"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(*argv: str) -> tuple[int, str, str]:
    """The CLI in a fresh interpreter: what a user gets from the shell."""
    r = subprocess.run([sys.executable, "-m", "apptrace", *argv], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def loop_bin(fixtures_dir: Path) -> str:
    p = fixtures_dir / "usdt_loop_pie"
    assert p.exists(), "fixture usdt_loop_pie was not built"
    return str(p)


@pytest.fixture(scope="module")
def sema_bin(fixtures_dir: Path) -> str:
    p = fixtures_dir / "usdt_sema_pie"
    assert p.exists(), "fixture usdt_sema_pie was not built"
    return str(p)


# --- JSON schema -------------------------------------------------------------------

ARG_KEYS = {"spec", "size", "signed", "float", "kind"}
SITE_KEYS = {"pc", "file_offset", "base", "semaphore", "semaphore_offset", "args"}
PROBE_KEYS = {"binary", "provider", "name", "sites"}


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_schema(doc: Any) -> None:
    assert isinstance(doc, list) and doc
    for probe in doc:
        assert set(probe) == PROBE_KEYS, probe.keys()
        assert all(isinstance(probe[k], str) and probe[k] for k in ("binary", "provider", "name"))
        assert isinstance(probe["sites"], list) and probe["sites"]
        for site in probe["sites"]:
            assert set(site) == SITE_KEYS, site.keys()
            for k in SITE_KEYS - {"args"}:
                assert is_int(site[k]), (k, site[k])
            assert site["pc"] > 0 and site["file_offset"] > 0
            assert (site["semaphore"] == 0) == (site["semaphore_offset"] == 0)
            for arg in site["args"]:
                assert ARG_KEYS <= set(arg), arg
                assert isinstance(arg["spec"], str) and arg["spec"]
                assert is_int(arg["size"])
                assert isinstance(arg["signed"], bool) and isinstance(arg["float"], bool)
                assert arg["kind"] in ("constant", "register", "memory", "rip_relative",
                                       "unavailable")
                if arg["kind"] == "constant":
                    assert is_int(arg["value"])
                if arg["kind"] == "memory":
                    assert is_int(arg["displacement"]) and is_int(arg["scale"])
                if arg["kind"] == "unavailable":
                    assert isinstance(arg["reason"], str) and arg["reason"]


def check_against_elf(doc: list[dict[str, Any]], path: str) -> None:
    """The JSON says what the notes say: same sites, same pcs and offsets."""
    sites = ElfImage(path).sites()
    flat = [(p["provider"], p["name"], s["pc"], s["file_offset"], s["semaphore_offset"],
             " ".join(a["spec"] for a in s["args"]))
            for p in doc for s in p["sites"]]
    want = [(s.provider, s.name, s.pc, s.file_offset, s.semaphore_offset,
             " ".join(a.spec for a in s.args)) for s in sites]
    assert sorted(flat) == sorted(want)
    assert {p["binary"] for p in doc} == {path}



def test_json_via_main_and_capsys(capsys: pytest.CaptureFixture[str], sema_bin: str) -> None:
    rc, out, err = run(capsys, "usdt", "list", "--json", sema_bin)
    assert rc == 0 and err == ""
    doc = json.loads(out)
    check_schema(doc)
    check_against_elf(doc, sema_bin)


def test_json_schema_from_the_command(sema_bin: str, loop_bin: str) -> None:
    rc, out, err = run_process("usdt", "list", "--json", sema_bin, loop_bin)
    assert rc == 0, err
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1   # one JSON document on one line
    doc = json.loads(out)
    check_schema(doc)
    check_against_elf([p for p in doc if p["binary"] == sema_bin], sema_bin)
    check_against_elf([p for p in doc if p["binary"] == loop_bin], loop_bin)
    # usdt_sema's probes have semaphores; the JSON carries vaddr and file offset
    sema_sites = [s for p in doc if p["binary"] == sema_bin for s in p["sites"]]
    assert all(s["semaphore"] and s["semaphore_offset"] for s in sema_sites)
    loop = [p for p in doc if p["binary"] == loop_bin]
    assert [(p["provider"], p["name"]) for p in loop] == [("apptrace_fx", "loop")]
    assert [a["size"] for a in loop[0]["sites"][0]["args"]] == [8, 4]


def test_json_of_a_library_name(fixtures_dir: Path) -> None:
    lib = fixtures_dir / "libfxprobes.so"
    rc, out, err = run_process("usdt", "list", "--json", str(lib))
    assert rc == 0, err
    doc = json.loads(out)
    check_schema(doc)
    assert any(s["semaphore"] for p in doc for s in p["sites"])
    assert any(not s["semaphore"] for p in doc for s in p["sites"])


# --- table output --------------------------------------------------------------------------

def test_table_lists_probe_names(capsys: pytest.CaptureFixture[str], sema_bin: str,
                                 loop_bin: str) -> None:
    rc, out, err = run(capsys, "usdt", "list", sema_bin, loop_bin)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["BINARY", "PROBE", "SITES", "SEMA", "ARGS"]
    rows = {ln.split()[1]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"apptrace_fx:sema_ping", "apptrace_fx:sema_pong", "apptrace_fx:loop"}
    assert rows["apptrace_fx:sema_ping"][0] == sema_bin
    assert rows["apptrace_fx:sema_ping"][2:4] == ["1", "yes"]
    assert rows["apptrace_fx:loop"][0] == loop_bin
    assert rows["apptrace_fx:loop"][2:4] == ["1", "no"]
    assert "site pc=" not in out      # sites only with -v


def test_verbose_shows_every_site(capsys: pytest.CaptureFixture[str], fixtures_dir: Path) -> None:
    path = str(fixtures_dir / "usdt_inline_pie")
    sites = ElfImage(path).sites()
    rc, out, err = run(capsys, "usdt", "list", "-v", path)
    assert rc == 0 and err == ""
    shown = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("site pc=")]
    assert len(shown) == len(sites)
    for s in sites:
        assert f"site pc={s.pc:#x} off={s.file_offset:#x}" in out
        assert s.args_spec in out
    assert out.count("arg0:") == sum(1 for s in sites if s.args)
    # without -v, a probe whose sites disagree says so
    rc, out, _ = run(capsys, "usdt", "list", path)
    if len({s.args_spec for s in sites if s.name == sites[0].name}) > 1:
        assert "(sites differ; -v)" in out


def test_verbose_shows_semaphore_address_and_offset(capsys: pytest.CaptureFixture[str],
                                                    sema_bin: str) -> None:
    rc, out, _ = run(capsys, "usdt", "list", "-v", sema_bin)
    assert rc == 0
    for s in ElfImage(sema_bin).sites():
        assert f"sema={s.semaphore_address:#x}@{s.semaphore_offset:#x}" in out


# --- errors: one line on stderr, no traceback --------------------------------------------

def assert_one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("apptrace:")
    for f in fragments:
        assert f in lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["/nonexistent/dir/app.so"], ["/nonexistent/dir/app.so"]),
    (["/etc/passwd"], ["/etc/passwd", "not an ELF"]),
    (["/bin/true"], ["no USDT probes in /bin/true",
                     "was it built with sys/sdt.h or dtrace support?"]),
    (["/tmp"], ["/tmp", "directory"]),
    (["-p", str(2**22 + 12345)], [f"no process with PID {2**22 + 12345}"]),
    (["-p", "-5"], ["-5"]),
    ([], ["TARGET"]),
], ids=["missing-file", "not-elf", "no-notes", "directory", "unknown-pid", "negative-pid",
        "no-targets"])
def test_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                fragments: list[str]) -> None:
    if argv == ["/bin/true"] and not os.path.exists("/bin/true"):
        missing("/bin/true is not installed")
    rc, out, err = run(capsys, "usdt", "list", *argv)
    assert_one_line_error(rc, out, err, *fragments)


def test_usage_error_exit_code_is_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "usdt", "list")
    assert rc == 2
    rc, out, err = run(capsys, "usdt", "list", "/etc/passwd")
    assert rc == 1


def test_errors_in_a_real_process_have_no_traceback() -> None:
    rc, out, err = run_process("usdt", "list", "/etc/passwd")
    assert_one_line_error(rc, out, err, "/etc/passwd")


def test_first_bad_target_fails_the_command(capsys: pytest.CaptureFixture[str],
                                            loop_bin: str) -> None:
    rc, out, err = run(capsys, "usdt", "list", loop_bin, "/etc/passwd")
    assert rc == 1
    assert "/etc/passwd" in err and "Traceback" not in err


def test_truncated_elf_is_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    from elfwriter import TEXT, build_elf, stapsdt_note

    data = build_elf(notes=stapsdt_note(TEXT.vaddr + 16, 0, 0, "p", "n", "8@%rdi"))
    path = tmp_path / "truncated.so"
    path.write_bytes(data[: len(data) - 40])    # lose the last section headers
    try:
        rc, out, err = run(capsys, "usdt", "list", str(path))
    except Exception as exc:  # noqa: BLE001 - this is the failure being recorded
        pytest.fail(f"main() raised {type(exc).__name__}: {exc}")
    assert_one_line_error(rc, out, err, str(path))


# --- -p PID ------------------------------------------------------------------------------------

def test_pid_lists_probes_of_a_running_fixture(capsys: pytest.CaptureFixture[str],
                                               spawn: Any, loop_bin: str) -> None:
    child = spawn([loop_bin, "0", "wait"])     # prints "ready", then waits on stdin
    rc, out, err = run(capsys, "usdt", "list", "-p", str(child.pid))
    assert rc == 0, err
    rows = [ln.split() for ln in out.splitlines()[1:]]
    mine = [r for r in rows if r[1] == "apptrace_fx:loop"]
    assert len(mine) == 1
    # shown as the process sees the file, not through /proc/PID/root
    assert mine[0][0] == os.path.realpath(loop_bin)
    assert not any(r[0].startswith("/proc/") for r in rows)


def test_pid_lists_python_probes(capsys: pytest.CaptureFixture[str], spawn: Any) -> None:
    require_program("python3.11", PYTHON311)
    child = spawn([PYTHON311, "-c",
                   "import sys; print('ready', flush=True); sys.stdin.read()"])
    rc, out, err = run(capsys, "usdt", "list", "-p", str(child.pid))
    assert rc == 0, err
    names = {ln.split()[1] for ln in out.splitlines()[1:]}
    assert {"python:function__entry", "python:function__return", "python:gc__start"} <= names
    py_rows = [ln.split() for ln in out.splitlines()[1:] if ln.split()[1].startswith("python:")]
    assert {r[0] for r in py_rows} == {os.path.realpath(PYTHON311)}
    assert all(r[3] == "yes" for r in py_rows)   # CPython's probes all have semaphores

    # a target name is resolved against the process's own mappings
    rc, out, err = run_process("usdt", "list", "--json", "-p", str(child.pid), "python3.11")
    assert rc == 0, err
    doc = json.loads(out)
    check_schema(doc)
    assert {p["binary"] for p in doc} == {os.path.realpath(PYTHON311)}
    assert {p["provider"] for p in doc} == {"python"}


def test_pid_of_exited_process(capsys: pytest.CaptureFixture[str]) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    rc, out, err = run(capsys, "usdt", "list", "-p", str(p.pid))
    assert_one_line_error(rc, out, err, str(p.pid))
