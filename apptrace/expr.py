"""The filter and aggregation expression language, compiled to BPF C.

``--where 'arg2 > 4096 && comm == "java"'``, ``--hist arg0``, ``--sum
'arg1 * 2'``: small expressions over what a probe hit carries, parsed here in
Python so a mistake is reported at its column, never as a clang error.

Grammar (C precedence, integers are 64-bit)::

    expr    := or
    or      := and ('||' and)*
    and     := cmp ('&&' cmp)*
    cmp     := bits (('=='|'!='|'<'|'<='|'>'|'>=') bits)?
    bits    := shift (('&'|'|'|'^') shift)*
    shift   := sum (('<<'|'>>') sum)*
    sum     := prod (('+'|'-') prod)*
    prod    := unary (('*'|'/'|'%') unary)*
    unary   := ('!'|'-'|'~') unary | atom
    atom    := INT | STRING | NAME | NAME '(' args ')' | '(' expr ')'

Names: ``arg0``..``arg11`` (typed as the probe string says: an integer, or a
string for ``str`` arguments), ``pid``, ``tid``, ``comm`` (a string), ``cpu``.
Strings compare only with ``==``/``!=`` against a literal, or with
``prefix(NAME, "literal")``. Division by zero gives 0, as BPF defines it.

Nothing from the user reaches the C text but numbers and the bytes of string
literals written as numeric character codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from apptrace.errors import ExpressionError

__all__ = ["Expr", "parse", "Env", "compile_c", "names_used", "MAX_LITERAL"]

MAX_LITERAL = 64  # longest string literal: compared byte by byte, unrolled

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<int>0[xX][0-9a-fA-F]+|\d+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>\|\||&&|==|!=|<=|>=|<<|>>|[-+*/%<>!~&|^(),])
""", re.X)

