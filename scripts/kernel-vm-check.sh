#!/bin/bash
# Runs the dirty-tracking tests on the kernel series cluster nodes run today, in a virtual machine: Debian 12's cloud
# kernel (6.1, as Amazon Linux 2023's) has soft-dirty bits but no userfaultfd async write-protection, so there the
# engine tracks written pages with adapters/softdirty.py and CRIU's patch 0003, a path this machine's own kernel
# (userfaultfd, or nothing) never takes.
#
# Plan:
#   1. Install qemu-system-x86 from this machine's apt sources; download (not install) the kernel package that
#      linux-image-cloud-amd64 names and busybox-static, and unpack them in the work directory.
#   2. Build an initramfs: busybox, the virtio modules, and an init that mounts the root disk and the data disk,
#      loads the modules CRIU's kernel probe needs, runs the command in a chroot and powers off.
#   3. Build the root disk (ext4, a scratch copy) from this machine's /usr and /etc, the venv's interpreter and
#      this checkout with its venv and CRIU: the files the host's own tests run, at the same paths.
#   4. Build the data disk: the kernel's modules and the command, which checks that the guest has soft-dirty and no
#      userfaultfd tracking, runs the tests and writes their exit status.
#   5. Boot it with qemu (software emulation by default: it works in any VM; VM_ACCEL=kvm where nested KVM works).
#   6. Verdict from the data disk; on every path qemu is stopped, bind mounts are undone and the work directory is
#      removed (downloads are kept in KERNEL_VM_CACHE).
set -euo pipefail
shopt -s inherit_errexit

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KERNEL_META=linux-image-cloud-amd64
KERNEL_VM_CACHE="${KERNEL_VM_CACHE:-/var/cache/ckpt-kernel-vm}"
KERNEL_VM_WORKDIR="${KERNEL_VM_WORKDIR:-/var/tmp}"
VM_ACCEL="${VM_ACCEL:-tcg}"
VM_MEMORY="${VM_MEMORY:-4G}"
# A safety net against a hung guest, not a performance target: the tests took about 5 min under emulation on 2 cores.
VM_TIMEOUT_SECONDS="${VM_TIMEOUT_SECONDS:-2400}"
TESTS=(
  tests/adapters/test_softdirty.py
  tests/checkpoint/test_fork_tracking.py
  tests/checkpoint/test_restore_tracking.py
  tests/checkpoint/test_streamdump.py
  tests/checkpoint/test_stopped_processes.py
)
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
CRIU_MODULES=(unix_diag inet_diag tcp_diag udp_diag raw_diag netlink_diag packet_diag nf_tables nf_conntrack tun veth
  overlay)

WORK=""
MOUNTS=()
QEMU_PID=""
START_SECONDS="$SECONDS"

log() { printf '%s kernel-vm: %s\n' "$(date -u +%T)" "$*" >&2; }

cleanup() {
  local i
  if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
  done
  MOUNTS=()
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    # a bind mount of the same file system would not stop rm's --one-file-system: never remove through one
    if awk -v w="$WORK/" 'index($2 "/", w) == 1 {found = 1} END {exit !found}' /proc/self/mounts; then
      log "something is still mounted under $WORK: left in place"
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
}

fail() {
  log "ERROR: $*"
  cleanup
  echo "kernel-vm check: FAIL after $((SECONDS - START_SECONDS)) s: $*"
  exit 1
}

trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (the tests run CRIU)"
[ "$(uname -m)" = x86_64 ] || fail "x86_64 only (the guest kernel is Debian's cloud-amd64)"
[ -x "$REPO/.venv/bin/python" ] || fail "no venv at $REPO/.venv: run \`make setup\` first"
[ -x /usr/local/sbin/criu ] || fail "no CRIU at /usr/local/sbin/criu: run \`make setup\` first"

# 1. qemu, the kernel, busybox
log "installing qemu-system-x86"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null \
  || fail "apt-get install qemu-system-x86 failed"
kernel_pkg="$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/ {print $2; exit}')"
[ -n "$kernel_pkg" ] || fail "no kernel package named by $KERNEL_META in this machine's apt sources"
mkdir -p "$KERNEL_VM_CACHE"
(
  cd "$KERNEL_VM_CACHE"
  for pkg in "$kernel_pkg" busybox-static; do
    compgen -G "${pkg}_*.deb" >/dev/null || apt-get download -q "$pkg" >/dev/null 2>&1
  done
) || fail "cannot download $kernel_pkg and busybox-static"
WORK="$(mktemp -d "$KERNEL_VM_WORKDIR/ckpt-kernel-vm.XXXXXX")"
for pkg in "$kernel_pkg" busybox-static; do
  deb="$(compgen -G "$KERNEL_VM_CACHE/${pkg}_*.deb" | head -n 1)"
  dpkg-deb -x "$deb" "$WORK/pkgs"
done
kver="${kernel_pkg#linux-image-}"
vmlinuz="$WORK/pkgs/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || fail "no $vmlinuz in $kernel_pkg"
grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$WORK/pkgs/boot/config-$kver" || fail "$kernel_pkg has no soft-dirty"
log "guest kernel $kver"

# 2. the initramfs
initrd="$WORK/initrd"
mkdir -p "$initrd"/{bin,sbin,mod,proc,sys,dev,newroot,lib/modules}
cp "$WORK/pkgs/bin/busybox" "$initrd/bin/busybox"
ln -s /bin/busybox "$initrd/sbin/modprobe"
for m in "${MODULES[@]}"; do
  found="$(find "$WORK/pkgs/lib/modules/$kver" -name "$m.ko" | head -n 1)"
  [ -n "$found" ] || fail "module $m missing from $kernel_pkg"
  cp "$found" "$initrd/mod/"
