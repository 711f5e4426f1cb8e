"""Every command's --help prints and exits 0 (argparse formats help lazily:
a stray % in a help string is a traceback only when someone asks for help)."""

from __future__ import annotations

import pytest

from apptrace.cli import REGISTRY, main


@pytest.mark.parametrize("words", [w for w, _m, _c in REGISTRY])
def test_help_of_every_command(words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*words.split(), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and words.split()[-1] in out


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words, _m, _c in REGISTRY:
        assert words.split()[0] in out
