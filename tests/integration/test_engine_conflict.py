"""The kernel's ref_ctr_offset mismatch is explained, not reported as bare EINVAL."""

from __future__ import annotations

import errno

import pytest

from apptrace.bpf import Program
from apptrace.errors import SemaphoreConflictError
from apptrace.session import Session
from apptrace.usdt import read_probes

pytestmark = pytest.mark.bpf


def test_plain_uprobe_on_semaphore_site_is_a_named_conflict(fixtures_dir):  # type: ignore[no-untyped-def]
    binary = str(fixtures_dir / "usdt_sema_pie")
    site = next(p for p in read_probes(binary) if p.name == "sema_ping").sites[0]
    assert site.semaphore_offset
    other = Program("#include <uapi/linux/ptrace.h>\n"
                    "int other_tool(struct pt_regs *ctx) { return 0; }\n")
    try:
        # Another tool's plain uprobe (ref_ctr_offset 0) on the same instruction.
        other.attach_perf(other.load("other_tool"), binary, site.file_offset, -1, 0, False,
                          "other")
        with pytest.raises(SemaphoreConflictError) as info:
            with Session(path=binary) as s:
                s.add("usdt:apptrace_fx:sema_ping")
                s.start()
        assert info.value.errno == errno.EINVAL
        assert "different semaphore offset" in str(info.value)
        assert "procmem" in str(info.value)
    finally:
        other.close()
    # With the other tool gone, the same attach works.
    with Session(path=binary) as s:
        s.add("usdt:apptrace_fx:sema_ping")
        s.start()
        assert [p.name for p in s.probes] == ["apptrace_fx:sema_ping"]
