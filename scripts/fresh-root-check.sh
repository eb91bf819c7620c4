#!/bin/bash
# Proves that the README's setup works on a fresh machine: a package installed by hand on the CI machine can no longer
# hide a missing install step, because `make setup` runs in a clean Debian 12 root built for this check.
#
# Plan:
#   1. Take the machine-wide lock (checks share the .deb cache) and remove roots that an earlier run left behind.
#   2. Build a clean Debian 12 (bookworm) root with mmdebstrap from this machine's own apt sources.
#   3. Copy in this machine's pip configuration, CA bundle and resolv.conf, and this checkout's tracked files.
#   4. Bind-mount /proc, /sys, /dev and the .deb cache; install `make`, the one tool a newcomer needs to type
#      `make setup`.
#   5. Run `make setup` in the root (chroot): scripts/setup-dev.sh and bootstrap/install-criu.sh install the rest.
#   6. Check there: `ckpt --version` from the venv setup made, `criu --version` >= the pinned release with this
#      project's patch line, and `criu check`.
#   7. On every path (success, failure, SIGINT, SIGTERM): stop what runs in the root, unmount in reverse order, remove
#      the root. Only downloaded .deb packages outlive a run (FRESH_ROOT_CACHE); never a build result or a venv.
#
# Idempotent: every run starts from a new root; a second run only reuses the .deb cache.
set -euo pipefail
shopt -s inherit_errexit

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE=bookworm
CRIU_MIN_VERSION="${CRIU_MIN_VERSION:-4.2.1}"
# The line our carried CRIU patch 0001 adds to `criu --version` (bootstrap/patches/criu-*/0001-*.patch).
CRIU_PATCH_LINE="Patches: ckpt-agent-0001"
FRESH_ROOT_CACHE="${FRESH_ROOT_CACHE:-/var/cache/ckpt-fresh-root}"
FRESH_ROOT_WORKDIR="${FRESH_ROOT_WORKDIR:-/var/tmp}"
# The root lives on a tmpfs of at most this size (it grows to about 1.5 GiB): dpkg's many fsyncs and the removal of
# tens of thousands of files cost minutes on a loaded disk mounted with `discard`, nothing in memory. 0: on disk.
FRESH_ROOT_TMPFS_SIZE="${FRESH_ROOT_TMPFS_SIZE:-6G}"
# A safety net against a hung download or build, not a performance target: setup builds CRIU from source, which took
# about 5-10 min on 2 loaded cores.
SETUP_TIMEOUT_SECONDS="${SETUP_TIMEOUT_SECONDS:-2400}"
# How long an interrupted mmdebstrap or setup gets to stop after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS=10
# Where the checkout lands inside the root.
SRC_IN_ROOT=/src/ckpt-agent
ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

WORK=""      # this run's directory: root/ and setup.log
ROOT=""      # the Debian root inside WORK
MOUNTS=()    # mount points in the order they were mounted
TIMINGS=()   # "phase seconds"
ROOT_ARGV=() # see root_argv
BG_PID=""    # the long command `interruptible` waits for
TAIL_PID=""  # the tail showing its output
PHASE="start"
PHASE_START=""          # set while a phase runs
CKPT_VERSION=""        # what the checks saw, for the verdict
CRIU_VERSION_SEEN=""
START_SECONDS="$SECONDS"

