"""apptrace.probes.parse_probe: every probe string form, and the errors (no root needed)."""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apptrace.errors import ApptraceError, ProbeSpecError
from apptrace.probes import TYPE_NAMES, ArgType, ProbeSpec, parse_probe, parse_types

# --- usdt -------------------------------------------------------------------


def test_usdt_without_binary() -> None:
    s = parse_probe("usdt:apptrace_fx:loop")
    assert s == ProbeSpec("usdt:apptrace_fx:loop", "usdt", None, "apptrace_fx", "loop", (),
                          False)
    assert s.offset is None


def test_usdt_with_binary_path_and_library_name() -> None:
    s = parse_probe("usdt:/usr/bin/python3.11:python:function__entry")
    assert (s.kind, s.binary, s.provider, s.name) == (
        "usdt", "/usr/bin/python3.11", "python", "function__entry")
    s = parse_probe("usdt:libjvm.so:hotspot:gc__begin")
    assert (s.binary, s.provider, s.name) == ("libjvm.so", "hotspot", "gc__begin")


def test_usdt_binary_may_contain_colons() -> None:
    s = parse_probe("usdt:/opt/a:b/bin:prov:name")
    assert (s.binary, s.provider, s.name) == ("/opt/a:b/bin", "prov", "name")


def test_usdt_with_types() -> None:
    s = parse_probe("usdt:apptrace_fx:strs(str,str)")
    assert s.name == "strs"
    assert s.types == (TYPE_NAMES["str"], TYPE_NAMES["str"])
    s = parse_probe("usdt:/bin/x:p:n(str, -, int, u64, double)")
    assert s.binary == "/bin/x" and s.name == "n"
    assert [t.name if t else None for t in s.types] == ["str", None, "int", "u64", "double"]
    assert parse_probe("usdt:p:n()").types == ()


def test_usdt_globs() -> None:
    s = parse_probe("usdt:apptrace_fx:*")
    assert (s.provider, s.name) == ("apptrace_fx", "*")
    s = parse_probe("usdt:/bin/x:apptrace_*:sema_p?ng")
    assert (s.binary, s.provider, s.name) == ("/bin/x", "apptrace_*", "sema_p?ng")
    s = parse_probe("usdt:*:[gl]oop")
    assert (s.provider, s.name) == ("*", "[gl]oop")


def test_surrounding_whitespace_and_stack_flag() -> None:
    s = parse_probe("  usdt:p:n(int)\n", stack=True)
    assert s.text == "usdt:p:n(int)"
    assert s.stack is True
    assert parse_probe("usdt:p:n").stack is False


# --- uprobe / uretprobe -------------------------------------------------------


def test_uprobe_symbol() -> None:
    s = parse_probe("uprobe:/work/bin/app:fx_add(long,int,short,char)")
    assert (s.kind, s.binary, s.provider, s.name) == ("uprobe", "/work/bin/app", None,
                                                      "fx_add")
    assert [t.name for t in s.types if t] == ["long", "int", "short", "char"]
    assert [(t.size, t.signed) for t in s.types if t] == [(8, True), (4, True), (2, True),
                                                          (1, True)]
    assert s.offset is None


def test_uprobe_library_name_and_glob() -> None:
    s = parse_probe("uprobe:libc:getpid")
    assert (s.binary, s.name, s.types) == ("libc", "getpid", ())
    s = parse_probe("uprobe:/bin/x:fx_*")
    assert (s.binary, s.name, s.offset) == ("/bin/x", "fx_*", None)


@pytest.mark.parametrize("target, offset", [("0x1390", 0x1390), ("0X1a2B", 0x1A2B),
                                            ("4096", 4096)])
def test_uprobe_file_offset(target: str, offset: int) -> None:
    s = parse_probe(f"uprobe:/bin/x:{target}(int)")
    assert s.name == target
    assert s.offset == offset
    assert s.types == (TYPE_NAMES["int"],)


def test_uprobe_symbol_plus_offset_is_not_a_file_offset() -> None:
    s = parse_probe("uprobe:/bin/x:fx_neg+0x10")
    assert s.name == "fx_neg+0x10"
    assert s.offset is None
    assert parse_probe("uprobe:/bin/x:f0x10").offset is None


def test_uretprobe_one_type() -> None:
    s = parse_probe("uretprobe:/bin/x:fx_greet(str)")
    assert (s.kind, s.binary, s.name) == ("uretprobe", "/bin/x", "fx_greet")
    assert s.types == (TYPE_NAMES["str"],)
    assert parse_probe("uretprobe:/bin/x:fx_add").types == ()


def test_uprobe_binary_may_contain_colons() -> None:
    s = parse_probe("uprobe:/opt/a:b/lib.so:sym")
    assert (s.binary, s.name) == ("/opt/a:b/lib.so", "sym")


@pytest.mark.parametrize("alias, kind", [("u", "uprobe"), ("ur", "uretprobe")])
def test_aliases(alias: str, kind: str) -> None:
    s = parse_probe(f"{alias}:/bin/x:main(int)")
    assert s.kind == kind
    assert (s.binary, s.name) == ("/bin/x", "main")
    assert s.text == f"{alias}:/bin/x:main(int)"  # the user's text is kept for labels


# --- types --------------------------------------------------------------------


