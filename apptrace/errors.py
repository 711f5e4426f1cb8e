"""One exception hierarchy for everything apptrace raises.

Every error carries the facts a user needs (binary, pid, probe) as fields and
renders its message from them. Where the meaning matches a builtin, the class
also subclasses it, so ``except PermissionError`` or ``except LookupError``
works for callers who do not know apptrace.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import Any, Optional


__all__ = [
    "ApptraceError",
    "ElfError",
    "NoProbesError",
    "ProbeNotFoundError",
    "ProbeSpecError",
    "ProcessNotFoundError",
    "ProcessGoneError",
    "TracePermissionError",
    "AttachError",
    "SemaphoreConflictError",
    "BccUnavailableError",
    "SymbolizerError",
    "OptionError",
    "SessionStateError",
    "SpawnError",
    "CommandNotFoundError",
    "BinaryNotFoundError",
    "ElfNotFoundError",
    "KernelThreadError",
    "OutputError",
    "SemaphoreError",
    "BpfError",
    "ExpressionError",
    "NotAJvmError",
    "JvmProbesMissingError",
    "GcLogError",
    "NoTlsLibraryError",
    "StrippedTlsError",
    "TraceAssertionError",
    "RunTimeoutError",
    "RunFileError",
]


class ApptraceError(Exception):
    """Base of every error apptrace raises on purpose."""

    def __init__(self, message: str, *, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take different keyword-only fields, so pickling (say, to
        # a multiprocessing parent) restores the instance state directly.
        # OSError keeps errno in a slot, not in __dict__.
        state = dict(self.__dict__)
        if isinstance(self, OSError):
            state["errno"] = self.errno
        return (_rebuild, (type(self), self.args, state))


def _rebuild(cls: type[ApptraceError], args: tuple[Any, ...],
             state: dict[str, Any]) -> ApptraceError:
    # An OSError subclass must be made by OSError's constructor (its instance
    # layout), whatever base comes first in the class's MRO.
    new = OSError.__new__ if issubclass(cls, OSError) else Exception.__new__
    err = new(cls)
    Exception.__init__(err, *args)
    if issubclass(cls, OSError):
        err.errno = state.pop("errno", None)  # type: ignore[attr-defined]
    err.__dict__.update(state)
    return err


class ElfError(ApptraceError, ValueError):
    """A file is not an ELF object apptrace can read, or a note in it is malformed."""

    def __init__(self, message: str, *, path: str, note_index: Optional[int] = None,
                 hint: Optional[str] = None) -> None:
        where = path if note_index is None else f"{path}, stapsdt note #{note_index}"
        super().__init__(f"{where}: {message}", hint=hint)
        self.path = path
        self.note_index = note_index


class NoProbesError(ApptraceError, LookupError):
    """The object has no ``.note.stapsdt`` section at all."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"no USDT probes in {path}; was it built with sys/sdt.h or dtrace support?"
        )
        self.path = path


class ProbeNotFoundError(ApptraceError, LookupError):
    """A probe, symbol or library named by the user does not exist."""

    def __init__(self, message: str, *, probe: str, hint: Optional[str] = None) -> None:
        super().__init__(message, hint=hint)
        self.probe = probe


class ProbeSpecError(ApptraceError, ValueError):
    """A probe specification string cannot be parsed."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(
            f"bad probe spec {spec!r}: {reason}",
            hint="expected usdt:[BINARY:]PROVIDER:NAME[(TYPES)], uprobe:BINARY:SYMBOL[(TYPES)]"
            " or uretprobe:BINARY:SYMBOL[(TYPE)]",
        )
        self.spec = spec
        self.reason = reason


class ProcessNotFoundError(ApptraceError, ProcessLookupError):
    """No process with that PID exists (or it is not the one we looked at)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"no process with PID {pid}")
        self.pid = pid


class ProcessGoneError(ProcessNotFoundError):
    """The traced process exited, or its PID was reused, while we worked on it."""

    def __init__(self, pid: int) -> None:
        ApptraceError.__init__(self, f"process {pid} exited")
        self.pid = pid


class TracePermissionError(ApptraceError, PermissionError):
    """The kernel refused for lack of privilege."""

    def __init__(self, message: str, *, hint: Optional[str] = None) -> None:
        super().__init__(
            message,
            hint=hint or "tracing needs root (or CAP_BPF+CAP_PERFMON); run `apptrace doctor`",
        )


class AttachError(ApptraceError, OSError):
    """The kernel refused to attach a probe."""

    def __init__(self, message: str, *, errno: int = 0, probe: str = "",
                 hint: Optional[str] = None) -> None:
        ApptraceError.__init__(self, message, hint=hint)
        self.errno = errno
        self.probe = probe


class SemaphoreConflictError(AttachError):
    """Another uprobe holds the same site with a different ``ref_ctr_offset``."""


class BccUnavailableError(ApptraceError, ImportError):
    """bcc cannot be imported or cannot compile BPF programs here."""


