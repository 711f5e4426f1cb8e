"""The compile cache: a repeated trace loads cached bytecode and decodes the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from apptrace.bpfobj import CompiledObject, cache_get, cache_key, cache_put
from apptrace.session import Session

pytestmark = pytest.mark.bpf


def _trace(fixtures_dir: Path, spawn, **kw):  # type: ignore[no-untyped-def]
    child = spawn([fixtures_dir / "usdt_inline_nopie", 30, "wait"])
    with Session(pid=child.pid, **kw) as s:
        s.add("usdt:apptrace_fx:inl")
        s.start()
        child.send()
        events = [(e.site, e.args) for e in s.events(timeout=20)]
        return events, s


def test_second_session_loads_from_cache_and_decodes_the_same(  # type: ignore[no-untyped-def]
        fixtures_dir, spawn, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first, s1 = _trace(fixtures_dir, spawn)
    files = list((tmp_path / "apptrace" / "bpf").glob("*.json"))
    assert len(files) == 2  # the session's base program and the group's generic one
    assert s1.compiled_programs == 2
    for f in files:
        assert oct(f.stat().st_mode & 0o777) == "0o600"
    assert oct(files[0].parent.stat().st_mode & 0o777) == "0o700"
    second, s2 = _trace(fixtures_dir, spawn)
    assert len(first) == 120 and first == second
    assert s2.compiled_programs == 0
    assert s2.attach_seconds < s1.attach_seconds


def test_a_never_seen_probe_string_needs_no_compiler(  # type: ignore[no-untyped-def]
        fixtures_dir, spawn, tmp_path, monkeypatch):
    """The generic program's C depends only on a group's shape: another probe
    in another binary, with other argument layouts, loads the cached bytecode."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _trace(fixtures_dir, spawn)  # apptrace_fx:inl, one argument
    child = spawn([fixtures_dir / "usdt_shapes_o2_nopie", "probes", 5, "wait"])
    with Session(pid=child.pid) as s:
        s.add("usdt:fx_shapes:one")   # one argument too, another binary and layout
        s.start()
        child.send()
        got = [e.args for e in s.events(timeout=10)]
        assert s.compiled_programs == 0
    assert got == [(i,) for i in range(5)]


def test_untrusted_or_broken_cache_files_are_ignored(  # type: ignore[no-untyped-def]
        fixtures_dir, spawn, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _trace(fixtures_dir, spawn)
    paths = list((tmp_path / "apptrace" / "bpf").glob("*.json"))
    assert len(paths) == 2
    path = max(paths, key=lambda p: p.stat().st_size)  # the group's program is the larger
    key = path.stem
    assert cache_get(key) is not None
    os.chmod(path, 0o666)  # anyone could have written kernel code into it
    assert cache_get(key) is None
    os.chmod(path, 0o600)
    path.write_text("{not json")
    assert cache_get(key) is None
    # ...and the session compiles again instead of failing.
    events, _ = _trace(fixtures_dir, spawn)
    assert len(events) == 120
    assert json.loads(path.read_text())["format"] == 1


def test_no_cache_env_disables_it(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("APPTRACE_NO_CACHE", "1")
    obj = CompiledObject((), {"f": b"\x95" + bytes(7)}, {"f": ()}, "GPL")
    key = cache_key("int f;", "test")
    cache_put(key, obj)
    assert not (tmp_path / "apptrace").exists()
    monkeypatch.delenv("APPTRACE_NO_CACHE")
    cache_put(key, obj)
    assert cache_get(key) == obj
