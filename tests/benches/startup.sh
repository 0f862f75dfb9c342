#!/bin/sh
# Startup of a whole `capvirt -c test:///default list` process with 1 and with 50 plugin files
# installed, with and without the manifest cache, against `virsh -c test:///default list`, in
# one hyperfine run (so the peer is measured under the same machine load).
#
#   cargo build --release -p capvirt-cli -p capvirt-driver-test
#   sh tests/benches/startup.sh [hyperfine options, e.g. --export-markdown out.md]
#
# The 50 files are the test driver and 49 copies of it under other file names. Every copy is
# a complete plugin: without the cache each one is validated, dlopen'ed and its manifest read
# (then refused as a duplicate of the first); with the cache only the file serving `test://` is.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/capvirt"
plugin="$root/target/release/libcapvirt_driver_test.so"
[ -x "$bin" ] && [ -f "$plugin" ] || { echo "build first: cargo build --release -p capvirt-cli -p capvirt-driver-test" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"
mkdir -m 700 "$work/one" "$work/fifty" "$work/fifty-uncached" "$work/cache"
for dir in one fifty fifty-uncached; do
  install -m 755 "$plugin" "$work/$dir/libcapvirt_driver_test.so"
done
i=1
while [ $i -lt 50 ]; do
  for dir in fifty fifty-uncached; do
    install -m 755 "$plugin" "$work/$dir/libcapvirt_driver_copy$(printf %02d $i).so"
  done
  i=$((i + 1))
done
# The cache file of a search path is plugins-<first 8 bytes of SHA-256 of "DIR\0">.json; a
# directory in its place can be neither read nor replaced, so that search path is never cached
# (every run loads every plugin, as before the cache).
key=$(printf '%s\0' "$work/fifty-uncached" | sha256sum | cut -c1-16)
mkdir -p "$work/cache/capvirt/plugins-$key.json"

# Private audit log, config and cache, as any user would have.
export XDG_STATE_HOME="$work/state" XDG_CONFIG_HOME="$work/config" XDG_CACHE_HOME="$work/cache"
list="-c test:///default list"
hyperfine -N --warmup 20 --min-runs 100 "$@" \
  --command-name "capvirt, 1 plugin file" "$bin --plugin-dir $work/one $list" \
  --command-name "capvirt, 50 plugin files" "$bin --plugin-dir $work/fifty $list" \
  --command-name "capvirt, 50 plugin files, cache unusable" "$bin --plugin-dir $work/fifty-uncached $list" \
  --command-name "virsh" "virsh $list"
