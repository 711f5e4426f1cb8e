"""A user's script that uses apptrace passes `mypy --strict`, and mypy sees real types."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import apptrace

USER_SCRIPT = textwrap.dedent('''
    """What a user writes: the flat API, typed."""
    from __future__ import annotations

    import apptrace
    from apptrace import Event, Probe, Session, StackFrame, list_probes


    def on_event(ev: Event) -> None:
        frames: tuple[StackFrame, ...] = ev.stack or ()
        print(ev.probe, ev.args, [f.symbol for f in frames])


    def probes(path: str) -> list[Probe]:
        return list_probes([path])


    def main() -> int:
        try:
            with Session(pid=1) as s:
                s.add("usdt:python:function__entry(str,str,int)")
                s.start()
                for ev in s.events(timeout=0.1):
                    on_event(ev)
        except apptrace.ApptraceError as err:
            print(err)
            return 1
        return 0
''')

# Every public name, imported the way a user would.
ALL_NAMES = f"from apptrace import {', '.join(apptrace.__all__)}\n"

# mypy must know what Session is: an Any would let this through.
WRONG = textwrap.dedent('''
    from apptrace import Session

    s: str = Session(pid=1)
''')


def test_user_script_passes_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    (tmp_path / "all_names.py").write_text(ALL_NAMES)
    (tmp_path / "wrong.py").write_text(WRONG)
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", os.devnull, "user.py", "all_names.py", "wrong.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stdout.splitlines() if ": error:" in ln]
    # Exactly one error, the deliberate one: the rest type-checks strictly.
    assert len(errors) == 1, r.stdout + r.stderr
    assert errors[0].startswith("wrong.py:4: error: Incompatible types in assignment")
    assert '"Session"' in errors[0]


def test_type_checking_imports_match_lazy_names() -> None:
    """The names type checkers see are exactly the names loaded lazily."""
    import ast

    tree = ast.parse(Path(apptrace.__file__).read_text())
    blocks = [n for n in tree.body if isinstance(n, ast.If)
              and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"]
    seen = {}
    for node in (node for block in blocks for node in block.body):
        assert isinstance(node, ast.ImportFrom)
        if node.module == "typing":
            continue
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported (as {alias.name})"
            seen[alias.name] = node.module
    assert seen == apptrace._MODULE_OF
