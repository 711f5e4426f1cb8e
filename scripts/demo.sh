#!/usr/bin/env bash
# `make demo`: apptrace's jobs one after the other, on the built-in fixtures
# (fixtures/c: an application server in miniature; fixtures/java: a GC
# workload). Each step says what it shows and checks its own output; the
# demo exits 0 only if every step did what it says, and ends with its time.
set -uo pipefail
cd "$(dirname "$0")/.."

APPTRACE=.venv/bin/apptrace
SERVER=fixtures/c/out/server
CERT=fixtures/c/out/tls_cert.pem
KEY=fixtures/c/out/tls_key.pem
JAVA_CP=fixtures/java/out
TMP=$(mktemp -d /tmp/apptrace-demo.XXXXXX)
SRV_PID=
cleanup() {
    [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

if [ -t 1 ]; then B=$'\033[1m'; D=$'\033[2m'; G=$'\033[32m'; R=$'\033[31m'; N=$'\033[0m'
else B=; D=; G=; R=; N=; fi
T0=$(date +%s%N)
PASSED=()
FAILED=()
STEP=
STEP_T0=0

# A step: its title, then what a newcomer needs to read the output.
step() {
    STEP=$1
    STEP_T0=$(date +%s%N)
    printf '\n%s== %s ==%s\n' "$B" "$1" "$N"
    shift
    printf '%s%s%s\n' "$D" "$*" "$N" | fold -s -w 100
}

# Show a command as a user would type it (`apptrace ...`, quoted), run it,
# keep its output (stdout and stderr) in $TMP/out for the checks.
show() {
    local shown=() a
    for a in "$@"; do
        if [[ $a =~ [^A-Za-z0-9_./=:,-] ]]; then shown+=("'$a'"); else shown+=("$a"); fi
    done
    shown[0]=${shown[0]/#$APPTRACE/apptrace}
    printf '%s$ %s%s\n' "$B" "${shown[*]}" "$N"
}
run() {
    show "$@"
    "$@" > >(tee "$TMP/out") 2> >(tee "$TMP/err" >&2)
    local rc=$?
    wait
    cat "$TMP/err" >> "$TMP/out"
    return $rc
}

# The end of a step: every check must hold.
done_step() {
    local ms=$(( ($(date +%s%N) - STEP_T0) / 1000000 ))
    if [ "$#" -eq 0 ]; then
        PASSED+=("$STEP ($ms ms)")
        printf '%s-> ok (%d ms)%s\n' "$G" "$ms" "$N"
    else
        FAILED+=("$STEP: $*")
        printf '%s-> FAILED: %s%s\n' "$R" "$*" "$N"
    fi
}
has() { grep -qF -- "$1" "$TMP/out"; }

# -- 0 --------------------------------------------------------------------------
step "Can this machine trace?" \
    "apptrace needs root (or CAP_BPF+CAP_PERFMON), a kernel with uprobes and BPF ring" \
    "buffers, and bcc. \`apptrace doctor\` checks each and names the fix for what is missing."
if run "$APPTRACE" doctor; then done_step; else done_step "apptrace doctor reported a problem"; fi

# -- 1 --------------------------------------------------------------------------
step "1. The USDT probes a program carries" \
    "USDT probes are markers compiled into a program (sys/sdt.h, dtrace): a no-op" \
    "instruction plus a note saying where each argument lives. Our fixture server has two:" \
    "request__start, behind a semaphore (SEMA yes: the program checks a counter and builds" \
    "the argument only while someone traces it), and request__done(path, status). ARGS" \
    "shows each argument's size and location (a register, or memory off the frame pointer)."
if run "$APPTRACE" usdt list "$SERVER"; then
    if has "myapp:request__start" && has "myapp:request__done" && grep -q "request__start .* yes" "$TMP/out"
    then done_step; else done_step "the server's two probes (one with a semaphore) were not listed"; fi
else done_step "apptrace usdt list failed"; fi

# -- 2 --------------------------------------------------------------------------
step "2. Trace the probes, with decoded arguments" \
    "Untraced, the server prints only request__done lines: request__start's semaphore is 0," \
    "so it skips building that argument."
show "$SERVER" 3
"$SERVER" 3
printf '%s%s%s\n' "$D" "Now traced: apptrace starts the server held before its first instruction, \
attaches both probes (raising the semaphore), then lets it run, so nothing is missed. The types \
in parentheses say how to decode each argument (str: the string the pointer points to). Each \
event line is: time, command[pid/tid], probe, arguments. The summary (stderr) counts events, \
events lost and events per probe; the server's own output goes to stderr too." "$N" | fold -s -w 100
if run "$APPTRACE" trace 'usdt:myapp:request__start(str)' 'usdt:myapp:request__done(str,int)' \
        -- "$SERVER" 6; then
    if has "usdt:myapp:request__start 'GET /items/0'" && has "usdt:myapp:request__done '/missing/4' 404" \
            && has "apptrace: 12 events, 0 lost"
    then done_step; else done_step "expected 12 decoded events, request__start from the first request"; fi
else done_step "apptrace trace failed"; fi

# -- 3 --------------------------------------------------------------------------
step "3. TLS plaintext, without keys or a proxy" \
    "The server now speaks HTTPS (OpenSSL) in the background; its client sends two requests." \
    "apptrace ssl hooks SSL_write/SSL_read (and GnuTLS, NSS) in the client with uprobes and" \
    "prints what went through each call before encryption / after decryption: a header per" \
    "call (time, process, library, function, connection, local -> remote, direction, bytes)," \
    "then the bytes, non-printable ones escaped."
"$SERVER" https 0 "$CERT" "$KEY" > "$TMP/srv" 2>&1 &
SRV_PID=$!
PORT=
for _ in $(seq 50); do
    PORT=$(sed -n 's/^port //p' "$TMP/srv")
    [ -n "$PORT" ] && break
    sleep 0.1
done
if [ -z "$PORT" ]; then
    done_step "the HTTPS fixture server did not start: $(cat "$TMP/srv")"
elif run "$APPTRACE" ssl -- "$SERVER" get "$PORT" /items/1 /missing/2; then
    wait "$SRV_PID"; SRV_PID=
    if has "GET /items/1 HTTP/1.1" && has "HTTP/1.1 404 Not Found" && has "item /items/1" \
            && has "0 lost"
    then done_step; else done_step "the requests and responses were not all captured"; fi
else done_step "apptrace ssl failed"; fi

# -- 4 --------------------------------------------------------------------------
step "4. A symbolized user stack" \
    "--stack takes the user stack at each probe hit (from frame pointers, in the kernel) and" \
    "symbolizes it with blazesym: innermost frame first, each with its function, source file" \
    "and line (DWARF), inlined frames marked."
if run "$APPTRACE" trace --stack 'usdt:myapp:request__done(str,int)' -- "$SERVER" 1; then
    if has "myapp_done" && has "server_done.c:" && has "handle" && has "main"
    then done_step; else done_step "the stack did not name myapp_done <- handle <- ... <- main"; fi
else done_step "apptrace trace --stack failed"; fi

# -- 5 --------------------------------------------------------------------------
step "5. A JVM's garbage-collection pauses" \
    "apptrace jvm gc reads HotSpot's own USDT probes (no agent, no JVM flag): one line per" \
    "stop-the-world pause (kind, cause, heap before->after, the pause, the whole safepoint)," \
    "then per collector the count, total and percentiles, and a histogram. The workload" \
    "allocates for half a second and calls System.gc() every 200 ms (the Full pauses)."
if ! command -v java > /dev/null; then
    done_step "no java on PATH (make setup installs openjdk-17-jdk-headless)"
elif [ ! -f "$JAVA_CP/GcLoad.class" ]; then
    done_step "fixtures/java is not built (make fixtures)"
elif run "$APPTRACE" jvm gc -- java -Xmx512m -Xmn256m -cp "$JAVA_CP" GcLoad 0.5 3 200 nowait; then
    if has "GC summary over" && has "Pause Full (System.gc())" && has "Pause Young" && has " 0 lost"
    then done_step; else done_step "expected young and full pauses and a summary with 0 lost"; fi
else done_step "apptrace jvm gc failed"; fi

# -- 6 --------------------------------------------------------------------------
step "6. Assert on probes in a test (pytest plugin)" \
    "The apptrace fixture runs a program under tracing and hands the test what fired. Two" \
    "tests: one passes; the other expects every request to answer 200, so it fails, and the" \
    "failure lists each event with + (matched) or - (did not, and why)."
mkdir -p "$TMP/t"
cat > "$TMP/t/test_server.py" <<EOF
SERVER = "$PWD/$SERVER"


def test_three_requests(apptrace):
    run = apptrace.run([SERVER, "3"], probes=["usdt:myapp:request__done(str,int)"])
    run.assert_fired("myapp:request__done", count=3, where=lambda ev: ev.args[1] == 200)


def test_five_requests(apptrace):
    run = apptrace.run([SERVER, "5"], probes=["usdt:myapp:request__done(str,int)"])
    run.assert_fired("myapp:request__done", count=5, where=lambda ev: ev.args[1] == 200)
EOF
sed -n '3,$p' "$TMP/t/test_server.py"
show .venv/bin/python -m pytest -q --no-header -p no:cacheprovider test_server.py
(cd "$TMP/t" && "$OLDPWD/.venv/bin/python" -m pytest -q --no-header -p no:cacheprovider \
    -W ignore test_server.py) > "$TMP/out" 2>&1
sed -n '/^E /p; /passed\|failed/p' "$TMP/out"
if has "1 failed, 1 passed" && has "expected myapp:request__done to fire 5 times" \
        && has "<- where() is false"
then done_step; else cat "$TMP/out"; done_step "expected one pass and one readable failure"; fi

# -- the end -------------------------------------------------------------------------
TOTAL=$(( ($(date +%s%N) - T0) / 1000000 ))
printf '\n%s== Summary ==%s\n' "$B" "$N"
for s in "${PASSED[@]}"; do printf '%sok%s      %s\n' "$G" "$N" "$s"; done
for s in "${FAILED[@]+"${FAILED[@]}"}"; do printf '%sFAILED%s  %s\n' "$R" "$N" "$s"; done
printf 'demo took %d.%03d s\n' $((TOTAL / 1000)) $((TOTAL % 1000))
printf 'More: README.md (the user guide), docs/ssl.md, docs/jvm-gc.md, docs/testing.md.\n'
[ "${#FAILED[@]}" -eq 0 ]
