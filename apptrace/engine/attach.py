"""The attach-point layer: probe strings to sites, read from ELF files. No BPF.

``usdt:PROVIDER:NAME`` becomes every site of every matching note, with its
file offset, semaphore and argument reads; ``uprobe:BIN:SYM`` becomes the
symbol's file offset. Binaries come from the probe string or the target
(a PID's mappings through ``/proc/PID/root``, a path, a command's file).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional

from apptrace.codegen import ArgRead
from apptrace.engine.plan import Group, ProbePlan, Site, Slot
from apptrace.engine.target import Target
from apptrace.errors import ElfError, NoProbesError, ProbeNotFoundError, ProbeSpecError
from apptrace.events import ProbeInfo
from apptrace.probes import ArgType, ProbeSpec
from apptrace.procs import resolve_binary
from apptrace.usdt.args import Argument
from apptrace.usdt.companions import companions_of
from apptrace.usdt.notes import ElfImage, Probe, group_sites

__all__ = ["Resolver", "quiet_offset"]

_UPROBE_REGS = ("di", "si", "dx", "cx", "r8", "r9")
_DEFAULT_UPROBE_TYPE = ArgType("ptr", "int", 8, False, hex=True)
_DEFAULT_RET_TYPE = ArgType("long", "int", 8, True)
_XMM_REASON = ("floating-point values travel in xmm registers, which uprobes cannot read"
               " (x86-64 ABI)")


def quiet_offset(img: ElfImage) -> Optional[int]:
    """A file offset where a binary's code runs at most once per process: .fini."""
    sec = img.section(".fini")
    if sec is not None and sec.offset:
        return int(sec.offset)
    return img.vaddr_to_offset(img.entry, executable=True) or None


def _str_read(r: ArgRead, t: Optional[ArgType], nargs: int, spec: ProbeSpec) -> ArgRead:
    """Add a string slot's shape (length argument, fixed size) to an argument read."""
    if r.str_slot < 0 or t is None:
        return r
    if t.kind == "bytes":
        return ArgRead(r.usdt, r.reg, r.str_slot, str_bytes=t.size)
    if t.len_arg is not None:
        if t.len_arg >= nargs:
            raise ProbeSpecError(spec.text, f"{t.name}: the probe has {nargs} argument(s)")
        return ArgRead(r.usdt, r.reg, r.str_slot, str_len_arg=t.len_arg)
    return r


