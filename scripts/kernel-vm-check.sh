#!/bin/bash
# Runs the dirty-tracking tests on kernels this machine does not run, in virtual machines:
#   - soft-dirty: Debian 12's cloud kernel (6.1, the series Amazon Linux 2023 runs) has soft-dirty bits but no
#     userfaultfd async write-protection, so the engine tracks written pages with adapters/softdirty.py and CRIU's
#     patch 0003, a path this machine's own kernel never takes;
#   - soft-dirty-scan: the cloud kernel of KERNEL_VM_SCAN_SUITE (Debian 13: 6.12, the series of Amazon Linux 2023's
#     newer AMIs) still tracks with soft-dirty (userfaultfd needs >= 6.13), but CRIU reads the bits through
#     PAGEMAP_SCAN (Linux >= 6.7) there instead of /proc/PID/pagemap;
#   - uffd: the cloud kernel of KERNEL_VM_UFFD_SUITE (Debian's trixie-backports: 7.3 in 2026-12) has userfaultfd async
#     write-protection and reports PAGEMAP_SCAN categories as newer kernels do (on 7.3 a CRIU without patch 0004 took
#     the written pages of unprotected mappings as unchanged, and the restored tool crashed).
# The soft-dirty guest also runs an ordinary user's job through Slurm and the node agent (the Spot notice end to end:
# the agent checkpoints, restores and arms the user's tree on another node), the path of every real job on a node
# whose kernel keeps soft-dirty bits.
#
# Plan:
#   1. Install qemu-system-x86 from this machine's apt sources; download (not install) each kernel's packages and
#      busybox-static: the 6.1 kernel from this machine's own suites, the newer ones from KERNEL_VM_SCAN_SUITE and
#      KERNEL_VM_UFFD_SUITE on the same Debian mirror (private apt lists under KERNEL_VM_CACHE; the machine's apt
#      configuration is not touched).
#   2. Per kernel, build an initramfs: busybox, the virtio modules, and an init that mounts the root disk and the
#      data disk, loads the modules CRIU's kernel probe needs, runs the command in a chroot and powers off.
#   3. Build the root disk once (ext4) from this machine's /usr and /etc, the venv's interpreter and this checkout
#      with its venv and CRIU, and the venv ordinary users' jobs run (CKPT_SHARED_VENV, `make setup`): the files
#      the host's own tests run, at the same paths. Each guest writes to a snapshot.
#   4. Per kernel, build the data disk: the kernel's modules and the command, which checks that the guest tracks
#      written pages the expected way, runs the tests and writes their exit status.
#   5. Boot each with qemu (software emulation by default: it works in any VM; VM_ACCEL=kvm where nested KVM works).
#   6. Verdict from the data disks; on every path qemu is stopped, bind mounts are undone and the work directory is
#      removed (downloads are kept in KERNEL_VM_CACHE).
set -euo pipefail
shopt -s inherit_errexit

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KERNEL_META=linux-image-cloud-amd64
KERNEL_VM_SCAN_SUITE="${KERNEL_VM_SCAN_SUITE:-trixie}"
KERNEL_VM_UFFD_SUITE="${KERNEL_VM_UFFD_SUITE:-trixie-backports}"
KERNEL_VM_CACHE="${KERNEL_VM_CACHE:-/var/cache/ckpt-kernel-vm}"
KERNEL_VM_WORKDIR="${KERNEL_VM_WORKDIR:-/var/tmp}"
VM_ACCEL="${VM_ACCEL:-tcg}"
VM_MEMORY="${VM_MEMORY:-4G}"
# A safety net against a hung guest, not a performance target: under emulation on the 2-vCPU dev VM the guests' tests
# took 7-8 min, and 17 min for the 6.1 guest while its user test still simulated the whole transient (2026-12-06).
VM_TIMEOUT_SECONDS="${VM_TIMEOUT_SECONDS:-2400}"
# The guests' tests' per-step safety nets (tests/ckpt_helpers.py backstop), multiplied: emulated, a step takes 10-40x
# what it takes natively, and the nets were sized for a machine a few times slower than the dev VM. The slowest guest
# test under emulation took 49 s in all (6.1, 2026-12-06) against nets of 30-120 s a step; 4x keeps that margin at
# several times over. A net only: a test that works never waits for it.
if [ "$VM_ACCEL" = tcg ]; then default_scale=4; else default_scale=1; fi
VM_BACKSTOP_SCALE="${VM_BACKSTOP_SCALE:-$default_scale}"
TESTS=(
  tests/adapters/test_softdirty.py
  tests/checkpoint/test_fork_tracking.py
  tests/checkpoint/test_restore_tracking.py
  tests/checkpoint/test_streamdump.py
  tests/checkpoint/test_stopped_processes.py
  tests/checkpoint/test_huge_pages.py  # THP `always` there, the default of Debian's cloud kernels (CRIU patch 0005)
  tests/checkpoint/test_zeropages.py  # zero pages a restore left out, then written: tracked by each kernel's tracker
)
UFFD_TESTS=(tests/adapters/test_uffd.py)  # on the newer kernel only (on 6.1 they are skipped)
# on 6.1 only: an ordinary user's job moved by a Spot notice (5 min under emulation, where floating point is slow:
# the test cuts its simulation to about 90 s there)
USER_TESTS=("tests/system/test_slurm_e2e.py::test_spot_notice_moves_an_ngspice_job_to_another_node[ordinary-user]")
SHARED_VENV="${CKPT_SHARED_VENV:-/opt/ckpt-agent-dev/venv}"  # ckpt_dev/shared_venv.py's, made by `make setup`
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)  # or built in
CRIU_MODULES=(unix_diag inet_diag tcp_diag udp_diag raw_diag netlink_diag packet_diag nf_tables nf_conntrack tun veth
  overlay)