class SymbolizerError(ApptraceError, RuntimeError):
    """blazesym is missing or reported an error."""

    def __init__(self, message: str, *, code: Optional[int] = None,
                 hint: Optional[str] = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class OptionError(ApptraceError, ValueError):
    """An option or argument is outside the range apptrace accepts; the message gives it."""

    def __init__(self, option: str, value: Any, expected: str) -> None:
        super().__init__(f"{option} must be {expected} (got {value!r})")
        self.option = option
        self.value = value
        self.expected = expected


class SessionStateError(ApptraceError, RuntimeError):
    """A session method was called in the wrong phase (added to after start, used after close)."""


class SpawnError(ApptraceError, OSError):
    """A command given to run could not be started."""

    def __init__(self, message: str, *, command: str, errno: int = 0,
                 hint: Optional[str] = None) -> None:
        ApptraceError.__init__(self, message, hint=hint)
        self.command = command
        self.errno = errno


class CommandNotFoundError(SpawnError, FileNotFoundError):
    """A command given to run is not a path that exists, nor a program on PATH."""

    def __init__(self, command: str) -> None:
        super().__init__(f"cannot run {command!r}: command not found", command=command,
                         errno=2, hint="give a path, or check PATH")


class BinaryNotFoundError(ProbeNotFoundError, FileNotFoundError):
    """A binary or library named in a probe or target does not exist."""

    def __init__(self, message: str, *, probe: str, hint: Optional[str] = None) -> None:
        ProbeNotFoundError.__init__(self, message, probe=probe, hint=hint)
        self.errno = 2


class ElfNotFoundError(ElfError, FileNotFoundError):
    """The ELF file to read does not exist (or vanished)."""

    def __init__(self, path: str) -> None:
        ElfError.__init__(self, "no such file", path=path)
        self.errno = 2


class KernelThreadError(ApptraceError, ValueError):
    """The PID is a kernel thread: it has no user-space code to probe."""

    def __init__(self, pid: int, name: str = "") -> None:
        what = f" ({name})" if name else ""
        super().__init__(f"PID {pid}{what} is a kernel thread with no user-space code;"
                         " nothing there can be traced with uprobes or USDT",
                         hint="give the PID of a user-space process")
        self.pid = pid
        self.name = name


class OutputError(ApptraceError, OSError):
    """An output file cannot be created safely, or writing to it failed."""

    def __init__(self, message: str, *, path: str, errno: int = 0,
                 hint: Optional[str] = None) -> None:
        ApptraceError.__init__(self, message, hint=hint)
        self.path = path
        self.errno = errno


class SemaphoreError(ApptraceError, OSError):
    """A USDT semaphore could not be located, raised or lowered in a process."""

    def __init__(self, message: str, *, pid: int, errno: int = 0,
                 hint: Optional[str] = None) -> None:
        ApptraceError.__init__(self, message, hint=hint)
        self.pid = pid
        self.errno = errno


class BpfError(ApptraceError, OSError):
    """The kernel refused a BPF map or program, or a compiled object is not as expected."""

    def __init__(self, message: str, *, errno: int = 0, hint: Optional[str] = None) -> None:
        ApptraceError.__init__(self, message, hint=hint)
        self.errno = errno


class NotAJvmError(ApptraceError, LookupError):
    """The process maps no ``libjvm.so``: it is not a HotSpot JVM."""

    def __init__(self, pid: int, name: str = "") -> None:
        what = f" ({name})" if name else ""
        super().__init__(f"process {pid}{what} is not a HotSpot JVM: it maps no libjvm.so",
                         hint="give the PID of the java process (jps or pgrep java)")
        self.pid = pid


class JvmProbesMissingError(ApptraceError, LookupError):
    """The JDK was built without HotSpot's USDT (DTrace) probes."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"{path} was built without HotSpot's USDT probes: {reason}",
            hint="run the application on a JDK built with DTrace probes (--enable-dtrace);"
                 " no JVM flag can add them")
        self.path = path
        self.reason = reason


class ExpressionError(ApptraceError, ValueError):
    """A filter or aggregation expression that cannot be compiled, with its column."""

    def __init__(self, text: str, column: int, reason: str) -> None:
        pointer = " " * (column - 1) + "^"
        super().__init__(f"column {column}: {reason}\n  {text}\n  {pointer}")
        self.text = text
        self.column = column
        self.reason = reason


class GcLogError(ApptraceError, ValueError):
    """A GC log apptrace cannot compare with: unreadable, or written without ``timenanos``."""


class NoTlsLibraryError(ApptraceError, LookupError):
    """A target has no TLS implementation apptrace can hook; says what was searched."""

    def __init__(self, message: str, *, searched: tuple[str, ...] = (),
                 hint: Optional[str] = None) -> None:
        super().__init__(message, hint=hint)
        self.searched = searched


class StrippedTlsError(NoTlsLibraryError):
    """A binary contains OpenSSL but no symbols to find its functions by."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path} contains {what} linked in, but its symbol table is stripped:"
                         " its TLS functions cannot be located",
                         hint="use a build with symbols (not stripped with -s), or a build"
                              " linking OpenSSL as a shared library")
        self.path = path
        self.what = what


class TraceAssertionError(ApptraceError, AssertionError):
    """What a test expected of a recorded run did not happen: the message
    lists what was expected next to what fired (an AssertionError, so pytest
    and unittest report it as a test failure, not an error)."""


class RunTimeoutError(ApptraceError, TimeoutError):
    """A program recorded by :mod:`apptrace.testing` outlived its timeout;
    ``run`` holds what was recorded until it was stopped."""

    def __init__(self, message: str, *, timeout: float, run: Any = None) -> None:
        super().__init__(message, hint="raise the timeout, or check why the program did not"
                                       " end (its output is in .run.output)")
        self.timeout = timeout
        self.run = run


class RunFileError(ApptraceError, ValueError):
    """A saved run (JSON lines) that cannot be read back: names the file and line."""

    def __init__(self, message: str, *, path: str, line: int = 0) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
