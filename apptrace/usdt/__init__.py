"""USDT discovery: probes, sites and argument specs read from ELF notes."""

from __future__ import annotations

from apptrace.errors import ElfError, NoProbesError
from apptrace.procs import ProcessRef, mapped_objects, resolve_binary
from apptrace.usdt.args import Argument, parse_argument, parse_arguments
from apptrace.usdt.notes import ElfImage, Probe, Site, read_probes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Iterable, Optional

__all__ = [
    "Argument",
    "ElfImage",
    "Probe",
    "Site",
    "list_probes",
    "parse_argument",
    "parse_arguments",
    "read_probes",
]


def list_probes(targets: Iterable[str] = (), *, pid: Optional[int] = None) -> list[Probe]:
    """Probes of each target (path or library name), or of every object PID maps.

    With ``pid`` and no targets, objects without USDT notes are skipped
    quietly; a named target without notes raises :class:`NoProbesError`.
    """
    out: list[Probe] = []
    targets = list(targets)
    if pid is not None:
        ProcessRef.from_pid(pid)
    if targets:
        for t in targets:
            path = resolve_binary(t, pid)
            out.extend(read_probes(path, display=path if pid is None else _shown(path, pid)))
        return out
    if pid is None:
        return out
    for shown, real in mapped_objects(pid):
        try:
            out.extend(read_probes(real, display=shown))
        except (NoProbesError, ElfError):
            continue
    return out


def _shown(path: str, pid: int) -> str:
    prefix = f"/proc/{pid}/root"
    return path[len(prefix):] if path.startswith(prefix) else path
