"""Compiled BPF objects: loading, maps, and a compile cache, through raw ``bpf(2)``.

bcc turns our C into bytecode (in :mod:`apptrace.bpf`); clang takes 0.25 s
or more even for a tiny program, most of an ``apptrace trace`` start-up. So
the bytecode is kept: a :class:`CompiledObject` is the instructions of each
entry function, where they refer to which map, and how to create each map.
Loading one needs no bcc at all, and a repeated trace (same probes, same
binaries, same kernel) starts in milliseconds.

The cache lives in ``$XDG_CACHE_HOME/apptrace/bpf`` (``~/.cache/...``). Its
files become kernel programs, so a file is used only if it and its directory
belong to us and nobody else can write them; the key covers the C text, the
kernel release and bcc's version.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import errno as _errno
import hashlib
import json
import os
import platform
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from apptrace.errors import BpfError, TracePermissionError
from apptrace.syscall import bpf, has_trace_privileges

__all__ = ["MapSpec", "CompiledObject", "LoadedObject", "BpfMap", "cache_get", "cache_put",
           "possible_cpus"]

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD, BPF_OBJ_GET_INFO_BY_FD = 4, 5, 15
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
CACHE_FORMAT = 1


@dataclass(frozen=True)
class MapSpec:
    """What BPF_MAP_CREATE needs to make a map again."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class CompiledObject:
    """Bytecode of each entry function, with its map references unbound.

    ``relocs[fn]`` lists (instruction index, map name) for every 64-bit load
    of a map fd; the fd is filled in when the object is loaded.
    """

    maps: tuple[MapSpec, ...]
    functions: dict[str, bytes]
    relocs: dict[str, tuple[tuple[int, str], ...]]
    license: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "license": self.license,
            "maps": [m.__dict__ for m in self.maps],
            "functions": {n: base64.b64encode(b).decode() for n, b in self.functions.items()},
            "relocs": {n: [list(r) for r in rs] for n, rs in self.relocs.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompiledObject:
        if d.get("format") != CACHE_FORMAT:
            raise ValueError("cache format")
        return cls(tuple(MapSpec(**m) for m in d["maps"]),
                   {n: base64.b64decode(b) for n, b in d["functions"].items()},
                   {n: tuple((int(i), str(m)) for i, m in rs) for n, rs in d["relocs"].items()},
                   str(d["license"]))


def map_info(fd: int) -> tuple[int, int, int, int, int]:
    """(type, key_size, value_size, max_entries, flags) of a map fd."""
    info = ctypes.create_string_buffer(128)
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    ret, err = bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    if ret < 0:
        raise BpfError(f"cannot read BPF map info: {os.strerror(err)}", errno=err)
    mtype, _id, key, value, entries, flags = struct.unpack_from("<IIIIII", info, 0)
    return mtype, key, value, entries, flags


def unbind(insns: bytes, fd_names: dict[int, str]) -> tuple[bytes, tuple[tuple[int, str], ...]]:
    """Replace map fds in ``insns`` by 0 and say where each map was referenced."""
    buf = bytearray(insns)
    relocs = []
    i = 0
    while i < len(buf) // 8:
        code, regs = buf[i * 8], buf[i * 8 + 1]
        if code == _LD_IMM64:
            if regs >> 4 == _PSEUDO_MAP_FD:
                fd = struct.unpack_from("<i", buf, i * 8 + 4)[0]
                if fd not in fd_names:
                    raise BpfError(f"instruction {i} refers to an unknown map fd {fd}")
                relocs.append((i, fd_names[fd]))
                struct.pack_into("<i", buf, i * 8 + 4, 0)
            i += 2
            continue
        i += 1
    return bytes(buf), tuple(relocs)


def _bind(insns: bytes, relocs: tuple[tuple[int, str], ...], fds: dict[str, int]) -> bytes:
    buf = bytearray(insns)
    for i, name in relocs:
        struct.pack_into("<i", buf, i * 8 + 4, fds[name])
    return bytes(buf)


_ncpus: Optional[int] = None


def possible_cpus() -> int:
    """How many values a per-CPU map returns per key."""
    global _ncpus
    if _ncpus is None:
        with open("/sys/devices/system/cpu/possible") as f:
            n = 0
            for part in f.read().strip().split(","):
                lo, _, hi = part.partition("-")
                n = max(n, int(hi or lo) + 1)
        _ncpus = n
    return _ncpus


class BpfMap:
    """One map of a loaded object: lookups, updates and key iteration on its fd."""

    def __init__(self, spec: MapSpec, fd: int) -> None:
        self.spec = spec
        self.fd = fd
        per_cpu = spec.type in PERCPU_TYPES
        self.value_len = ((spec.value_size + 7) & ~7) * possible_cpus() if per_cpu \
            else spec.value_size

    def _op(self, cmd: int, key: bytes, value: Any, flags: int = 0) -> int:
        k = ctypes.create_string_buffer(key, max(len(key), 1))
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, ctypes.addressof(k),
                         ctypes.addressof(value), flags)
        ret, err = bpf(cmd, attr)
        return 0 if ret >= 0 else err

    def lookup(self, key: bytes) -> Optional[bytes]:
        value = ctypes.create_string_buffer(self.value_len)
        err = self._op(BPF_MAP_LOOKUP_ELEM, key, value)
        if err == _errno.ENOENT or (err == _errno.EFAULT and self.spec.type == 7):
            return None  # no such key (a stack map answers EFAULT for a free id)
        if err:
            raise BpfError(f"map {self.spec.name}: lookup failed: {os.strerror(err)}",
                           errno=err)
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        v = ctypes.create_string_buffer(value, len(value))
        err = self._op(BPF_MAP_UPDATE_ELEM, key, v)
        if err:
            raise BpfError(f"map {self.spec.name}: update failed: {os.strerror(err)}",
                           errno=err)

    def keys(self) -> Iterator[bytes]:
        nxt = ctypes.create_string_buffer(self.spec.key_size)
        key: Optional[bytes] = None
        while True:
            k = ctypes.create_string_buffer(key or b"", max(self.spec.key_size, 1))
            attr = ctypes.create_string_buffer(144)
            struct.pack_into("<IIQQ", attr, 0, self.fd, 0,
                             0 if key is None else ctypes.addressof(k), ctypes.addressof(nxt))
            ret, err = bpf(BPF_MAP_GET_NEXT_KEY, attr)
            if ret < 0:
                if err == _errno.ENOENT:
                    return
                raise BpfError(f"map {self.spec.name}: iteration failed: "
                               f"{os.strerror(err)}", errno=err)
            key = nxt.raw
            yield key

    def sum_u64(self, key: bytes) -> int:
        """A u64 slot summed over CPUs (per-CPU maps) or as is."""
        raw = self.lookup(key)
        if raw is None:
            return 0
        return sum(struct.unpack_from("<Q", raw, off)[0]
                   for off in range(0, len(raw), (self.spec.value_size + 7) & ~7))


