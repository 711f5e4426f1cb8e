"""`apptrace doctor` against the real machine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")


@pytest.mark.bpf
def test_doctor_all_required_checks_pass_here() -> None:
    r = subprocess.run([PY, "-m", "apptrace", "doctor", "--json"], capture_output=True,
                       text=True, timeout=120)
    doc = json.loads(r.stdout)
    names = {c["name"]: c for c in doc["checks"]}
    for want in ("privileges", "bpf program load", "tracefs", "uprobe PMU",
                 "uprobe ref_ctr_offset (kernel semaphores)", "BPF ring buffer",
                 "uprobe_multi link", "bcc", "symbolizer (blazesym)",
                 "JDKs with HotSpot probes"):
        assert want in names, want
    failed = [c for c in doc["checks"] if c["required"] and not c["ok"]]
    assert failed == [] and doc["ok"] is True and r.returncode == 0, failed
    assert names["symbolizer (blazesym)"]["ok"], names["symbolizer (blazesym)"]
    assert "probes" in names["JDKs with HotSpot probes"]["detail"]


@pytest.mark.bpf
def test_doctor_without_privileges_fails_and_names_the_fix(tmp_path: Path) -> None:
    # Root with every capability dropped (as in a locked-down container): the
    # checks must fail with their fix, and the exit status must be 1.
    r = subprocess.run(["setpriv", "--inh-caps=-all", "--ambient-caps=-all",
                        "--bounding-set=-all", PY, "-m", "apptrace", "doctor"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "privileges" in ln)
    assert line.startswith("FAIL") and "CAP_BPF" in line
    assert any(ln.startswith("FAIL") and "bpf program load" in ln for ln in r.stdout.splitlines())
