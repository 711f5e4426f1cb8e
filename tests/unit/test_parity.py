"""apptrace's stapsdt reader against GNU readelf, on real binaries.

For each ELF with USDT notes (the C fixtures, every JDK's libjvm.so,
python3.11, libstdc++, PostgreSQL), ``readelf -n --wide`` and
``ElfImage(path).sites()`` must agree on provider, name, pc, base, semaphore
and the raw argument string of every note. readelf lists duplicate notes;
apptrace drops a note whose (provider, name, address) it has already seen, so
the comparison is: the same set of tuples, and apptrace's count equals
readelf's count after removing those duplicates (first occurrence kept).

A missing system binary is skipped on a developer machine; in CI
(``CI=true``) the JDK, python3.11, libstdc++ and PostgreSQL 15 must be there
(``make setup`` installs them), and so must readelf.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
from helpers import missing

from apptrace.usdt.notes import ElfImage

CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parents[2]
FIXTURE_OUT = ROOT / "fixtures" / "c" / "out"


@pytest.fixture(autouse=True)
def _readelf() -> None:
    if shutil.which("readelf") is None:
        missing("GNU readelf (binutils) is not installed")


class Note(NamedTuple):
    provider: str
    name: str
    pc: int
    base: int
    semaphore: int
    args: str


_LOC = re.compile(r"^\s+Location: (0x[0-9a-fA-F]+), Base: (0x[0-9a-fA-F]+), "
                  r"Semaphore: (0x[0-9a-fA-F]+)$")


def readelf_notes(path: str) -> list[Note]:
    """stapsdt notes as GNU readelf prints them, in file order."""
    r = subprocess.run(["readelf", "-n", "--wide", path], capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C"}, errors="surrogateescape")
    assert r.returncode == 0, f"readelf failed on {path}: {r.stderr}"
    out: list[Note] = []
    in_stapsdt = False
    cur: dict[str, object] = {}
    for line in r.stdout.splitlines():
        if line.startswith("Displaying notes found in:"):
            in_stapsdt = line.split(":", 1)[1].strip() == ".note.stapsdt"
            continue
        if not in_stapsdt:
            continue
        if "NT_STAPSDT" in line and "Provider: " in line:
            cur = {"provider": line.split("Provider: ", 1)[1]}
        elif line.startswith("    Name: ") and "provider" in cur:
            cur["name"] = line[len("    Name: "):]
        elif (m := _LOC.match(line)) and "name" in cur:
            cur["pc"], cur["base"], cur["semaphore"] = (int(g, 16) for g in m.groups())
        elif line.startswith("    Arguments:") and "pc" in cur:
            # readelf prints "    Arguments: %s"; the string itself may be empty
            cur["args"] = line[len("    Arguments: "):]
            out.append(Note(**cur))  # type: ignore[arg-type]
            cur = {}
    return out


def has_stapsdt(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(18)
        # an executable or shared object (ET_EXEC/ET_DYN, little-endian): what
        # apptrace reads; relocatable .o files are not traceable
        if head[:4] != b"\x7fELF" or head[16:18] not in (b"\x02\x00", b"\x03\x00"):
            return False
    except OSError:
        return False
    r = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C"})
    return r.returncode == 0 and ".note.stapsdt" in r.stdout


def dedup(notes: list[Note]) -> list[Note]:
    """readelf's list with apptrace's rule: first note per (provider, name, pc)."""
    seen: set[tuple[str, str, int]] = set()
    out = []
    for n in notes:
        key = (n.provider, n.name, n.pc)
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out


def apptrace_notes(path: str) -> list[Note]:
    return [Note(s.provider, s.name, s.pc, s.base, s.semaphore, s.args_spec)
            for s in ElfImage(path).sites()]


def compare(path: str) -> int:
    """Assert parity for one file; returns the number of notes compared."""
    theirs = readelf_notes(path)
    assert theirs, f"readelf shows no stapsdt notes in {path}"
    ours = apptrace_notes(path)
    expected = dedup(theirs)
    # every tuple apptrace reports is one readelf reports, and nothing is lost
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))[:5]
    missing = set(expected) - set(ours)
    assert not missing, f"{len(missing)} notes missing, e.g. {sorted(missing)[:5]}"
    # counts after dedup, and the same order (file order) as readelf
    assert len(ours) == len(expected), (len(ours), len(expected), len(theirs))
    assert ours == expected
    return len(ours)


# --- the C fixtures -------------------------------------------------------------------

def _fixture_candidates() -> list[str]:
    if not FIXTURE_OUT.is_dir():
        return []
    return sorted(p.name for p in FIXTURE_OUT.iterdir()
                  if p.is_file() and has_stapsdt(str(p)))


FIXTURES_AT_COLLECTION = _fixture_candidates()


@pytest.mark.parametrize("name", FIXTURES_AT_COLLECTION)
def test_fixture_parity(fixtures_dir: Path, name: str) -> None:
    path = fixtures_dir / name
    assert path.exists(), f"{name} vanished after `make`"
    compare(str(path))


def test_all_fixtures_with_notes(fixtures_dir: Path) -> None:
    """After building, every fixture with notes is compared (also those that did
    not exist yet when the tests were collected), and there must be some."""
    found = sorted(p.name for p in fixtures_dir.iterdir()
                   if p.is_file() and has_stapsdt(str(p)))
    assert found, f"no ELF file with .note.stapsdt in {fixtures_dir}"
    for name in set(found) - set(FIXTURES_AT_COLLECTION):
        compare(str(fixtures_dir / name))
    # the fixtures exercise semaphores and multi-site probes; make sure the
    # comparison saw at least one of each when those fixtures exist
    notes = [n for name in found for n in readelf_notes(str(fixtures_dir / name))]
    if "usdt_sema_pie" in found:
        assert any(n.semaphore for n in notes)


# --- system binaries ------------------------------------------------------------------------

def _libstdcxx() -> Optional[str]:
    try:
        from apptrace.procs import resolve_binary

        return resolve_binary("libstdc++.so.6")
    except Exception:  # noqa: BLE001 - absent is reported by the test itself
        return None


def _system_targets() -> list[tuple[str, Optional[str], bool]]:
    """(id, path or None, required in CI)."""
    out: list[tuple[str, Optional[str], bool]] = []
    jvms = sorted(glob.glob("/usr/lib/jvm/*/lib/server/libjvm.so"))
    if jvms:
        for p in jvms:
            out.append((f"libjvm[{p.split('/')[4]}]", p, True))
    else:
        out.append(("libjvm[no JDK]", None, True))
    out.append(("python3.11", "/usr/bin/python3.11"
                if os.path.exists("/usr/bin/python3.11") else None, True))
    out.append(("libstdc++.so.6", _libstdcxx(), True))
    pgs = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if pgs:
        for p in pgs:
            out.append((f"postgres[{p.split('/')[4]}]", p, True))
    else:
        out.append(("postgres[absent]", None, True))
    return out


SYSTEM = _system_targets()


@pytest.mark.parametrize("path, required", [(p, r) for _, p, r in SYSTEM],
                         ids=[i for i, _, _ in SYSTEM])
def test_system_binary_parity(path: Optional[str], required: bool) -> None:
    if path is None or not os.path.exists(path):
        if required and CI:
            pytest.fail("required system binary is missing in CI")
        pytest.skip("not installed here")
    if not has_stapsdt(path):
        if required and CI:
            pytest.fail(f"{path} has no .note.stapsdt (built without USDT support?)")
        pytest.skip(f"{path} has no .note.stapsdt")
    n = compare(path)
    assert n > 0


# --- the comparison itself is sensitive -----------------------------------------------------

def test_readelf_parser_reads_what_apptrace_must_match(tmp_path: Path) -> None:
    """Guard against a parser that silently reads nothing: a synthetic file with
    known notes, including an empty argument string and a duplicate."""
    from elfwriter import DATA, TEXT, build_elf, stapsdt_note

    pc = TEXT.vaddr + 0x20
    notes = (stapsdt_note(pc, DATA.vaddr, DATA.vaddr + 8, "prov", "a", "-4@%edi 8@$1")
             + stapsdt_note(pc + 4, DATA.vaddr, 0, "prov", "b", "")
             + stapsdt_note(pc + 4, DATA.vaddr, 0, "prov", "b", ""))
    path = tmp_path / "synthetic.so"
    path.write_bytes(build_elf(notes=notes, base_addr=DATA.vaddr))
    theirs = readelf_notes(str(path))
    assert theirs == [
        Note("prov", "a", pc, DATA.vaddr, DATA.vaddr + 8, "-4@%edi 8@$1"),
        Note("prov", "b", pc + 4, DATA.vaddr, 0, ""),
        Note("prov", "b", pc + 4, DATA.vaddr, 0, ""),
    ]
    assert compare(str(path)) == 2
