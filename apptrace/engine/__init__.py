"""The tracing engine, in four layers that every probe family builds on.

::

    target    engine/target.py   what is traced: a PID, a binary system-wide, or a
                                 command held before exec until attached (its
                                 release, exit status and termination)
    attach    engine/attach.py   probe strings → sites (binary, file offset,
                                 semaphore, argument reads); ELF only, no BPF
    program   engine/program.py  the C (codegen.py) compiled through bcc with the
                                 compile cache (bpf.py, bpfobj.py), loaded, attached
                                 (uprobe_multi or perf events), semaphores in either
                                 mode, the exec gate; one close() releases it all
    stream    engine/stream.py   rings (ringbuf.py) drained in batches, counted per
                                 probe, decoded by the decoder that owns each record
                                 kind (engine/decode.py for probe strings), merged
                                 by time

``engine/plan.py`` holds the records the layers pass along (groups, probes,
sites, slots): data only, at the bottom, so no layer reaches into another.

:class:`apptrace.Session` is the family for probe strings: a short
composition of the four. A probe family with its own BPF C (TLS capture,
JVM GC) is its peer: it takes a :class:`~apptrace.engine.target.Target`,
renders its own C, compiles and attaches it with :class:`apptrace.bpf.Program`
(and :class:`~apptrace.engine.program.TaskHooks` for a held command's exec
gate), and reads its ring through an :class:`~apptrace.engine.stream.EventStream`
with its own decoder. docs/architecture.md walks through adding one.
"""

from __future__ import annotations

from apptrace.engine.target import HeldCommand, Target

__all__ = ["HeldCommand", "Target"]
