#!/bin/bash
# Makes CRIU >= the pinned release, with the patches this project carries, available on this machine.
#
# Plan:
#   1. If a criu at the install prefix or on PATH is new enough, carries what this machine needs (our patches, where
#      root lacks CAP_SYS_RESOURCE) and `criu check` passes, stop.
#   2. If a cached build for this release and patch set exists (CRIU_CACHE_DIR, e.g. on the cluster's shared
#      storage), install its runtime libraries only and the binary, and stop.
#   3. Install the build dependencies (CRIU's own lists, contrib/dependencies/, cut to what the `criu` target needs).
#   4. Fetch the pinned upstream source (CRIU_SOURCE_URL, else Debian's archive through the mirror this machine's
#      apt sources already name), verify its sha256, apply bootstrap/patches/criu-<version>/*.patch in order, build,
#      install, record the patch set next to the binary, and fill the cache.
#
# Idempotent: a second run finds the installed binary in step 1 and changes nothing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CRIU_VERSION="${CRIU_VERSION:-4.2.1}"
# sha256 of criu_4.2.1.orig.tar.xz, the upstream release tarball as Debian's archive carries it.
CRIU_SHA256="${CRIU_SHA256:-29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9}"
CRIU_PREFIX="${CRIU_PREFIX:-/usr/local}"
CRIU_SOURCE_URL="${CRIU_SOURCE_URL:-}"
CRIU_CACHE_DIR="${CRIU_CACHE_DIR:-}"
CRIU_BUILD_DIR="${CRIU_BUILD_DIR:-/var/tmp/ckpt-criu-build}"
CRIU_SKIP_DEPS="${CRIU_SKIP_DEPS:-0}"
CRIU_PATCH_DIR="${CRIU_PATCH_DIR:-$HERE/patches/criu-${CRIU_VERSION}}"
CRIU_APT_ETC="${CRIU_APT_ETC:-/etc/apt}"

# What `make criu` needs (CRIU's contrib/dependencies/{apt,dnf}-packages.sh, less docs, tests, plugins and crit).
# libprotobuf-dev / protobuf-devel: descriptor.proto and protobuf.pc, which the image sources are generated from.
APT_BUILD_DEPS=(build-essential patch pkg-config xz-utils curl ca-certificates libprotobuf-dev libprotobuf-c-dev
                protobuf-c-compiler protobuf-compiler libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev
                libnftables-dev uuid-dev iproute2)
DNF_BUILD_DEPS=(gcc make patch pkgconf-pkg-config xz curl tar protobuf-devel protobuf-c-devel protobuf-c-compiler
                protobuf-compiler libnl3-devel libnet-devel libcap-devel libbsd-devel gnutls-devel nftables-devel
                libuuid-devel iproute)
# What the built binary links against (ldd criu), for nodes that install a cached build: no compiler, no headers.
APT_RUNTIME_DEPS=(libprotobuf-c1 libnl-3-200 libnet1 libcap2 libbsd0 libgnutls30 libnftables1 libuuid1 iproute2)
DNF_RUNTIME_DEPS=(protobuf-c libnl3 libnet libcap libbsd gnutls nftables-libs libuuid iproute)

