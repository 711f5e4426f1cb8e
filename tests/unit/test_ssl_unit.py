"""TLS capture pieces that need no BPF: reassembly, writers, addresses,
library recognition, the program's BTF and record layouts."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
from pathlib import Path

import pytest

from apptrace.cli import main
from apptrace.errors import OptionError
from apptrace.ssl import (
    Capture,
    Chunk,
    Connection,
    Gap,
    _kernel,
    _loader,
    libraries,
    net,
    reassemble,
)
from apptrace.ssl.formats import HexWriter, JsonlWriter, PcapngWriter, TextWriter, escape_bytes

CONN = Connection(3, 100, 0x5555, "openssl", 7, ("127.0.0.1", 40000), ("127.0.0.1", 443))


def chunk(offset: int, data: bytes, direction: str = "write", *, call_len: int = 0,
          call_offset: int = 0, peek: bool = False, conn: Connection = CONN) -> Chunk:
    return Chunk(1_000_000_000, 100, 101, "client", "openssl",
                 "SSL_write" if direction == "write" else "SSL_read", direction, conn, offset,
                 data, call_len or len(data), call_offset, peek)


def gap(offset: int, length: int, reason: str = "lost", direction: str = "write") -> Gap:
    return Gap(2_000_000_000, 100, 101, "client", "openssl", "SSL_write", direction, CONN,
               offset, length, reason)


# -- reassembly ----------------------------------------------------------------------------


def test_reassemble_orders_by_offset_and_skips_peeks() -> None:
    items = [chunk(5, b"world"), chunk(0, b"hello"), chunk(0, b"h", "read", peek=True),
             chunk(0, b"hi", "read")]
    s = reassemble(items, CONN, "write")
    assert s.data == b"helloworld" and s.complete and s.start == 0
    assert reassemble(items, 3, "read").data == b"hi"


def test_reassemble_keeps_gaps_in_place() -> None:
    items = [chunk(0, b"ab"), gap(2, 3), chunk(5, b"cd")]
    s = reassemble(items, CONN, "write")
    assert s.data == b"ab\0\0\0cd" and s.gaps == ((2, 3, "lost"),) and not s.complete


def test_reassemble_names_unreported_holes() -> None:
    s = reassemble([chunk(0, b"ab"), chunk(4, b"cd")], CONN, "write")
    assert s.gaps == ((2, 2, "missing"),)


def test_reassemble_errors() -> None:
    with pytest.raises(ValueError):
        reassemble([], CONN, "sideways")
    with pytest.raises(LookupError):
        reassemble([chunk(0, b"x")], 99, "write")


# -- objects and addresses -----------------------------------------------------------------


def test_connection_text_and_json() -> None:
    assert CONN.five_tuple == "tcp 127.0.0.1:40000 -> 127.0.0.1:443"
    assert CONN.to_json() == {"id": 3, "fd": 7, "laddr": "127.0.0.1:40000",
                              "raddr": "127.0.0.1:443"}
    v6 = Connection(1, 1, 1, "gnutls", 4, ("::1", 5), ("::1", 6))
    assert v6.five_tuple == "tcp [::1]:5 -> [::1]:6"
    assert Connection(2, 1, 1, "openssl").five_tuple == "?"
    with pytest.raises(AttributeError):
        CONN.fd = 9  # type: ignore[misc]  # frozen


def test_chunk_json_matches_the_documented_record() -> None:
    c = chunk(10, b"GET /", call_len=100, call_offset=0)
    j = c.to_json()
    assert set(j) >= {"ts_ns", "pid", "tid", "comm", "lib", "func", "direction", "conn",
                      "offset", "len", "data_b64"}
    assert base64.b64decode(j["data_b64"]) == b"GET /" and j["len"] == 5
    assert j["call_len"] == 100 and "peek" not in j
    g = gap(4, 8).to_json()
    assert g["data_b64"] is None and g["gap"] == "lost" and g["len"] == 8


def test_proc_net_addresses() -> None:
    assert net._hex_addr("0100007F:1F90") == ("127.0.0.1", 8080)
    assert net._hex_addr("00000000000000000000000001000000:01BB") == ("::1", 443)
    assert net._hex_addr("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)
    assert net.kernel_addr(2, bytes([10, 0, 0, 1]) + bytes(12), 22) == ("10.0.0.1", 22)
    assert net.kernel_addr(99, bytes(16), 1) is None


# -- writers -------------------------------------------------------------------------------


def test_escape_bytes_keeps_lines_and_escapes_the_rest() -> None:
    assert escape_bytes(b"GET / HTTP/1.1\r\nX: \x1b[31m\\\t\xff\n") == \
        "GET / HTTP/1.1\\r\nX: \\x1b[31m\\\\\t\\xff\n"


def test_text_writer_headers_once_per_call() -> None:
    out = io.StringIO()
    w = TextWriter(out)
    w.write(chunk(0, b"abc", call_len=6))
    w.write(chunk(3, b"def", call_len=6, call_offset=3))
    w.write(gap(6, 10))
    lines = out.getvalue().splitlines()
    assert "client[100/101] openssl SSL_write conn#3 tcp 127.0.0.1:40000 -> 127.0.0.1:443" \
        " write 6 bytes" in lines[0]
    assert lines[1] == "abcdef"
    assert lines[2].startswith("-- ") and "10 bytes at offset 6 lost" in lines[2]


def test_hex_writer_offsets_within_the_call() -> None:
    out = io.StringIO()
    w = HexWriter(out)
    w.write(chunk(100, bytes(range(20)), call_len=40, call_offset=20))
    text = out.getvalue()
    assert "  00000014  00 01 02" in text and "|................|" in text


def test_jsonl_writer() -> None:
    out = io.StringIO()
    JsonlWriter(out).write(chunk(0, b"\x00\x01"))
    assert json.loads(out.getvalue())["data_b64"] == "AAE="


def test_pcapng_writer_round_trip(tmp_path: Path) -> None:
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap

    path = tmp_path / "x.pcapng"
    with open(path, "wb") as f:
        w = PcapngWriter(f, 0)
        w.write(chunk(0, b"GET / HTTP/1.1\r\n\r\n"))
        w.write(chunk(0, b"HTTP/1.1 200 OK\r\n\r\n", "read"))
        w.write(gap(19, 5))
        w.write(chunk(24, b"more"))
        w.close()
    pkts = rdpcap(str(path))
    data = [(p[TCP].sport, p[TCP].seq, bytes(p[TCP].payload)) for p in pkts]
    assert [d for d in data if d[2]] == [
        (40000, PcapngWriter._ISN_LOCAL, b"GET / HTTP/1.1\r\n\r\n"),
        (443, PcapngWriter._ISN_REMOTE, b"HTTP/1.1 200 OK\r\n\r\n"),
        (40000, PcapngWriter._ISN_LOCAL + 24, b"more")]  # the gap is a missing segment
    assert pkts[0][TCP].flags == "S"


# -- the BPF side's layout and linking -----------------------------------------------------


def test_funcs_and_masks() -> None:
    assert [f.id for f in _kernel.FUNCS] == list(range(len(_kernel.FUNCS)))
    assert len(_kernel.FUNCS) <= 16  # the cookie is masked with 15
    text = _kernel.render(64)
    assert "BPF_RINGBUF_OUTPUT(ssl_rb, 64);" in text
    write_mask = sum(1 << f.id for f in _kernel.FUNCS if f.write)
    assert f"#define WRITE_MASK {write_mask:#x}" in text
    assert f"{_kernel.LOOP_PLACEHOLDER:#x}ULL" in text
    assert _kernel.DATA_HDR.size == 80 and _kernel.CONN_REC.size == 96
    assert _kernel.CLOSE_REC.size == 48


def test_btf_for_the_loop_callback() -> None:
    blob = _loader._btf("ssl_return", "ssl_chunk")
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", blob)
    assert (magic, version, hdr_len) == (0xEB9F, 1, 24)
    assert len(blob) == 24 + type_len + str_len and str_off == type_len
    strings = blob[24 + str_off:]
    assert b"\0ssl_return\0" in strings and strings.endswith(b"ssl_chunk\0")


def test_callback_must_read_its_context_first() -> None:
    mov_r6_r2 = struct.pack("<BBhi", 0xBF, 0x26, 0, 0)
    mov_r2_imm = struct.pack("<BBhi", 0xB7, 0x02, 0, 1)
    assert _loader._reads_r2_first(mov_r6_r2)
    assert not _loader._reads_r2_first(mov_r2_imm + mov_r6_r2)


# -- libraries and options -----------------------------------------------------------------


def test_libraries_recognised_by_symbols(fixtures_dir: Path) -> None:
    static = libraries.inspect_file(str(fixtures_dir / "tls_openssl_static"))
    assert [(lib.kind, lib.static) for lib in static] == [("openssl", True)]
    assert set(static[0].functions) == {"SSL_read", "SSL_read_ex", "SSL_peek", "SSL_peek_ex",
                                        "SSL_write", "SSL_write_ex"}
    hooks = {h.symbol for h in static[0].hooks}
    assert {"SSL_set_fd", "SSL_set_bio", "SSL_free"} <= hooks
    stripped = str(fixtures_dir / "tls_openssl_stripped")
    assert libraries.inspect_file(stripped) == []
    assert libraries.openssl_without_symbols(stripped) == "OpenSSL"
    assert libraries.inspect_file(str(fixtures_dir / "tls_fx.h")) == []  # not ELF
    assert libraries.openssl_without_symbols("/bin/sh") is None


def test_nspr_alone_is_not_tls() -> None:
    nspr = "/usr/lib/x86_64-linux-gnu/libnspr4.so"
    if not os.path.exists(nspr):
        pytest.skip("libnspr4 not installed")
    assert libraries.libraries_of_files([(nspr, nspr)]) == []


def test_capture_options_are_checked() -> None:
    with pytest.raises(OptionError):
        Capture(pid=os.getpid(), ring_mb=0)
    with pytest.raises(OptionError):
        Capture(pid=os.getpid(), max_bytes=0)
    with pytest.raises(ValueError):
        Capture(pid=os.getpid(), path="/bin/sh")


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ssl", "-p", "1", "--path", "/bin/sh"]) == 2
    assert "exactly one target" in capsys.readouterr().err
    assert main(["ssl", "-p", "1", "--max-bytes", "0"]) == 2
    assert "--max-bytes" in capsys.readouterr().err
