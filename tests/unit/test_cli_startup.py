"""`apptrace usdt list` imports only what listing needs (its speed is benchmarked in
bench/bench_usdt_list.py; this checks the imports that would undo it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Loaded by other commands or on demand, never to list probes of a file.
NOT_FOR_LISTING = ["elftools", "psutil", "shutil", "typing", "cffi", "bcc", "ctypes",
                   "apptrace.session", "apptrace.bpf", "apptrace.symbolize", "apptrace.stacks",
                   "apptrace.codegen", "apptrace.cli.trace", "apptrace.cli.doctor",
                   "apptrace.cli.jvm", "apptrace.cli.semaphores"]

PROBE = """
import sys
from apptrace.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
modules = sorted(sys.modules)
import json
print(json.dumps({"rc": rc, "modules": modules}), file=sys.stderr)
"""


def _modules_after(*argv: str) -> tuple[int, str, set[str]]:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                       timeout=120)
    report = json.loads(r.stderr.strip().splitlines()[-1])
    return report["rc"], r.stdout, set(report["modules"])


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_usdt_list_imports_only_what_listing_needs(fixtures_dir: Path, fmt: list[str]) -> None:
    binary = fixtures_dir / "usdt_loop_pie"
    rc, out, modules = _modules_after("usdt", "list", *fmt, str(binary))
    assert rc == 0 and "apptrace_fx" in out and "loop" in out, out
    loaded = [m for m in NOT_FOR_LISTING
              if m in modules or any(n.startswith(m + ".") for n in modules)]
    assert loaded == []
    assert ("json" in modules) == bool(fmt)  # only --json needs it


def test_version_and_help_still_see_every_command() -> None:
    import apptrace
    from apptrace.cli import REGISTRY

    r = subprocess.run([sys.executable, "-m", "apptrace", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"apptrace {apptrace.__version__}\n")
    r = subprocess.run([sys.executable, "-m", "apptrace", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for words, _module, _cls in REGISTRY:
        assert f"    {words.split()[0]} " in r.stdout or f"    {words.split()[0]}\n" in r.stdout
