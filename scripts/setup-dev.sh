#!/bin/bash
# Installs everything the tests and the demo need on a fresh Debian/Ubuntu machine (as root):
#   1. system packages: Slurm (slurmctld, slurmd, client), munge, EDA tools, shellcheck, zstd;
#   2. CRIU >= 4.2.1 through the project's own bootstrap/install-criu.sh;
#   3. the package with its test and validation extras in a virtual environment (.venv).
# Idempotent: a second run only checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

log() { printf '%s setup: %s\n' "$(date -u +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# slurmdbd and mariadb-server: Slurm accounting, so `sacct` knows finished jobs (ckpt gc asks it).
SYSTEM_PACKAGES=(slurmctld slurmd slurm-client slurmdbd mariadb-server munge ngspice iverilog shellcheck zstd procps
                 iproute2 curl ca-certificates passwd python3 python3-venv util-linux
                 chromium mmdebstrap)  # chromium: the HTML report's browser test; mmdebstrap: the emulated node's root
# Jobs run as ordinary users, so the local cluster needs a copy of the agent that everyone can run (a developer's
# venv may live under a private directory): like a cluster node's /opt/ckpt-agent/venv, from the system's Python.
SHARED_VENV="${CKPT_SHARED_VENV:-/opt/ckpt-agent-dev/venv}"

install_system_packages() {
  [ "$(id -u)" = 0 ] || die "run as root: installs system packages, CRIU and starts no service yet"
  command -v apt-get >/dev/null 2>&1 || die "this setup supports Debian/Ubuntu (apt-get); see README for others"
  local missing=()
  local p
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian starts the daemons it installs where systemd runs; tests start their own, so stop the packaged ones.
  local svc
  for svc in slurmctld slurmd slurmdbd munge mariadb; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
}

install_criu() {
  bash "$ROOT/bootstrap/install-criu.sh"
}

install_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  log "installing the package with its dev and validate extras"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "${ROOT}[dev,validate]"
  # an editable install has no bytecode, and with PYTHONDONTWRITEBYTECODE set every `ckpt` command would compile its
  # modules again (about 60 ms a call here); a node's wheel install is compiled by pip
  "$VENV/bin/python" -m compileall -q "$ROOT/ckpt_agent" >/dev/null
  # the local cluster and the demo (ckpt_dev/) come from the checkout: they are not in the package nodes install
  local purelib
  purelib="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$ROOT" >"$purelib/ckpt-dev-checkout.pth"
}

install_shared_venv() {
  if [ ! -x "$SHARED_VENV/bin/python" ]; then
    log "creating $SHARED_VENV (for jobs of ordinary users in the local cluster)"
    mkdir -p "$(dirname "$SHARED_VENV")"
    /usr/bin/python3 -m venv "$SHARED_VENV"
  fi
  "$SHARED_VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$SHARED_VENV/bin/pip" install -q "$ROOT"
  chmod -R a+rX "$(dirname "$SHARED_VENV")"
}

main() {
  install_system_packages
  install_criu
  install_venv
  install_shared_venv
  log "done: $("$VENV/bin/ckpt" --version), $(/usr/local/sbin/criu --version 2>/dev/null | head -n1 || criu --version | head -n1)"
}

main "$@"
