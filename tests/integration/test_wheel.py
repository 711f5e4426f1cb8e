"""Installed as a user installs it: the wheel in a fresh venv, run from elsewhere.

The wheel is built once per session with the normal PEP 517 build (sdist,
then the wheel from it), reusing the checkout's cargo target directory so
blazesym is not compiled again. The fresh venv has no link to Debian's bcc
and no environment variable points at blazesym: stacks must be symbolized
all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import apptrace

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]
LIB = "apptrace/libblazesym_c.so"


def _clean_env() -> dict[str, str]:
    """The environment a user's shell has: nothing of ours."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APPTRACE_", "PYTHON", "VIRTUAL_ENV"))}
    return env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = _clean_env()
    env["CARGO_TARGET_DIR"] = str(ROOT / ".build" / "blazesym" / "target")  # reuse the build
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    print(f"\nwheel built in {time.monotonic() - t0:.1f} s")
    [whl] = out.glob("*.whl")
    return whl


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with only the wheel and its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    r = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=900, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def _run(venv: Path, *argv: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=_clean_env(), **kw)


def test_wheel_is_platform_specific_and_carries_blazesym(wheel: Path) -> None:
    assert wheel.name == f"apptrace-{apptrace.__version__}-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"apptrace-{apptrace.__version__}.dist-info/METADATA").decode()
        info = z.getinfo(LIB)
        elf = z.read(LIB)[:20]
    assert elf[:4] == b"\x7fELF" and elf[16] == 3  # ET_DYN: a shared library
    assert info.external_attr >> 16 & 0o111, "the library is not executable"
    assert "apptrace/LICENSE.blazesym" in names
    assert f"apptrace-{apptrace.__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: bcc" not in meta  # Debian's bcc; PyPI's is another project
    # Nothing but the package's own files: no stale build output, no caches.
    for name in names:
        if name.startswith("apptrace/") and name not in (LIB, "apptrace/LICENSE.blazesym"):
            assert (ROOT / name).is_file(), f"{name} is in the wheel but not in the source"
            assert name.endswith((".py", "py.typed")), name
        else:
            assert name.startswith(("apptrace/", "apptrace-")), name


def test_installed_wheel_symbolizes_stacks(venv: Path, fixtures_dir: Path,
                                           tmp_path: Path) -> None:
    """`apptrace trace --stack` from the wheel, from an unrelated directory, no env vars."""
    r = _run(venv, "python", "-c",
             "import apptrace, apptrace.symbolize as s, apptrace.bpf as b;"
             " print(apptrace.__file__); print(s.library_path()); print(b.import_bcc().__file__)",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pkg, lib, bcc = r.stdout.split()
    assert pkg.startswith(str(venv)), "apptrace was not imported from the wheel"
    assert lib == str(Path(pkg).parent / "libblazesym_c.so")
    assert bcc == "/usr/lib/python3/dist-packages/bcc/__init__.py"  # found without a link

    r = _run(venv, "apptrace", "trace", "--json", "--stack", "usdt:apptrace_fx:deep", "--",
             str(fixtures_dir / "stack_chain_pie"), "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(events) == 2, r.stdout + r.stderr
    for ev in events:
        frames = ev["frames"]
        assert [f["symbol"] for f in frames[:4]] == ["fire_here", "inner",
                                                      "fx::Walker::outer(int)", "main"]
        assert frames[0]["file"].endswith("stack_chain.cpp") and frames[0]["line"] == 34
    assert "warning" not in r.stderr


def test_installed_cli_basics(venv: Path, tmp_path: Path) -> None:
    r = _run(venv, "apptrace", "--version", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"apptrace {apptrace.__version__}\n"
    r = _run(venv, "apptrace", "doctor", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"], report
    checks = {c["name"]: c for c in report["checks"]}
    sym = next(c for name, c in checks.items() if "symbolizer" in name)
    assert sym["ok"] and str(venv) in sym["detail"], sym
    bcc = checks["bcc"]
    assert bcc["ok"], bcc
