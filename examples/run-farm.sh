#!/usr/bin/env bash
# A local braid farm on this machine: a registry, a coordinator and three
# agents (amd64 native; arm64 and arm/v7 run through qemu-user-static here,
# natively on real boards), then one build of examples/hello for
# linux/amd64, linux/arm64 and linux/arm/v7, and the resulting index.
#
#   sudo bash examples/run-farm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME bash "$0" "$@"
fi
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }

work=$(mktemp -d /tmp/braid-farm.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  bash tests/env/setup.sh stop-registry "$work/registry" >/dev/null 2>&1 || true
  echo "logs kept in $work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== installing buildah, docker-registry, qemu-user-static, skopeo"
bash tests/env/setup.sh setup
echo "== building braid"
cargo build --workspace --bins
bin=target/debug

reg_port=$(free_port)
registry="127.0.0.1:$reg_port"
bash tests/env/setup.sh start-registry "$reg_port" "$work/registry" >/dev/null
echo "== making an offline multi-platform base image in $registry"
bash tests/env/setup.sh make-base-image "$registry" base/busybox:latest 2>/dev/null

coord_port=$(free_port)
url="http://127.0.0.1:$coord_port"
"$bin/braid-coordinator" --insecure --listen "127.0.0.1:$coord_port" --data-dir "$work/coordinator" \
  --insecure-registry "$registry" >"$work/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$coord_port") 2>/dev/null && break; sleep 0.1; done

start_agent() { # NAME [PLATFORM]
  local args=(--insecure --coordinator "$url" --name "$1" --work-dir "$work/$1")
  [ $# -gt 1 ] && args+=(--platform "$2")
  "$bin/braid-agent" "${args[@]}" >"$work/$1.log" 2>&1 &
  pids+=($!)
}
start_agent amd64-agent
start_agent arm64-agent linux/arm64
start_agent armv7-agent linux/arm/v7
for _ in $(seq 100); do [ "$(grep -c 'agent connected' "$work/coordinator.log" || true)" -ge 3 ] && break; sleep 0.1; done

echo "== braid build --platform linux/amd64,linux/arm64,linux/arm/v7"
"$bin/braid" --coordinator "$url" build \
  --platform linux/amd64,linux/arm64,linux/arm/v7 \
  --build-arg "BASE_IMAGE=$registry/base/busybox:latest" \
  -t "$registry/example/hello:latest" --push \
  --metadata-file "$work/metadata.json" \
  examples/hello

echo "== the image index in the registry"
skopeo inspect --raw --tls-verify=false "docker://$registry/example/hello:latest" | jq .
