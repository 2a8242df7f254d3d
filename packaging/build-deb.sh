#!/usr/bin/env bash
# Builds the edge-agent .deb for one architecture from an already built release binary,
# with plain `dpkg-deb --build` (package dpkg-dev is not even needed, dpkg suffices).
# A script rather than cargo-deb: CI would otherwise compile cargo-deb from source on
# every cold run, and the package's few files are easier to review here.
#
# Usage: packaging/build-deb.sh DEB_ARCH [BINARY] [OUT_DIR]
#   DEB_ARCH  armhf | arm64 | amd64
#   BINARY    the release binary (default: $CARGO_TARGET_DIR/<rust target>/release/edge-agent,
#             or target/release/edge-agent for amd64)
#   OUT_DIR   where the .deb goes (default: $CARGO_TARGET_DIR/deb)
# Prints the path of the package.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:?usage: $0 armhf|arm64|amd64 [BINARY] [OUT_DIR]}
target_dir=${CARGO_TARGET_DIR:-target}
case "$arch" in
  armhf) triple=armv7-unknown-linux-gnueabihf; tools=arm-linux-gnueabihf- ;;
  arm64) triple=aarch64-unknown-linux-gnu; tools=aarch64-linux-gnu- ;;
  amd64) triple=""; tools="" ;;
  *) echo "unknown architecture $arch (armhf, arm64, amd64)" >&2; exit 2 ;;
esac
readelf=${tools}readelf
strip=${tools}strip
command -v "$readelf" >/dev/null || readelf=readelf
if [ -n "$triple" ]; then
  bin=${2:-$target_dir/$triple/release/edge-agent}
else
  bin=${2:-$target_dir/release/edge-agent}
fi
out=${3:-$target_dir/deb}
[ -x "$bin" ] || { echo "no binary at $bin; build it first (cross/build-arm.sh)" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "no workspace version in Cargo.toml" >&2; exit 1; }

# Shared libraries and the newest glibc symbol version the binary needs: the package's
# dependencies (what dpkg-shlibdeps would find, without a debian/ tree).
needed=$("$readelf" -dW "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
glibc=$("$readelf" -VW "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
depends="libc6 (>= $glibc)"
for lib in $needed; do
  case "$lib" in
    libgcc_s.so.1) depends="$depends, libgcc-s1" ;;
    libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
    *) echo "unexpected shared library $lib: add its package to Depends" >&2; exit 1 ;;
  esac
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
pkg="$root/edge-agent"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/etc/edge-agent" \
  "$pkg/lib/systemd/system" "$pkg/usr/share/doc/edge-agent"
install -m 0755 "$bin" "$pkg/usr/bin/edge-agent"
# Release builds are stripped already; a debug build (CI's amd64 test package) is not.
"$strip" "$pkg/usr/bin/edge-agent"

# The default config: the commented default with the packaged paths. It may come to
# hold broker passwords, so it is root-only; the service gets it as a credential.
sed -e 's|^path = .*|path = "/var/lib/edge-agent/store"|' \
    -e 's|^# broker_config = .*|broker_config = "/etc/edge-agent/rumqttd.toml"|' \
    -e 's|^runtime_dir = "auto"|runtime_dir = "/run/edge-agent"|' \
    agent/default-config.toml >"$pkg/etc/edge-agent/config.toml"
grep -q '^broker_config = "/etc/edge-agent/rumqttd.toml"' "$pkg/etc/edge-agent/config.toml" \
  || { echo "default-config.toml: broker_config line not found" >&2; exit 1; }
grep -q '^runtime_dir = "/run/edge-agent"' "$pkg/etc/edge-agent/config.toml" \
  || { echo "default-config.toml: runtime_dir line not found" >&2; exit 1; }
chmod 0600 "$pkg/etc/edge-agent/config.toml"
install -m 0644 broker-config/rumqttd.toml "$pkg/etc/edge-agent/rumqttd.toml"
install -m 0644 packaging/edge-agent.service "$pkg/lib/systemd/system/edge-agent.service"
install -m 0644 packaging/README.operator.md "$pkg/usr/share/doc/edge-agent/README.operator.md"
gzip -9n -c README.md >"$pkg/usr/share/doc/edge-agent/README.md.gz"
# The operator docs the README and the operator notes link to (docs/NAME.md beside
# them), and the example upstream Mosquitto config with its ACL.
install -d -m 0755 "$pkg/usr/share/doc/edge-agent/docs" "$pkg/usr/share/doc/edge-agent/mosquitto"
install -m 0644 docs/*.md "$pkg/usr/share/doc/edge-agent/docs/"
install -m 0644 packaging/mosquitto/* "$pkg/usr/share/doc/edge-agent/mosquitto/"
cat >"$pkg/usr/share/doc/edge-agent/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edge-agent
License: MIT OR Apache-2.0
COPYRIGHT
chmod 0644 "$pkg/usr/share/doc/edge-agent/copyright"

install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$pkg/DEBIAN/"
printf '/etc/edge-agent/config.toml\n/etc/edge-agent/rumqttd.toml\n' >"$pkg/DEBIAN/conffiles"
installed_kib=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $version
Architecture: $arch
Maintainer: edge-agent maintainers <edge-agent@localhost>
Installed-Size: $installed_kib
Depends: $depends
Section: net
Priority: optional
Description: energy-meter gateway agent for Raspberry Pi
 Reads energy meters over Modbus RTU (RS-485) and Modbus TCP, stores every
 reading durably (CRC per record, gap-free sequence numbers) and publishes live
 state on an MQTT broker embedded in the process. Runs as a hardened systemd
 service (edge-agent.service).
CONTROL

mkdir -p "$out"
deb="$out/edge-agent_${version}_${arch}.deb"
# Files owned by root whoever builds; xz like Debian's own packages.
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
