#!/usr/bin/env bash
# Instructions per remote `domain.info` call, client and daemon apart (callgrind: independent of
# the machine's load, unlike latency). README "Remote calls", Figures.
#
#   tests/benches/remote_instructions.sh DAEMON_BINARY [CLIENT_BINARY]
#   e.g. CAPVIRT_PLUGIN_DIR=target/release tests/benches/remote_instructions.sh target/release/capvirt
#
# The client's figure is the difference between a 2,500-call and a 500-call run over 2,000; the
# daemon's is one dump of counters covering a 2,500-call run (+ its 100 warm-up calls), over 2,600.
# CAPVIRT_PLUGIN_DIR must name a directory holding the test driver.
set -euo pipefail
daemon=$1 client=${2:-$1}
work=$(mktemp -d)
vg=
cleanup() { [ -n "$vg" ] && kill "$vg" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
total() { sed -n 's/^summary: *//p;s/^totals: *//p' "$1" | head -1; }

CAPVIRT_AUDIT_LOG="$work/audit.jsonl" valgrind --tool=callgrind --callgrind-out-file="$work/daemon.%p" \
  "$daemon" daemon --listen "unix:$work/sock" 2>"$work/daemon.err" &
vg=$!
for _ in $(seq 400); do [ -S "$work/sock" ] && break; sleep 0.05; done
uri="test+unix:///default?socket=$work/sock"
bench() { "$client" -c "$uri" bench call domain.info --arg domain=test --calls "$1" >/dev/null; }

bench 500 # the daemon's plugin, connection and caches are warm after this
callgrind_control -d "$vg" >/dev/null
bench 2500
callgrind_control -d "$vg" >/dev/null
daemon_calls=$(total "$(ls "$work"/daemon.*.2)")

client_run() {
  valgrind --tool=callgrind --callgrind-out-file="$work/client.$1" "$client" -c "$uri" bench call domain.info \
    --arg domain=test --calls "$1" >/dev/null 2>&1
  total "$work/client.$1"
}
small=$(client_run 500)
large=$(client_run 2500)
echo "daemon: $((daemon_calls / 2600)) instructions per call"
echo "client: $(((large - small) / 2000)) instructions per call"
