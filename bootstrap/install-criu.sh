#!/bin/bash
# Makes CRIU >= the pinned release available on this machine.
#
# Plan:
#   1. If a criu on PATH (or at the install prefix) is new enough and `criu check` passes, stop.
#   2. If a cached build exists (CRIU_CACHE_DIR, e.g. on the cluster's shared storage), install it and stop.
#   3. Install build dependencies with apt or dnf.
#   4. Fetch the pinned upstream source (CRIU_SOURCE_URL, else Debian's archive through the mirror this machine's
#      apt sources already name), verify its sha256, build, install, and fill the cache.
#
# Idempotent: a second run finds the installed binary in step 1 and changes nothing.
set -euo pipefail

CRIU_VERSION="${CRIU_VERSION:-4.2.1}"
# sha256 of criu_4.2.1.orig.tar.xz, the upstream release tarball as Debian's archive carries it.
CRIU_SHA256="${CRIU_SHA256:-29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9}"
CRIU_PREFIX="${CRIU_PREFIX:-/usr/local}"
CRIU_SOURCE_URL="${CRIU_SOURCE_URL:-}"
CRIU_CACHE_DIR="${CRIU_CACHE_DIR:-}"
CRIU_BUILD_DIR="${CRIU_BUILD_DIR:-/var/tmp/ckpt-criu-build}"
CRIU_SKIP_DEPS="${CRIU_SKIP_DEPS:-0}"

usage() {
  cat <<EOF
usage: install-criu.sh [--check-only]

Installs CRIU >= ${CRIU_VERSION} into ${CRIU_PREFIX}/sbin unless a working one is already there.

Environment:
  CRIU_VERSION      pinned release (default ${CRIU_VERSION}); CRIU_SHA256 must match its tarball
  CRIU_SOURCE_URL   where to fetch the release tarball (default: Debian's archive via this machine's apt mirror)
  CRIU_CACHE_DIR    a directory (e.g. on shared storage) holding a built criu to reuse, and filled after a build
  CRIU_PREFIX       install prefix (default /usr/local)
  CRIU_SKIP_DEPS=1  do not install build dependencies
EOF
}

log() { printf '%s install-criu: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

retry() {
  local n=0
  until "$@"; do
    n=$((n + 1))
    [ "$n" -ge 4 ] && return 1
    log "retrying ($n/3): $*"
    sleep $((n * 3))
  done
}

# version_ge A B: true when version A >= version B.
version_ge() {
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]
}

criu_version_of() {
  "$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

# usable BINARY: new enough and `criu check` passes on this kernel.
usable() {
  local bin="$1" ver
  [ -x "$bin" ] || return 1
  ver="$(criu_version_of "$bin")"
  [ -n "$ver" ] || return 1
  version_ge "$ver" "$CRIU_VERSION" || { log "$bin is version $ver, need >= $CRIU_VERSION"; return 1; }
  "$bin" check >/dev/null 2>&1 || { log "$bin $ver fails 'criu check' on this kernel"; return 1; }
  return 0
}

find_usable() {
  local cand
  for cand in "$CRIU_PREFIX/sbin/criu" "$(command -v criu 2>/dev/null || true)"; do
    [ -n "$cand" ] && usable "$cand" && { echo "$cand"; return 0; }
  done
  return 1
}

install_deps() {
  [ "$CRIU_SKIP_DEPS" = 1 ] && return 0
  if command -v apt-get >/dev/null 2>&1; then
    log "installing build dependencies with apt"
    export DEBIAN_FRONTEND=noninteractive
    retry apt-get install -y -q --no-install-recommends build-essential pkg-config xz-utils curl ca-certificates \
      libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev \
      libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev iproute2 >/dev/null \
      || { retry apt-get update -q >/dev/null && retry apt-get install -y -q --no-install-recommends \
        build-essential pkg-config xz-utils curl ca-certificates libprotobuf-c-dev protobuf-c-compiler \
        protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev \
        libnftables-dev uuid-dev iproute2 >/dev/null; }
  elif command -v dnf >/dev/null 2>&1; then
    log "installing build dependencies with dnf"
    retry dnf install -y -q gcc make pkgconf-pkg-config xz curl tar protobuf-c-devel protobuf-c-compiler \
      protobuf-compiler python3-protobuf libnl3-devel libnet-devel libcap-devel libbsd-devel gnutls-devel \
      nftables-devel libuuid-devel iproute >/dev/null
  else
    die "neither apt-get nor dnf found: install CRIU's build dependencies by hand and set CRIU_SKIP_DEPS=1"
  fi
}

# The Debian mirror this machine already uses, from its apt sources (deb822 or one-line format).
debian_mirror() {
  local uri
  uri="$( { grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
            grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } \
          | grep -v -- '-security' | grep -E '/debian/?$' | head -n1)"
  [ -n "$uri" ] || return 1
  echo "${uri%/}"
}

