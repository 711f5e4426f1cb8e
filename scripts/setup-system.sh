#!/usr/bin/env bash
# System-level set-up for apptrace: Debian packages, kernel headers bcc can
# compile against, tracefs. Idempotent and quick when everything is there.
set -euo pipefail

PKGS=(python3-bpfcc libbpfcc bpfcc-tools linux-headers-amd64 systemtap-sdt-dev
      bpftrace binutils gcc g++ make libssl-dev libgnutls28-dev curl)
# Real programs the tests trace (tests/integration/test_real_programs.py).
PKGS+=(python3.11 postgresql-15 openjdk-17-jdk-headless openssl)
# TLS capture fixtures and tests: NSS headers, the openssl CLI (certificate,
# s_server), node (statically linked OpenSSL), curl.
PKGS+=(libnss3-dev libnspr4-dev openssl nodejs curl)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages (${missing[*]}); run 'make setup' as root" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
fi

# bcc compiles BPF C against /lib/modules/$(uname -r)/build. When no headers
# package matches the running kernel, point build/ at the newest amd64 headers
# and source/ at their -common sibling (BCC_KERNEL_SOURCE alone is not enough).
mod=/lib/modules/$(uname -r)
if [ ! -e "$mod/build/include" ] && [ "$(id -u)" = 0 ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$hdr" ]; then
        common=${hdr%-amd64}-common
        mkdir -p "$mod"
        ln -sfn "$hdr" "$mod/build"
        [ -d "$common" ] && ln -sfn "$common" "$mod/source"
        echo "setup: linked $mod/build -> $hdr"
    fi
fi

# tracefs holds the uprobe_events file that bcc and the kernel use.
if [ ! -e /sys/kernel/tracing/uprobe_events ] && [ "$(id -u)" = 0 ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
