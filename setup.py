"""Build hooks: the wheel carries libblazesym_c.so, the symbolizer apptrace loads with cffi.

Everything else about the package is declared in pyproject.toml. Here we only
say which crate setuptools-rust builds and where its library goes:

* blazesym-c is not our code and is not vendored: cargo downloads the version
  pinned in mk/blazesym.mk and builds it from its own manifest with its own
  Cargo.lock (``--locked``), as ``make blazesym`` always did.
* apptrace does not bind to Python's C API (it dlopens the library through
  cffi), so the file is installed as plain ``apptrace/libblazesym_c.so`` and
  the wheel is tagged ``py3-none-<platform>``: any Python 3, this platform.
* cargo's target directory is ``.build/blazesym/target`` (``CARGO_TARGET_DIR``
  overrides it), so wheel builds and the editable install share one
  incremental build. setuptools' own scratch directory is a fresh temporary
  one per build, so nothing stale from an earlier build can reach a wheel.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools_rust import Binding, RustExtension
from setuptools_rust.build import build_rust

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 kept it in the wheel project
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
LIB_NAME = "libblazesym_c.so"
WORK = HERE / ".build" / "blazesym"
CRATE = "blazesym-c"


def blazesym_version() -> str:
    """The pinned crate version, from the one place it is written (mk/blazesym.mk)."""
    text = (HERE / "mk" / "blazesym.mk").read_text(encoding="utf-8")
    m = re.search(r"^BLAZESYM_VERSION\s*:=\s*(\S+)\s*$", text, re.M)
    if not m:
        raise RuntimeError("mk/blazesym.mk does not set BLAZESYM_VERSION")
    return m.group(1)


def _cargo_environment() -> None:
    """cargo from PATH or rustup's default place; the shared target directory."""
    if shutil.which(os.environ.get("CARGO", "cargo")) is None:
        rustup_bin = Path.home() / ".cargo" / "bin"
        if (rustup_bin / "cargo").is_file():
            os.environ["PATH"] = f"{rustup_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        else:
            raise RuntimeError(
                "building apptrace needs cargo (Rust >= 1.88, e.g. from rustup) to compile"
                " the blazesym symbolizer; none on PATH or in ~/.cargo/bin")
    os.environ.setdefault("CARGO_TARGET_DIR", str(WORK / "target"))


def fetch_crate(version: str) -> Path:
    """Have cargo download blazesym-c VERSION; return the Cargo.toml of its sources.

    cargo has no "download this crate" command, so a throwaway manifest that
    depends on exactly that version is resolved; the dependency's manifest
    path then says where cargo unpacked it.
    """
    fetch = WORK / "fetch"
    (fetch / "src").mkdir(parents=True, exist_ok=True)
    (fetch / "src" / "lib.rs").write_text("", encoding="utf-8")
    (fetch / "Cargo.toml").write_text(
        '[package]\nname = "apptrace-blazesym-fetch"\nversion = "0.0.0"\n'
        'edition = "2021"\npublish = false\n\n[lib]\npath = "src/lib.rs"\n\n'
        f'[dependencies]\n{CRATE} = "={version}"\n', encoding="utf-8")
    try:
        out = subprocess.run(
            [os.environ.get("CARGO", "cargo"), "metadata", "--format-version", "1",
             "--manifest-path", str(fetch / "Cargo.toml")],
            check=True, stdout=subprocess.PIPE).stdout
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"cargo could not get {CRATE} {version} (its message is above): the build"
            " downloads it from the Rust crate registry once, then works offline") from err
    for pkg in json.loads(out)["packages"]:
        if pkg["name"] == CRATE and pkg["version"] == version:
            return Path(pkg["manifest_path"])
    raise RuntimeError(f"cargo resolved no {CRATE} {version}")


class BuildBlazesym(build_rust):  # type: ignore[misc]
    """setuptools-rust's build, pointed at the downloaded crate."""

    def run(self) -> None:
        _cargo_environment()
        manifest = fetch_crate(blazesym_version())
        for ext in self.extensions:
            ext.path = str(manifest)
        super().run()
        # The header the unit tests compare our cffi declarations with.
        include = WORK / "include"
        include.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.parent / "include" / "blazesym.h", include / "blazesym.h")

    def install_extension(self, ext: RustExtension, dylib_paths: list, build_dir: object) -> None:
        super().install_extension(ext, dylib_paths, build_dir)
        # blazesym's licence travels with the library built from it.
        lib = Path(self.get_dylib_ext_path(ext, ext.name))
        shutil.copyfile(Path(ext.path).parent / "LICENSE", lib.with_name("LICENSE.blazesym"))

    def get_dylib_ext_path(self, ext: RustExtension, target_fname: str) -> str:
        # A plain library name, not a CPython extension suffix: nothing imports it.
        return str(Path(super().get_dylib_ext_path(ext, target_fname)).with_name(LIB_NAME))


class BdistWheel(bdist_wheel):  # type: ignore[misc]
    """Platform-specific (it carries a .so), but for any Python 3: no C-API use."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


# setuptools' scratch space (build/lib, bdist.*, egg-info) lives and dies with
# this build, never in the checkout.
_scratch = tempfile.mkdtemp(prefix="apptrace-setuptools-")
atexit.register(shutil.rmtree, _scratch, True)

setup(
    rust_extensions=[
        RustExtension(
            "apptrace.libblazesym_c",
            binding=Binding.NoBinding,
            cargo_manifest_args=["--locked"],
            debug=False,  # also for the editable install: it is the library tests use
        ),
    ],
    cmdclass={"build_rust": BuildBlazesym, "bdist_wheel": BdistWheel},
    options={"build": {"build_base": os.path.join(_scratch, "build")},
             "egg_info": {"egg_base": _scratch}},
)
