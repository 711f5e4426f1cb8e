"""apptrace: trace running programs with eBPF — USDT probes, uprobes, user stacks.

The public API is flat: everything a user needs is importable from here.
Names load on first use (PEP 562), so ``apptrace usdt list`` does not pay for
the tracing engine's imports.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "apptrace.errors": ["ApptraceError", "AttachError", "BccUnavailableError",
                        "BinaryNotFoundError", "BpfError", "CommandNotFoundError", "ElfError",
                        "ElfNotFoundError", "ExpressionError", "GcLogError",
                        "JvmProbesMissingError", "KernelThreadError", "NoProbesError",
                        "NoTlsLibraryError", "NotAJvmError", "OptionError", "OutputError",
                        "ProbeNotFoundError", "ProbeSpecError",
                        "ProcessGoneError", "ProcessNotFoundError", "SemaphoreConflictError",
                        "SemaphoreError", "SessionStateError", "SpawnError",
                        "StrippedTlsError", "SymbolizerError", "TracePermissionError",
                        "TraceAssertionError", "RunTimeoutError", "RunFileError"],
    "apptrace.events": ["Event", "ProbeInfo", "Stats", "Unavailable"],
    "apptrace.probes": ["ProbeSpec", "parse_probe"],
    "apptrace.session": ["ProbeHandle", "Session"],
    "apptrace.agg": ["Aggregator", "Latency", "AggregateResult", "LatencyResult"],
    "apptrace.usdt": ["Argument", "Probe", "Site", "list_probes", "read_probes"],
    "apptrace.symbolize": ["StackFrame", "Symbolizer"],
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


# The probe families and helpers, reachable as attributes (``apptrace.ssl``).
_SUBPACKAGES = ("ssl", "jvm", "testing", "engine", "usdt", "expr")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"apptrace.{name}")
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module 'apptrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    # "from M import X as X" marks a re-export for type checkers (mypy --strict).
    from apptrace.agg import AggregateResult as AggregateResult
    from apptrace.agg import Aggregator as Aggregator
    from apptrace.agg import Latency as Latency
    from apptrace.agg import LatencyResult as LatencyResult
    from apptrace.errors import ApptraceError as ApptraceError
    from apptrace.errors import AttachError as AttachError
    from apptrace.errors import BccUnavailableError as BccUnavailableError
    from apptrace.errors import BinaryNotFoundError as BinaryNotFoundError
    from apptrace.errors import BpfError as BpfError
    from apptrace.errors import CommandNotFoundError as CommandNotFoundError
    from apptrace.errors import ElfError as ElfError
    from apptrace.errors import ElfNotFoundError as ElfNotFoundError
    from apptrace.errors import ExpressionError as ExpressionError
    from apptrace.errors import GcLogError as GcLogError
    from apptrace.errors import JvmProbesMissingError as JvmProbesMissingError
    from apptrace.errors import KernelThreadError as KernelThreadError
    from apptrace.errors import NoProbesError as NoProbesError
    from apptrace.errors import NotAJvmError as NotAJvmError
    from apptrace.errors import NoTlsLibraryError as NoTlsLibraryError
    from apptrace.errors import OptionError as OptionError
    from apptrace.errors import OutputError as OutputError
    from apptrace.errors import ProbeNotFoundError as ProbeNotFoundError
    from apptrace.errors import ProbeSpecError as ProbeSpecError
    from apptrace.errors import ProcessGoneError as ProcessGoneError
    from apptrace.errors import ProcessNotFoundError as ProcessNotFoundError
    from apptrace.errors import RunFileError as RunFileError
    from apptrace.errors import RunTimeoutError as RunTimeoutError
    from apptrace.errors import SemaphoreConflictError as SemaphoreConflictError
    from apptrace.errors import SemaphoreError as SemaphoreError
    from apptrace.errors import SessionStateError as SessionStateError
    from apptrace.errors import SpawnError as SpawnError
    from apptrace.errors import StrippedTlsError as StrippedTlsError
    from apptrace.errors import SymbolizerError as SymbolizerError
    from apptrace.errors import TraceAssertionError as TraceAssertionError
    from apptrace.errors import TracePermissionError as TracePermissionError
    from apptrace.events import Event as Event
    from apptrace.events import ProbeInfo as ProbeInfo
    from apptrace.events import Stats as Stats
    from apptrace.events import Unavailable as Unavailable
    from apptrace.probes import ProbeSpec as ProbeSpec
    from apptrace.probes import parse_probe as parse_probe
    from apptrace.session import ProbeHandle as ProbeHandle
    from apptrace.session import Session as Session
    from apptrace.symbolize import StackFrame as StackFrame
    from apptrace.symbolize import Symbolizer as Symbolizer
    from apptrace.usdt import Argument as Argument
    from apptrace.usdt import Probe as Probe
    from apptrace.usdt import Site as Site
    from apptrace.usdt import list_probes as list_probes
    from apptrace.usdt import read_probes as read_probes
