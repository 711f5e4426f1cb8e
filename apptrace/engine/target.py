"""The target layer: what is traced, and the lifecycle of a command we start.

A :class:`Target` is a running PID, a binary system-wide, a command that
apptrace starts and holds before exec until every probe is attached, or
nothing (probes name their binaries and trace system-wide). It is the one
place that spawns, releases, stops at exec, waits, reports the exit status
of and terminates a command: every probe family uses it.

No BPF here: the exec gate the kernel side keeps (:mod:`apptrace.codegen`,
``CTL_HELD``) is armed by the program layer with :attr:`HeldCommand.pid`.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from typing import IO, Any, Callable, Optional, Sequence, Union

from apptrace.errors import (
    CommandNotFoundError,
    OptionError,
    ProbeNotFoundError,
    SpawnError,
)
from apptrace.procs import ProcessRef, check_executable, mapped_objects, resolve_binary

__all__ = ["HeldCommand", "Target"]

Stdout = Union[None, int, IO[Any]]

# The launcher: a tiny Python that waits on a pipe, then execs the command in
# place (same PID), so probes attached to the PID see the command's first
# instruction. It execs the file the probes were resolved in.
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
    """A command started held before its exec; :meth:`release` lets it run."""

    def __init__(self, argv: Sequence[str], exe: str, *, stdout: Stdout = None) -> None:
        self.argv = list(argv)
        self.exe = exe
        r, w = os.pipe()
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                [sys.executable, "-S", "-c", _HOLD, str(r), exe, *self.argv],
                pass_fds=(r,), stdout=stdout)
        except OSError as err:
            os.close(r)
            os.close(w)
            raise SpawnError(f"cannot start {shlex.join(self.argv)}: {err.strerror or err}",
                             command=self.argv[0], errno=err.errno or 0) from err
        os.close(r)
        self._release_fd: Optional[int] = w
        self.pid = self.proc.pid
        self.exit_status: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._release_fd is not None

    def release(self, *, stopped_at_exec: Optional[Callable[[], None]] = None) -> None:
        """Let the command exec. With ``stopped_at_exec``, the kernel side stops it
        right after its exec (before its first instruction): the callback runs
        then (procmem semaphores in the new image), and the command continues.
        Otherwise return once the command has replaced the launcher, so
        ``/proc/PID`` describes the command from here on."""
        if self._release_fd is None:
            return
        try:
            os.write(self._release_fd, b"go\n")
        except OSError:
            pass
        os.close(self._release_fd)
        self._release_fd = None
        if stopped_at_exec is not None:
            if self._wait_stop(10.0, "its exec"):
                try:
                    stopped_at_exec()
                finally:
                    os.kill(self.pid, signal.SIGCONT)
            return
        want = os.path.realpath(self.exe)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if os.path.realpath(f"/proc/{self.pid}/exe") == want:
                    break
            except OSError:
                break
            time.sleep(0.0005)

    def at_stop(self, callback: Callable[[], None], timeout: float = 5.0) -> None:
        """Wait for the command to stop itself (a kernel-sent SIGSTOP), run the
        callback, let it continue. An exit instead is recorded, not an error."""
        stopped = self._wait_stop(timeout, None)
        try:
            if stopped or self.alive():
                callback()
        finally:
            if stopped:
                os.kill(self.pid, signal.SIGCONT)

    def _wait_stop(self, timeout: float, what: Optional[str]) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return False
            if got == self.pid and os.WIFSTOPPED(status):
                return True
            if got == self.pid:  # it exited (or could not exec) before stopping
                self.exit_status = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.exit_status
                return False
            if time.monotonic() > deadline:
                if what is None:
                    return False
                raise SpawnError(f"{shlex.join(self.argv)} did not reach {what} within"
                                 f" {timeout:.0f} s", command=self.argv[0])
            time.sleep(0.0005)

    def alive(self) -> bool:
        if self.exit_status is None:
            self.exit_status = self.proc.poll()
        return self.exit_status is None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        try:
            self.exit_status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_status

    def stop(self) -> None:
        """The command does not outlive its tracer: SIGTERM, then SIGKILL. A command
        still held just sees its pipe close and exits."""
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
        if self.exit_status is None:
            self.exit_status = self.proc.returncode


class Target:
    """What a tracer watches. At most one of ``pid``, ``path``, ``command``."""

    def __init__(self, *, pid: Optional[int] = None, path: Optional[str] = None,
                 command: Optional[Sequence[str]] = None, command_stdout: Stdout = None) -> None:
        given = {k: v for k, v in (("pid", pid), ("path", path), ("command", command))
                 if v is not None}
        if len(given) > 1:
            raise OptionError("target", given, "at most one of pid, path, command")
        if command is not None and not list(command):
            raise OptionError("command", command, "a command to run")
        self.process: Optional[ProcessRef] = ProcessRef.from_pid(pid) if pid is not None \
            else None
        self.path = resolve_binary(path) if path is not None else None
        self.command = list(command) if command is not None else None
        self.command_stdout = command_stdout
        self.exe: Optional[str] = None       # the command's ELF file, once resolved
        self.child: Optional[HeldCommand] = None

    @property
    def pid(self) -> Optional[int]:
        """The process traced (a spawned command's once started), or None."""
        if self.child is not None:
            return self.child.pid
        return self.process.pid if self.process is not None else None

    @property
    def system_wide(self) -> bool:
        return self.pid is None

    def resolve(self) -> None:
        """Check the process still is the one asked for, or find the command's file."""
        if self.command is not None:
            try:
                self.exe = resolve_binary(self.command[0])
            except ProbeNotFoundError as err:
                raise CommandNotFoundError(self.command[0]) from err
            check_executable(self.exe, self.command[0])
        elif self.process is not None:
            self.process.check()

    def binaries(self) -> list[tuple[str, str]]:
        """(path to open, path to show) of what the target runs or maps; empty
        when probes must name their binary."""
        if self.process is not None and self.child is None:
            return [(real, shown) for shown, real in mapped_objects(self.process.pid)]
        if self.path is not None:
            return [(self.path, self.path)]
        if self.exe is not None:
            return [(self.exe, self.exe)]
        return []

    def spawn(self) -> HeldCommand:
        """Start the command, held before its exec."""
        assert self.command is not None and self.exe is not None
        self.child = HeldCommand(self.command, self.exe, stdout=self.command_stdout)
        self.process = ProcessRef.from_pid(self.child.pid)
        return self.child

    @property
    def exit_status(self) -> Optional[int]:
        return self.child.exit_status if self.child is not None else None

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.alive()
        if self.process is not None:
            return self.process.alive()
        return True

    def describe(self) -> str:
        if self.command is not None:
            return shlex.join(self.command)
        if self.process is not None:
            return f"process {self.process.pid}"
        return self.path or "system-wide"

    def close(self) -> None:
        """Terminate what we spawned (and only that)."""
        if self.child is not None:
            self.child.stop()
