"""apptrace: trace running programs with eBPF — USDT probes, uprobes, user stacks.

The public API is flat: everything a user needs is importable from here.
Names load on first use (PEP 562), so ``apptrace usdt list`` does not pay for
the tracing engine's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "apptrace.errors": ["ApptraceError", "AttachError", "BccUnavailableError",
                        "BinaryNotFoundError", "BpfError", "CommandNotFoundError", "ElfError",
                        "ElfNotFoundError", "KernelThreadError", "NoProbesError",
                        "OptionError", "OutputError", "ProbeNotFoundError", "ProbeSpecError",
                        "ProcessGoneError", "ProcessNotFoundError", "SemaphoreConflictError",
                        "SemaphoreError", "SessionStateError", "SpawnError",
                        "SymbolizerError", "TracePermissionError"],
    "apptrace.events": ["Event", "ProbeInfo", "Stats", "Unavailable"],
    "apptrace.probes": ["ProbeSpec", "parse_probe"],
    "apptrace.session": ["ProbeHandle", "Session"],
    "apptrace.usdt": ["Argument", "Probe", "Site", "list_probes", "read_probes"],
    "apptrace.symbolize": ["StackFrame", "Symbolizer"],
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module 'apptrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
    from apptrace.errors import (
        ApptraceError,
        AttachError,
        BccUnavailableError,
        BinaryNotFoundError,
        BpfError,
        CommandNotFoundError,
        ElfError,
        ElfNotFoundError,
        KernelThreadError,
        NoProbesError,
        OptionError,
        OutputError,
        ProbeNotFoundError,
        ProbeSpecError,
        ProcessGoneError,
        ProcessNotFoundError,
        SemaphoreConflictError,
        SemaphoreError,
        SessionStateError,
        SpawnError,
        SymbolizerError,
        TracePermissionError,
    )
    from apptrace.events import Event, ProbeInfo, Stats, Unavailable
    from apptrace.probes import ProbeSpec, parse_probe
    from apptrace.session import ProbeHandle, Session
    from apptrace.symbolize import StackFrame, Symbolizer
    from apptrace.usdt import Argument, Probe, Site, list_probes, read_probes
