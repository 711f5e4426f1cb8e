"""The machine's real programs, traced for real, each against what it says it did.

Fixtures only show that apptrace agrees with programs written for it. These
tests trace programs as users find them (Debian's python3.11, PostgreSQL 15,
libstdc++, a HotSpot JVM, curl over OpenSSL 3) and compare with an account
the program itself gives: CPython's ``gc.callbacks``, a recursive function's
own call counter, the SQL the test sent, the exceptions a fixture caught,
the JVM's ``-Xlog:gc`` pause lines, the byte counts curl reports.

A missing program fails under CI (``make setup`` installs them all) and skips
with the reason elsewhere (see ``helpers.missing``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import OutputDrain, missing, require_program

from apptrace.events import Event
from apptrace.session import Session

pytestmark = pytest.mark.bpf

PYTHON311 = "/usr/bin/python3.11"
PG_BIN = "/usr/lib/postgresql/15/bin"
JAVA = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java"


def _python311() -> str:
    path = require_program("python3.11", PYTHON311)
    out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True).stdout
    if "gc__start" not in out:
        missing(f"{path} has no USDT probes (Debian's python3.11 has them)")
    return path


def _collect(s: Session, budget: float = 60) -> list[Event]:
    t0 = time.monotonic()
    events = list(s.events(timeout=budget))
    assert time.monotonic() - t0 < budget, "events() did not end when the target exited"
    return events


# -- CPython 3.11 ----------------------------------------------------------------------------

GC_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys, time
    starts = []
    def on_gc(phase, info):
        if phase == "start":
            starts.append((time.monotonic_ns(), info["generation"]))
    gc.callbacks.append(on_gc)
    print("ready", flush=True)
    sys.stdin.readline()
    t_go = time.monotonic_ns()
    keep = []
    for i in range(60):
        gc.collect(i % 3)
        keep.append([[] for _ in range(2000)])  # container allocations: automatic collections
        if len(keep) > 8:
            keep.clear()
    t_end = time.monotonic_ns()
    gens = [g for t, g in starts if t_go < t < t_end]
    print(json.dumps({"t_go": t_go, "t_end": t_end, "generations": gens}), flush=True)
    os._exit(0)  # no collections at interpreter shutdown
""")


def test_python_gc_start_matches_gc_callbacks(spawn: Any) -> None:
    """Every collection the interpreter reports through gc.callbacks, with its
    generation, and no other, in the same order (both clocks are CLOCK_MONOTONIC)."""
    py = _python311()
    child = spawn([py, "-c", GC_SCRIPT])
    with Session(pid=child.pid) as s:
        s.add("usdt:python:gc__start")
        s.start()
        child.send("\n")
        report = json.loads(child.readline())
        events = _collect(s)
        stats = s.stats()
    t_go, t_end, gens = report["t_go"], report["t_end"], report["generations"]
    got = [ev.args[0] for ev in events if t_go < ev.ts_ns < t_end]
    assert got == gens
    assert len(gens) > 60, "expected the automatic collections too"
    assert {0, 1, 2} <= set(gens)
    assert stats.lost == 0 and stats.decode_errors == 0


RECURSE_SCRIPT = textwrap.dedent("""
    import sys
    calls = 0
    def fib(n):
        global calls
        calls += 1
        return n if n < 2 else fib(n - 1) + fib(n - 2)
    print("ready", flush=True)
    sys.stdin.readline()
    fib(17)
    print("calls", calls, flush=True)
""")


def test_python_function_entry_sees_every_recursive_call(spawn: Any, tmp_path: Path) -> None:
    """``function__entry`` alone (no ``python:line``) must deliver each call of a
    Python function made from Python, as the script counts them."""
    py = _python311()
    script = tmp_path / "recurse.py"
    script.write_text(RECURSE_SCRIPT)
    def_line = RECURSE_SCRIPT.splitlines().index("def fib(n):") + 1
    child = spawn([py, str(script)])
    with Session(pid=child.pid, str_max=256) as s:
        s.add("usdt:python:function__entry(str,str,int)")
        s.start()
        child.send("\n")
        drain = OutputDrain(child)
        events = _collect(s)
        printed = drain.lines()
    calls = int(next(ln.split()[1] for ln in printed if ln.startswith("calls ")))
    assert calls == 5167  # fib(17) makes 2*fib(18)-1 calls
    fib = [ev.args for ev in events if ev.args[1] == "fib"]
    assert len(fib) == calls
    assert all(a == (str(script), "fib", def_line) for a in fib), fib[:3]


# -- PostgreSQL 15 ---------------------------------------------------------------------------


