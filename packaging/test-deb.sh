#!/usr/bin/env bash
# Checks a built edge-agent .deb: its contents, control fields, conffiles and
# maintainer scripts (dpkg-deb -c/-I/-f/-x), then installs it with dpkg into a
# throwaway root (maintainer scripts run chrootless with DPKG_ROOT set, so they must
# leave the host's systemd alone), runs the installed binary's check-config on the
# installed config, verifies the unit with systemd-analyze, and purges it again.
#
# Usage: packaging/test-deb.sh PACKAGE.deb     (run as root: dpkg --root needs it)
set -euo pipefail
deb=${1:?usage: $0 PACKAGE.deb}
fail() { echo "FAIL: $*" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== dpkg-deb -I"
dpkg-deb -I "$deb"
[ "$(dpkg-deb -f "$deb" Package)" = edge-agent ] || fail "package name"
dpkg-deb -f "$deb" Depends | grep -q '^libc6 (>= 2\.[0-9]*)' || fail "Depends lacks libc6 (>= ...)"

echo "== dpkg-deb -c"
dpkg-deb -c "$deb" | tee "$work/contents"
expect_file() { # path mode
  grep -qE "^$2 root/root .* \./${1#/}\$" "$work/contents" || fail "$1 with mode $2 (owner root) not in the package"
}
expect_file /usr/bin/edge-agent -rwxr-xr-x
expect_file /etc/edge-agent/config.toml -rw-------
expect_file /etc/edge-agent/rumqttd.toml -rw-r--r--
expect_file /lib/systemd/system/edge-agent.service -rw-r--r--
expect_file /usr/share/doc/edge-agent/README.operator.md -rw-r--r--
expect_file /usr/share/doc/edge-agent/copyright -rw-r--r--
expect_file /usr/share/doc/edge-agent/docs/configuration.md -rw-r--r--
expect_file /usr/share/doc/edge-agent/mosquitto/edge-agent.acl -rw-r--r--

dpkg-deb -e "$deb" "$work/control"
printf '/etc/edge-agent/config.toml\n/etc/edge-agent/rumqttd.toml\n' | diff - "$work/control/conffiles" \
  || fail "conffiles"
for s in postinst prerm postrm; do
  [ -x "$work/control/$s" ] || fail "maintainer script $s missing or not executable"
  sh -n "$work/control/$s" || fail "$s: syntax"
done
grep -q 'check-config' "$work/control/postinst" || fail "postinst starts without checking the config"
grep -q '/run/systemd/system' "$work/control/postinst" || fail "postinst talks to systemd unconditionally"

echo "== dpkg-deb -x: config and unit"
dpkg-deb -x "$deb" "$work/x"
cfg="$work/x/etc/edge-agent/config.toml"
grep -q '^path = "/var/lib/edge-agent/store"$' "$cfg" || fail "store.path in the default config"
grep -q '^broker_config = "/etc/edge-agent/rumqttd.toml"$' "$cfg" || fail "mqtt.broker_config in the default config"
unit="$work/x/lib/systemd/system/edge-agent.service"
for setting in 'Type=notify' 'WatchdogSec=' 'DynamicUser=yes' 'SupplementaryGroups=dialout' \
  'StateDirectory=edge-agent' 'ProtectSystem=strict' 'ProtectHome=yes' 'PrivateTmp=yes' \
  'NoNewPrivileges=yes' 'CapabilityBoundingSet=$' 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6$' \
  'MemoryMax=' 'Restart=on-failure' 'DevicePolicy=closed' 'SystemCallFilter=@system-service' \
  'ExecStart=/usr/bin/edge-agent run '; do
  grep -q "^$setting" "$unit" || fail "unit lacks $setting"
done

echo "== dpkg --root: install into a throwaway root"
root="$work/root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
dpkg_root=(dpkg --root="$root" --force-script-chrootless --force-depends --log=/dev/null)
# The package's architecture must be one dpkg accepts for this root.
"${dpkg_root[@]}" --add-architecture "$(dpkg-deb -f "$deb" Architecture)" 2>/dev/null || true
"${dpkg_root[@]}" -i "$deb"
dpkg-query --root="$root" -W -f='${Status}\n' edge-agent | grep -q 'install ok installed' || fail "not installed"
dpkg-query --root="$root" -W -f='${Conffiles}\n' edge-agent | tee "$work/conffiles"
grep -q '/etc/edge-agent/config.toml [0-9a-f]\{32\}' "$work/conffiles" || fail "config.toml not registered as conffile"
grep -q '/etc/edge-agent/rumqttd.toml [0-9a-f]\{32\}' "$work/conffiles" || fail "rumqttd.toml not registered as conffile"
for f in /usr/bin/edge-agent /etc/edge-agent/config.toml /etc/edge-agent/rumqttd.toml \
  /lib/systemd/system/edge-agent.service /usr/share/doc/edge-agent/README.operator.md; do
  [ -f "$root$f" ] || fail "$f not installed"
done
[ "$(stat -c %a "$root/etc/edge-agent/config.toml")" = 600 ] || fail "config.toml is not 0600"

if [ "$(dpkg-deb -f "$deb" Architecture)" = "$(dpkg --print-architecture)" ]; then
  echo "== the installed binary checks the installed config"
  sed "s|\"/etc/edge-agent/|\"$root/etc/edge-agent/|" "$root/etc/edge-agent/config.toml" >"$work/config.toml"
  "$root/usr/bin/edge-agent" check-config "$work/config.toml"
  echo "== systemd-analyze verify on the installed unit"
  # ExecStart= must name an existing binary: verify a copy pointing into the root.
  sed "s|/usr/bin/edge-agent|$root/usr/bin/edge-agent|g" "$root/lib/systemd/system/edge-agent.service" \
    >"$work/edge-agent.service"
  SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$work/edge-agent.service" 2>&1 | tee "$work/verify.txt"
  ! grep -v -e 'Failed to open /dev/tty' -e '^$' "$work/verify.txt" | grep -q . \
    || fail "systemd-analyze verify reported problems"
fi

echo "== modify a conffile, reinstall: the change is kept"
echo '# local change' >>"$root/etc/edge-agent/config.toml"
"${dpkg_root[@]}" --force-confold -i "$deb"
grep -q '^# local change' "$root/etc/edge-agent/config.toml" || fail "conffile change lost on reinstall"

echo "== remove keeps the conffiles, purge removes them and the state"
mkdir -p "$root/var/lib/private/edge-agent/store"
"${dpkg_root[@]}" -r edge-agent
[ ! -e "$root/usr/bin/edge-agent" ] || fail "binary left after remove"
[ -f "$root/etc/edge-agent/config.toml" ] || fail "config removed by remove (only purge may)"
"${dpkg_root[@]}" -P edge-agent
[ ! -e "$root/etc/edge-agent" ] || fail "/etc/edge-agent left after purge"
[ ! -e "$root/var/lib/private/edge-agent" ] || fail "state left after purge"
echo "package $(basename "$deb"): ok"