@pytest.mark.parametrize("name, kind, size, signed", [
    ("u8", "int", 1, False), ("s8", "int", 1, True), ("i16", "int", 2, True),
    ("u16", "int", 2, False), ("u32", "int", 4, False), ("s32", "int", 4, True),
    ("u64", "int", 8, False), ("s64", "int", 8, True), ("char", "int", 1, True),
    ("uchar", "int", 1, False), ("short", "int", 2, True), ("ushort", "int", 2, False),
    ("int", "int", 4, True), ("uint", "int", 4, False), ("unsigned", "int", 4, False),
    ("long", "int", 8, True), ("ulong", "int", 8, False), ("size_t", "int", 8, False),
    ("ssize_t", "int", 8, True), ("bool", "int", 1, False), ("uint32_t", "int", 4, False),
    ("int64_t", "int", 8, True), ("float", "float", 4, False),
    ("double", "float", 8, False),
])
def test_type_names(name: str, kind: str, size: int, signed: bool) -> None:
    [t] = parse_types(name)
    assert isinstance(t, ArgType)
    assert (t.kind, t.size, t.signed) == (kind, size, signed)


@pytest.mark.parametrize("name", ["str", "string", "char*", "char *"])
def test_string_type_names(name: str) -> None:
    assert parse_types(name) == (ArgType("str", "str"),)


@pytest.mark.parametrize("name", ["ptr", "pointer", "hex", "void*", "void *"])
def test_pointer_type_names(name: str) -> None:
    [t] = parse_types(name)
    assert t is not None and (t.kind, t.size, t.signed, t.hex) == ("int", 8, False, True)


def test_placeholders_keep_the_default() -> None:
    assert parse_types("-, _, auto,") == (None, None, None, None)
    assert parse_types("") == parse_types("   ") == ()


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize("text, reason", [
    ("", "missing the probe kind"),
    ("apptrace_fx", "missing the probe kind"),
    ("kprobe:do_sys_open", "unknown probe kind 'kprobe'"),
    ("USDT:p:n", "unknown probe kind 'USDT'"),
    ("usdt:onlyname", "expected usdt:[BINARY:]PROVIDER:NAME"),
    ("usdt::name", "empty provider or probe name"),
    ("usdt:prov:", "empty provider or probe name"),
    ("uprobe:/bin/x", "expected uprobe:BINARY:SYMBOL"),
    ("uprobe:/bin/x:", "expected uprobe:BINARY:SYMBOL"),
    ("uprobe::sym", "expected uprobe:BINARY:SYMBOL"),
    ("uretprobe:sym", "expected uretprobe:BINARY:SYMBOL"),
    ("ur:/bin/x:f(long,int)", "a uretprobe takes one type"),
    ("usdt:p:n(strr)", "unknown type 'strr'"),
    ("uprobe:/bin/x:f(int,float128)", "unknown type 'float128'"),
])
def test_bad_specs(text: str, reason: str) -> None:
    with pytest.raises(ProbeSpecError) as ei:
        parse_probe(text)
    err = ei.value
    assert reason in err.reason
    assert err.spec == text.strip()
    assert repr(text.strip()) in str(err)          # the message names the spec
    assert err.hint and "usdt:[BINARY:]PROVIDER:NAME" in err.hint
    assert isinstance(err, ApptraceError) and isinstance(err, ValueError)


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(ProbeSpecError) as ei:
        parse_probe("usdt:p:n(int, wchar)")
    assert "wchar" in ei.value.reason
    for known in ("int", "str", "double", "ptr"):
        assert known in ei.value.reason


# --- round trip -----------------------------------------------------------------

_ident = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)
_glob = st.from_regex(r"[a-z_*?][a-z0-9_*?]{0,10}", fullmatch=True)
_path = st.lists(st.from_regex(r"[A-Za-z0-9_.+-]{1,8}", fullmatch=True), min_size=1,
                 max_size=4).map(lambda parts: "/" + "/".join(parts))
_types = st.lists(st.sampled_from(sorted(k for k in TYPE_NAMES if " " not in k) + ["-"]),
                  max_size=12)


@given(binary=st.none() | _path, provider=_glob, name=_glob, types=_types)
def test_usdt_round_trip(binary: Optional[str], provider: str, name: str,
                         types: list[str]) -> None:
    text = "usdt:" + (f"{binary}:" if binary else "") + f"{provider}:{name}"
    if types:
        text += "(" + ",".join(types) + ")"
    s = parse_probe(text)
    assert (s.kind, s.binary, s.provider, s.name) == ("usdt", binary, provider, name)
    assert s.types == tuple(None if t == "-" else TYPE_NAMES[t] for t in types)
    assert s.text == text


@given(kind=st.sampled_from(["uprobe", "u", "uretprobe", "ur"]), binary=_path,
       symbol=_glob, offset=st.none() | st.integers(0, 2**40))
def test_uprobe_round_trip(kind: str, binary: str, symbol: str,
                           offset: Optional[int]) -> None:
    target = symbol if offset is None else hex(offset)
    s = parse_probe(f"{kind}:{binary}:{target}")
    assert s.kind == {"u": "uprobe", "ur": "uretprobe"}.get(kind, kind)
    assert (s.binary, s.name, s.provider) == (binary, target, None)
    if offset is not None:
        assert s.offset == offset
    elif not symbol.isdigit():
        assert s.offset is None