_BINARY_LEVELS: list[tuple[str, ...]] = [
    ("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">="), ("&", "|", "^"), ("<<", ">>"),
    ("+", "-"), ("*", "/", "%"),
]


@dataclass(frozen=True)
class Expr:
    """One node: ``op`` is 'int', 'str', 'name', 'call', a unary or binary operator."""

    op: str
    col: int                       # 1-based column in the source text
    value: Union[int, str, None] = None
    args: tuple["Expr", ...] = ()


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    col: int


def _lex(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(text, pos + 1, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(_Tok(kind, m.group(), pos + 1))
        pos = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _lex(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, text: str) -> _Tok:
        t = self.take()
        if t.text != text:
            raise self.error(t, f"expected {text!r}" + (f", found {t.text!r}" if t.text
                                                       else " at the end"))
        return t

    def error(self, t: _Tok, msg: str) -> ExpressionError:
        return ExpressionError(self.text, t.col, msg)

    def parse(self) -> Expr:
        if self.peek().kind == "end":
            raise self.error(self.peek(), "empty expression")
        e = self.binary(0)
        t = self.peek()
        if t.kind != "end":
            raise self.error(t, f"unexpected {t.text!r}")
        return e

    def binary(self, level: int) -> Expr:
        if level == len(_BINARY_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        ops = _BINARY_LEVELS[level]
        while self.peek().kind == "op" and self.peek().text in ops:
            t = self.take()
            right = self.binary(level + 1)
            left = Expr(t.text, t.col, None, (left, right))
            if level == 2 and self.peek().text in ops:  # a < b < c is not what it looks like
                raise self.error(self.peek(), "comparisons do not chain; use &&")
        return left

    def unary(self) -> Expr:
        t = self.peek()
        if t.kind == "op" and t.text in ("!", "-", "~"):
            self.take()
            return Expr("u" + t.text, t.col, None, (self.unary(),))
        return self.atom()

    def atom(self) -> Expr:
        t = self.take()
        if t.kind == "int":
            v = int(t.text, 0)
            if v >= 1 << 64:
                raise self.error(t, "integer does not fit in 64 bits")
            return Expr("int", t.col, v)
        if t.kind == "str":
            body = t.text[1:-1]
            try:
                value = body.encode("latin-1", "backslashreplace").decode("unicode_escape")
            except UnicodeDecodeError as err:
                raise self.error(t, f"bad escape in string: {err.reason}") from None
            if len(value.encode()) > MAX_LITERAL:
                raise self.error(t, f"string literals are at most {MAX_LITERAL} bytes")
            return Expr("str", t.col, value)
        if t.kind == "name":
            if self.peek().text == "(":
                self.take()
                args: list[Expr] = []
                if self.peek().text != ")":
                    args.append(self.binary(0))
                    while self.peek().text == ",":
                        self.take()
                        args.append(self.binary(0))
                self.expect(")")
                return Expr("call", t.col, t.text, tuple(args))
            return Expr("name", t.col, t.text)
        if t.text == "(":
            e = self.binary(0)
            self.expect(")")
            return e
        raise self.error(t, "expected a number, a name, a string or '('" if t.text
                         else "the expression ends too early")


def parse(text: str) -> Expr:
    """Parse an expression; :class:`ExpressionError` names the column of a mistake."""
    return _Parser(text).parse()


def names_used(e: Expr) -> set[str]:
    """Every name the expression reads (``arg2``, ``comm``...)."""
    out = {str(e.value)} if e.op == "name" else set()
    for a in e.args:
        out |= names_used(a)
    return out


@dataclass(frozen=True)
class Env:
    """What the names mean in C, for one probe string.

    ``ints`` maps an integer name to a C expression and its signedness;
    ``strs`` maps a string name to a C char array expression and its size.
    ``missing`` explains names that exist in general but not here.
    ``lens`` gives, for a counted string (``str[argN]``, ``bytes[N]``: no
    NUL), a C expression of its length; the others end at a NUL.
    """

    ints: dict[str, tuple[str, bool]]
    strs: dict[str, tuple[str, int]]
    missing: dict[str, str]
    lens: dict[str, str] = field(default_factory=dict)


def compile_c(text: str, env: Env) -> str:
    """The expression as one C expression (a u64, or 0/1 for conditions)."""
    tree = parse(text)
    return _Compiler(text, env).integer(tree)


_CMP = {"==", "!=", "<", "<=", ">", ">="}


class _Compiler:
    def __init__(self, text: str, env: Env) -> None:
        self.text = text
        self.env = env

    def error(self, e: Expr, msg: str) -> ExpressionError:
        return ExpressionError(self.text, e.col, msg)

    def is_str(self, e: Expr) -> bool:
        return e.op == "str" or (e.op == "name" and str(e.value) in self.env.strs)

    def signed(self, e: Expr) -> bool:
        if e.op == "name":
            return self.env.ints.get(str(e.value), ("", False))[1]
        if e.op in ("u-",):
            return True
        if e.op in _CMP or e.op in ("&&", "||", "u!", "int", "call"):
            return False
        return any(self.signed(a) for a in e.args)

    def integer(self, e: Expr) -> str:
        """C for an integer-valued node (u64, or s64 where an operand is signed)."""
        op = e.op
        if op == "int":
            return f"{int(e.value or 0)}ULL"
        if op == "str":
            raise self.error(e, "a string is only compared (==, !=) or used in prefix()")
        if op == "name":
            name = str(e.value)
            if name in self.env.ints:
                c, signed = self.env.ints[name]
                return f"((s64)({c}))" if signed else f"((u64)({c}))"
            if name in self.env.strs:
                raise self.error(e, f"{name} is a string: compare it with == \"...\" or"
                                    " prefix()")
            if name in self.env.missing:
                raise self.error(e, self.env.missing[name])
            known = ", ".join(sorted(set(self.env.ints) | set(self.env.strs)))
            raise self.error(e, f"unknown name {name!r} (known here: {known})")
        if op == "call":
            return self.call(e)
        if op in ("u!", "u-", "u~"):
            return f"({op[1]}{self.integer(e.args[0])})"
        a, b = e.args
        if op in ("==", "!=") and (self.is_str(a) or self.is_str(b)):
            return self.string_eq(e, a, b, op == "!=")
        if op in ("&&", "||"):
            return f"({self.integer(a)} {op} {self.integer(b)})"
        left, right = self.integer(a), self.integer(b)
        if op in _CMP:
            if self.signed(a) or self.signed(b):
                return f"((s64){left} {op} (s64){right})"
            return f"((u64){left} {op} (u64){right})"
        if op in ("/", "%"):
            # Division by zero gives 0, as BPF defines it for '/'. Signed
            # operands: BPF before cpu v4 has no signed division (clang gives
            # up on it), so divide the magnitudes and put the sign back, as C
            # does (the quotient truncates toward zero, the remainder takes
            # the dividend's sign).
            if self.signed(a) or self.signed(b):
                x, y = f"((s64){left})", f"((s64){right})"
                ax = f"({x} < 0 ? -(u64){x} : (u64){x})"
                ay = f"({y} < 0 ? -(u64){y} : (u64){y})"
                if op == "/":
                    mag = f"({ax} / {ay})"
                    neg = f"(({x} < 0) != ({y} < 0))"
                else:
                    mag = f"({ax} % {ay})"
                    neg = f"({x} < 0)"
                return f"({y} ? ({neg} ? -(s64){mag} : (s64){mag}) : 0)"
            return f"((u64){right} ? (u64){left} {op} (u64){right} : 0)"
        if op == ">>" and self.signed(a):
            return f"((s64){left} >> ((u64){right} & 63))"
        if op in ("<<", ">>"):
            return f"((u64){left} {op} ((u64){right} & 63))"
        return f"({left} {op} {right})"

    def string_eq(self, e: Expr, a: Expr, b: Expr, negate: bool) -> str:
        if a.op == "str" and b.op != "str":
            a, b = b, a
        if b.op != "str" or a.op != "name" or str(a.value) not in self.env.strs:
            raise self.error(e, "compare a string name with a string literal")
        c = self.string_match(a, str(b.value), exact=True)
        return f"(!{c})" if negate else c

    def call(self, e: Expr) -> str:
        fn = str(e.value)
        if fn == "prefix":
            if len(e.args) != 2 or e.args[1].op != "str" or e.args[0].op != "name" \
                    or str(e.args[0].value) not in self.env.strs:
                raise self.error(e, 'prefix takes a string name and a literal:'
                                    ' prefix(arg1, "java/")')
            return self.string_match(e.args[0], str(e.args[1].value), exact=False)
        raise self.error(e, f"unknown function {fn!r} (known: prefix)")

    def string_match(self, name: Expr, literal: str, *, exact: bool) -> str:
        c, size = self.env.strs[str(name.value)]
        data = literal.encode()
        length = self.env.lens.get(str(name.value))
        if length is not None:  # counted: the length says where it ends, no NUL
            if len(data) > size:
                raise self.error(name, f"{name.value} holds at most {size} bytes")
            terms = [f"(u64)({length}) {'==' if exact else '>='} {len(data)}"]
            terms += [f"(u8){c}[{i}] == {byte}" for i, byte in enumerate(data)]
            return "(" + " && ".join(terms) + ")"
        if len(data) + (1 if exact else 0) > size:
            if exact:
                raise self.error(name, f"{name.value} holds at most {size - 1} bytes; the"
                                       f" literal has {len(data)}")
            raise self.error(name, f"{name.value} holds at most {size} bytes")
        # Byte by byte, with the terminating NUL for equality: unrolled, bounded.
        terms = [f"(u8){c}[{i}] == {byte}" for i, byte in enumerate(data)]
        if exact:
            terms.append(f"(u8){c}[{len(data)}] == 0")
        return "(" + " && ".join(terms or ["1"]) + ")"


