"""One exception hierarchy for everything apptrace raises.

Every error carries the facts a user needs (binary, pid, probe) as fields and
renders its message from them. Where the meaning matches a builtin, the class
also subclasses it, so ``except PermissionError`` or ``except LookupError``
works for callers who do not know apptrace.
"""

from __future__ import annotations

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
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[ApptraceError], args: tuple[Any, ...],
             state: dict[str, Any]) -> ApptraceError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
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
