"""TLS plaintext capture on real processes, checked against what the peer got.

The fixtures (fixtures/c/tls_*.c) print the sha256 of everything they sent
and received over TLS; each test reassembles the captured stream of every
connection direction and compares. Sizes go from 1 byte to 16 MiB in one
connection (a 16 MiB ``SSL_write`` is one call: 1024 ring records).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from helpers import require_program

import apptrace.ssl
from apptrace.errors import NoTlsLibraryError, ProcessNotFoundError, StrippedTlsError
from apptrace.ssl import Chunk, Gap

pytestmark = pytest.mark.bpf

ROOT = Path(__file__).resolve().parents[2]

SWEEP = "1,7,4095,16384,16385,100003,1m,16m"
SMALL = "1,7,16385,100003"
APPTRACE = [sys.executable, "-m", "apptrace"]


# -- helpers ------------------------------------------------------------------------------


class Server:
    """A fixture TLS server on an ephemeral loopback port, serving one client."""

    def __init__(self, out: Path, prog: str, *extra: str) -> None:
        self.proc = subprocess.Popen([str(out / prog), "server", "0", str(out / "tls_cert.pem"),
                                      str(out / "tls_key.pem"), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "port", f"{prog} server did not start: {line}"
        self.port = int(line[1])

    def totals(self, timeout: float = 60) -> dict[str, tuple[int, str]]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return _totals(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def _totals(text: str) -> dict[str, tuple[int, str]]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("sent", "recv"):
            out[parts[0]] = (int(parts[1]), parts[2])
    return out


@pytest.fixture
def servers(fixtures_dir: Path) -> Iterator[Any]:
    made: list[Server] = []

    def start(prog: str = "tls_openssl", *extra: str) -> Server:
        s = Server(fixtures_dir, prog, *extra)
        made.append(s)
        return s

    yield start
    for s in made:
        s.kill()


def _client(out: Path, prog: str, port: int, sizes: str, *extra: str,
            wait: str = "connect") -> subprocess.Popen[str]:
    p = subprocess.Popen([str(out / prog), "client", str(port), sizes, f"wait={wait}", *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def _release(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()


def _capture_client(out: Path, client: str, server: Server, sizes: str, *extra: str,
                    wait: str = "connect", **options: Any) -> tuple[Any, list[Any], dict]:
    """Capture one fixture client from before it connects (or after its
    handshake) to its exit; (capture, items, client totals)."""
    p = _client(out, client, server.port, sizes, *extra, wait=wait)
    try:
        with apptrace.ssl.capture(pid=p.pid, keep=True, **options) as cap:
            _release(p)
            t0 = time.monotonic()
            items = list(cap)
            assert time.monotonic() - t0 < 120, "the capture did not end with its target"
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr
        return cap, items, _totals(stdout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _assert_exact(cap: Any, items: list[Any], mine: dict, peer: dict, server: Server) -> None:
    chunks = [i for i in items if isinstance(i, Chunk)]
    assert chunks, "nothing captured"
    gaps = [i for i in items if isinstance(i, Gap)]
    st = cap.stats()
    assert not gaps and st.lost_bytes == 0 and st.lost_records == 0, (gaps[:3], st)
    conns = {c.conn.id for c in chunks}
    assert len(conns) == 1, cap.connections
    conn = cap.connections[0]
    wrote = cap.stream(conn, "write")
    read = cap.stream(conn, "read")
    assert wrote.complete and read.complete
    # What the client wrote is what the server received, byte for byte.
    assert (len(wrote.data), wrote.sha256()) == peer["recv"] == mine["sent"]
    assert (len(read.data), read.sha256()) == peer["sent"] == mine["recv"]
    assert st.bytes == len(wrote.data) + len(read.data) + sum(
        len(c.data) for c in chunks if c.peek)
    # The connection: its socket and the right 5-tuple (the server's port).
    assert conn.fd is not None and conn.fd >= 0
    assert conn.raddr == ("127.0.0.1", server.port), conn
    assert conn.laddr is not None and conn.laddr[0] == "127.0.0.1"


# -- byte-exact per library ---------------------------------------------------------------


@pytest.mark.parametrize("client,server,extra", [
    ("tls_openssl", "tls_openssl", ()),
    ("tls_openssl_ex", "tls_openssl", ()),
    ("tls_gnutls", "tls_gnutls", ()),
    ("tls_nss", "tls_openssl", ()),
], ids=["openssl", "openssl-ex", "gnutls", "nss"])
def test_sweep_1b_to_16mib_is_byte_exact(fixtures_dir: Path, servers: Any, client: str,
                                         server: str, extra: tuple[str, ...]) -> None:
    srv = servers(server)
    # 64 MiB of ring: a 16 MiB call lands at once, and on a loaded machine the
    # reader may not run for a while (losses are tested on their own below).
    cap, items, mine = _capture_client(fixtures_dir, client, srv, SWEEP, *extra, ring_mb=64)
    _assert_exact(cap, items, mine, srv.totals(), srv)
    # The 16 MiB write is one TLS call for OpenSSL and NSS: many records, one call.
    big = [c for c in items if isinstance(c, Chunk) and c.call_len >= 16 << 20]
    if client != "tls_gnutls":  # gnutls_record_send takes one record per call
        assert len({c.offset - c.call_offset for c in big if c.direction == "write"}) == 1
        assert max(c.call_offset for c in big) >= (16 << 20) - 16384
    funcs = {c.func for c in items if isinstance(c, Chunk)}
    expected = {"tls_openssl": {"SSL_write", "SSL_read"},
                "tls_openssl_ex": {"SSL_write_ex", "SSL_read_ex"},
                "tls_gnutls": {"gnutls_record_send", "gnutls_record_recv"},
                "tls_nss": {"PR_Write", "PR_Send", "PR_Read", "PR_Recv"}}[client]
    assert funcs == expected


def test_gnutls_send2_and_recv_seq(fixtures_dir: Path, servers: Any) -> None:
    srv = servers("tls_gnutls")
    cap, items, mine = _capture_client(fixtures_dir, "tls_gnutls", srv, SMALL, "send2",
                                       "recvseq")
    _assert_exact(cap, items, mine, srv.totals(), srv)
    assert {c.func for c in items} == {"gnutls_record_send2", "gnutls_record_recv_seq"}


def test_nss_plain_descriptors_are_not_captured(fixtures_dir: Path, servers: Any) -> None:
    """tls_nss writes a line to stderr with PR_Write on a non-TLS descriptor."""
    srv = servers("tls_openssl")
    cap, items, mine = _capture_client(fixtures_dir, "tls_nss", srv, "1,5000")
    _assert_exact(cap, items, mine, srv.totals(), srv)
    assert not any(b"plain PR_Write" in c.data for c in items if isinstance(c, Chunk))


def test_peek_is_flagged_and_not_part_of_the_stream(fixtures_dir: Path, servers: Any) -> None:
    for client in ("tls_openssl", "tls_openssl_ex"):
        srv = servers("tls_openssl")
        cap, items, mine = _capture_client(fixtures_dir, client, srv, SMALL, "peek", "bio")
        _assert_exact(cap, items, mine, srv.totals(), srv)
        peeks = [c for c in items if isinstance(c, Chunk) and c.peek]
        assert len(peeks) == len(SMALL.split(","))
        assert {c.func for c in peeks} == {"SSL_peek" if client == "tls_openssl"
                                           else "SSL_peek_ex"}
        # A peeked byte is the first byte the next read returns.
        reads = cap.stream(cap.connections[0], "read").data
        assert all(reads[c.offset:c.offset + 1] == c.data for c in peeks)


def test_attached_after_the_handshake(fixtures_dir: Path, servers: Any) -> None:
    """A connection opened before the capture: its addresses come from /proc."""
    srv = servers("tls_openssl")
    cap, items, mine = _capture_client(fixtures_dir, "tls_openssl", srv, SMALL,
                                       wait="handshake")
    _assert_exact(cap, items, mine, srv.totals(), srv)


def test_static_openssl_found_by_symbols(fixtures_dir: Path, servers: Any) -> None:
    srv = servers("tls_openssl")
    cap, items, mine = _capture_client(fixtures_dir, "tls_openssl_static", srv, SMALL)
    _assert_exact(cap, items, mine, srv.totals(), srv)
    assert [(lib.kind, lib.static) for lib in cap.libraries] == [("openssl", True)]
    assert cap.libraries[0].path.endswith("tls_openssl_static")


def test_path_target_is_system_wide(fixtures_dir: Path, servers: Any) -> None:
    """--path FILE: processes started after the capture are captured too."""
    srv = servers("tls_openssl")
    exe = str(fixtures_dir / "tls_openssl_static")
    with apptrace.ssl.capture(path=exe, keep=True) as cap:
        p = subprocess.run([exe, "client", str(srv.port), SMALL], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        deadline = time.monotonic() + 30
        items: list[Any] = []
        while time.monotonic() < deadline:
            items += cap.poll(0.2)
            done = sum(len(c.data) for c in items if isinstance(c, Chunk))
            if done >= sum(_totals(p.stdout)[k][0] for k in ("sent", "recv")):
                break
        cap.stop()
        items += list(cap)
        mine = _totals(p.stdout)
    _assert_exact(cap, items, mine, srv.totals(), srv)


# -- losses are gaps, counted -------------------------------------------------------------


def test_a_full_ring_makes_counted_gaps(fixtures_dir: Path, servers: Any) -> None:
    """A 1 MiB ring cannot take a 16 MiB call at once: the bytes it drops are
    gaps at their exact offsets, and the counters add up."""
    srv = servers("tls_openssl")
    cap, items, mine = _capture_client(fixtures_dir, "tls_openssl", srv, "16m", ring_mb=1)
    srv.totals()
    st = cap.stats()
    assert st.lost_records > 0 and st.lost_bytes > 0
    conn = cap.connections[0]
    wrote = cap.stream(conn, "write")
    lost = sum(n for _, n, why in wrote.gaps if why == "lost")
    lost += sum(n for _, n, why in cap.stream(conn, "read").gaps if why == "lost")
    assert lost == st.lost_bytes
    assert len(wrote.data) == mine["sent"][0]  # every byte placed: captured or a gap
    assert all(why == "lost" for _, _, why in wrote.gaps)


def test_max_bytes_copies_a_prefix_and_says_so(fixtures_dir: Path, servers: Any) -> None:
    srv = servers("tls_openssl")
    cap, items, mine = _capture_client(fixtures_dir, "tls_openssl", srv, "100000",
                                       max_bytes=1000)
    srv.totals()
    st = cap.stats()
    skipped = [g for g in items if isinstance(g, Gap) and g.reason == "max-bytes"]
    assert skipped and sum(g.length for g in skipped) == st.skipped_bytes
    assert all(len(c.data) <= 1000 for c in items if isinstance(c, Chunk))
    wrote = cap.stream(cap.connections[0], "write")
    assert len(wrote.data) == mine["sent"][0]


# -- real clients: curl, Python's ssl module, node ----------------------------------------


@pytest.fixture
def s_server(fixtures_dir: Path) -> Iterator[int]:
    openssl = require_program("openssl")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([openssl, "s_server", "-www", "-quiet", "-accept", str(port),
                          "-cert", str(fixtures_dir / "tls_cert.pem"),
                          "-key", str(fixtures_dir / "tls_key.pem")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        p.kill()
        p.wait()


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(APPTRACE + args, capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_curl_against_s_server(tmp_path: Path, s_server: int) -> None:
    curl = require_program("curl")
    out = tmp_path / "curl.jsonl"
    r = _cli(["ssl", "--json", "-o", str(out), "--", curl, "-sk",
              f"https://127.0.0.1:{s_server}/apptrace-probe"])
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    recs = _jsonl(out)
    import base64

    wrote = b"".join(base64.b64decode(x["data_b64"]) for x in recs
                     if x["direction"] == "write")
    read = b"".join(base64.b64decode(x["data_b64"]) for x in recs if x["direction"] == "read")
    assert wrote.startswith(b"GET /apptrace-probe HTTP/1.1\r\n")
    assert read.startswith(b"HTTP/1.0 200 ok\r\n")
    assert {x["comm"] for x in recs} == {"curl"} and {x["lib"] for x in recs} == {"openssl"}
    conns = {json.dumps(x["conn"], sort_keys=True) for x in recs}
    assert len(conns) == 1
    conn = recs[0]["conn"]
    assert conn["raddr"] == f"127.0.0.1:{s_server}" and conn["laddr"].startswith("127.0.0.1:")
    assert conn["fd"] >= 0
    assert "target exited" in r.stderr and "0 lost" in r.stderr
    assert "command exited with status 0" in r.stderr


PY_CLIENT = """
import socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
print("ready", flush=True)
sys.stdin.readline()
with socket.create_connection(("127.0.0.1", port)) as s:
    with ctx.wrap_socket(s) as t:
        t.sendall(b"GET /from-python HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        data = b""
        while True:
            b = t.recv(65536)
            if not b:
                break
            data += b
print(len(data), data.split(b"\\r\\n")[0].decode(), flush=True)
"""


def test_python_ssl_module_uses_the_ex_forms(s_server: int) -> None:
    p = subprocess.Popen([sys.executable, "-c", PY_CLIENT, str(s_server)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        with apptrace.ssl.capture(pid=p.pid, keep=True) as cap:
            _release(p)  # type: ignore[arg-type]
            items = list(cap)
        n, status = p.stdout.read().split(" ", 1)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    chunks = [c for c in items if isinstance(c, Chunk)]
    assert {c.func for c in chunks} == {"SSL_write_ex", "SSL_read_ex"}
    conn = cap.connections[0]
    assert cap.stream(conn, "write").data.startswith(b"GET /from-python HTTP/1.0\r\n")
    body = cap.stream(conn, "read")
    assert body.complete and len(body.data) == int(n)
    assert body.data.startswith(status.strip().encode())
    assert conn.raddr == ("127.0.0.1", s_server)


NODE_CLIENT = """
const https = require('https');
const req = https.request({host: '127.0.0.1', port: process.argv[2], path: '/from-node',
                           rejectUnauthorized: false}, (res) => {
  let n = 0;
  res.on('data', (d) => { n += d.length; });
  res.on('end', () => { console.log(res.statusCode, n); });
});
req.end();
"""


def test_node_static_openssl(tmp_path: Path, s_server: int) -> None:
    node = require_program("node")
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    with apptrace.ssl.capture(command=[node, str(script), str(s_server)], keep=True,
                              command_stdout=subprocess.PIPE) as cap:
        items = list(cap)
        status = cap.target.child.proc.stdout.read().decode().split()
    node_libs = [lib for lib in cap.libraries if lib.path == os.path.realpath(node)
                 or lib.path == node]
    assert node_libs and node_libs[0].static, [lib.describe() for lib in cap.libraries]
    chunks = [c for c in items if isinstance(c, Chunk)]
    assert chunks and {c.comm for c in chunks} == {"node"}
    conn = chunks[0].conn
    assert cap.stream(conn, "write").data.startswith(b"GET /from-node HTTP/1.1\r\n")
    body = cap.stream(conn, "read").data
    assert body.startswith(b"HTTP/1.0 200 ok\r\n")
    assert status[0] == "200" and int(status[1]) == len(body.split(b"\r\n\r\n", 1)[1])


# -- ending, bad input --------------------------------------------------------------------


def test_target_exits_mid_capture(fixtures_dir: Path, servers: Any) -> None:
    """The client dies (SIGKILL) in the middle of a 16 MiB exchange: the
    capture ends by itself with its summary."""
    srv = servers("tls_openssl")
    p = _client(fixtures_dir, "tls_openssl", srv.port, "16m,16m,16m,16m", "rbuf=1024")
    r: Optional[subprocess.CompletedProcess[str]] = None
    try:
        cli = subprocess.Popen(APPTRACE + ["ssl", "-p", str(p.pid), "-f", "jsonl", "-o",
                                           os.devnull], stderr=subprocess.PIPE, text=True,
                               cwd=str(ROOT))
        assert cli.stderr is not None
        head = ""
        while "capturing TLS" not in head:  # attached: now let the client run
            line = cli.stderr.readline()
            assert line, "apptrace ended before attaching"
            head += line
        _release(p)
        time.sleep(0.5)
        p.kill()
        p.communicate()
        _, err = cli.communicate(timeout=60)
        r = subprocess.CompletedProcess(cli.args, cli.returncode, "", head + err)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert r.returncode == 0, r.stderr
    assert "capturing TLS of process" in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("apptrace: target exited:")]
    assert line, r.stderr
    calls = int(line[0].split("target exited: ")[1].split(" TLS call")[0])
    assert calls > 0


def test_pid_without_tls_names_what_was_searched() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(NoTlsLibraryError) as exc:
            apptrace.ssl.capture(pid=p.pid)
        r = _cli(["ssl", "-p", str(p.pid)])
    finally:
        p.kill()
        p.wait()
    msg = str(exc.value)
    assert "OpenSSL" in msg and "GnuTLS" in msg and "NSS" in msg and "sleep" in msg
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptrace: error: process") \
        and "OpenSSL" in lines[0], r.stderr


def test_stripped_static_binary_says_so(fixtures_dir: Path, servers: Any) -> None:
    srv = servers("tls_openssl")
    p = _client(fixtures_dir, "tls_openssl_stripped", srv.port, "1")
    try:
        with pytest.raises(StrippedTlsError) as exc:
            apptrace.ssl.capture(pid=p.pid)
        r = _cli(["ssl", "--path", str(fixtures_dir / "tls_openssl_stripped")])
    finally:
        p.kill()
        p.communicate()
    assert "stripped" in str(exc.value) and "OpenSSL" in str(exc.value)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "stripped" in r.stderr


def test_bad_pid_and_usage() -> None:
    with pytest.raises(ProcessNotFoundError):
        apptrace.ssl.Capture(pid=2 ** 22 + 12345)
    r = _cli(["ssl", "-p", str(2 ** 22 + 12345)])
    assert r.returncode == 1 and "no process" in r.stderr
    r = _cli(["ssl"])
    assert r.returncode == 2 and "exactly one target" in r.stderr


# -- pcapng -------------------------------------------------------------------------------


def test_pcapng_replays_the_streams(tmp_path: Path, fixtures_dir: Path, servers: Any) -> None:
    srv = servers("tls_openssl")
    p = _client(fixtures_dir, "tls_openssl", srv.port, SMALL)
    out = tmp_path / "tls.pcapng"
    try:
        cli = subprocess.Popen(APPTRACE + ["ssl", "-p", str(p.pid), "-f", "pcapng", "-o",
                                           str(out)], stderr=subprocess.PIPE, text=True,
                               cwd=str(ROOT))
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        _release(p)
        stdout, _ = p.communicate(timeout=60)
        _, err = cli.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert cli.returncode == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    mine, peer = _totals(stdout), srv.totals()

    from scapy.layers.inet import IP, TCP
    from scapy.utils import rdpcap

    streams: dict[str, dict[int, bytes]] = {"write": {}, "read": {}}
    for pkt in rdpcap(str(out)):
        tcp = pkt[TCP]
        payload = bytes(tcp.payload)
        if not payload:
            continue
        d = "read" if tcp.sport == srv.port else "write"
        assert pkt[IP].src == "127.0.0.1" and srv.port in (tcp.sport, tcp.dport)
        streams[d][tcp.seq] = payload
    for d, key in (("write", "sent"), ("read", "recv")):
        data = b"".join(streams[d][k] for k in sorted(streams[d]))
        assert (len(data), hashlib.sha256(data).hexdigest()) == mine[key]
    assert peer["recv"] == mine["sent"]


def test_text_and_hex_formats(fixtures_dir: Path, servers: Any) -> None:
    for fmt in ("text", "hex"):
        srv = servers("tls_openssl")
        p = _client(fixtures_dir, "tls_openssl", srv.port, "5")
        try:
            cli = subprocess.Popen(APPTRACE + ["ssl", "-p", str(p.pid), "-f", fmt],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=str(ROOT))
            assert cli.stderr is not None
            while "capturing TLS" not in cli.stderr.readline():
                pass
            _release(p)
            p.communicate(timeout=60)
            text, err = cli.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
        srv.totals()
        headers = [x for x in text.splitlines() if " conn#1 " in x]
        # 8-byte header + 5 bytes out, 8 + 5 back, 8-byte goodbye: 5 calls
        assert len(headers) == 5, text
        assert f"-> 127.0.0.1:{srv.port} write 8 bytes" in headers[0]
        assert "tls_openssl[" in headers[0] and " openssl SSL_write " in headers[0]
        if fmt == "hex":
            assert "  00000000  00 00 00 00 00 00 00 05" in text
        else:
            assert "\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x05" in text


LATE_LOADER = """
import ctypes, socket, sys, time
ctypes.CDLL("libgnutls.so.30")      # a TLS library from the start...
print("ready", flush=True)
sys.stdin.readline()
import ssl                           # ...and OpenSSL only now (dlopen of _ssl, libssl)
time.sleep(2.5)                      # the capture looks for new libraries every second
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    with ctx.wrap_socket(s) as t:
        t.sendall(b"GET /late HTTP/1.0\\r\\n\\r\\n")
        while t.recv(65536):
            pass
"""


def test_library_loaded_after_attach_is_attached(s_server: int) -> None:
    p = subprocess.Popen([sys.executable, "-c", LATE_LOADER, str(s_server)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        with apptrace.ssl.capture(pid=p.pid, keep=True) as cap:
            assert [lib.kind for lib in cap.libraries] == ["gnutls"]
            _release(p)  # type: ignore[arg-type]
            items = list(cap)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert any(lib.kind == "openssl" and "libssl" in lib.path for lib in cap.libraries)
    chunks = [c for c in items if isinstance(c, Chunk)]
    assert chunks and chunks[0].data.startswith(b"GET /late HTTP/1.0")


INTERLEAVED = """
import socket, ssl, struct, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
conns = [ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(p)))) for p in sys.argv[1:]]
print("ready", flush=True)
sys.stdin.readline()
def exact(t, n):
    b = b""
    while len(b) < n:
        b += t.recv(n - len(b))
    return b