GUEST_MODULES=(dummy)  # not for CRIU: the guest's interface for Slurm (AI_ADDRCONFIG), made in cmd.sh

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
[ -x "$SHARED_VENV/bin/ckpt" ] || fail "no venv for users' jobs at $SHARED_VENV: run \`make setup\` first"

# 1. qemu, the kernels, busybox
log "installing qemu-system-x86"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null \
  || fail "apt-get install qemu-system-x86 failed"
mkdir -p "$KERNEL_VM_CACHE"
WORK="$(mktemp -d "$KERNEL_VM_WORKDIR/ckpt-kernel-vm.XXXXXX")"

# download PKG... into KERNEL_VM_CACHE (kept there), with the apt options in APT_OPTS (none: this machine's sources)
APT_OPTS=()
download() {
  local pkg
  for pkg in "$@"; do
    compgen -G "$KERNEL_VM_CACHE/${pkg}_*.deb" >/dev/null \
      || (cd "$KERNEL_VM_CACHE" && apt-get "${APT_OPTS[@]}" download -q "$pkg" >/dev/null 2>&1) \
      || return 1
  done
}

# unpack_kernel LABEL: download the kernel KERNEL_META names (newer Debian kernels split it into linux-binary-*,
# linux-modules-* and linux-base-* packages) and unpack it in $WORK/LABEL; sets KVER
unpack_kernel() {
  local label="$1" image pkg deb
  local -a pkgs
  image="$(apt-cache "${APT_OPTS[@]}" depends "$KERNEL_META" | awk '/Depends: linux-image-/ {print $2; exit}')"
  [ -n "$image" ] || fail "no kernel package named by $KERNEL_META for the $label guest"
  pkgs=("$image")
  while IFS= read -r pkg; do
    pkgs+=("$pkg")
  done < <(apt-cache "${APT_OPTS[@]}" depends "$image" | awk '/Depends: linux-(binary|modules|base)-/ {print $2}')
  download "${pkgs[@]}" || fail "cannot download ${pkgs[*]}"
  for pkg in "${pkgs[@]}"; do
    deb="$(compgen -G "$KERNEL_VM_CACHE/${pkg}_*.deb" | head -n 1)"
    dpkg-deb -x "$deb" "$WORK/$label"
  done
  KVER="${image#linux-image-}"
}

# kernel_file ROOT WHAT: the unpacked kernel's vmlinuz, config or modules directory, in the old layout (/boot, /lib)
# or the new one (/usr/lib/modules/VERSION)
kernel_file() {
  local root="$1" what="$2" f
  case "$what" in
    vmlinuz | config)
      for f in "$root/boot/$what-$KVER" "$root/usr/lib/modules/$KVER/$what"; do
        if [ -f "$f" ]; then echo "$f"; return 0; fi
      done ;;
    modules)
      for f in "$root/lib/modules/$KVER" "$root/usr/lib/modules/$KVER"; do
        if [ -d "$f" ]; then echo "$f"; return 0; fi
      done ;;
  esac
  return 1
}

download busybox-static || fail "cannot download busybox-static"
dpkg-deb -x "$(compgen -G "$KERNEL_VM_CACHE/busybox-static_*.deb" | head -n 1)" "$WORK/busybox"

