#!/usr/bin/env bash
# Runs the ARM release binary's demo under qemu user-mode emulation with a real Pi CPU
# model and Debian's cross sysroot, and checks it end to end:
#   - the status API (GET /api/v1/meters and /api/v1/status on --http-listen) lists
#     every simulated meter (main, pv, heatpump, garage) with values and polls;
#   - each meter's state was published on the embedded broker during the run (read with
#     mosquitto_sub, a third-party client);
#   - SIGTERM ends it with exit code 0 within 5 s, `offline` is published, the store is
#     flushed ("stopped cleanly");
#   - `edge-agent verify-store` (the same ARM binary) finds records, all CRCs valid, no gap.
# It samples the qemu process's VmRSS/VmHWM every second and prints current and peak.
# qemu-user runs the guest inside its own process, so the figure is the agent plus
# qemu's own overhead (its code and translation cache); the baseline printed first is
# qemu running the same binary for `--version`.
#
# Usage: cross/qemu-demo.sh armv7|aarch64 [SECONDS]   (default 20 s; binary from
#        $CARGO_TARGET_DIR/<target>/release/edge-agent-tools, built by
#        `cross/build-arm.sh --tools`: the demo is a tool, not in the packaged binary;
#        EDGE_AGENT_BIN overrides it)
# Needs: qemu-user, mosquitto-clients, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:?usage: $0 armv7|aarch64 [SECONDS]}
seconds=${2:-20}
case "$arch" in
  armv7) triple=armv7-unknown-linux-gnueabihf
         qemu=(qemu-arm -cpu cortex-a7 -L /usr/arm-linux-gnueabihf) ;;
  aarch64) triple=aarch64-unknown-linux-gnu
         qemu=(qemu-aarch64 -cpu cortex-a53 -L /usr/aarch64-linux-gnu) ;;
  *) echo "usage: $0 armv7|aarch64 [SECONDS]" >&2; exit 2 ;;
esac
bin=${EDGE_AGENT_BIN:-${CARGO_TARGET_DIR:-target}/$triple/release/edge-agent-tools}
[ -x "$bin" ] || { echo "no binary at $bin; run cross/build-arm.sh --tools $arch" >&2; exit 1; }
for tool in "${qemu[0]}" mosquitto_sub python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (packages qemu-user, mosquitto-clients, python3)" >&2; exit 1; }
done

work=$(mktemp -d)
agent_pid=""
sub_pid=""
cleanup() {
  [ -n "$sub_pid" ] && kill "$sub_pid" 2>/dev/null || true
  [ -n "$agent_pid" ] && kill -KILL "$agent_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL ($arch): $*" >&2
  echo "--- agent stderr (last 30 lines)" >&2
  tail -30 "$work/stderr" >&2 || true
  exit 1
}
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
http_port=$(free_port)
upstream_port=$(free_port)
prefix=edge/demo-gw

baseline_kib=$(python3 - "${qemu[@]}" "$bin" --version <<'PY'
import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
PY
)
echo "$arch: qemu running '$(basename "$bin") --version' peaks at $(kib_to_mib "$baseline_kib") (qemu's own overhead)"

"${qemu[@]}" "$bin" demo --data-dir "$work/data" --mqtt-listen "127.0.0.1:$port" \
  --http-listen "127.0.0.1:$http_port" --upstream-listen "127.0.0.1:$upstream_port" --interval 1s \
  >"$work/stdout" 2>"$work/stderr" &
agent_pid=$!
started=$(date +%s)

# The broker listens once the store is open; then subscribe for the whole run.
for _ in $(seq 1 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$agent_pid" 2>/dev/null || fail "agent exited before its broker listened"
  sleep 0.1
done
mosquitto_sub -h 127.0.0.1 -p "$port" -t "$prefix/#" -v >"$work/mqtt.log" 2>"$work/mqtt.err" &
sub_pid=$!

peak_kib=0
rss_kib=0
samples=0
sample() {
  kill -0 "$agent_pid" 2>/dev/null || fail "agent exited during the run"
  rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$agent_pid/status")
  hwm_kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$agent_pid/status")
  [ "$hwm_kib" -gt "$peak_kib" ] && peak_kib=$hwm_kib
  samples=$((samples + 1))
}
# The demo first stores a week of simulated history (tens of seconds under emulation on
# a busy machine); the run's window starts when the buses are polled.
until grep -q "acquire::bus: polling" "$work/stderr"; do
  sample
  [ $(( $(date +%s) - started )) -lt 300 ] || fail "the buses were not polled within 300 s"
  sleep 1
done
history_s=$(( $(date +%s) - started ))
started=$(date +%s)
while [ $(( $(date +%s) - started )) -lt "$seconds" ]; do
  sample
  sleep 1
done
echo "$arch: RSS under ${qemu[*]:0:3} after ${history_s} s of history and ${seconds} s of polling: current $(kib_to_mib "$rss_kib"), peak $(kib_to_mib "$peak_kib") ($samples samples)"

# The status API: every meter listed with its latest values, and polled successfully.
python3 - "127.0.0.1:$http_port" <<'PY' >"$work/api.txt" 2>&1 || fail "status API check: $(cat "$work/api.txt")"
import json, sys, urllib.request
base = "http://" + sys.argv[1]
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
def get(path):
    with direct.open(base + path, timeout=10) as r:
        return json.load(r)
meters = {m["id"]: m for m in get("/api/v1/meters")["meters"]}
status = {m["id"]: m for m in get("/api/v1/status")["meters"]}
for meter in ["main", "pv", "heatpump", "garage"]:
    m = meters.get(meter)
    assert m and m.get("latest"), f"{meter}: no reading in /api/v1/meters"
    values = [v for v in m["latest"]["values"] if v["value"] is not None]
    assert values, f"{meter}: latest reading has no values"
    polls = status[meter]["successes"]
    assert polls >= 3, f"{meter}: only {polls} successful polls"
    print(f"meter {meter}: {len(values)} values at {m['latest']['ts']}, {polls} polls, state {status[meter]['state']}")
PY
sed "s/^/$arch: /" "$work/api.txt"
for meter in main pv heatpump garage; do
  n=$(grep -c "^$prefix/$meter/state " "$work/mqtt.log" || true)
  echo "$arch: meter $meter: $n state messages during the run"
  [ "$n" -ge 3 ] || fail "meter $meter: only $n state messages in ${seconds} s"
done
grep -q "^$prefix/status online" "$work/mqtt.log" || fail "status online not seen"

kill -TERM "$agent_pid"
t0=$(date +%s%N)
rc=0
wait "$agent_pid" || rc=$?
agent_pid=""
stop_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "$arch: exit code $rc, ${stop_ms} ms after SIGTERM"
[ "$rc" -eq 0 ] || fail "exit code $rc after SIGTERM"
[ "$stop_ms" -lt 5000 ] || fail "took ${stop_ms} ms to stop (limit 5000)"
sleep 0.5
grep -q "^$prefix/status offline" "$work/mqtt.log" || fail "offline not published"
grep -q "stopped cleanly" "$work/stderr" || fail "no 'stopped cleanly' in the log (store flush)"

"${qemu[@]}" "$bin" verify-store --path "$work/data/store" | tee "$work/verify.txt" \
  || fail "verify-store found damage"
records=$(sed -n 's/.*: records \([0-9]*\) .*/\1/p' "$work/verify.txt")
[ "${records:-0}" -gt 0 ] || fail "the store holds no records"
echo "$arch: demo under qemu ok ($records records, all CRCs valid)"