usage() {
  cat <<EOF
usage: install-criu.sh [--check-only | --print-deps | --print-mirror]

Installs CRIU >= ${CRIU_VERSION} into ${CRIU_PREFIX}/sbin unless a working one is already there.
  --check-only   exit 0 when a usable criu is installed, 1 otherwise
  --print-deps   print the apt build dependencies, one a line
  --print-mirror print the Debian mirror this machine's apt sources name (exit 1 if none)

Environment:
  CRIU_VERSION      pinned release (default ${CRIU_VERSION}); CRIU_SHA256 must match its tarball
  CRIU_SOURCE_URL   where to fetch the release tarball (default: Debian's archive via this machine's apt mirror)
  CRIU_CACHE_DIR    a directory (e.g. on shared storage) holding a built criu to reuse, and filled after a build
  CRIU_PREFIX       install prefix (default /usr/local)
  CRIU_PATCH_DIR    patches applied after the checksum check (default: patches/criu-<version> beside this script)
  CRIU_SKIP_DEPS=1  do not install packages
  CRIU_APT_ETC      where the apt sources are read from (default /etc/apt)
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

patch_files() {
  [ -d "$CRIU_PATCH_DIR" ] || return 0
  find "$CRIU_PATCH_DIR" -maxdepth 1 -name '*.patch' -type f | LC_ALL=C sort
}

# patch_set_id: a short hash of the patches applied to a build ("none" without patches). Part of the cache key and
# of the marker file, so a changed patch never reuses an old binary.
patch_set_id() {
  local files
  files="$(patch_files)"
  if [ -z "$files" ]; then
    echo none
    return 0
  fi
  # shellcheck disable=SC2086  # one path a line, no spaces in our patch names
  cat $files | sha256sum | cut -c1-16
}

marker_of() { echo "$(dirname "$1")/.criu-patches"; }

# root_has_cap_sys_resource: without it CRIU cannot read another user's resource limits (see patch 0001).
root_has_cap_sys_resource() {
  local eff
  eff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
  [ -n "$eff" ] && (( (16#$eff >> 24) & 1 ))
}

# usable BINARY: new enough, carries our patches where this machine needs them, and `criu check` passes.
usable() {
  local bin="$1" ver want
  [ -x "$bin" ] || return 1
  ver="$(criu_version_of "$bin")"
  [ -n "$ver" ] || return 1
  version_ge "$ver" "$CRIU_VERSION" || { log "$bin is version $ver, need >= $CRIU_VERSION"; return 1; }
  want="$(patch_set_id)"
  if [ "$want" != none ] && ! root_has_cap_sys_resource; then
    if [ "$(cat "$(marker_of "$bin")" 2>/dev/null || true)" != "$want" ]; then
      log "$bin lacks this project's CRIU patches (patch set $want), which this machine needs: root lacks CAP_SYS_RESOURCE"
      return 1
    fi
  fi
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

# install_packages build|runtime
install_packages() {
  [ "$CRIU_SKIP_DEPS" = 1 ] && return 0
  local kind="$1"
  local -a pkgs
  if command -v apt-get >/dev/null 2>&1; then
    if [ "$kind" = build ]; then pkgs=("${APT_BUILD_DEPS[@]}"); else pkgs=("${APT_RUNTIME_DEPS[@]}"); fi
    local missing=() p
    for p in "${pkgs[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing CRIU $kind dependencies with apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    retry apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || { retry apt-get update -q >/dev/null && retry apt-get install -y -q --no-install-recommends "${missing[@]}" \
             >/dev/null; } || die "cannot install CRIU $kind dependencies: ${missing[*]}"
  elif command -v dnf >/dev/null 2>&1; then
    if [ "$kind" = build ]; then pkgs=("${DNF_BUILD_DEPS[@]}"); else pkgs=("${DNF_RUNTIME_DEPS[@]}"); fi
    log "installing CRIU $kind dependencies with dnf"
    retry dnf install -y -q "${pkgs[@]}" >/dev/null || die "cannot install CRIU $kind dependencies with dnf"
  else
    die "neither apt-get nor dnf found: install CRIU's $kind dependencies by hand and set CRIU_SKIP_DEPS=1"
  fi
}

# The Debian mirror this machine already uses, from its apt sources (deb822 or one-line format); the first that is
# not a security mirror. Any kind of source file may be missing. The one place the project derives a mirror
# (scripts/kernel-vm-check.sh asks through --print-mirror).
debian_mirror() {
  local uri
  uri="$( { grep -hsE '^URIs:' "$CRIU_APT_ETC"/sources.list.d/*.sources | awk '{print $2}' || true
            grep -hsE '^deb ' "$CRIU_APT_ETC"/sources.list "$CRIU_APT_ETC"/sources.list.d/*.list \
              | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' || true; } \
          | grep -v -- '-security' | grep -E '/debian/?$' | head -n 1 || true)"
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
  local tarball="$CRIU_BUILD_DIR/criu_${CRIU_VERSION}.orig.tar.xz" src patch
  mkdir -p "$CRIU_BUILD_DIR"
  fetch_source "$(source_url)" "$tarball"
  src="$CRIU_BUILD_DIR/src-${CRIU_VERSION}"
  rm -rf "$src" && mkdir -p "$src"
  tar -xJf "$tarball" -C "$src" --strip-components=1
  while IFS= read -r patch; do
    [ -n "$patch" ] || continue
    log "applying $(basename "$patch")"
    patch -p1 -s -N -d "$src" <"$patch" >"$CRIU_BUILD_DIR/patch.log" 2>&1 \
      || { cat "$CRIU_BUILD_DIR/patch.log" >&2; die "patch $patch does not apply to CRIU ${CRIU_VERSION}"; }
  done < <(patch_files)
  log "building CRIU ${CRIU_VERSION}, patch set $(patch_set_id) (a few minutes at most)"
  # Documentation needs asciidoc/xmlto, which a node does not need: build the binary only.
  make -C "$src" -j"$(nproc)" criu >"$CRIU_BUILD_DIR/build.log" 2>&1 \
    || { tail -n 30 "$CRIU_BUILD_DIR/build.log" >&2; die "CRIU build failed, log: $CRIU_BUILD_DIR/build.log"; }
  install_binary "$src/criu/criu"
}

# install_binary FILE: the binary and its patch-set marker, each replaced atomically.
install_binary() {
  local tmp="$CRIU_PREFIX/sbin/.criu.new.$$"
  install -D -m 0755 "$1" "$tmp"
  mv -f "$tmp" "$CRIU_PREFIX/sbin/criu"
  printf '%s\n' "$(patch_set_id)" >"$tmp.marker"
  mv -f "$tmp.marker" "$(marker_of "$CRIU_PREFIX/sbin/criu")"
}

cache_name() { echo "criu-${CRIU_VERSION}-$(patch_set_id)"; }

fill_cache() {
  [ -n "$CRIU_CACHE_DIR" ] || return 0
  mkdir -p "$CRIU_CACHE_DIR"
  # a name of our own: several nodes may fill a shared cache at once
  local tmp
  tmp="$CRIU_CACHE_DIR/.criu.new.$$.$(hostname)"
  install -m 0755 "$CRIU_PREFIX/sbin/criu" "$tmp"
  mv -f "$tmp" "$CRIU_CACHE_DIR/$(cache_name)"
  log "cached build at $CRIU_CACHE_DIR/$(cache_name)"
}

from_cache() {
  [ -n "$CRIU_CACHE_DIR" ] || return 1
  local cached
  cached="$CRIU_CACHE_DIR/$(cache_name)"
  [ -x "$cached" ] || return 1
  install_packages runtime
  install_binary "$cached"
  usable "$CRIU_PREFIX/sbin/criu" || { log "cached build at $cached does not work here"; return 1; }
  log "installed cached build from $cached"
}

main() {
  case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --check-only) find_usable >/dev/null && exit 0 || exit 1 ;;
    --print-deps) printf '%s\n' "${APT_BUILD_DEPS[@]}"; exit 0 ;;
    --print-mirror) debian_mirror || die "no Debian mirror in the apt sources under $CRIU_APT_ETC"; exit 0 ;;
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
  install_packages build
  build
  usable "$CRIU_PREFIX/sbin/criu" || die "built CRIU ${CRIU_VERSION} fails 'criu check' on kernel $(uname -r)"
  fill_cache
  log "CRIU ${CRIU_VERSION} (patch set $(patch_set_id)) installed at $CRIU_PREFIX/sbin/criu"
}

fill_cache_if_missing() {
  [ -n "$CRIU_CACHE_DIR" ] || return 0
  [ -x "$CRIU_CACHE_DIR/$(cache_name)" ] && return 0
  [ "$1" = "$CRIU_PREFIX/sbin/criu" ] || return 0
  fill_cache
}

main "$@"
