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
    assert len(files) == 1
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert oct(files[0].parent.stat().st_mode & 0o777) == "0o700"
    second, s2 = _trace(fixtures_dir, spawn)
    assert len(first) == 120 and first == second
    assert s2.attach_seconds < s1.attach_seconds


def test_untrusted_or_broken_cache_files_are_ignored(  # type: ignore[no-untyped-def]
        fixtures_dir, spawn, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _trace(fixtures_dir, spawn)
    (path,) = list((tmp_path / "apptrace" / "bpf").glob("*.json"))
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