source_url() {
  if [ -n "$CRIU_SOURCE_URL" ]; then
    echo "$CRIU_SOURCE_URL"
    return 0
  fi
  local mirror
  mirror="$(debian_mirror)" || die "no CRIU_SOURCE_URL set and no Debian mirror in this machine's apt sources"
  echo "$mirror/pool/main/c/criu/criu_${CRIU_VERSION}.orig.tar.xz"
}

fetch_source() {
  local url="$1" out="$2"
  if [ -f "$out" ] && echo "$CRIU_SHA256  $out" | sha256sum -c --status; then
    log "source already downloaded and verified: $out"
    return 0
  fi
  log "fetching $url"
  case "$url" in
    file://*) cp "${url#file://}" "$out.part" ;;
    /*) cp "$url" "$out.part" ;;
    *) retry curl -fsSL --connect-timeout 20 --max-time 600 -o "$out.part" "$url" \
         || die "cannot download CRIU source from $url" ;;
  esac
  echo "$CRIU_SHA256  $out.part" | sha256sum -c --status \
    || die "sha256 mismatch for $url (expected $CRIU_SHA256): refusing to build it"
  mv "$out.part" "$out"
}

build() {
  local tarball="$CRIU_BUILD_DIR/criu_${CRIU_VERSION}.orig.tar.xz" src
  mkdir -p "$CRIU_BUILD_DIR"
  fetch_source "$(source_url)" "$tarball"
  src="$CRIU_BUILD_DIR/src-${CRIU_VERSION}"
  rm -rf "$src" && mkdir -p "$src"
  tar -xJf "$tarball" -C "$src" --strip-components=1
  log "building CRIU ${CRIU_VERSION} (a few minutes at most)"
  # Documentation needs asciidoc/xmlto, which a node does not need: build the binary only.
  make -C "$src" -j"$(nproc)" criu >"$CRIU_BUILD_DIR/build.log" 2>&1 \
    || { tail -n 30 "$CRIU_BUILD_DIR/build.log" >&2; die "CRIU build failed, log: $CRIU_BUILD_DIR/build.log"; }
  install -D -m 0755 "$src/criu/criu" "$CRIU_PREFIX/sbin/criu.new"
  mv -f "$CRIU_PREFIX/sbin/criu.new" "$CRIU_PREFIX/sbin/criu"
  # crit and pycriu help humans inspect images; the agent itself does not need them.
  if [ -d "$src/lib/pycriu" ]; then
    make -C "$src" -j"$(nproc)" lib >>"$CRIU_BUILD_DIR/build.log" 2>&1 || log "pycriu/crit build skipped"
  fi
}

fill_cache() {
  [ -n "$CRIU_CACHE_DIR" ] || return 0
  mkdir -p "$CRIU_CACHE_DIR"
  # a name of our own: several nodes may fill a shared cache at once
  local tmp
  tmp="$CRIU_CACHE_DIR/.criu.new.$$.$(hostname)"
  install -m 0755 "$CRIU_PREFIX/sbin/criu" "$tmp"
  mv -f "$tmp" "$CRIU_CACHE_DIR/criu-${CRIU_VERSION}"
  log "cached build at $CRIU_CACHE_DIR/criu-${CRIU_VERSION}"
}

from_cache() {
  [ -n "$CRIU_CACHE_DIR" ] || return 1
  local cached="$CRIU_CACHE_DIR/criu-${CRIU_VERSION}"
  [ -x "$cached" ] || return 1
  install_runtime_libs
  install -D -m 0755 "$cached" "$CRIU_PREFIX/sbin/criu.new.$$"
  mv -f "$CRIU_PREFIX/sbin/criu.new.$$" "$CRIU_PREFIX/sbin/criu"
  usable "$CRIU_PREFIX/sbin/criu" || { log "cached build at $cached does not work here"; return 1; }
  log "installed cached build from $cached"
}

# A cached binary needs the shared libraries it was linked against; the -dev packages pull them in.
install_runtime_libs() {
  install_deps
}

main() {
  case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --check-only) find_usable >/dev/null && exit 0 || exit 1 ;;
    "") ;;
    *) usage >&2; exit 2 ;;
  esac
  local found
  if found="$(find_usable)"; then
    log "CRIU $(criu_version_of "$found") at $found works; nothing to do"
    fill_cache_if_missing "$found"
    return 0
  fi
  if from_cache; then
    return 0
  fi
  install_deps
  build
  usable "$CRIU_PREFIX/sbin/criu" || die "built CRIU ${CRIU_VERSION} fails 'criu check' on kernel $(uname -r)"
  fill_cache
  log "CRIU ${CRIU_VERSION} installed at $CRIU_PREFIX/sbin/criu"
}

fill_cache_if_missing() {
  [ -n "$CRIU_CACHE_DIR" ] || return 0
  [ -x "$CRIU_CACHE_DIR/criu-${CRIU_VERSION}" ] && return 0
  [ "$1" = "$CRIU_PREFIX/sbin/criu" ] || return 0
  fill_cache
}

main "$@"