# 2. and 4. per kernel: prepare_guest LABEL EXPECTED_FACTS TEST... makes $WORK/LABEL.{vmlinuz,initrd.gz,data.img}
prepare_guest() {
  local label="$1" expected="$2" pkgs moddir config m found initrd data
  local -a insmods=()
  shift 2
  pkgs="$WORK/$label"
  moddir="$(kernel_file "$pkgs" modules)" || fail "no modules directory in the $label kernel $KVER"
  config="$(kernel_file "$pkgs" config)" || fail "no config in the $label kernel $KVER"
  cp "$(kernel_file "$pkgs" vmlinuz)" "$WORK/$label.vmlinuz" || fail "no vmlinuz in the $label kernel $KVER"
  grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$config" || fail "the $label kernel $KVER has no soft-dirty"
  # busybox's insmod reads plain modules only: unpack the xz-compressed ones (Debian's kernels after 6.1)
  find "$moddir" -name '*.ko.xz' -print0 | xargs -0 -r "$REPO/.venv/bin/python" -c '
import lzma, os, sys
for f in sys.argv[1:]:
    with lzma.open(f) as src, open(f[:-3], "wb") as dst:
        dst.write(src.read())
    os.unlink(f)'
  log "$label guest: kernel $KVER"

  initrd="$WORK/$label.initrd"
  mkdir -p "$initrd"/{bin,sbin,mod,proc,sys,dev,newroot,lib/modules}
  cp "$WORK/busybox/bin/busybox" "$initrd/bin/busybox"
  ln -s /bin/busybox "$initrd/sbin/modprobe"
  for m in "${MODULES[@]}"; do
    found="$(find "$moddir" -name "$m.ko" | head -n 1)"
    if [ -n "$found" ]; then
      cp "$found" "$initrd/mod/"
      insmods+=("$m")
    elif ! grep -q "/$m\.ko\$" "$moddir/modules.builtin"; then
      fail "module $m is neither in nor built into the $label kernel $KVER"
    fi
  done
  cat >"$initrd/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${insmods[*]}; do insmod /mod/\$m.ko || echo "insmod \$m failed"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 0.2; done
mount /dev/vda /newroot || { echo "guest: no root disk"; poweroff -f; }
mkdir -p /data && mount /dev/vdb /data || { echo "guest: no data disk"; poweroff -f; }
mount --bind /data/modules /lib/modules && depmod
for m in ${CRIU_MODULES[*]} ${GUEST_MODULES[*]}; do modprobe \$m 2>/dev/null; done
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
INIT
  chmod 0755 "$initrd/init"
  (cd "$initrd" && find . | "$WORK/busybox/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$WORK/$label.initrd.gz")

  data="$WORK/$label.data"
  mkdir -p "$data/modules"
  cp -a "$moddir" "$data/modules/"
  cat >"$data/cmd.sh" <<CMD
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin HOME=/root PYTHONDONTWRITEBYTECODE=1
# the local Slurm cluster (ckpt_dev/slurm_cluster.py): this machine's name, and an address on an interface other than
# loopback (Slurm resolves with AI_ADDRCONFIG, which finds no address family on a machine with loopback only);
# no accounting database under emulation
hostname "$(hostname)"
ip link add ckpt0 type dummy && ip addr add 192.0.2.1/24 dev ckpt0 && ip link set ckpt0 up || echo "guest: no dummy interface"
export CKPT_CLUSTER_ACCOUNTING=0 CKPT_SHARED_VENV="$SHARED_VENV" CKPT_TEST_BACKSTOP_SCALE="$VM_BACKSTOP_SCALE"
cd "$REPO"
.venv/bin/python - <<'PY' || { echo 3 >/tmp/data/rc; exit 0; }
import sys
from ckpt_agent.adapters.criu import Criu
from ckpt_agent.adapters.softdirty import SoftDirtyTracker
from ckpt_agent.adapters.uffd import DirtyTracker
criu = Criu("/usr/local/sbin/criu")
facts = dict(soft_dirty=SoftDirtyTracker.supported() and criu.can_dump_soft_dirty_written(),
             uffd=DirtyTracker.supported() and criu.can_dump_uffd_written())
print("guest:", facts, "expected:", $expected)
sys.exit(0 if facts == $expected else 1)
PY
.venv/bin/python -m pytest -p no:cacheprovider -q -rs --durations=10 $(printf '%q ' "$@") 2>&1 | tee /tmp/data/pytest.log
rc=\${PIPESTATUS[0]}
if [ "\$rc" = 0 ] && grep -q " skipped" /tmp/data/pytest.log; then rc=4; fi
echo "\$rc" >/tmp/data/rc
CMD
  truncate -s 2G "$WORK/$label.data.img"
  mkfs.ext4 -q -F -d "$data" "$WORK/$label.data.img" || fail "mkfs.ext4 of the $label data disk failed"
  rm -rf --one-file-system "$pkgs" "$initrd" "$data"
}

unpack_kernel soft-dirty
prepare_guest soft-dirty "dict(soft_dirty=True, uffd=False)" "${TESTS[@]}" "${USER_TESTS[@]}"