class Resolver:
    """Resolves probe strings for one target; keeps each ELF file open once."""

    def __init__(self, target: Target, *, semaphores: str = "kernel") -> None:
        self.target = target
        self.semaphores = semaphores
        self._images: dict[str, ElfImage] = {}
        self._probes: dict[str, list[Probe]] = {}

    def image(self, path: str) -> ElfImage:
        img = self._images.get(path)
        if img is None:
            img = self._images[path] = ElfImage(path)
        return img

    def usdt_probes(self, path: str, display: str) -> list[Probe]:
        if path not in self._probes:
            self._probes[path] = group_sites(display, self.image(path).sites())
        return self._probes[path]

    def close(self) -> None:
        for img in self._images.values():
            img.close()
        self._images.clear()
        self._probes.clear()

    # -- probe strings -------------------------------------------------------

    def resolve(self, groups: list[Group]) -> None:
        """Fill each group's probes and sites; then make ambiguous labels name
        their binary."""
        for g in groups:
            self._resolve(g)
        qualify_labels(groups)

    def _binaries(self, spec: ProbeSpec) -> list[tuple[str, str]]:
        """(path to open/attach, path to show) candidates for a spec."""
        pid = self.target.pid
        if spec.binary:
            p = resolve_binary(spec.binary, pid)
            shown = p[len(f"/proc/{pid}/root"):] if pid and p.startswith("/proc/") else p
            return [(p, shown)]
        found = self.target.binaries()
        if found:
            return found
        raise ProbeNotFoundError(f"{spec.text}: no binary given and no target to search",
                                 probe=spec.text,
                                 hint="name the binary (usdt:BINARY:PROVIDER:NAME) or give"
                                      " -p PID, --path BIN or a command")

    def _resolve(self, g: Group) -> None:
        spec = g.spec
        candidates = self._binaries(spec)
        named = spec.binary is not None or self.target.process is None
        if spec.kind == "usdt":
            for path, shown in candidates:
                try:
                    probes = self.usdt_probes(path, shown)
                except (NoProbesError, ElfError):
                    if named:
                        raise
                    continue
                for p in probes:
                    if fnmatch.fnmatchcase(p.provider, spec.provider or "*") and \
                            fnmatch.fnmatchcase(p.name, spec.name):
                        self._add_usdt(g, path, p)
        else:
            for path, shown in candidates:
                self._add_uprobes(g, path, shown)
        if not g.probes:
            where = ", ".join(shown for _, shown in candidates[:3])
            what = (f"USDT probe matches {spec.provider}:{spec.name}" if spec.kind == "usdt"
                    else f"function matches {spec.name}")
            raise ProbeNotFoundError(
                f"{spec.text}: no {what} in {where}", probe=spec.text,
                hint="list them with `apptrace usdt list " + (candidates[0][1] if candidates
                                                               else "BINARY") + "`"
                if spec.kind == "usdt" else "check the symbol name (nm -D)")

    def _add_usdt(self, g: Group, path: str, p: Probe) -> None:
        spec = g.spec
        probe = ProbePlan(ProbeInfo("usdt", p.binary, p.fullname, spec.text, len(p.sites)))
        for provider, name in companions_of(p.provider, p.name):
            for other in self.usdt_probes(path, p.binary):
                if (other.provider, other.name) == (provider, name):
                    probe.companions.extend(sorted({(path, s.semaphore_offset)
                                                    for s in other.sites
                                                    if s.semaphore_offset}))
        for s in p.sites:
            n = max(len(s.args), len(spec.types))
            reads: list[ArgRead] = []
            slots: list[Slot] = []
            nstr = 0
            for i in range(n):
                t = spec.types[i] if i < len(spec.types) else None
                a: Optional[Argument] = s.args[i] if i < len(s.args) else None
                if a is None:
                    reads.append(ArgRead(usdt=Argument("", 8, False, False, "unavailable",
                                                       reason="no such argument")))
                    slots.append(Slot(f"this site has {len(s.args)} arguments", False, 8,
                                      False, t))
                    continue
                slot = -1
                if t is not None and t.kind in ("str", "bytes") and a.available:
                    slot, nstr = nstr, nstr + 1
                reads.append(_str_read(ArgRead(usdt=a, str_slot=slot), t, n, spec))
                slots.append(Slot(a.reason if not a.available else None, a.is_float, a.size,
                                  a.signed, t, slot))
            g.nargs = max(g.nargs, n)
            g.nstr = max(g.nstr, nstr)
            g.str_size = max([g.str_size] + [r.str_bytes for r in reads])
            rid = g.reader(tuple(reads), s.address)
            ref = s.semaphore_offset if self.semaphores == "kernel" else 0
            probe.sites.append(Site(path, s.file_offset, ref, s.semaphore_offset, rid, slots,
                                    s.address))
        g.probes.append(probe)

    def _add_uprobes(self, g: Group, path: str, shown: str) -> None:
        spec = g.spec
        img = self.image(path)
        targets: list[tuple[str, int]] = []
        if spec.offset is not None:
            targets.append((spec.name, spec.offset))
        else:
            sym, _, off = spec.name.partition("+")
            extra = int(off, 0) if off else 0
            funcs = img.functions()
            names = [sym] if sym in funcs else sorted(
                n for n in funcs if fnmatch.fnmatchcase(n, sym))
            for name in names:
                foff = img.vaddr_to_offset(funcs[name] + extra, executable=True)
                if foff is None:
                    continue
                targets.append((name + (f"+{off}" if off else ""), foff))
        vaddrs = {foff: img.offset_to_vaddr(foff) for _, foff in targets}
        ret = spec.kind == "uretprobe"
        types = spec.types or ((_DEFAULT_RET_TYPE,) if ret else (_DEFAULT_UPROBE_TYPE,) * 6)
        regs = iter(("ax",) if ret else _UPROBE_REGS)
        reads, slots, nstr = [], [], 0
        for t in types:
            slot = -1
            if t is not None and t.kind == "float":
                # The x86-64 ABI passes floating-point values in xmm registers;
                # a uprobe sees only the integer registers (pt_regs).
                reads.append(ArgRead())
                slots.append(Slot(_XMM_REASON, False, 8, False, t))
                continue
            reg = next(regs, None)
            if reg is None:
                raise ProbeSpecError(spec.text, "at most 6 integer arguments (1 return value)"
                                     " are in registers")
            if t is not None and t.kind in ("str", "bytes"):
                slot, nstr = nstr, nstr + 1
            reads.append(_str_read(ArgRead(reg=reg, str_slot=slot), t, len(types), spec))
            slots.append(Slot(None, False, 8, False, t or _DEFAULT_UPROBE_TYPE, slot))
        g.nargs = max(g.nargs, len(types))
        g.nstr = max(g.nstr, nstr)
        g.str_size = max([g.str_size] + [r.str_bytes for r in reads])
        rid = g.reader(tuple(reads), 0)
        for name, foff in targets:
            probe = ProbePlan(ProbeInfo(spec.kind, shown, name, spec.text, 1))
            probe.sites.append(Site(path, foff, 0, 0, rid, slots, vaddrs[foff] or 0))
            g.probes.append(probe)


def qualify_labels(groups: list[Group]) -> None:
    """Probes of one name in two binaries get labels that name the binary, so
    their counts and JSON stay apart."""
    binaries: dict[tuple[str, str], set[str]] = {}
    for g in groups:
        for p in g.probes:
            binaries.setdefault((p.info.kind, p.info.name), set()).add(p.info.binary)
    for g in groups:
        for p in g.probes:
            if len(binaries[(p.info.kind, p.info.name)]) > 1:
                p.info = dataclasses.replace(p.info, qualified=True)
