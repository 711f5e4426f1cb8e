"""apptrace finds Debian's bcc from any Python, and says which package to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from helpers import missing

import apptrace.bpf as bpf
from apptrace.errors import BccUnavailableError

REPO = Path(__file__).resolve().parents[2]
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc/__init__.py")


def test_bcc_found_without_site_packages() -> None:
    """`python -S` sees no site-packages at all: the system's bcc is loaded by itself."""
    if not DEBIAN_BCC.is_file():
        missing("python3-bpfcc is not installed")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from apptrace.bpf import import_bcc\n"
        "b = import_bcc()\n"
        "assert not any('dist-packages' in p for p in sys.path), sys.path\n"
        "print(b.__file__, b.BPF.__module__, b.libbcc.lib._name)\n"
    )
    r = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    path, module, lib = r.stdout.split()
    assert path == str(DEBIAN_BCC)
    assert module == "bcc"
    assert lib == "libbcc.so.0"


@pytest.fixture
def no_bcc_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`import bcc` fails as in a fresh venv; import_bcc must look for itself."""
    monkeypatch.setattr(bpf, "_bcc", None)
    saved = {n: m for n, m in sys.modules.items() if n == "bcc" or n.startswith("bcc.")}
    for name in saved:
        del sys.modules[name]
    sys.modules["bcc"] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_missing_bcc_names_the_package(no_bcc_on_path: None, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpf, "_BCC_DIRS", (str(tmp_path),))
    with pytest.raises(BccUnavailableError) as info:
        bpf.import_bcc()
    text = str(info.value)
    assert "apt-get install python3-bpfcc" in text
    assert str(tmp_path) in text
    assert "unrelated" in text  # PyPI's 'bcc' is not the fix


def test_missing_libbcc_names_the_package(no_bcc_on_path: None, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "bcc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise AssertionError('must not be imported')\n")
    monkeypatch.setattr(bpf, "_BCC_DIRS", (str(tmp_path),))
    monkeypatch.setattr(bpf, "_LIBBCC_DIRS", (str(tmp_path / "nolib"),))
    with pytest.raises(BccUnavailableError) as info:
        bpf.import_bcc()
    assert "apt-get install libbpfcc" in str(info.value)


def test_bcc_of_another_release_is_refused(no_bcc_on_path: None, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "libbcc.so.0.99.0").write_bytes(b"")
    (libdir / "libbcc.so.0").symlink_to("libbcc.so.0.99.0")
    pkg = tmp_path / "dist" / "bcc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise AssertionError('must not be imported')\n")
    (pkg / "version.py").write_text("__version__ = '0.26.0'\n")
    monkeypatch.setattr(bpf, "_BCC_DIRS", (str(tmp_path / "dist"),))
    monkeypatch.setattr(bpf, "_LIBBCC_DIRS", (str(libdir),))
    with pytest.raises(BccUnavailableError) as info:
        bpf.import_bcc()
    text = str(info.value)
    assert "0.26.0" in text and "0.99.0" in text
    assert "apt-get install --reinstall python3-bpfcc libbpfcc" in text


def test_matching_bcc_is_loaded_alone(no_bcc_on_path: None, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The matching copy is imported as the package `bcc`, its submodules relative to it."""
    if not DEBIAN_BCC.is_file():
        missing("python3-bpfcc is not installed")
    path_before = list(sys.path)
    b = bpf.import_bcc()
    assert b.__file__ == str(DEBIAN_BCC)
    assert sys.modules["bcc.libbcc"].__file__ == str(DEBIAN_BCC.parent / "libbcc.py")
    assert sys.path == path_before
