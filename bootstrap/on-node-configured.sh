#!/bin/bash
# ParallelCluster OnNodeConfigured action for ckpt-agent, rendered into cluster.yaml by `ckpt render`.
# Runs as root after shared storage is mounted and before slurmd starts; a non-zero exit fails the node.
#
# Plan, compute node (`compute QUEUE BUNDLE`):
#   1. fetch the bundle (SHA256SUMS first, then every file it lists) and verify it;
#   2. read nodes/QUEUE/node.env (what `ckpt render` decided for this queue);
#   3. install CRIU: the head node's build on shared storage (runtime libraries only), else install-criu.sh;
#   4. CRIU preflight (`criu check`): fail the node with a clear message if CRIU cannot work on it;
#   5. copy the cluster's HMAC key from shared storage;
#   6. install the agent and its dependencies from the bundle's wheelhouse (pip --no-index: no package index
#      needed), put `ckpt` on users' PATH, put the queue's agent.yaml in place;
#   7. install ckpt-agent.service; enable and start it under systemd.
# Plan, head node (`head BUNDLE`):
#   1-2. as above, with head/node.env;
#   3. create the cluster's HMAC key once, and a root-only copy on shared storage for the compute nodes;
#   4. build CRIU once for the cluster onto shared storage;
#   5. install the agent (with boto3, from the wheelhouse); agent.yaml; create the checkpoint store directory;
#   6. install the cleanup as a systemd timer (ckpt-gc.timer); a cron entry only where systemd does not run.
# Steps 3-4 and 7 only checkpointing queues; a queue with checkpointing off gets the agent and its config only.
#
# Where messages land: every progress line goes to stdout (ParallelCluster keeps it in cfn-init.log on the head
# node, cloud-init-output.log on compute nodes) and to /var/log/ckpt-bootstrap.log, with the output of
# install-criu.sh and pip. A failure writes one short cause line to stderr, which ParallelCluster reports
# (/var/log/parallelcluster/bootstrap_error_msg, the CloudFormation event, clustermgtd's log).
#
# Idempotent: every file is compared before it is replaced, the venv is rebuilt only for a different wheel, the
# key is never regenerated, and systemd is only asked for what is not already so. A second run changes nothing.
set -euo pipefail
shopt -s inherit_errexit
# Functions called as `f && x` or `f || y` run without errexit, so every step that can fail says `|| die` itself.

PROG="on-node-configured"
ROOT="${CKPT_ROOT:-}"                  # prefix for every path written (tests); empty on a real node
SYSTEMCTL="${CKPT_SYSTEMCTL:-}"        # systemctl to use; default systemctl, or none when ROOT is set
AWS="${CKPT_AWS:-aws}"
PIP_OPTS="${CKPT_PIP_OPTS:-}"          # extra pip options, e.g. --index-url for a site mirror
INSTALL_CRIU="${CKPT_INSTALL_CRIU:-}"  # default: bash <bundle>/install-criu.sh
CRIU_BIN="${CKPT_CRIU:-}"              # the criu the preflight checks; default the installed one
PKG_INSTALL="${CKPT_PKG_INSTALL:-}"    # package installer command; default dnf or apt-get
RETRIES="${CKPT_RETRIES:-4}"
LOG_FILE=""                            # set in main: $ROOT/var/log/ckpt-bootstrap.log
STDERR_MAX=300                         # cfn-signal reasons are capped at 4 KiB, and the executor truncates

usage() {
  cat <<EOF
usage: on-node-configured.sh head BUNDLE
       on-node-configured.sh head-start BUNDLE   (OnNodeStart: only the Slurm job_submit plugin)
       on-node-configured.sh compute QUEUE BUNDLE

BUNDLE is where 'ckpt upload' put the bootstrap bundle: s3://BUCKET/PREFIX, or a local directory.
Environment (tests, special images): CKPT_ROOT, CKPT_SYSTEMCTL, CKPT_AWS, CKPT_PIP_OPTS, CKPT_INSTALL_CRIU,
CKPT_CRIU, CKPT_PKG_INSTALL, CKPT_PYTHON, CKPT_RETRIES.
EOF
}