for rnd in range(3):                      # one thread, both connections in turn
    for i, t in enumerate(conns):
        size = 1000 * (i + 1) + rnd
        t.sendall(struct.pack(">Q", size) + bytes([65 + i]) * size)
    for t in conns:
        n = struct.unpack(">Q", exact(t, 8))[0]
        exact(t, n)
for t in conns:
    t.sendall(struct.pack(">Q", 2 ** 64 - 1))
    t.close()
"""


def test_two_connections_in_one_thread_stay_apart(servers: Any) -> None:
    """Connection identity is the TLS object, not the thread: interleaved calls
    on two connections from one thread land in their own streams."""
    a, b = servers("tls_openssl"), servers("tls_openssl")
    p = subprocess.Popen([sys.executable, "-c", INTERLEAVED, str(a.port), str(b.port)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        with apptrace.ssl.capture(pid=p.pid, keep=True) as cap:
            _release(p)  # type: ignore[arg-type]
            items = list(cap)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert len({c.tid for c in items if isinstance(c, Chunk)}) == 1
    by_port = {c.raddr[1]: c for c in cap.connections if c.raddr}
    assert set(by_port) == {a.port, b.port}
    for srv, letter in ((a, b"A"), (b, b"B")):
        conn = by_port[srv.port]
        wrote = cap.stream(conn, "write")
        peer = srv.totals()
        assert (len(wrote.data), hashlib.sha256(wrote.data).hexdigest()) == peer["recv"]
        assert letter * 1000 in wrote.data and (b"B" if letter == b"A" else b"A") * 100 \
            not in wrote.data
        read = cap.stream(conn, "read")
        assert (len(read.data), read.sha256()) == peer["sent"]


def test_without_uprobe_multi(fixtures_dir: Path, servers: Any) -> None:
    """Kernels before 6.6: one perf-event uprobe per function, no attach cookies."""
    srv = servers("tls_openssl")
    cap, items, mine = _capture_client(fixtures_dir, "tls_openssl_ex", srv, SMALL, "peek",
                                       multi=False)
    _assert_exact(cap, items, mine, srv.totals(), srv)
    assert {c.func for c in items if isinstance(c, Chunk)} == \
        {"SSL_write_ex", "SSL_read_ex", "SSL_peek_ex"}
