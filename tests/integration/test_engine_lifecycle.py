"""A session's life: spawned commands end with it, sessions are single-use."""

from __future__ import annotations

import signal
import time

import pytest

from apptrace.errors import ApptraceError
from apptrace.session import Session

pytestmark = pytest.mark.bpf


def test_spawned_command_is_terminated_with_the_session(fixtures_dir):  # type: ignore[no-untyped-def]
    s = Session(command=[str(fixtures_dir / "usdt_loop_pie"), "0"])  # loops forever
    s.add("usdt:apptrace_fx:loop")
    events = list(s.events(timeout=0.5))
    child = s.child
    assert child is not None and child.poll() is None and len(events) > 50
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 5
    assert child.returncode == -signal.SIGTERM == s.exit_status


def test_sessions_are_single_use(fixtures_dir):  # type: ignore[no-untyped-def]
    with Session(command=[str(fixtures_dir / "usdt_early_pie"), "1"]) as s:
        s.add("usdt:apptrace_fx:early")
        assert len(list(s.events(timeout=10))) == 1
        with pytest.raises(ApptraceError, match="before the session starts"):
            s.add("usdt:apptrace_fx:tick")
    with pytest.raises(ApptraceError, match="single-use"):
        s.start()
    assert s.stats().per_probe == {"usdt:apptrace_fx:early": 1}  # still readable
