"""Immutable records for the start-up path, without importing dataclasses.

``apptrace usdt list`` should finish before ``bpftrace -l`` does, and
importing :mod:`dataclasses` (which imports :mod:`inspect`) alone costs a
fifth of that. :func:`record` makes the same kind of frozen value class
from the annotated fields, on :func:`collections.namedtuple`; type checkers
see it as a frozen dataclass.
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import TypeVar

    from typing_extensions import dataclass_transform

    T = TypeVar("T")

    @dataclass_transform(frozen_default=True)
    def record(cls: type[T]) -> type[T]: ...
else:
    def record(cls):
        """``cls``'s annotated fields (in order, defaults from class attributes)
        as an immutable named tuple, with ``cls``'s methods and docstring."""
        names = list(cls.__dict__.get("__annotations__", {}))
        defaults = [cls.__dict__[n] for n in names if n in cls.__dict__]
        base = collections.namedtuple(cls.__name__, names, defaults=defaults)
        ns = {k: v for k, v in cls.__dict__.items()
              if k not in names and k not in ("__dict__", "__weakref__", "__annotations__")}
        ns["__slots__"] = ()
        ns["replace"] = base._replace  # like dataclasses.replace(obj, **changes)
        return type(cls.__name__, (base,), ns)

__all__ = ["record"]
