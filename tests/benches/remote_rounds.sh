#!/usr/bin/env bash
# Remote `domain.info` latency and throughput of one or more capvirt daemons and libvirtd,
# interleaved round by round so that every peer sees the same machine load (README "Remote
# calls", Figures). Prints each peer's p50 and calls/s per round, sorted.
#
#   tests/benches/remote_rounds.sh CLIENTS CALLS ROUNDS LIBVIRT_SOCKET DAEMON_BINARY...
#   e.g. tests/benches/remote_rounds.sh 1 2000 10 /tmp/lv/libvirt-sock /tmp/capvirt-old target/release/capvirt
#
# The first DAEMON_BINARY is also the client of every capvirt round (only the daemons differ),
# unless OWN_CLIENT=1: then each binary is the client of its own daemon (client and daemon
# compared together, e.g. before and after a protocol change).
# CAPVIRT_PLUGIN_DIR must name a directory holding the test driver; libvirtd must be running
# (see the README for a private one).
set -euo pipefail
clients=$1 calls=$2 rounds=$3 libvirt_socket=$4
shift 4
daemons=("$@")
client=${daemons[0]}
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
for i in "${!daemons[@]}"; do
  CAPVIRT_AUDIT_LOG="$work/audit.jsonl" "${daemons[$i]}" daemon --listen "unix:$work/sock$i" 2>/dev/null &
  pids+=($!)
done
for i in "${!daemons[@]}"; do
  for _ in $(seq 200); do [ -S "$work/sock$i" ] && break; sleep 0.05; done
done
figures() { sed -n 's/.*calls\/s: \([0-9]*\).*/\1/p;s/.*p50 \([0-9.]*\).*/\1/p' | tr '\n' ' '; echo; }
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$rounds"); do
  for i in "${!daemons[@]}"; do
    if [ "${OWN_CLIENT:-0}" = 1 ]; then client=${daemons[$i]}; fi
    "$client" -c "test+unix:///default?socket=$work/sock$i" bench call domain.info --arg domain=test \
      --calls "$calls" --clients "$clients" 2>&1 | figures >> "$work/r$i"
  done
  /usr/bin/python3 "$(dirname "$0")/libvirt_peer.py" "test+unix:///default?socket=$libvirt_socket" "$calls" "$clients" \
    | figures >> "$work/rlv"
done
for i in "${!daemons[@]}" lv; do
  if [ "$i" = lv ]; then name=libvirtd; else name=${daemons[$i]}; fi
  echo "$name: p50 µs: $(cut -d' ' -f2 "$work/r$i" | sort -n | tr '\n' ' ')| calls/s: $(cut -d' ' -f1 "$work/r$i" | sort -n | tr '\n' ' ')"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
