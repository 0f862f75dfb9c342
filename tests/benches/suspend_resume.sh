#!/bin/sh
# `capvirt suspend`/`resume` as whole processes on a running QEMU against `virsh suspend`/`resume`
# with libvirt's qemu driver on the same QEMU binary, in one hyperfine run each (each command
# gets the other state restored before every run).
#
#   cargo build --release -p capvirt-cli -p capvirt-driver-qemu
#   libvirtd running (as root: `virtlogd -d; libvirtd -d`), then
#   QEMU=/path/to/qemu-system-x86_64 GUEST=/var/cache/capvirt-ci/guest sh tests/benches/suspend_resume.sh
#
# Both guests: 64 MiB, 1 vCPU, TCG, the test guest's kernel and initramfs. The audit log is on
# tmpfs, as libvirt keeps its domain status under /run. Both domains are removed at exit.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release/capvirt"
plugin="$root/target/release/libcapvirt_driver_qemu.so"
[ -x "$bin" ] && [ -f "$plugin" ] || { echo "build first: cargo build --release -p capvirt-cli -p capvirt-driver-qemu" >&2; exit 2; }
: "${QEMU:?set QEMU to a qemu-system-x86_64}" "${GUEST:?set GUEST to the test guest directory}"

work=$(mktemp -d)
chmod 700 "$work"
mkdir -m 700 "$work/plugins" "$work/state"
install -m 755 "$plugin" "$work/plugins/"
export XDG_STATE_HOME="$work/xdg" XDG_CONFIG_HOME="$work/xdg" XDG_CACHE_HOME="$work/xdg"
export CAPVIRT_PLUGIN_DIR="$work/plugins" CAPVIRT_AUDIT_LOG="/dev/shm/capvirt-bench-$$.jsonl"
uri="qemu:///session?root=$work/state&emulator=$QEMU"
lv="capvirt-bench-$$"
cleanup() {
  "$bin" -c "$uri" destroy cv1 >/dev/null 2>&1 || true
  virsh -q -c qemu:///system destroy "$lv" >/dev/null 2>&1 || true
  rm -rf "$work" "$CAPVIRT_AUDIT_LOG"
}
trap cleanup EXIT

cat > "$work/cv1.toml" <<SPEC
name = "cv1"
memory_mib = 64
vcpus = 1

[boot]
kernel = "$GUEST/vmlinuz"
initrd = "$GUEST/initrd.img"
cmdline = "console=ttyS0 quiet"
SPEC
"$bin" -c "$uri" define "$work/cv1.toml" >/dev/null
"$bin" -c "$uri" start cv1 >/dev/null
cat > "$work/lv.xml" <<XML
<domain type='qemu'>
  <name>$lv</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST/vmlinuz</kernel>
    <initrd>$GUEST/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <devices>
    <emulator>$QEMU</emulator>
    <serial type='null'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -q -c qemu:///system create "$work/lv.xml" >/dev/null

for op in suspend resume; do
  if [ $op = suspend ]; then other=resume; else other=suspend; fi
  hyperfine -N --runs 60 "$@" \
    --prepare "sh -c '\"$bin\" -c \"$uri\" $other cv1 >/dev/null 2>&1; true'" \
    --command-name "capvirt $op" "$bin -c $uri $op cv1" \
    --prepare "sh -c 'virsh -q -c qemu:///system $other $lv >/dev/null 2>&1; true'" \
    --command-name "virsh $op" "virsh -q -c qemu:///system $op $lv"
done