# Progress goes to stdout and the log file; a failure also writes one short line to stderr, which ParallelCluster
# reports as the node's bootstrap failure (stderr of a successful run is dropped, so nothing else goes there).
log() {
  local line
  line="$(date -u +%FT%TZ) $PROG: $*"
  printf '%s\n' "$line"
  [ -z "$LOG_FILE" ] || printf '%s\n' "$line" >>"$LOG_FILE" 2>/dev/null || true
}
die() {
  log "ERROR: $*"
  local short="$*"
  [ "${#short}" -le "$STDERR_MAX" ] || short="${short:0:$STDERR_MAX}..."
  printf '%s: ERROR: %s%s\n' "$PROG" "$short" "${LOG_FILE:+ (details: ${LOG_FILE#"$ROOT"})}" >&2
  exit 1
}
# logged CMD...: run CMD with its stdout and stderr shown as progress and kept in the log file.
logged() {
  if [ -n "$LOG_FILE" ]; then
    "$@" 2>&1 | tee -a "$LOG_FILE"
  else
    "$@" 2>&1
  fi
}

retry() {
  local n=0
  until "$@"; do
    n=$((n + 1))
    [ "$n" -ge "$RETRIES" ] && return 1
    log "retrying ($n/$((RETRIES - 1))): $*"
    sleep $((n * 3))
  done
}

# install_file SRC DEST MODE: replace DEST atomically only when its content or mode differs; true if it changed.
install_file() {
  local src="$1" dest="$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    return 1
  fi
  mkdir -p "$(dirname "$dest")" || die "cannot create $(dirname "$dest")"
  install -m "$mode" "$src" "$dest.ckpt-new" || die "cannot write $dest"
  mv -f "$dest.ckpt-new" "$dest" || die "cannot write $dest"
  log "installed $dest"
  return 0
}

systemctl_() {
  if [ -n "$SYSTEMCTL" ]; then
    "$SYSTEMCTL" "$@"
  elif [ -z "$ROOT" ]; then
    systemctl "$@"
  else
    log "CKPT_ROOT is set and CKPT_SYSTEMCTL is not: skipping 'systemctl $*'"
  fi
}

pkg_install() {
  log "installing packages: $*"
  if [ -n "$PKG_INSTALL" ]; then
    # shellcheck disable=SC2086  # CKPT_PKG_INSTALL is a command line by design
    $PKG_INSTALL "$@"
  elif command -v dnf >/dev/null 2>&1; then
    retry dnf install -y -q "$@" >/dev/null
  elif command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    retry apt-get update -q >/dev/null
    retry apt-get install -y -q --no-install-recommends "$@" >/dev/null
  else
    die "neither dnf nor apt-get found to install $*"
  fi
}

# ---- 1. the bundle -----------------------------------------------------------------------------------------------

