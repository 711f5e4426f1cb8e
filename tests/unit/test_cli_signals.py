"""A signal that lands while the CLI installs its handlers ends the run like
any other: no traceback, the signal's exit status, the old handlers back.

Found in CI: SIGINT sent the moment SIGHUP's handler was in place hit
SIGINT's handler while the rest were still being installed, outside the
code that turns KeyboardInterrupt into exit 130.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from apptrace.cli import main


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_installing_handlers(monkeypatch: pytest.MonkeyPatch, sig: int,
                                          status: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)}
    real = signal.signal
    installed: list[int] = []

    def installing(signum: int, handler: Any) -> Any:
        old = real(signum, handler)
        installed.append(signum)
        if signum == signal.SIGHUP and installed.count(signum) == 1:
            os.kill(os.getpid(), sig)  # SIGINT and SIGTERM are in place, others not yet
        return old

    monkeypatch.setattr(signal, "signal", installing)
    ran: list[bool] = []
    monkeypatch.setattr("apptrace.cli.doctor.DoctorCommand.run",
                        lambda self, args: ran.append(True))
    assert main(["doctor"]) == status
    monkeypatch.undo()
    assert not ran and signal.SIGHUP in installed and signal.SIGPIPE not in installed
    assert {s: signal.getsignal(s) for s in before} == before