done
cat >"$initrd/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${MODULES[*]}; do insmod /mod/\$m.ko || echo "insmod \$m failed"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 0.2; done
mount /dev/vda /newroot || { echo "guest: no root disk"; poweroff -f; }
mkdir -p /data && mount /dev/vdb /data || { echo "guest: no data disk"; poweroff -f; }
mount --bind /data/modules /lib/modules && depmod
for m in ${CRIU_MODULES[*]}; do modprobe \$m 2>/dev/null; done
ip link set lo up
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /newroot/run
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount --rbind /dev /newroot/dev
mkdir -p /newroot/tmp/data && mount --bind /data /newroot/tmp/data
echo "guest: \$(uname -r) up"
chroot /newroot /bin/bash /tmp/data/cmd.sh
echo "guest: command exited \$?"
umount /newroot/tmp/data; umount /data; sync
poweroff -f
EOF
chmod 0755 "$initrd/init"
(cd "$initrd" && find . | "$WORK/pkgs/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$WORK/initrd.gz")

# 3. the root disk: this machine's files at the same paths (a scratch copy: the guest writes to it)
log "building the root disk"
base_python="$(sed -n 's/^home = //p' "$REPO/.venv/pyvenv.cfg")"
python_prefix="$(cd "$base_python/.." && pwd -P)"
stage="$WORK/rootfs"
mkdir -p "$stage"/{tmp,run,proc,sys,dev,var/tmp,root}
for link in bin lib lib64 sbin; do ln -s "usr/$link" "$stage/$link"; done
dirs=(/usr /etc "$REPO")
case "$python_prefix" in /usr | /usr/*) ;; *) dirs+=("$python_prefix") ;; esac  # pyenv's, a venv's own
for dir in "${dirs[@]}"; do
  mkdir -p "$stage$dir"
  mount --bind "$dir" "$stage$dir"
  MOUNTS+=("$stage$dir")
done
truncate -s 24G "$WORK/root.img"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$stage" "$WORK/root.img" || fail "mkfs.ext4 of the root disk failed"
for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}"; done
MOUNTS=()

# 4. the data disk: modules, command, results
data="$WORK/data"
mkdir -p "$data/modules"
cp -a "$WORK/pkgs/lib/modules/$kver" "$data/modules/"
cat >"$data/cmd.sh" <<EOF
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin HOME=/root PYTHONDONTWRITEBYTECODE=1
cd "$REPO"
.venv/bin/python - <<'PY' || { echo 3 >/tmp/data/rc; exit 0; }
import sys
from ckpt_agent.adapters.criu import Criu
from ckpt_agent.adapters.softdirty import SoftDirtyTracker
from ckpt_agent.adapters.uffd import DirtyTracker
criu = Criu("/usr/local/sbin/criu")
facts = dict(soft_dirty=SoftDirtyTracker.supported(), uffd=DirtyTracker.supported(),
             patch_0003=criu.can_dump_soft_dirty_written())
print("guest:", facts)
sys.exit(0 if facts == dict(soft_dirty=True, uffd=False, patch_0003=True) else 1)
PY
.venv/bin/python -m pytest -p no:cacheprovider -q -rs ${TESTS[*]} 2>&1 | tee /tmp/data/pytest.log
rc=\${PIPESTATUS[0]}
if [ "\$rc" = 0 ] && grep -q " skipped" /tmp/data/pytest.log; then rc=4; fi
echo "\$rc" >/tmp/data/rc
EOF
truncate -s 2G "$WORK/data.img"
mkfs.ext4 -q -F -d "$data" "$WORK/data.img" || fail "mkfs.ext4 of the data disk failed"

# 5. boot
case "$VM_ACCEL" in
  kvm) accel=(-accel kvm -cpu "host,-arch-capabilities") ;;
  tcg) accel=(-accel "tcg,thread=multi" -cpu max) ;;
  *) fail "VM_ACCEL must be tcg or kvm, not $VM_ACCEL" ;;
esac
log "booting $kver ($VM_ACCEL, $VM_MEMORY); console in $WORK/console.log"
timeout --kill-after=10 "$VM_TIMEOUT_SECONDS" qemu-system-x86_64 "${accel[@]}" -smp "$(nproc)" -m "$VM_MEMORY" \
  -nographic -no-reboot -net none -kernel "$vmlinuz" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1" \
  -drive "file=$WORK/root.img,format=raw,if=virtio,cache=unsafe" \
  -drive "file=$WORK/data.img,format=raw,if=virtio,cache=unsafe" </dev/null >"$WORK/console.log" 2>&1 &
QEMU_PID=$!
wait "$QEMU_PID" || log "qemu exited $?"
QEMU_PID=""
grep -a '^guest:\|passed\|failed\|error' "$WORK/console.log" | tail -n 20 >&2 || true

# 6. verdict
mkdir -p "$WORK/out"
debugfs -R "dump /rc $WORK/out/rc" "$WORK/data.img" >/dev/null 2>&1 || true
rc="$(cat "$WORK/out/rc" 2>/dev/null || echo none)"
case "$rc" in
  0) echo "kernel-vm check: PASS ($kver, soft-dirty tracking) in $((SECONDS - START_SECONDS)) s" ;;
  3) tail -n 40 "$WORK/console.log" >&2; fail "the guest has no soft-dirty tracking, or the CRIU lacks patch 0003" ;;
  4) fail "tests were skipped in the guest: the soft-dirty path was not exercised" ;;
  *) tail -n 60 "$WORK/console.log" >&2; fail "the tests in the guest exited $rc" ;;
esac
