"""Socket addresses of a process's descriptor, from /proc (for sockets the
kernel-side tracepoints did not see being set up: opened before attaching)."""

from __future__ import annotations

import os
import socket
from typing import Optional

__all__ = ["socket_inode", "tcp_addresses", "kernel_addr"]

Addr = tuple[str, int]


def socket_inode(pid: int, fd: int) -> Optional[int]:
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def _hex_addr(text: str) -> Addr:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    # /proc/net/tcp prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words), int(port, 16)
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped: show the IPv4 address
        return socket.inet_ntop(socket.AF_INET, words[12:]), int(port, 16)
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)


def tcp_addresses(pid: int, fd: int) -> Optional[tuple[Addr, Addr]]:
    """(local, remote) of a TCP socket descriptor, or None."""
    inode = socket_inode(pid, fd)
    if inode is None:
        return None
    want = str(inode)
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] == want:
                        return _hex_addr(parts[1]), _hex_addr(parts[2])
        except OSError:
            continue
    return None


def kernel_addr(family: int, raw: bytes, port: int) -> Optional[Addr]:
    """An address as the inet_sock_set_state tracepoint gave it."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4]), port
    if family == socket.AF_INET6:
        if raw[:12] == b"\0" * 10 + b"\xff\xff":
            return socket.inet_ntop(socket.AF_INET, raw[12:16]), port
        return socket.inet_ntop(socket.AF_INET6, raw[:16]), port
    return None