@pytest.fixture
def pg_cluster() -> Iterator[tuple[str, int, int]]:
    """A throwaway cluster owned by the postgres user, listening only on a unix
    socket in its own directory: (socket dir, port, postmaster pid)."""
    require_program("postgres", f"{PG_BIN}/postgres")
    for tool in ("initdb", "pg_ctl", "psql"):
        require_program(tool, f"{PG_BIN}/{tool}")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        missing("no postgres user (the postgresql-15 package creates it)")
    top = tempfile.mkdtemp(prefix="apptrace-pg-")
    os.chown(top, user.pw_uid, user.pw_gid)
    data = os.path.join(top, "data")
    as_pg: dict[str, Any] = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                                 cwd=top, capture_output=True, text=True, timeout=120,
                                 env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    with socket.socket() as probe:  # a port nobody uses: it names the socket file
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = False
    try:
        r = subprocess.run([f"{PG_BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres",
                            "--no-sync"], **as_pg)
        assert r.returncode == 0, r.stderr
        opts = f"-k {top} -p {port} -c listen_addresses='' -c fsync=off"
        r = subprocess.run([f"{PG_BIN}/pg_ctl", "-D", data, "-o", opts, "-l",
                            os.path.join(top, "log"), "-w", "-t", "60", "start"], **as_pg)
        assert r.returncode == 0, r.stdout + r.stderr
        started = True
        with open(os.path.join(data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        yield top, port, postmaster
    finally:
        if started:
            subprocess.run([f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                           **as_pg)
        shutil.rmtree(top, ignore_errors=True)


def test_postgres_query_start_across_new_backends(pg_cluster: tuple[str, int, int]) -> None:
    """Traced by path (every process running the binary, including backends
    forked after attach): each query the test sends, from its own backend."""
    sockdir, port, postmaster = pg_cluster
    postgres = f"{PG_BIN}/postgres"
    tag = f"apptrace-{uuid.uuid4().hex[:12]}"
    queries = [f"SELECT '{tag}-{i}' AS n, {i} + 1" for i in range(6)]
    with Session(path=postgres, str_max=128) as s:
        s.add("usdt:postgresql:query__start(str)")
        s.start()
        for q in queries:
            r = subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-A", "-t", "-h", sockdir,
                                "-p", str(port), "-U", "postgres", "-d", "postgres", "-c", q],
                               user="postgres", group="postgres", extra_groups=[],
                               capture_output=True, text=True, timeout=60, cwd=sockdir)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip().startswith(f"{tag}-")
        events: list[Event] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events += s.poll(0.2)
            if sum(tag in str(ev.args[0]) for ev in events) >= len(queries):
                break
        events += s.poll(0, flush=True)
        stats = s.stats()
    mine = [ev for ev in events if tag in str(ev.args[0])]
    assert [ev.args[0] for ev in mine] == queries
    pids = [ev.pid for ev in mine]
    assert len(set(pids)) == len(queries), "one new backend per connection"
    assert postmaster not in pids
    assert all(ev.probe.binary == postgres for ev in mine)
    assert stats.lost == 0 and stats.per_probe["usdt:postgresql:query__start"] == len(events)


# -- libstdc++ ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cxx_throw_pie", "cxx_throw_nopie"])
def test_libstdcxx_throw_count_and_arguments(fixtures_dir: Path, spawn: Any, name: str) -> None:
    """``libstdcxx:throw`` lives in libstdc++.so.6, found through the process's
    maps; its arguments are the exception object and its type_info."""
    n = 400
    child = spawn([fixtures_dir / name, n, "wait"])
    with Session(pid=child.pid) as s:
        s.add("usdt:libstdcxx:throw")
        s.start()
        child.send("\n")
        drain = OutputDrain(child)
        events = _collect(s)
        printed = drain.lines()
    tinfo = int(next(ln.split()[1] for ln in printed if ln.startswith("typeinfo ")))
    thrown = [int(ln.split()[1]) for ln in printed if ln.startswith("throw ")]
    assert f"thrown {n}" in printed and len(thrown) == n
    assert len(events) == n
    assert all("libstdc++" in os.path.basename(ev.probe.binary) for ev in events)
    assert [ev.args for ev in events] == [(obj, tinfo) for obj in thrown]


# -- a HotSpot JVM ---------------------------------------------------------------------------

JAVA_GC = textwrap.dedent("""
    import java.io.*;
    public class ApptraceGc {
        public static void main(String[] a) throws Exception {
            int n = Integer.parseInt(a[0]);
            System.out.println("ready");
            System.out.flush();
            new BufferedReader(new InputStreamReader(System.in)).readLine();
            long t0 = System.nanoTime();
            for (int i = 0; i < n; i++) System.gc();
            long t1 = System.nanoTime();
            System.out.println("window " + t0 + " " + t1);
            System.out.flush();
        }
    }
""")
PAUSE = re.compile(r"^\[(\d+)ns\].* GC\(\d+\) Pause (.*)$")


def _stop_jvm(proc: subprocess.Popen[str]) -> None:
    """SIGTERM first: the JVM's own exit removes its attach socket."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.jvm
def test_jvm_gc_begin_end_pairs_match_the_gc_log(tmp_path: Path) -> None:
    java = require_program("java", JAVA)
    n = 8
    src = tmp_path / "ApptraceGc.java"
    src.write_text(JAVA_GC)
    log = tmp_path / "gc.log"
    # timenanos is System.nanoTime(): CLOCK_MONOTONIC, the clock of event stamps.
    proc = subprocess.Popen([java, "-XX:+UseG1GC", "-Xmx64m", f"-Xlog:gc:file={log}:tn",
                             str(src), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        with Session(pid=proc.pid) as s:
            s.add("usdt:hotspot:gc__begin")
            s.add("usdt:hotspot:gc__end")
            s.start()
            proc.stdin.write("\n")
            proc.stdin.flush()
            window = proc.stdout.readline().split()
            assert window[0] == "window", window
            events = _collect(s)
            stats = s.stats()
    finally:
        _stop_jvm(proc)
    t0, t1 = int(window[1]), int(window[2])
    pauses = []
    for line in log.read_text().splitlines():
        m = PAUSE.match(line)
        if m and t0 < int(m.group(1)) < t1:
            pauses.append(m.group(2))
    assert sum(p.startswith("Full (System.gc())") for p in pauses) == n, pauses
    spans = [ev for ev in events if t0 < ev.ts_ns < t1]
    names = [ev.probe.name for ev in spans]
    # Each pause is one begin/end pair, on one thread, never nested.
    assert names == ["hotspot:gc__begin", "hotspot:gc__end"] * len(pauses), names
    for begin, end in zip(spans[::2], spans[1::2]):
        assert begin.tid == end.tid and begin.ts_ns < end.ts_ns
        assert end.args == ()
    assert sum(ev.args[0] == 1 for ev in spans[::2]) == n  # System.gc(): a full collection
    assert stats.lost == 0 and stats.decode_errors == 0


# -- curl over OpenSSL 3 --------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    """``openssl s_server -www`` on a free loopback port, with a throwaway certificate."""
    openssl = require_program("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-subj", "/CN=localhost", "-days", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                               str(cert), "-key", str(key), "-www"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        seen = []
        while not seen or seen[-1] != "ACCEPT":  # it says so once it listens
            line = server.stdout.readline()
            assert line, f"s_server ended: {seen}"
            seen.append(line.strip())
        yield port
    finally:
        server.kill()
        server.wait()


def test_ssl_write_from_curl_has_the_request_bytes(tls_server: int) -> None:
    """A uprobe on libssl's SSL_write sees the plaintext curl sends (the buffer
    is not NUL-terminated: its length is the third argument, ``str[arg2]``),
    and the lengths add up to the request size curl reports."""
    curl = require_program("curl")
    port = tls_server
    tag = uuid.uuid4().hex[:16]
    with Session(str_max=1024) as s:
        s.add("uprobe:libssl.so.3:SSL_write(ptr,str[arg2],int)")
        s.start()
        proc = subprocess.Popen([curl, "-sk", "--http1.1", "-o", "/dev/null", "-w",
                                 "%{http_code} %{size_request}", "-H", f"X-Apptrace: {tag}",
                                 f"https://127.0.0.1:{port}/apptrace/{tag}"],
                                stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=60)
        events: list[Event] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(ev.pid == proc.pid for ev in events):
            events += s.poll(0.2)
        events += s.poll(0, flush=True)
    code, size_request = (int(v) for v in out.split())
    assert code == 200
    writes = [ev for ev in events if ev.pid == proc.pid]
    assert writes, "no SSL_write from curl"
    sent = "".join(ev.args[1] for ev in writes)
    assert sum(ev.args[2] for ev in writes) == size_request == len(sent.encode())
    assert sent.startswith(f"GET /apptrace/{tag} HTTP/1.1\r\n")
    assert f"\r\nX-Apptrace: {tag}\r\n" in sent and sent.endswith("\r\n\r\n")
    assert all("libssl.so.3" in ev.probe.binary for ev in writes)