class LoadedObject:
    """Maps created and programs loaded from a :class:`CompiledObject`.

    ``sizes`` overrides maps' ``max_entries`` (the C only sets placeholders
    when one compiled object serves many sizes); ``shared`` gives a map
    another object already created (its fd is used, not closed here).
    """

    def __init__(self, obj: CompiledObject, *, sizes: Optional[dict[str, int]] = None,
                 shared: Optional[dict[str, BpfMap]] = None) -> None:
        self.obj = obj
        self.maps: dict[str, BpfMap] = {}
        self._prog_fds: list[int] = []
        self._borrowed: set[str] = set()
        try:
            for spec in obj.maps:
                if shared and spec.name in shared:
                    self.maps[spec.name] = shared[spec.name]
                    self._borrowed.add(spec.name)
                    continue
                if sizes and spec.name in sizes:
                    spec = dataclasses.replace(spec, max_entries=sizes[spec.name])
                self.maps[spec.name] = BpfMap(spec, self._create_map(spec))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create_map(spec: MapSpec) -> int:
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<IIIII", attr, 0, spec.type, spec.key_size, spec.value_size,
                         spec.max_entries, spec.flags)
        name = "".join(c for c in spec.name if c.isalnum() or c in "_.")[:15].encode()
        struct.pack_into("16s", attr, 28, name)
        fd, err = bpf(BPF_MAP_CREATE, attr)
        if fd < 0:
            if err in (_errno.EPERM, _errno.EACCES):
                raise TracePermissionError(f"cannot create BPF map {spec.name}")
            raise BpfError(f"cannot create BPF map {spec.name} (type {spec.type},"
                           f" {spec.max_entries} entries): {os.strerror(err)}", errno=err,
                           hint="a ring buffer needs memory: try a smaller --ring-mb")
        return fd

    def load(self, name: str, *, expected_attach_type: int = 0,
             prog_type: int = BPF_PROG_TYPE_KPROBE) -> int:
        """Load entry function ``name`` (a kprobe-type program unless told); its fd."""
        if name not in self.obj.functions:
            raise BpfError(f"no BPF function {name} in the compiled object")
        insns = _bind(self.obj.functions[name], self.obj.relocs.get(name, ()),
                      {n: m.fd for n, m in self.maps.items()})
        fd, err, log = self._prog_load(name, insns, expected_attach_type, prog_type,
                                       log_size=0)
        privileged = has_trace_privileges()
        if fd < 0 and (privileged or err not in (_errno.EPERM, _errno.EACCES)):
            # With the privileges, EACCES is the verifier refusing the program:
            # load again with its log to say why.
            fd, err, log = self._prog_load(name, insns, expected_attach_type, prog_type,
                                           log_size=4 << 20)
        if fd < 0:
            if err == _errno.EPERM or (err == _errno.EACCES and not privileged):
                raise TracePermissionError(f"the kernel refused to load BPF program {name}")
            tail = " | ".join(log.strip().splitlines()[-6:])
            raise BpfError(f"the kernel rejected BPF program {name}: {os.strerror(err)}"
                           + (f" (verifier: {tail})" if tail else ""), errno=err)
        self._prog_fds.append(fd)
        return fd

    def _prog_load(self, name: str, insns: bytes, attach_type: int, prog_type: int,
                   log_size: int) -> tuple[int, int, str]:
        code = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(self.obj.license.encode())
        log = ctypes.create_string_buffer(log_size) if log_size else None
        attr = ctypes.create_string_buffer(144)
        struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8,
                         ctypes.addressof(code), ctypes.addressof(lic), 1 if log else 0,
                         log_size, ctypes.addressof(log) if log else 0)
        struct.pack_into("16s", attr, 48, name[:15].encode())
        struct.pack_into("<I", attr, 68, attach_type)
        fd, err = bpf(BPF_PROG_LOAD, attr)
        return fd, err, (log.value.decode("utf-8", "replace") if log else "")

    def close(self) -> None:
        for fd in self._prog_fds:
            os.close(fd)
        self._prog_fds.clear()
        for name, m in self.maps.items():
            if name not in self._borrowed:
                os.close(m.fd)
        self.maps.clear()


# -- the cache --------------------------------------------------------------------


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "apptrace", "bpf")


def cache_key(text: str, compiler: str) -> str:
    h = hashlib.sha256()
    for part in (str(CACHE_FORMAT), platform.release(), compiler, text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _trusted(path: str) -> bool:
    """Ours, and not writable by group or others (the file becomes kernel code)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def cache_get(key: str) -> Optional[CompiledObject]:
    if os.environ.get("APPTRACE_NO_CACHE"):
        return None
    d = _cache_dir()
    path = os.path.join(d, key + ".json")
    if not (_trusted(d) and _trusted(path)):
        return None
    try:
        with open(path) as f:
            return CompiledObject.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_put(key: str, obj: CompiledObject) -> None:
    """Best effort: a read-only home or a full disk only costs the next compile."""
    if os.environ.get("APPTRACE_NO_CACHE"):
        return
    d = _cache_dir()
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        if not _trusted(d):
            return
        tmp = os.path.join(d, f".{key}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(obj.to_json(), f)
        os.replace(tmp, os.path.join(d, key + ".json"))
    except OSError:
        pass
