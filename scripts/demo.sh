#!/usr/bin/env bash
# `make demo`: apptrace's main jobs on the built-in fixtures and the JDK.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/apptrace
FX=fixtures/c/out
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Can this machine trace?" $A doctor || true
step "USDT probes of a fixture (decoded argument specs)" $A usdt list $FX/usdt_args_o2_pie
JVM=$(ls /usr/lib/jvm/*/lib/server/libjvm.so 2>/dev/null | head -n 1 || true)
if [ -n "$JVM" ]; then
    printf '\n\033[1m== HotSpot probes in %s (first 12 of %s)\033[0m\n' "$JVM" \
        "$($A usdt list --json "$JVM" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')"
    { $A usdt list "$JVM" || true; } | head -n 13
fi
step "Trace every probe of a spawned command, typed string arguments" \
    $A trace 'usdt:apptrace_fx:[!s]*' 'usdt:apptrace_fx:strs(str,str)' -- $FX/usdt_args_o2_pie 1
step "uprobes and uretprobes with typed arguments, as JSON lines" \
    $A trace --json 'uprobe:'$FX'/uprobe_funcs_pie:fx_add(long,int,short,char)' \
    'uretprobe:'$FX'/uprobe_funcs_pie:fx_greet(str)' -- $FX/uprobe_funcs_pie 2
step "User stacks, symbolized with blazesym (file:line, inlined frames, C++ names)" \
    $A trace --stack 'usdt:apptrace_fx:deep' -- $FX/stack_chain_pie 1
step "Folded stacks (flamegraph.pl / speedscope input), counted in the kernel" \
    $A trace --folded 'usdt:apptrace_fx:deep' -- $FX/stack_chain_pie 500
