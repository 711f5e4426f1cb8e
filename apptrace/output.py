"""Writing what a trace saw, safely: private output files and terminal-safe text.

apptrace usually runs as root and writes what other users' programs do
(arguments, soon TLS plaintext). An output path may sit in a directory other
users can write (``/tmp``), so :func:`open_private` never follows a symbolic
link another user owns, never writes into a file another user owns or one
hard-linked elsewhere, refuses kernel interface files, and creates new files
``0600`` with ``O_EXCL``. :func:`escape_text` keeps process names, probe names
and strings from a traced program from driving the terminal (escape
sequences) when printed as text; JSON output needs none of this.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import stat
import struct

from apptrace.errors import OutputError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from typing import IO, Any, Optional, TextIO

__all__ = ["open_private", "open_output", "escape_text", "TextOutput", "EscapingWriter",
           "replace_private", "read_regular"]

_MAX_LINKS = 40  # symbolic links followed in one path, as the kernel allows
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC

# statfs f_type of kernel interface filesystems: writing there changes the
# kernel, it does not store a file.
_PSEUDO_FS = {
    0x9FA0: "procfs", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x27E0EB: "cgroupfs", 0x63677270: "cgroup2fs", 0x73636673: "securityfs",
    0xCAFE4A11: "bpffs", 0x62656570: "configfs", 0xDE5E81E4: "efivarfs",
    0x6E736673: "nsfs", 0x67596969: "rpc_pipefs", 0xF97CFF8C: "selinuxfs",
}

_libc: Any = None


def _fs_type(fd: int) -> Optional[int]:
    """The filesystem magic number of an open file (``fstatfs``), None if unknown."""
    global _libc
    import ctypes  # here: `apptrace usdt list` never opens an output file

    if _libc is None:
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return struct.unpack_from("<q", buf)[0] & 0xFFFFFFFF


def _fail(path: str, what: str, err: int = 0, hint: Optional[str] = None) -> OutputError:
    return OutputError(f"cannot write {escape_text(path)}: {what}", path=path, errno=err,
                       hint=hint)


def _trusted(uid: int) -> bool:
    """Symbolic links made by root or by us may be followed; others may point anywhere."""
    return uid in (0, os.geteuid())


def _open_dir(name: str, dir_fd: Optional[int]) -> int:
    return os.open(name, os.O_PATH | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)


def _walk(path: str) -> tuple[int, str, bool]:
    """Resolve every directory of ``path`` one component at a time, following
    only symbolic links root or we own; (fd of the final directory, last name,
    whether that name is a /proc magic link).

    Opening each directory relative to the previous one (``O_NOFOLLOW``) leaves
    no window in which another user can swap a directory for a link.
    """
    pending = [c for c in path.split("/") if c not in ("", ".")]
    if not pending:
        raise _fail(path, "not a file path")
    dfd = _open_dir("/" if path.startswith("/") else ".", None)
    links = 0
    try:
        while True:
            name = pending.pop(0)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                if pending:
                    raise _fail(path, f"directory {name!r} does not exist",
                                _errno.ENOENT) from None
                return dfd, name, False
            magic = stat.S_ISLNK(st.st_mode) and _magic_link(dfd)
            if stat.S_ISLNK(st.st_mode) and not magic:
                if not _trusted(st.st_uid):
                    raise _fail(path, f"{name!r} is a symbolic link owned by uid"
                                      f" {st.st_uid}; refusing to follow it",
                                hint="write to a directory only you can change")
                links += 1
                if links > _MAX_LINKS:
                    raise _fail(path, "too many levels of symbolic links", _errno.ELOOP)
                target = os.readlink(name, dir_fd=dfd)
                pending = [c for c in target.split("/") if c not in ("", ".")] + pending
                if target.startswith("/"):
                    os.close(dfd)
                    dfd = _open_dir("/", None)
                if not pending:
                    raise _fail(path, "the symbolic link points at a directory")
                continue
            if not pending:
                return dfd, name, magic
            if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                raise _fail(path, f"{name!r} is not a directory", _errno.ENOTDIR)
            nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd) \
                if stat.S_ISLNK(st.st_mode) else _open_dir(name, dfd)
            os.close(dfd)
            dfd = nfd
    except BaseException:
        os.close(dfd)
        raise


def _magic_link(dfd: int) -> bool:
    """Links under /proc (``/proc/self/fd/1``, what ``/dev/stdout`` points to) name
    open files, not paths; the kernel resolves them itself."""
    return _fs_type(dfd) == 0x9FA0


def open_private(path: str) -> int:
    """Open ``path`` for writing output; a file descriptor.

    A new file is created ``0600`` (``O_CREAT|O_EXCL|O_NOFOLLOW``). An existing
    regular file is truncated only if it is ours, writable, and has no other
    hard link; it is then made private (group and other permissions dropped).
    Devices, FIFOs and sockets (``/dev/null``, ``/dev/stderr``, a pipe) are
    written as they are. Every refusal is an :class:`OutputError` naming why.
    """
    if not isinstance(path, str) or not path:
        raise OutputError("the output path is empty", path=str(path),
                          hint="give a file name, or leave the option out for stdout")
    for _attempt in range(5):  # lost races with another process retry from scratch
        dfd, name, magic = _walk(path)
        try:
            try:
                return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600,
                               dir_fd=dfd)
            except FileExistsError:
                pass
            except OSError as err:
                raise _fail(path, err.strerror or str(err), err.errno or 0) from err
            try:
                # O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of hanging.
                # A /proc/self/fd link is a file we already hold (``-o /dev/stdout``):
                # appended to, like the descriptor it names.
                flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                flags |= os.O_APPEND if magic else os.O_NOFOLLOW
                fd = os.open(name, flags, dir_fd=dfd)
            except FileNotFoundError:
                continue  # removed since: create it
            except OSError as err:
                if err.errno == _errno.ELOOP:
                    continue  # became a symbolic link since: walk again
                if err.errno == _errno.ENXIO:
                    raise _fail(path, "a FIFO no process reads", err.errno) from err
                if err.errno == _errno.EISDIR:
                    raise _fail(path, "is a directory", err.errno) from err
                raise _fail(path, err.strerror or str(err), err.errno or 0) from err
        finally:
            os.close(dfd)
        try:
            if not magic:
                _check_existing(path, fd)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise _fail(path, "the file kept changing while it was opened")


def _check_existing(path: str, fd: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise _fail(path, "is a directory", _errno.EISDIR)
        return  # a device, FIFO or socket: nothing is stored, nothing to overwrite
    fs = _fs_type(fd)
    if fs in _PSEUDO_FS:
        raise _fail(path, f"is a kernel interface file ({_PSEUDO_FS[fs]}), not an output"
                          " file")
    if st.st_uid != os.geteuid():
        raise _fail(path, f"the file exists and belongs to uid {st.st_uid}",
                    hint="remove it or choose another path")
    if st.st_nlink > 1:
        raise _fail(path, f"the file has {st.st_nlink} hard links; refusing to overwrite it",
                    hint="remove it or choose another path")
    if not st.st_mode & stat.S_IWUSR:
        raise _fail(path, f"the file is read-only (mode {stat.S_IMODE(st.st_mode):04o})",
                    _errno.EACCES)
    os.ftruncate(fd, 0)
    if st.st_mode & 0o077:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)


class TextOutput:
    """A text stream whose write errors are one clear :class:`OutputError`.

    A closed pipe on the other end is left as :class:`BrokenPipeError` so the
    CLI can end quietly (``apptrace ... | head``) after cleaning up.
    """

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self.display = name

    def _error(self, err: OSError) -> BaseException:
        if isinstance(err, BrokenPipeError):
            return err
        code = err.errno or 0
        return OutputError(f"cannot write {escape_text(self.display)}:"
                           f" {os.strerror(code) if code else err}", path=self.display,
                           errno=code)

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except OSError as err:
            raise self._error(err) from err

    def flush(self) -> None:
        if self._stream.closed:
            return
        try:
            self._stream.flush()
        except OSError as err:
            raise self._error(err) from err

    def close(self) -> None:
        if self._stream.closed:
            return
        try:
            self._stream.close()
        except OSError as err:
            raise self._error(err) from err

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


def open_output(path: str) -> TextOutput:
    """A private output file (see :func:`open_private`) as a text stream."""
    fd = open_private(path)
    stream = open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=True)
    return TextOutput(stream, path)


def stdout_output(stream: Optional[TextIO] = None) -> TextOutput:
    import sys

    return TextOutput(stream or sys.stdout, "standard output")


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    """``text`` with every non-printable character written as an escape
    (``\\x1b``, ``\\n``, ``\\u202e``, ``\\udcff``): safe to print on a terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
            continue
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


class EscapingWriter:
    """Writes text through :func:`escape_text`, line by line (newlines kept)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        return self._stream.write("\n".join(escape_text(part) for part in s.split("\n")))

    def flush(self) -> None:
        self._stream.flush()


def replace_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a new ``0600`` file made with
    ``O_EXCL`` in the same directory (a name nobody can have planted), then
    renamed over ``path`` (a rename replaces a link, it never follows one)."""
    import tempfile

    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".apptrace-")
    except OSError as err:
        raise _fail(path, err.strerror or str(err), err.errno or 0) from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _fail(path, err.strerror or str(err), err.errno or 0) from err


def read_regular(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file another user may control: a FIFO
    does not block, a device is not read, a symbolic link at the end is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise OSError(err.errno, f"cannot read {path}: {err.strerror}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(_errno.EINVAL, f"{path} is not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