# the newer kernels, from the Debian mirror this machine's apt sources name (install-criu.sh owns that lookup)
mirror="$(bash "$REPO/bootstrap/install-criu.sh" --print-mirror)" || fail "no Debian mirror in this machine's apt sources"
# use_suite SUITE: APT_OPTS for a private apt list of SUITE on that mirror, under KERNEL_VM_CACHE
use_suite() {
  local suite="$1" apt_dir="$KERNEL_VM_CACHE/apt-$1"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} $suite main" >"$apt_dir/sources.list"
  APT_OPTS=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  apt-get "${APT_OPTS[@]}" update -q >/dev/null 2>&1 || fail "apt-get update of $suite from $mirror failed"
}
use_suite "$KERNEL_VM_SCAN_SUITE"
unpack_kernel soft-dirty-scan
prepare_guest soft-dirty-scan "dict(soft_dirty=True, uffd=False)" "${TESTS[@]}"
use_suite "$KERNEL_VM_UFFD_SUITE"
unpack_kernel uffd
prepare_guest uffd "dict(soft_dirty=True, uffd=True)" "${TESTS[@]}" "${UFFD_TESTS[@]}"

# 3. the root disk: this machine's files at the same paths (each guest writes to a snapshot of it)
log "building the root disk"
base_python="$(sed -n 's/^home = //p' "$REPO/.venv/pyvenv.cfg")"
python_prefix="$(cd "$base_python/.." && pwd -P)"
stage="$WORK/rootfs"
mkdir -p "$stage"/{tmp,run,proc,sys,dev,var/tmp,root}
chmod 1777 "$stage/tmp" "$stage/var/tmp"  # users' jobs write there (ngspice's tmpfile())
for link in bin lib lib64 sbin; do ln -s "usr/$link" "$stage/$link"; done
dirs=(/usr /etc "$REPO" "$SHARED_VENV")
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

# 5. boot, 6. verdict
case "$VM_ACCEL" in
  kvm) accel=(-accel kvm -cpu "host,-arch-capabilities") ;;
  # one host thread runs every vCPU: with thread=multi a 7.3 guest once died of an int3 in __schedule, the kernel's
  # text_poke of a jump label seen half done by another vCPU (an emulation race, not seen on real CPUs)
  tcg) accel=(-accel "tcg,thread=single" -cpu max) ;;
  *) fail "VM_ACCEL must be tcg or kvm, not $VM_ACCEL" ;;
esac
# boot_guest LABEL: boots it, fails unless its tests passed; its console is $WORK/LABEL.console.log
boot_guest() {
  local label="$1" rc
  log "booting the $label guest ($VM_ACCEL, $VM_MEMORY); console in $WORK/$label.console.log"
  # snapshot=on: the guest's writes to the root disk go to a temporary overlay, so each guest starts from the same disk
  timeout --kill-after=10 "$VM_TIMEOUT_SECONDS" qemu-system-x86_64 "${accel[@]}" -smp "$(nproc)" -m "$VM_MEMORY" \
    -nographic -no-reboot -net none -kernel "$WORK/$label.vmlinuz" -initrd "$WORK/$label.initrd.gz" \
    -append "console=ttyS0 quiet panic=-1" \
    -drive "file=$WORK/root.img,format=raw,if=virtio,cache=unsafe,snapshot=on" \
    -drive "file=$WORK/$label.data.img,format=raw,if=virtio,cache=unsafe" </dev/null >"$WORK/$label.console.log" 2>&1 &
  QEMU_PID=$!
  wait "$QEMU_PID" || log "qemu exited $?"
  QEMU_PID=""
  # the verdict lines and the ten slowest steps (a test near its backstop shows here first)
  grep -a '^guest:\|passed\|failed\|error\|^[0-9.]*s \(call\|setup\|teardown\) ' "$WORK/$label.console.log" \
    | tail -n 30 >&2 || true
  mkdir -p "$WORK/out-$label"
  debugfs -R "dump /rc $WORK/out-$label/rc" "$WORK/$label.data.img" >/dev/null 2>&1 || true
  rc="$(cat "$WORK/out-$label/rc" 2>/dev/null || echo none)"
  case "$rc" in
    0) log "$label guest: PASS" ;;
    3)
      tail -n 40 "$WORK/$label.console.log" >&2
      fail "the $label guest does not track written pages the expected way (its kernel, or CRIU's patches)"
      ;;
    4) fail "tests were skipped in the $label guest: its tracking path was not exercised" ;;
    *)
      tail -n 60 "$WORK/$label.console.log" >&2
      fail "the tests in the $label guest exited $rc"
      ;;
  esac
}
boot_guest soft-dirty
boot_guest soft-dirty-scan
boot_guest uffd
echo "kernel-vm check: PASS (soft-dirty tracking on the cloud kernels of Debian 12 and $KERNEL_VM_SCAN_SUITE," \
  "userfaultfd tracking on $KERNEL_VM_UFFD_SUITE's) in $((SECONDS - START_SECONDS)) s"
