"""What a capture watches: a running PID, a file system-wide, or a command it
starts and holds before exec until every probe is attached.

This is the target half of a probe family, kept small and free of TLS
details so it can move to the engine's common target layer (it does what
``Session._spawn``/``_release`` do, through public pieces only).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import IO, Optional, Sequence

from apptrace.errors import CommandNotFoundError, ProcessNotFoundError, SpawnError
from apptrace.procs import ProcessRef, resolve_binary

__all__ = ["HeldCommand", "Target"]

_HOLD = ("import os, sys\n"
         "fd = int(sys.argv[1])\n"
         "if os.read(fd, 1) != b'g': sys.exit(125)\n"
         "os.close(fd)\n"
         "try:\n"
         "    os.execv(sys.argv[2], sys.argv[3:])\n"
         "except OSError as e:\n"
         "    sys.stderr.write(f'apptrace: cannot run {sys.argv[3]}: {e.strerror}\\n')\n"
         "    sys.exit(127 if e.errno == 2 else 126)\n")


class HeldCommand:
    """A command started as a tiny Python that waits on a pipe, then execs the
    command in place: same PID, so probes attached to the PID before
    :meth:`release` see the command from its first instruction."""

    def __init__(self, argv: Sequence[str], *, stdout: Optional[IO[bytes]] = None) -> None:
        if not argv:
            raise SpawnError("no command given", command="")
        self.argv = list(argv)
        try:
            self.exe = resolve_binary(self.argv[0])
        except Exception as err:  # noqa: BLE001 - any lookup failure is "not found" here
            raise CommandNotFoundError(self.argv[0]) from err
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", _HOLD, str(r), self.exe,
                                          *self.argv], pass_fds=(r,), stdout=stdout)
        except OSError as err:
            os.close(r)
            os.close(w)
            raise SpawnError(f"cannot start {shlex.join(self.argv)}: {err.strerror or err}",
                             command=self.argv[0], errno=err.errno or 0) from err
        os.close(r)
        self._release_fd: Optional[int] = w
        self.pid = self.proc.pid
        self.returncode: Optional[int] = None

    def release(self, timeout: float = 2.0) -> None:
        """Let the command exec; return once /proc/PID shows the command."""
        if self._release_fd is None:
            return
        try:
            os.write(self._release_fd, b"go\n")
        except OSError:
            pass
        os.close(self._release_fd)
        self._release_fd = None
        want = os.path.realpath(self.exe)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if os.path.realpath(f"/proc/{self.pid}/exe") == want:
                    return
            except OSError:
                return
            time.sleep(0.0005)

    def alive(self) -> bool:
        if self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode is None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self) -> None:
        """Never released: the holder exits on EOF. Still running: SIGTERM, then SIGKILL."""
        if self._release_fd is not None:
            os.close(self._release_fd)
            self._release_fd = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode


class Target:
    """Exactly one of: ``pid`` (running), ``path`` (system-wide: every process
    using that file, including later ones) or ``command`` (started here)."""

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None) -> None:
        given = sum(x is not None for x in (pid, path, command))
        if given != 1:
            raise ValueError("give exactly one of pid, path, command")
        self.process: Optional[ProcessRef] = ProcessRef.from_pid(pid) if pid is not None \
            else None
        self.path = resolve_binary(path) if path is not None else None
        self.command = list(command) if command is not None else None
        self.held: Optional[HeldCommand] = None

    @property
    def pid(self) -> int:
        """The PID probes are limited to (-1: system-wide)."""
        if self.held is not None:
            return self.held.pid
        if self.process is not None:
            return self.process.pid
        return -1

    def spawn(self, stdout: Optional[IO[bytes]] = None) -> HeldCommand:
        assert self.command is not None
        self.held = HeldCommand(self.command, stdout=stdout)
        return self.held

    def check(self) -> None:
        if self.process is not None and not self.process.alive():
            raise ProcessNotFoundError(self.process.pid)

    def alive(self) -> bool:
        if self.held is not None:
            return self.held.alive()
        if self.process is not None:
            return self.process.alive()
        return True

    @property
    def exit_status(self) -> Optional[int]:
        return self.held.returncode if self.held is not None else None

    def describe(self) -> str:
        if self.held is not None:
            return f"{shlex.join(self.held.argv)} (pid {self.held.pid})"
        if self.process is not None:
            return f"process {self.process.pid} ({self.process.name})"
        return f"every process using {self.path}"

    def close(self) -> None:
        if self.held is not None:
            self.held.stop()
