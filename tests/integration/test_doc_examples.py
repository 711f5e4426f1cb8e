"""Every example in the help texts, the README and docs/ runs, for real.

An example is a line starting with ``apptrace `` in an ``Examples:`` block of
a command's help, or in a ``sh`` code block of README.md or docs/*.md; and
every ``python`` code block of README.md and docs/*.md. ``PID`` is replaced
by a running python3.11 process (which maps libssl) and ``JAVA_PID`` by a
running JVM. Each must exit 0 without a traceback. Shell examples run in an
empty directory where ``fixtures/`` is the repository's; Python blocks run
from the repository root, as a script, or under pytest when they define
``test_`` functions (every test must pass).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers import missing

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


def help_examples() -> list[str]:
    from apptrace.cli import COMMANDS

    out = []
    for cls in COMMANDS:
        doc = cls.__doc__ or ""
        if "Examples:" not in doc:
            continue
        for ln in doc.split("Examples:", 1)[1].splitlines():
            ln = ln.strip()
            if ln.startswith("apptrace "):
                out.append(ln)
    return out


def doc_examples() -> list[tuple[str, str]]:
    out = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```sh\n(.*?)```", md.read_text(), re.S):
            for ln in block.splitlines():
                if ln.startswith("apptrace "):
                    out.append((md.name, ln))
    return out


EXAMPLES = [("help", e) for e in help_examples()] + doc_examples()


def python_blocks() -> list[tuple[str, str]]:
    out = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", md.read_text(), re.S):
            out.append((md.name, block))
    return out


PYTHON = python_blocks()


def test_there_are_examples() -> None:
    assert len([e for e in EXAMPLES if e[0] == "help"]) >= 3
    assert len([e for e in EXAMPLES if e[0] == "README.md"]) >= 8
    assert len([b for b in PYTHON if b[0] == "README.md"]) >= 2
    assert len([b for b in PYTHON if b[0] == "testing.md"]) >= 6


def with_pids(text: str, pids: dict[str, str]) -> str:
    for name in ("JAVA_PID", "PID"):
        if re.search(rf"\b{name}\b", text):
            if name not in pids:
                pytest.fail(f"{name} needed by {text!r} but not available")
            text = re.sub(rf"\b{name}\b", pids[name], text)
    return text


@pytest.fixture(scope="module")
def pids() -> Iterator[dict[str, str]]:
    """A python3.11 that calls functions, collects garbage and mallocs, with
    libssl mapped; and a JVM."""
    py = "/usr/bin/python3.11"
    if not os.path.exists(py):
        missing(f"{py} (Debian's python3.11) is not installed")
    code = ("import ssl, gc, time, sys\nprint('ready', flush=True)\n"
            "def f(i): return [i] * 100\n"
            "while True:\n    f(1); gc.collect(); time.sleep(0.05)\n")
    procs = [subprocess.Popen([py, "-c", code], stdout=subprocess.PIPE, text=True)]
    assert procs[0].stdout is not None and procs[0].stdout.readline().strip() == "ready"
    found = {"PID": str(procs[0].pid)}
    java = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java"
    if os.path.exists(java):
        src = Path("/tmp/apptrace_doc_spin.java")
        src.write_text("public class apptrace_doc_spin { public static void main(String[] a)"
                       " throws Exception { System.out.println(\"ready\");"
                       " while (true) { new Thread(() -> {}).start(); Thread.sleep(100); } } }")
        j = subprocess.Popen([java, str(src)], stdout=subprocess.PIPE, text=True)
        procs.append(j)
        assert j.stdout is not None and j.stdout.readline().strip() == "ready"
        found["JAVA_PID"] = str(j.pid)
    yield found
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("where,line", EXAMPLES, ids=[f"{w}:{i}" for i, (w, _) in
                                                     enumerate(EXAMPLES)])
def test_example_runs(where: str, line: str, pids: dict[str, str], tmp_path: Path) -> None:
    cmd = line.split("  #", 1)[0].strip()
    for name in ("JAVA_PID", "PID"):
        if re.search(rf"\b{name}\b", cmd):
            if name not in pids:
                pytest.fail(f"{name} needed by {cmd!r} but not available")
            cmd = re.sub(rf"\b{name}\b", pids[name], cmd)
    words = shlex.split(cmd)
    if ">" in words:  # a redirection; a quoted '>=' inside an expression is one word
        words = words[:words.index(">")]
    # A trace with neither a duration nor a command would run until Ctrl-C.
    if words[1] == "trace" and "-d" not in words and "--" not in words:
        cmd = cmd.replace("apptrace trace", "apptrace trace -d 1", 1)
    # The venv's apptrace, by path: the venv's bin/ on PATH would make
    # `python3.11` the venv's interpreter rather than the system's.
    cmd = str(VENV_BIN / "apptrace") + cmd[len("apptrace"):]
    t0 = time.monotonic()
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")  # examples name fixtures/c/out/...
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, f"{where}: {cmd}\n{r.stderr}\n({time.monotonic() - t0:.1f}s)"


@pytest.mark.parametrize("where,block", PYTHON, ids=[f"{w}:py{i}" for i, (w, _) in
                                                    enumerate(PYTHON)])
def test_python_block_runs(where: str, block: str, pids: dict[str, str],
                           fixtures_dir: Path, tmp_path: Path) -> None:
    code = with_pids(block, pids)
    if re.search(r"^\s*def test_", code, re.M):
        path = tmp_path / "test_doc_block.py"
        path.write_text(code)
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                f"--rootdir={tmp_path}", str(path)]
    else:
        path = tmp_path / "doc_block.py"
        path.write_text(code)
        argv = [sys.executable, str(path)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{where}:\n{code}\n--- output:\n{out}"
    assert "Traceback" not in r.stderr, out
    if argv[1] == "-m":
        assert re.search(r"\d+ passed", r.stdout) and "skipped" not in r.stdout, out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
