"""The expression language: parsing, errors at the right column, C that means
what the text says (checked by evaluating the C with a C compiler)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from apptrace.errors import ExpressionError
from apptrace.expr import Env, compile_c, names_used, parse

ENV = Env(ints={"arg0": ("a0", True), "arg2": ("a2", False), "pid": ("pid", False)},
          strs={"comm": ("comm", 16), "arg1": ("s1", 64)},
          missing={"arg3": "arg3: this probe has 3 arguments"})


@pytest.mark.parametrize("text,col,words", [
    ("arg2 >", 7, "ends too early"),
    ("arg9 + 1", 1, "unknown name 'arg9'"),
    ("arg3", 1, "this probe has 3 arguments"),
    ("comm + 1", 1, "is a string"),
    ("1 < 2 < 3", 7, "do not chain"),
    ("foo(1)", 1, "unknown function"),
    ('"x"', 1, "only compared"),
    ("arg2 @ 1", 6, "unexpected character"),
    ("(arg2", 6, "expected ')'"),
    ("", 1, "empty"),
    ("0x1ffffffffffffffff", 1, "64 bits"),
    ('comm == "' + "x" * 16 + '"', 1, "at most 15 bytes"),
    ('prefix(arg2, "a")', 1, "prefix takes a string name"),
    ('arg2 == "a"', 6, "compare a string name"),
])
def test_errors_name_the_column(text: str, col: int, words: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_c(text, ENV)
    assert info.value.column == col, str(info.value)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_names_used() -> None:
    assert names_used(parse('arg2 > 1 && prefix(arg1, "x") || pid == 3')) == {
        "arg2", "arg1", "pid"}


def test_no_user_text_in_c() -> None:
    c = compile_c('comm == "*/ #define x" && arg2 > 1', ENV)
    assert "*/" not in c and "define" not in c and '"' not in c


CASES = [
    # (expression, a0, a2, pid, comm, s1) -> expected truth / value
    ("arg2 > 4096 && comm == \"java\"", (0, 5000, 1, "java", ""), 1),
    ("arg2 > 4096 && comm == \"java\"", (0, 5000, 1, "javac", ""), 0),
    ("arg2 > 4096 && comm == \"java\"", (0, 4096, 1, "java", ""), 0),
    ("arg0 < 0", (-5, 0, 0, "", ""), 1),          # signed argument
    ("arg2 < 0", (0, 2**64 - 1, 0, "", ""), 0),   # unsigned argument
    ("-arg0 == 5", (-5, 0, 0, "", ""), 1),
    ("arg2 / 0 == 0 && arg2 % 0 == 0", (0, 7, 0, "", ""), 1),
    # signed division as C does it (no signed divide instruction in older BPF)
    ("arg0 / 2 == -3 && arg0 % 2 == -1", (-7, 0, 0, "", ""), 1),
    ("arg0 / -2 == 3 && arg0 % -2 == -1 && 7 / arg0 == -1", (-7, 0, 0, "", ""), 1),
    ("arg0 % 7", (-15, 0, 0, "", ""), 2**64 - 1),
    ("arg0 / 0 == 0 && arg0 % 0 == 0", (-7, 0, 0, "", ""), 1),
    ("(arg2 + 1) * 3 - 4 == 20", (0, 7, 0, "", ""), 1),
    ("arg2 >> 1 == 3 && 1 << 4 == 16", (0, 7, 0, "", ""), 1),
    ("!(pid == 3) || comm != \"x\"", (0, 0, 3, "x", ""), 0),
    ('prefix(arg1, "java/")', (0, 0, 0, "", "java/lang"), 1),
    ('prefix(arg1, "java/")', (0, 0, 0, "", "jav"), 0),
    ("arg2 & 0xff ^ 1 | 2", (0, 0x1234, 0, "", ""), (0x34 ^ 1) | 2),
]


def test_c_means_what_the_text_says(tmp_path: Path) -> None:
    """Each case compiled as C with gcc (u64/s64 as in BPF) and run."""
    body = []
    for i, (text, (a0, a2, pid, comm, s1), _want) in enumerate(CASES):
        c = compile_c(text, ENV)
        body.append(f"{{ s64 a0 = {a0}LL; u64 a2 = {a2}ULL; u64 pid = {pid};"
                    f" char comm[16] = \"{comm}\"; char s1[64] = \"{s1}\";"
                    f" (void)a0; (void)a2; (void)pid; (void)comm; (void)s1;"
                    f" printf(\"%d %llu\\n\", {i}, (unsigned long long)({c})); }}")
    src = tmp_path / "t.c"
    src.write_text("#include <stdio.h>\n#include <stdint.h>\ntypedef uint64_t u64;"
                   " typedef int64_t s64; typedef uint8_t u8;\nint main(void) {\n"
                   + "\n".join(body) + "\nreturn 0; }\n")
    exe = tmp_path / "t"
    subprocess.run(["gcc", "-w", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    got = {int(a): int(b) for a, b in (ln.split() for ln in out.splitlines())}
    assert got == {i: int(w) for i, (_, _, w) in enumerate(CASES)}
