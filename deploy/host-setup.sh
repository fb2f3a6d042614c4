#!/usr/bin/env bash
# Host set-up for spanflame on Debian 12: the packages the agent needs (and, with `test`, the
# validators the test suite runs), and tracefs. Idempotent and quick when already done:
# it only calls apt-get for packages that are missing.
#   deploy/host-setup.sh run    bcc, Debian kernel headers (bcc's fallback tree), python3-venv
#   deploy/host-setup.sh test   the above, plus go (go tool pprof), chromium (browser tests) and
#                               gcc (the C event generators of the probe tests and benchmarks)
set -euo pipefail

mode="${1:-run}"
arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
pkgs=(python3-venv python3-bpfcc bpfcc-tools "linux-headers-${arch}" ca-certificates)
if [ "$mode" = "test" ]; then
  pkgs+=(golang-go chromium gcc libc6-dev)
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "host-setup: missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "host-setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# tracefs: bcc attaches tracepoints through it. Fresh machines may not have it mounted.
if [ "$(id -u)" = 0 ] && [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || \
    echo "host-setup: could not mount tracefs at /sys/kernel/tracing (eBPF probes will be off)" >&2
fi
exit 0
