"""`apptrace trace --stack --no-symbolize`: raw addresses and the files that hold them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from apptrace.cli import main
from apptrace.usdt import read_probes
from apptrace.usdt.notes import ElfImage

ROOT = Path(__file__).resolve().parents[2]
APPTRACE = str(ROOT / ".venv" / "bin" / "apptrace")


def _trace_waiting_child(spawn: Any, binary: Path, *extra: str) -> tuple[str, str]:
    """Trace 3 hits of apptrace_fx:deep in a running stack_chain; (stdout, stderr)."""
    child = spawn([binary, 3, "wait"], wait=False)
    while child.readline() != "ready":
        pass
    # Without a working symbolizer: --no-symbolize must never reach for it.
    env = {**os.environ, "APPTRACE_BLAZESYM": "/nonexistent/libblazesym_c.so"}
    cli = subprocess.Popen([APPTRACE, "trace", "--stack", "--no-symbolize", "-n", "3",
                            "-p", str(child.pid), *extra, "usdt:apptrace_fx:deep"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert cli.stderr is not None
    line = cli.stderr.readline()
    assert "attached" in line, line + cli.stderr.read()
    child.send()
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    return out, line + err


@pytest.mark.bpf
def test_json_frames_are_addresses_in_files(fixtures_dir: Path, spawn: Any) -> None:
    binary = fixtures_dir / "stack_chain_pie"
    [probe] = read_probes(str(binary))
    site_offset = probe.sites[0].file_offset
    with ElfImage(str(binary)) as img:
        funcs = img.functions()
    inner = img.vaddr_to_offset(funcs["inner"], executable=True)
    main_off = img.vaddr_to_offset(funcs["main"], executable=True)
    assert inner is not None and main_off is not None

    out, err = _trace_waiting_child(spawn, binary, "--json")
    events = [json.loads(ln) for ln in out.splitlines()]
    assert [e["args"] for e in events] == [[3], [4], [5]]
    assert "3 events, 0 lost" in err
    for ev in events:
        frames = ev["frames"]
        assert all(set(f) == {"addr", "module", "module_offset"} for f in frames), frames
        # Innermost first: the probe site itself (fire_here is inlined into inner)...
        assert frames[0]["module"] == str(binary)
        assert frames[0]["module_offset"] == site_offset
        # ... then the return addresses in Walker::outer and main, then libc.
        assert [f["module"] for f in frames[:3]] == [str(binary)] * 3
        assert frames[2]["module_offset"] > main_off
        assert any(f["module"] and "libc.so" in f["module"] for f in frames[3:]), frames
        assert inner <= frames[0]["module_offset"] < main_off
        for f in frames:
            assert f["addr"] > 0


@pytest.mark.bpf
def test_text_frames(fixtures_dir: Path, spawn: Any) -> None:
    binary = fixtures_dir / "stack_chain_nopie"
    [probe] = read_probes(str(binary))
    out, _ = _trace_waiting_child(spawn, binary)
    lines = out.splitlines()
    frames = [ln for ln in lines if ln.startswith("    ")]
    assert len([ln for ln in lines if not ln.startswith("    ")]) == 3
    first = re.fullmatch(r"    0x([0-9a-f]+) \((\S+)\+0x([0-9a-f]+)\)", frames[0])
    assert first, frames[0]
    assert first.group(2) == str(binary)
    assert int(first.group(3), 16) == probe.sites[0].file_offset
    # A non-PIE maps at its link address: the address is the site's vaddr.
    assert int(first.group(1), 16) == probe.sites[0].address
    for f in frames:  # address and file only: no symbol names, no source lines
        assert re.fullmatch(r"    0x[0-9a-f]+ \((\S+\+0x[0-9a-f]+|\[\w+\]|\?)\)", f), f


@pytest.mark.parametrize("argv, message", [
    (["trace", "--no-symbolize", "usdt:x:y", "-p", "1"], "--no-symbolize goes with --stack"),
])
def test_bad_combinations(argv: list[str], message: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.bpf
def test_folded_without_symbols_counts_addresses(fixtures_dir: Path) -> None:
    """Folded stacks of raw addresses: every hit counted, outermost frame first."""
    r = subprocess.run([APPTRACE, "trace", "--folded", "--no-symbolize",
                        "usdt:apptrace_fx:tick", "--", str(fixtures_dir / "usdt_early_pie"),
                        "50"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum(int(ln.rsplit(" ", 1)[1]) for ln in lines) == 50
    for ln in lines:
        comm, *frames = ln.rsplit(" ", 1)[0].split(";")
        assert comm == "usdt_early_pie" and frames
        assert all(re.fullmatch(r"0x[0-9a-f]+", f) for f in frames), ln
