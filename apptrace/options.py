"""The ranges apptrace accepts for its options, checked in one place.

The CLI checks each option under its flag name (``--str-max``), the library
under its parameter name (``str_max``); both raise :class:`OptionError`
with the range in the message, so a bad value fails at once instead of
running forever (``-d nan``), being replaced silently (``--str-max 0``) or
failing later with a misleading cause (a ring too small for one event).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from apptrace.errors import OptionError

__all__ = ["STR_MAX", "RING_KB", "STACK_DEPTH", "MIN_EVENTS_PER_RING", "check_int",
           "check_seconds", "check_event_fits"]

STR_MAX = (1, 65536)           # bytes copied per string argument
RING_KB = (4, 1024 * 1024)     # one ring buffer: a page .. 1 GiB (rounded up to 2^n pages)
STACK_DEPTH = (1, 127)         # frames; the kernel's perf_event_max_stack default
BATCH_MS = (0.0, 10_000.0)
MIN_EVENTS_PER_RING = 8        # fewer and a ring loses events whenever the reader blinks


def check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    """An integer in [lo, hi]; booleans and floats with a fraction are refused."""
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
    if isinstance(value, bool):
        raise OptionError(name, value, expected)
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(name, value, expected) from None
    if n != value and not (isinstance(value, str) and str(n) == value.strip()):
        raise OptionError(name, value, expected)
    if n < lo or (hi is not None and n > hi):
        raise OptionError(name, value, expected)
    return n


def check_seconds(name: str, value: Any, *, allow_zero: bool = False,
                  hi: Optional[float] = None, unit: str = "seconds") -> float:
    """A finite number of seconds (or ``unit``), > 0 (or >= 0)."""
    lo_text = ">= 0" if allow_zero else "> 0"
    expected = f"a finite number of {unit} {lo_text}" + (f" and <= {hi:g}" if hi else "")
    if isinstance(value, bool):
        raise OptionError(name, value, expected)
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(name, value, expected) from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) or (hi and v > hi):
        raise OptionError(name, value, expected)
    return v


def check_event_fits(event_bytes: int, ring_bytes: int) -> None:
    """A ring must hold several events, or every event (or most) is lost."""
    if event_bytes * MIN_EVENTS_PER_RING <= ring_bytes:
        return
    raise OptionError(
        "event size", event_bytes,
        f"at most {ring_bytes // MIN_EVENTS_PER_RING} bytes, 1/{MIN_EVENTS_PER_RING} of the"
        f" {ring_bytes // 1024} KiB ring buffer: lower the string size (--str-max,"
        " str_max; string slots are the bulk of an event) or raise the ring size"
        " (--ring-mb, ringbuf_kb)")