# fetch_bundle: the whole versioned prefix in one `aws s3 cp --recursive` (one CLI start, not one per file), then
# every file checked against SHA256SUMS; a file the manifest does not list is removed, never used.
fetch_bundle() {
  local rel
  log "fetching the bundle from $BUNDLE"
  case "$BUNDLE" in
    s3://*) retry "$AWS" s3 cp --recursive --only-show-errors "$BUNDLE/" "$STAGE/" \
              || die "cannot download $BUNDLE/ (does this node's instance role grant s3:GetObject there?)" ;;
    *) cp -R "$BUNDLE/." "$STAGE/" || die "cannot copy the bundle from $BUNDLE" ;;
  esac
  [ -f "$STAGE/SHA256SUMS" ] || die "no SHA256SUMS in $BUNDLE: upload it again with 'ckpt upload'"
  # Only names from our own SHA256SUMS, and never outside the staging directory.
  while read -r _ rel; do
    case "$rel" in
      /*|*..*) die "bad file name in $BUNDLE/SHA256SUMS: $rel" ;;
    esac
  done <"$STAGE/SHA256SUMS"
  (cd "$STAGE" && sha256sum --quiet -c SHA256SUMS) || die "bundle at $BUNDLE fails its SHA256SUMS: upload it again"
  (cd "$STAGE" && find . -type f ! -name SHA256SUMS -printf '%P\n' | sort \
     | comm -23 - <(awk '{print $2}' SHA256SUMS | sort) | xargs -r rm -f --) \
    || die "cannot clean the staged bundle in $STAGE"
}

read_node_env() {
  local env_file="$1"
  [ -f "$env_file" ] || die "no ${env_file#"$STAGE"/} in the bundle: is '$QUEUE' a queue of this cluster's site file?"
  # node.env is generated by `ckpt render` with every value quoted by shlex.quote.
  # shellcheck disable=SC1090
  . "$env_file"
  : "${CKPT_ROLE:?}" "${CKPT_VENV:?}" "${CKPT_CONFIG:?}" "${CKPT_KEY_FILE:?}" "${CKPT_SHARED_DIR:?}" "${CKPT_STORE:?}"
  : "${CRIU_VERSION:?}" "${CKPT_CHECKPOINT_ENABLED:?}" "${CRIU_PREINSTALLED:?}" "${CKPT_BIN_DIR:?}" "${CKPT_PYTHONS:?}"
  [ "$CKPT_ROLE" = "$ROLE" ] || die "$env_file is for role $CKPT_ROLE, not $ROLE"
}

# ---- CRIU ---------------------------------------------------------------------------------------------------------

criu_source_path() {
  case "${CRIU_SOURCE:-}" in
    "") echo "" ;;
    bundle:*) echo "$STAGE/${CRIU_SOURCE#bundle:}" ;;
    s3://*)
      # stdout is this function's result: everything else goes to stderr.
      retry "$AWS" s3 cp --only-show-errors "$CRIU_SOURCE" "$STAGE/criu-source.tar.xz" >&2 \
        || die "cannot download $CRIU_SOURCE"
      echo "$STAGE/criu-source.tar.xz" ;;
    *) echo "$CRIU_SOURCE" ;;
  esac
}

install_criu() {
  if [ "$CRIU_PREINSTALLED" = 1 ]; then
    log "CRIU is preinstalled on this image: not installing"
    return 0
  fi
  local cache source
  cache="$ROOT$CKPT_SHARED_DIR/criu/$(uname -m)"
  source="$(criu_source_path)"
  mkdir -p "$cache"
  log "installing CRIU $CRIU_VERSION (shared build cache: $cache)"
  local -a cmd=(bash "$STAGE/install-criu.sh")
  if [ -n "$INSTALL_CRIU" ]; then
    read -r -a cmd <<<"$INSTALL_CRIU"
  fi
  # The bundle carries the patches beside install-criu.sh; named explicitly so any installer gets the same set.
  logged env CRIU_VERSION="$CRIU_VERSION" CRIU_CACHE_DIR="$cache" CRIU_PREFIX="$ROOT/usr/local" \
    CRIU_BUILD_DIR="$ROOT/var/tmp/ckpt-criu-build" CRIU_SOURCE_URL="$source" \
    CRIU_PATCH_DIR="$STAGE/patches/criu-$CRIU_VERSION" \
    ${CRIU_SHA256:+"CRIU_SHA256=$CRIU_SHA256"} "${cmd[@]}" || die "CRIU $CRIU_VERSION could not be installed"
}

criu_preflight() {
  local criu="$CRIU_BIN" out
  if [ -z "$criu" ]; then
    if [ -x "$ROOT/usr/local/sbin/criu" ]; then criu="$ROOT/usr/local/sbin/criu"; else criu="$(command -v criu || true)"; fi
  fi
  [ -n "$criu" ] || die "no criu binary found after installing CRIU"
  log "CRIU preflight: $criu check"
  if ! out="$("$criu" check 2>&1)"; then
    die "CRIU cannot checkpoint on this node (kernel $(uname -r)): $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
  fi
  log "CRIU preflight passed"
}

# ---- the agent ----------------------------------------------------------------------------------------------------

# find_python: a Python with venv whose version the bundle's wheelhouse serves (CKPT_PYTHONS, newest first).
find_python() {
  local cand v
  for cand in ${CKPT_PYTHON:-} $(for v in $CKPT_PYTHONS; do echo "python$v"; done) python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    v="$("$cand" -c 'import sys, venv, ensurepip; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || continue
    case " $CKPT_PYTHONS " in *" $v "*) ;; *) continue ;; esac
    command -v "$cand"
    return 0
  done
  return 1
}

# install_agent EXTRAS: the agent wheel (with its extras, e.g. "[aws]") and its dependencies, from the bundle's
# wheelhouse only: no package index is asked, so nodes in private or air-gapped subnets boot.
install_agent() {
  local venv="$ROOT$CKPT_VENV" extras="$1" wheel py sum
  wheel="$(find "$STAGE/wheels" -maxdepth 1 -name 'ckpt_agent-*.whl' 2>/dev/null | head -n 1 || true)"
  [ -n "$wheel" ] || die "no ckpt_agent wheel in the bundle's wheels/"
  sum="$( { sha256sum <"$wheel" | cut -d' ' -f1; echo "$extras"; } | sha256sum | cut -d' ' -f1)"
  if [ -x "$venv/bin/ckpt" ] && [ "$(cat "$venv/.ckpt-wheel.sha256" 2>/dev/null)" = "$sum" ]; then
    log "agent $(basename "$wheel") already installed in $venv"
    return 1
  fi
  if [ -x "$venv/bin/python" ]; then
    py="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
    case " $CKPT_PYTHONS " in
      *" $py "*) ;;
      *) log "$venv has Python ${py:-?}, which the bundle's wheelhouse does not serve: recreating it"
         rm -rf "$venv" ;;
    esac
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if ! py="$(find_python)"; then
      if command -v dnf >/dev/null 2>&1; then pkg_install python3.11; else pkg_install python3-venv; fi
      py="$(find_python)" || die "no Python ($CKPT_PYTHONS) with venv on this node"
    fi
    log "creating $venv with $py"
    "$py" -m venv "$venv" >/dev/null || die "cannot create a virtual environment at $venv"
  fi
  log "installing $(basename "$wheel")$extras into $venv from the bundle's wheelhouse"
  # shellcheck disable=SC2086  # PIP_OPTS holds several options
  logged "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$STAGE/wheels" \
    $PIP_OPTS "$wheel$extras" \
    || die "cannot install the agent from the bundle's wheelhouse: does it serve Python $py on $(uname -m)? (bundle.pythons, bundle.architectures)"
  # shellcheck disable=SC2086
  logged "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index $PIP_OPTS --no-deps \
    --force-reinstall "$wheel" || die "cannot install the agent (pip install --force-reinstall $(basename "$wheel"))"
  [ -x "$venv/bin/ckpt" ] || die "the agent wheel did not install $CKPT_VENV/bin/ckpt"
  printf '%s\n' "$sum" >"$venv/.ckpt-wheel.sha256" || die "cannot write $venv/.ckpt-wheel.sha256"
  return 0
}

# ---- the cluster's HMAC key ---------------------------------------------------------------------------------------

new_key() {
  local tmp="$1"
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp")
}

setup_key_head() {
  local key="$ROOT$CKPT_KEY_FILE" shared="$ROOT$CKPT_SHARED_DIR/secret"
  # The config directory stays readable: every user's `ckpt run` reads agent.yaml there; the key itself is 0600.
  { install -d -m 0755 "$(dirname "$key")" && chmod 0755 "$(dirname "$key")"; } || die "cannot create $(dirname "$key")"
  install -d -m 0700 "$shared"
  chmod 0700 "$shared"
  if [ ! -s "$key" ]; then
    if [ -s "$shared/node.key" ]; then
      install_file "$shared/node.key" "$key" 0600 || true
    else
      new_key "$STAGE/node.key"
      install_file "$STAGE/node.key" "$key" 0600 || true
      log "created the cluster's manifest signing key $CKPT_KEY_FILE"
    fi
  fi
  install_file "$key" "$shared/node.key" 0600 || log "shared copy of the signing key is current"
}

setup_key_compute() {
  local key="$ROOT$CKPT_KEY_FILE" shared="$ROOT$CKPT_SHARED_DIR/secret/node.key"
  [ -s "$shared" ] || die "the cluster's signing key is missing at $CKPT_SHARED_DIR/secret/node.key: did the head node's OnNodeConfigured finish?"
  { install -d -m 0755 "$(dirname "$key")" && chmod 0755 "$(dirname "$key")"; } || die "cannot create $(dirname "$key")"
  install_file "$shared" "$key" 0600 || log "signing key is current"
}

# ---- services -----------------------------------------------------------------------------------------------------

# ensure_service NAME CHANGED: enable and start NAME if it is not; restart it if its files CHANGED (1).
ensure_service() {
  local name="$1" changed="$2"
  if ! systemctl_ is-enabled --quiet "$name" 2>/dev/null; then
    systemctl_ enable "$name"
  fi
  if ! systemctl_ is-active --quiet "$name" 2>/dev/null; then
    systemctl_ start "$name"
  elif [ "$changed" = 1 ]; then
    systemctl_ restart "$name"
  fi
}

install_agent_service() {
  local changed=0
  if install_file "$STAGE/systemd/ckpt-agent.service" "$ROOT/etc/systemd/system/ckpt-agent.service" 0644; then
    systemctl_ daemon-reload
    changed=1
  fi
  [ "$1" = 1 ] && changed=1
  ensure_service ckpt-agent "$changed"
}

# install_user_path: `ckpt` for every user and every batch job. /etc/profile.d/ckpt-agent.sh adds CKPT_BIN_DIR
# (a directory holding only the `ckpt` link, never the venv's python) to login shells' PATH; a link in
# /usr/local/bin, on every distribution's default PATH, covers shells that read no profile.
install_user_path() {
  local target="$CKPT_VENV/bin/ckpt" link
  install_file "$STAGE/profile.d/ckpt-agent.sh" "$ROOT/etc/profile.d/ckpt-agent.sh" 0644 \
    || log "/etc/profile.d/ckpt-agent.sh is current"
  for link in "$CKPT_BIN_DIR/ckpt" /usr/local/bin/ckpt; do
    if [ -L "$ROOT$link" ] && [ "$(readlink "$ROOT$link")" = "$target" ]; then
      continue
    fi
    if [ -e "$ROOT$link" ] && [ ! -L "$ROOT$link" ]; then
      log "WARNING: $link exists and is not a link to $target: left alone"
      continue
    fi
    mkdir -p "$(dirname "$ROOT$link")" || die "cannot create $(dirname "$link")"
    ln -sfn "$target" "$ROOT$link" || die "cannot link $link to $target"
    log "linked $link -> $target"
  done
}

# install_gc: the head node's cleanup as a systemd timer (logs in the journal: journalctl -u ckpt-gc); a cron
# entry only on a machine where systemd does not run.
install_gc() {
  if [ -z "$SYSTEMCTL" ] && { [ -n "$ROOT" ] || [ ! -d /run/systemd/system ]; }; then
    log "systemd is not running here: the cleanup runs from cron instead of ckpt-gc.timer"
    install_cron
    return 0
  fi
  local changed=0 unit
  for unit in ckpt-gc.service ckpt-gc.timer; do
    if install_file "$STAGE/head/$unit" "$ROOT/etc/systemd/system/$unit" 0644; then changed=1; fi
  done
  if [ "$changed" = 1 ]; then systemctl_ daemon-reload; fi
  ensure_service ckpt-gc.timer "$changed"
  # An entry an older bundle installed: the timer replaces it.
  if [ -f "$ROOT/etc/cron.d/ckpt-gc" ] && grep -qF "by \`ckpt render\`" "$ROOT/etc/cron.d/ckpt-gc"; then
    rm -f "$ROOT/etc/cron.d/ckpt-gc"
    log "removed /etc/cron.d/ckpt-gc: ckpt-gc.timer runs the cleanup now"
  fi
}

install_cron() {
  local svc=""
  if command -v crond >/dev/null 2>&1; then svc=crond; elif command -v cron >/dev/null 2>&1; then svc=cron; fi
  if [ -z "$svc" ]; then
    if command -v dnf >/dev/null 2>&1 || [ -n "$PKG_INSTALL" ]; then pkg_install cronie; else pkg_install cron; fi
    if command -v crond >/dev/null 2>&1; then svc=crond; else svc=cron; fi
  fi
  install_file "$STAGE/head/ckpt-gc.cron" "$ROOT/etc/cron.d/ckpt-gc" 0644 || log "cleanup cron entry is current"
  ensure_service "$svc" 0
}

# Transparent checkpointing: the Slurm job_submit plugin goes next to slurm.conf (head/job_submit.lua exists only
# when some queue is transparent). slurmctld refuses to start with JobSubmitPlugins=lua and no script, and
# ParallelCluster starts it before OnNodeConfigured, so the head node's OnNodeStart (`head-start BUNDLE`) installs
# it first; OnNodeConfigured and OnNodeUpdated install it again (slurmctld reloads a changed script by itself).
install_job_submit_plugin() {
  local src="$STAGE/head/job_submit.lua"
  [ -f "$src" ] || return 0
  : "${CKPT_SLURM_ETC:?}"
  install_file "$src" "$ROOT$CKPT_SLURM_ETC/job_submit.lua" 0644 || log "job_submit.lua is current"
}

# ---- roles --------------------------------------------------------------------------------------------------------

run_compute() {
  local node_dir="$STAGE/nodes/$QUEUE" changed=0
  read_node_env "$node_dir/node.env"
  # Cheap checks that can fail the node come first: a node that cannot checkpoint is replaced sooner.
  if [ "$CKPT_CHECKPOINT_ENABLED" = 1 ]; then
    install_criu
    criu_preflight
  fi
  setup_key_compute
  install_agent "" && changed=1
  install_user_path
  install_file "$node_dir/agent.yaml" "$ROOT$CKPT_CONFIG" 0644 && changed=1
  if [ "$CKPT_CHECKPOINT_ENABLED" != 1 ]; then
    log "checkpointing is off for queue $QUEUE: no CRIU, no agent service"
    return 0
  fi
  install_agent_service "$changed"
}

run_head() {
  read_node_env "$STAGE/head/node.env"
  setup_key_head
  if [ "$CKPT_CHECKPOINT_ENABLED" = 1 ]; then
    install_criu
  fi
  install_agent "[aws]" || true
  install_user_path
  install_file "$STAGE/head/agent.yaml" "$ROOT$CKPT_CONFIG" 0644 || log "agent.yaml is current"
  if [ ! -d "$ROOT$CKPT_STORE" ]; then
    # every user's job creates its own 0700 directory here; sticky, so nobody removes another user's
    install -d -m 1777 "$ROOT$CKPT_STORE"
    log "created the checkpoint store $CKPT_STORE"
  fi
  install_gc
  install_job_submit_plugin
}

main() {
  case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    head|head-start) [ "$#" -eq 2 ] || { usage >&2; exit 2; }; ROLE="head"; QUEUE=""; BUNDLE="$2" ;;
    compute) [ "$#" -eq 3 ] || { usage >&2; exit 2; }; ROLE=compute; QUEUE="$2"; BUNDLE="$3" ;;
    *) usage >&2; exit 2 ;;
  esac
  [[ "$QUEUE" =~ ^[a-z0-9-]*$ ]] || die "bad queue name: $QUEUE"
  BUNDLE="${BUNDLE%/}"
  BUNDLE="${BUNDLE#file://}"
  [ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || die "must run as root (ParallelCluster runs it so)"
  # ParallelCluster's environment may lack sbin directories; a test's PATH is kept as it is.
  [ -n "$ROOT" ] || export PATH="$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  mkdir -p "$ROOT/var/lib/ckpt-agent" "$ROOT/var/log"
  LOG_FILE="$ROOT/var/log/ckpt-bootstrap.log"
  STAGE="$(mktemp -d "$ROOT/var/lib/ckpt-agent/bundle.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  local started=$SECONDS
  log "starting: role $ROLE${QUEUE:+, queue $QUEUE}, bundle $BUNDLE"
  fetch_bundle
  if [ "$1" = head-start ]; then read_node_env "$STAGE/head/node.env"; install_job_submit_plugin
  elif [ "$ROLE" = head ]; then run_head; else run_compute; fi
  log "done: role $ROLE${QUEUE:+, queue $QUEUE} in $((SECONDS - started)) s"
}

main "$@"