usage() {
  cat <<EOF
usage: fresh-root-check.sh

Builds a clean Debian 12 root (mmdebstrap), runs \`make setup\` from this checkout inside it, then checks
\`ckpt --version\`, \`criu --version\` (>= ${CRIU_MIN_VERSION}, "${CRIU_PATCH_LINE}") and \`criu check\` there.
Prints timings per phase and a one-line verdict; exits non-zero on failure. Run as root.

Environment:
  FRESH_ROOT_CACHE        .deb packages kept between runs, nothing else (default ${FRESH_ROOT_CACHE})
  FRESH_ROOT_WORKDIR      where the temporary root is built (default ${FRESH_ROOT_WORKDIR})
  FRESH_ROOT_TMPFS_SIZE   size limit of the tmpfs holding the root, 0 to build it on disk (default ${FRESH_ROOT_TMPFS_SIZE})
  SETUP_TIMEOUT_SECONDS   safety limit for \`make setup\` in the root (default ${SETUP_TIMEOUT_SECONDS})
EOF
}

log() { printf '%s fresh-root: %s\n' "$(date -u +%T)" "$*" >&2; }

fmt_seconds() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# fail CAUSE: cleans up, then prints the verdict line for a failure (last, where CI shows it) and exits 1.
fail() {
  log "ERROR: $*"
  print_timings
  finish 1 "FAIL in phase '${PHASE}' after $(fmt_seconds $((SECONDS - START_SECONDS))): $*"
}

# finish CODE VERDICT: removes the root, prints the verdict, exits with CODE.
finish() {
  trap - EXIT
  trap '' INT TERM # a second Ctrl-C must not leave a root with /dev bound inside it
  if [ -n "$WORK" ]; then
    log "cleaning up: unmounting and removing $WORK"
    teardown || log "ERROR: cannot remove $WORK: something is still mounted there"
  fi
  echo "fresh-root check: $2"
  exit "$1"
}

print_timings() {
  local t
  for t in "${TIMINGS[@]}"; do
    log "timing: ${t% *} $(fmt_seconds "${t##* }")"
  done
  [ -z "$PHASE_START" ] || log "timing: ${PHASE} $(fmt_seconds $((SECONDS - PHASE_START))) (stopped)"
}

# phase NAME COMMAND...: runs one phase, records its duration.
phase() {
  PHASE="$1"
  shift
  PHASE_START="$SECONDS"
  log "== $PHASE"
  "$@"
  TIMINGS+=("$PHASE $((SECONDS - PHASE_START))")
  PHASE_START=""
}

# root_argv: sets ROOT_ARGV to the prefix that runs a command inside the root with a clean environment. No host
# variable leaks in except the pip settings, so the root sees what a newcomer's shell would.
root_argv() {
  local -a pip_env=()
  local name
  while IFS= read -r name; do
    # PIP_FIND_LINKS names a directory of wheels that exists on this machine only.
    [ "$name" = PIP_FIND_LINKS ] && continue
    pip_env+=("$name=${!name}")
  done < <(compgen -e | grep '^PIP_' || true)
  ROOT_ARGV=(env -i PATH="$ROOT_PATH" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "${pip_env[@]}"
             chroot "$ROOT")
}

in_root() {
  root_argv
  "${ROOT_ARGV[@]}" "$@"
}

# interruptible LOG COMMAND...: runs a long command in the background, in a process group of its own, with its output
# in LOG shown as it comes, and waits for it. A trapped SIGTERM or SIGINT interrupts `wait` at once (a foreground
# child would delay the trap until it ends); teardown then stops that process group.
interruptible() {
  local logfile="$1" rc=0
  shift
  : >"$logfile" # exists before tail opens it
  setsid "$@" >>"$logfile" 2>&1 </dev/null &
  BG_PID=$!
  tail -n +1 -f --pid="$BG_PID" "$logfile" &
  TAIL_PID=$!
  wait "$BG_PID" || rc=$?
  BG_PID=""
  wait "$TAIL_PID" || true
  TAIL_PID=""
  return "$rc"
}

# --- cleanup -----------------------------------------------------------------------------------------------------

# stop_root_processes DIR: processes whose root directory is DIR were started by this check (a daemon a package
# started, a build still running after SIGINT): stop them so the mounts can go.
stop_root_processes() {
  local dir="$1" sig pid link found
  for sig in TERM KILL; do
    found=0
    for pid in /proc/[0-9]*; do
      link="$(readlink "$pid/root" 2>/dev/null || true)"
      [ "$link" = "$dir" ] || continue
      found=1
      kill -s "$sig" "${pid#/proc/}" 2>/dev/null || true
    done
    [ "$found" = 1 ] || return 0
    sleep 1
  done
}

# mounts_under DIR: DIR itself and every mount point below it.
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo
}

# remove_root WORKDIR: unmounts everything under WORKDIR (deepest first, the tmpfs last), then deletes WORKDIR.
# Refuses to delete while anything is still mounted there: a bound /dev must never be removed through the root.
remove_root() {
  local work="$1" root="$1/root" m
  stop_root_processes "$root"
  local -a left=()
  local _pass
  # A mount point can be stacked (mounted twice): a few passes, deepest first.
  for _pass in 1 2 3; do
    mapfile -t left < <(mounts_under "$work" | sort -r)
    [ "${#left[@]}" -gt 0 ] || break
    for m in "${left[@]}"; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  if [ -n "$(mounts_under "$work")" ]; then
    log "ERROR: still mounted under $work, not removing it: $(mounts_under "$work" | tr '\n' ' ')"
    return 1
  fi
  rm -rf --one-file-system "$work"
}

# teardown: stops what runs in the root, unmounts our mounts newest first (each with whatever was mounted below it),
# removes the root. Runs at the end of a good run and from the EXIT trap on every other path.
teardown() {
  # A long command interrupted by a signal: its process group gets TERM, then KILL after a grace period (mmdebstrap
  # finishes the apt run in progress before it reacts to TERM). What it mounted, remove_root unmounts.
  if [ -n "$TAIL_PID" ]; then
    kill "$TAIL_PID" 2>/dev/null || true
    TAIL_PID=""
  fi
  if [ -n "$BG_PID" ]; then
    kill -s TERM -- "-$BG_PID" 2>/dev/null || true
    local waited=0
    while kill -0 -- "-$BG_PID" 2>/dev/null && [ "$waited" -lt "$STOP_GRACE_SECONDS" ]; do
      sleep 1
      waited=$((waited + 1))
    done
    kill -s KILL -- "-$BG_PID" 2>/dev/null || true
    wait "$BG_PID" 2>/dev/null || true
    BG_PID=""
  fi
  [ -n "$WORK" ] && [ -d "$WORK" ] || return 0
  local m i
  stop_root_processes "$ROOT"
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    m="${MOUNTS[$i]}"
    umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || log "cannot unmount $m"
  done
  MOUNTS=()
  remove_root "$WORK" || return 1
  WORK=""
}

# cleanup: the EXIT trap, for a command that failed outside `fail` (set -e) and for a good run's exit.
cleanup() {
  local rc=$?
  [ "$rc" = 0 ] && [ -z "$WORK" ] && return 0
  [ "$rc" = 0 ] && rc=1
  finish "$rc" "FAIL in phase '${PHASE}' after $(fmt_seconds $((SECONDS - START_SECONDS))): exit status $rc (see above)"
}

on_signal() {
  log "interrupted by SIG$1"
  finish "$2" "FAIL in phase '${PHASE}' after $(fmt_seconds $((SECONDS - START_SECONDS))): interrupted by SIG$1"
}

# --- phases ------------------------------------------------------------------------------------------------------

require_tools() {
  [ "$(id -u)" = 0 ] || fail "run as root: builds a root file system and chroots into it"
  command -v git >/dev/null 2>&1 || fail "git is needed to list this checkout's tracked files"
  if ! command -v mmdebstrap >/dev/null 2>&1; then
    log "installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null \
      || { apt-get update -q >/dev/null \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null; } \
      || fail "cannot install mmdebstrap with apt-get"
  fi
}

# lock_and_sweep: one check at a time per machine (they share the .deb cache, and apt locks it); under the lock, any
# root left in the work directory belongs to a run that was killed before its cleanup.
lock_and_sweep() {
  mkdir -p "$FRESH_ROOT_CACHE/archives/partial"
  exec {lock_fd}>"$FRESH_ROOT_CACHE/lock"
  if ! flock -n "$lock_fd"; then
    log "another fresh-root check runs on this machine; waiting for it"
    flock "$lock_fd"
  fi
  local stale
  for stale in "$FRESH_ROOT_WORKDIR"/ckpt-fresh-root.*; do
    [ -d "$stale" ] || continue
    log "removing a root left by an interrupted run: $stale"
    remove_root "$stale" || fail "cannot remove the stale root $stale"
  done
}

make_root() {
  WORK="$(mktemp -d "$FRESH_ROOT_WORKDIR/ckpt-fresh-root.XXXXXX")"
  # the canonical path: it is compared with /proc/PID/root to find processes running in the root
  WORK="$(realpath "$WORK")"
  if [ "$FRESH_ROOT_TMPFS_SIZE" != 0 ]; then
    mount -t tmpfs -o "size=$FRESH_ROOT_TMPFS_SIZE,mode=0755" ckpt-fresh-root "$WORK" \
      || fail "cannot mount a tmpfs on $WORK"
  fi
  ROOT="$WORK/root"
  # No mirror argument: mmdebstrap takes this machine's apt sources. The hooks fill the root's apt archives from the
  # .deb cache and save what was downloaded; essential/unlink keeps the essential packages there until then.
  interruptible "$WORK/mmdebstrap.log" mmdebstrap --quiet --variant=apt --include=ca-certificates \
    --skip=essential/unlink \
    --setup-hook="mkdir -p \"\$1/var/cache/apt/archives\"" \
    --setup-hook="sync-in $FRESH_ROOT_CACHE/archives /var/cache/apt/archives" \
    --customize-hook="sync-out /var/cache/apt/archives $FRESH_ROOT_CACHE/archives" \
    "$SUITE" "$ROOT" \
    || fail "mmdebstrap could not build a $SUITE root: $(grep -m1 '^E: ' "$WORK/mmdebstrap.log" || echo 'see above')"
  [ -x "$ROOT/usr/bin/apt-get" ] || fail "mmdebstrap left no apt-get in $ROOT"
}

copy_host_config() {
  # pip reaches the same index as on this machine through its configuration files, never a host name in this repo.
  # Not root's own ~/.config/pip: like PIP_FIND_LINKS, it names wheel directories that exist on this machine only.
  local f
  if [ -d /etc/xdg/pip ]; then
    mkdir -p "$ROOT/etc/xdg"
    cp -a /etc/xdg/pip "$ROOT/etc/xdg/"
  fi
  for f in /etc/pip.conf /etc/ssl/certs/ca-certificates.crt; do
    [ -e "$f" ] || continue
    mkdir -p "$ROOT$(dirname "$f")"
    cp -L "$f" "$ROOT$f"
  done
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
}

# copy_checkout: the working tree's tracked files (uncommitted edits included, untracked files such as .venv not).
copy_checkout() {
  mkdir -p "$ROOT$SRC_IN_ROOT"
  local f
  git -C "$REPO" ls-files -z \
    | while IFS= read -r -d '' f; do
        # a tracked file deleted in the working tree is not part of what we test
        if [ -e "$REPO/$f" ] || [ -L "$REPO/$f" ]; then printf '%s\0' "$f"; fi
      done \
    | tar -C "$REPO" --null -T - -cf - \
    | tar -C "$ROOT$SRC_IN_ROOT" -xf - \
    || fail "cannot copy the checkout into the root"
}

bind_mount() {
  local src="$1" dst="$ROOT${2%/}"
  mkdir -p "$dst"
  mount --rbind "$src" "$dst"
  MOUNTS+=("$dst")
  # slave: unmounting our copy never propagates back to the host's tree
  mount --make-rslave "$dst"
}

mount_all() {
  # The root is a mount point of its own, as / is on a machine: CRIU reads mountinfo and, in a plain chroot, finds
  # no parent for the mounts below it ("No parent found for mountpoint"), so `criu check` would fail.
  bind_mount "$ROOT" /
  bind_mount /proc /proc
  bind_mount /sys /sys
  bind_mount /dev /dev
  bind_mount "$FRESH_ROOT_CACHE/archives" /var/cache/apt/archives
}

# install_make: a newcomer types `make setup`, so `make` is the one tool we grant before the project's own setup.
install_make() {
  in_root apt-get update -q >/dev/null || fail "apt-get update fails in the root"
  in_root apt-get install -y -q --no-install-recommends make >/dev/null || fail "cannot install make in the root"
}

run_setup() {
  local rc=0 cause first
  root_argv
  interruptible "$WORK/setup.log" \
    timeout -k 30 "$SETUP_TIMEOUT_SECONDS" "${ROOT_ARGV[@]}" make -C "$SRC_IN_ROOT" setup || rc=$?
  [ "$rc" = 0 ] && return 0
  [ "$rc" = 124 ] && fail "make setup did not finish within ${SETUP_TIMEOUT_SECONDS} s"
  # The first error a script reported is the cause; make's own "Error" line only repeats the exit status. A failed
  # build also names its first error (the build log it points to goes with the root).
  cause="$(grep -m1 -E 'ERROR:|^E: ' "$WORK/setup.log" || tail -n1 "$WORK/setup.log")"
  first="$(grep -m1 -E '\*\*\* .*Stop\.$|: (fatal )?error: ' "$WORK/setup.log" || true)"
  [ -z "$first" ] || cause="$cause; first build error: $first"
  fail "make setup exits $rc in a clean $SUITE root: ${cause}"
}

check_root() {
  local out ver
  out="$(in_root "$SRC_IN_ROOT/.venv/bin/ckpt" --version 2>&1)" \
    || fail "ckpt --version fails in the root: $out"
  log "ckpt --version: $out"
  CKPT_VERSION="$out"
  out="$(in_root criu --version 2>&1)" || fail "criu --version fails in the root: $out"
  log "criu --version: $(tr '\n' ' ' <<<"$out")"
  ver="$(awk '/^Version:/ {print $2; exit}' <<<"$out")"
  [ -n "$ver" ] || fail "criu --version prints no version in the root: $out"
  [ "$(printf '%s\n%s\n' "$ver" "$CRIU_MIN_VERSION" | sort -V | head -n1)" = "$CRIU_MIN_VERSION" ] \
    || fail "criu in the root is $ver, need >= $CRIU_MIN_VERSION"
  grep -qF "$CRIU_PATCH_LINE" <<<"$out" || fail "criu in the root lacks our patch line '$CRIU_PATCH_LINE'"
  CRIU_VERSION_SEEN="$ver"
  out="$(in_root criu check 2>&1)" || fail "criu check fails in the root: $(tail -n1 <<<"$out")"
  log "criu check: $out"
}

teardown_or_fail() {
  teardown || fail "cannot remove the root $WORK: something is still mounted there"
}

main() {
  case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
  esac
  trap cleanup EXIT
  trap 'on_signal INT 130' INT
  trap 'on_signal TERM 143' TERM
  phase prepare require_tools
  phase lock lock_and_sweep
  phase mmdebstrap make_root
  phase copy-in copy_host_config
  phase copy-in-checkout copy_checkout
  phase mount mount_all
  phase install-make install_make
  phase make-setup run_setup
  phase checks check_root
  phase teardown teardown_or_fail
  print_timings
  echo "fresh-root check: PASS in $(fmt_seconds $((SECONDS - START_SECONDS))): make setup in a clean Debian 12 root" \
    "gives ${CKPT_VERSION}, CRIU ${CRIU_VERSION_SEEN} with ${CRIU_PATCH_LINE}, criu check OK"
}

main "$@"
