#!/usr/bin/env bash
# Builds stripped release binaries of edge-agent for Raspberry Pi without Docker,
# with Debian's cross toolchains. Needs: rustup, apt-get (run as root to install),
# gcc-arm-linux-gnueabihf + libc6-dev-armhf-cross (armv7),
# gcc-aarch64-linux-gnu + libc6-dev-arm64-cross (aarch64).
#
# Usage: cross/build-arm.sh [--tools] [armv7|aarch64|all]   (default: all)
#
# Without --tools: the product, as packaged in the .deb (`--no-default-features`: no
# demo, simulator, benchmarks or verifier), at <target dir>/<target>/release/edge-agent.
# With --tools: the default features (what `cargo run` builds, the demo included), copied
# to <target dir>/<target>/release/edge-agent-tools for cross/qemu-demo.sh; a product
# build afterwards replaces release/edge-agent but leaves that copy alone.
set -euo pipefail
cd "$(dirname "$0")/.."

features=(--no-default-features)
suffix=""
if [ "${1:-}" = --tools ]; then
  features=()
  suffix=-tools
  shift
fi
want=${1:-all}
targets=()
case "$want" in
  armv7) targets=(armv7-unknown-linux-gnueabihf) ;;
  aarch64) targets=(aarch64-unknown-linux-gnu) ;;
  all) targets=(armv7-unknown-linux-gnueabihf aarch64-unknown-linux-gnu) ;;
  *) echo "usage: $0 [--tools] [armv7|aarch64|all]" >&2; exit 2 ;;
esac

need_pkgs=()
for t in "${targets[@]}"; do
  case "$t" in
    armv7-*) command -v arm-linux-gnueabihf-gcc >/dev/null || need_pkgs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    aarch64-*) command -v aarch64-linux-gnu-gcc >/dev/null || need_pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
  esac
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing cross toolchains: ${need_pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "need root to install ${need_pkgs[*]} (or install them yourself)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

for t in "${targets[@]}"; do
  rustup target add "$t" >/dev/null
  # Linkers and qemu runners are set in .cargo/config.toml.
  cargo build --release --locked -p edge-agent --target "$t" ${features[@]+"${features[@]}"}
  out="${CARGO_TARGET_DIR:-target}/$t/release/edge-agent"
  if [ -n "$suffix" ]; then
    cp "$out" "$out$suffix"
    out=$out$suffix
  fi
  # The release profile strips already; strip again in case a user profile does not.
  case "$t" in
    armv7-*) arm-linux-gnueabihf-strip "$out" ;;
    aarch64-*) aarch64-linux-gnu-strip "$out" ;;
  esac
  printf '%s: %s (%s bytes)\n' "$t" "$out" "$(stat -c %s "$out")"
done
