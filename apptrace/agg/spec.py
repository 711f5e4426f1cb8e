"""What to aggregate: keys, values and histograms, checked before anything runs.

Keys: ``argN`` (as the probe string types it: an integer, or a string cut
at a bound), ``pid``, ``tid``, ``comm``, ``cpu``, ``probe`` (which probe of
the probe string fired) and ``ustack`` (the user stack). Values are
expressions of :mod:`apptrace.expr` (64-bit signed integers in the kernel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from apptrace.errors import ExpressionError, OptionError
from apptrace.expr import parse

__all__ = ["KEY_NAMES", "HistSpec", "parse_keys", "parse_hist", "MAX_KEYS", "KEY_STR_MAX",
           "MAX_LINEAR_BUCKETS", "STATS"]

KEY_NAMES = ("pid", "tid", "comm", "cpu", "probe", "ustack")
STATS = ("sum", "min", "max", "avg")
MAX_KEYS = (1, 1 << 20)          # distinct keys one map holds
KEY_STR_MAX = (1, 128)           # bytes of a string kept in a key
MAX_LINEAR_BUCKETS = 1000
_ARG = re.compile(r"arg(\d+)")


def parse_keys(keys: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """``"arg0,comm"`` or ``["arg0", "comm"]`` → names, each checked once."""
    if keys is None:
        return ()
    items = keys.replace(" ", ",").split(",") if isinstance(keys, str) else list(keys)
    out: list[str] = []
    for raw in items:
        k = raw.strip()
        if not k:
            continue
        m = _ARG.fullmatch(k)
        if k not in KEY_NAMES and not (m and int(m.group(1)) < 12):
            raise OptionError("key", k, "arg0..arg11, " + ", ".join(KEY_NAMES))
        if k in out:
            raise OptionError("key", k, "each key once")
        out.append(k)
    return tuple(out)


@dataclass(frozen=True)
class HistSpec:
    """A histogram of an expression: log2 buckets, or linear ``lo..hi`` by ``step``."""

    expr: str
    linear: Optional[tuple[int, int, int]] = None

    @property
    def nbuckets(self) -> int:
        if self.linear is None:
            return 65
        lo, hi, step = self.linear
        return -(-(hi - lo) // step) + 2

    def text(self) -> str:
        if self.linear is None:
            return self.expr
        return f"{self.expr}:{self.linear[0]}:{self.linear[1]}:{self.linear[2]}"


def parse_hist(text: str) -> HistSpec:
    """``EXPR`` (log2) or ``EXPR:MIN:MAX:STEP`` (linear); the expression is
    checked for syntax here (names are checked against each probe later)."""
    parts = text.split(":")
    if len(parts) not in (1, 4):
        raise OptionError("hist", text, "EXPR (log2 buckets) or EXPR:MIN:MAX:STEP (linear)")
    parse(parts[0])  # a syntax error names its column now
    if len(parts) == 1:
        return HistSpec(parts[0])
    try:
        lo, hi, step = (int(p, 0) for p in parts[1:])
    except ValueError:
        raise OptionError("hist", text, "integers MIN:MAX:STEP after the expression") from None
    if hi <= lo or step <= 0:
        raise OptionError("hist", text, "MIN < MAX and STEP > 0")
    if not -(1 << 62) < lo < hi < 1 << 62:
        raise OptionError("hist", text, "MIN and MAX within +-2^62")
    spec = HistSpec(parts[0], (lo, hi, step))
    if spec.nbuckets - 2 > MAX_LINEAR_BUCKETS:
        raise OptionError("hist", text, f"at most {MAX_LINEAR_BUCKETS} buckets between MIN"
                          " and MAX: raise STEP")
    return spec


def check_expr(name: str, text: Optional[str]) -> Optional[str]:
    """Syntax-check an expression option now (its column in the error)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise OptionError(name, text, "an expression (a string)")
    try:
        parse(text)
    except ExpressionError as err:
        raise ExpressionError(err.text, err.column, f"{name}: {err.reason}") from None
    return text
