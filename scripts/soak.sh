#!/usr/bin/env bash
# Memory soak: runs `edge-agent demo` at a fast poll with a `#` subscriber on the
# embedded broker, samples the agent's RSS every 15 s, and prints RSS at fixed minutes,
# the growth slope after the first 15 minutes and the peak.
#
#   scripts/soak.sh [--binary PATH] [--minutes N] [--interval 50ms] [--slope-after MIN]
#                   [--env NAME=VALUE]... [--out DIR] [-- DEMO ARGS]
#
# The defaults match the memory figures in docs/memory.md: 2 hours, 50 ms (80 readings/s
# from the demo's four meters). Arguments after `--` go to `edge-agent demo` (for
# example `--quota 64MiB` to reach the store quota early). `--env` sets a variable for
# the agent only (for example MALLOC_ARENA_MAX=2); `--slope-after` moves the start of
# the growth fit (15 minutes by default) for shorter comparison runs.
set -euo pipefail

binary=${CARGO_TARGET_DIR:-target}/release/edge-agent
minutes=120
interval=50ms
out=
slope_after=15
agent_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --slope-after) slope_after=$2; shift 2 ;;
    --env) agent_env+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "soak.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "soak.sh: no agent binary at $binary (build with cargo build --release)" >&2; exit 2; }
command -v mosquitto_sub >/dev/null || { echo "soak.sh: mosquitto_sub is missing (apt-get install mosquitto-clients)" >&2; exit 2; }
out=${out:-$(mktemp -d /tmp/edge-agent-soak.XXXXXX)}
mkdir -p "$out"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); http=$(free_port); up=$(free_port)

env "${agent_env[@]}" "$binary" demo --no-history --interval "$interval" --data-dir "$out/data" \
  --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http" \
  --upstream-listen "127.0.0.1:$up" "$@" >"$out/agent.log" 2>&1 &
agent=$!
cleanup() { kill "$sub" 2>/dev/null || true; kill "$agent" 2>/dev/null || true; wait 2>/dev/null || true; }
sub=
trap cleanup EXIT

# Wait for the embedded broker, then subscribe to everything, as a dashboard would.
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$mqtt") 2>/dev/null; then break; fi
  sleep 0.1
done
mosquitto_sub -h 127.0.0.1 -p "$mqtt" -t '#' -i soak-subscriber >/dev/null 2>&1 &
sub=$!

echo "soak: agent pid $agent, $minutes min at $interval, samples in $out/rss.csv"
echo "seconds,rss_kib" >"$out/rss.csv"
start=$(date +%s)
end=$((start + minutes * 60))
while [ "$(date +%s)" -lt "$end" ]; do
  if ! kill -0 "$agent" 2>/dev/null; then
    echo "soak: the agent exited early; see $out/agent.log" >&2
    exit 1
  fi
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$agent/status")
  echo "$(( $(date +%s) - start )),$rss" >>"$out/rss.csv"
  sleep 15
done
curl -s "http://127.0.0.1:$http/api/v1/status" >"$out/status.json" 2>/dev/null || true

python3 - "$out/rss.csv" "$slope_after" <<'PY'
import csv, sys
rows = [(int(r["seconds"]), int(r["rss_kib"]) / 1024) for r in csv.DictReader(open(sys.argv[1]))]
if not rows:
    sys.exit("soak: no samples")
def at(minute):
    best = min(rows, key=lambda r: abs(r[0] - minute * 60))
    return best[1] if abs(best[0] - minute * 60) <= 30 else None
marks = [m for m in (1, 2, 5, 10, 15, 20, 30, 40, 60, 75, 90, 105, 120, 180, 240) if at(m) is not None]
print("minute  " + " ".join(f"{m:>6}" for m in marks))
print("RSS MiB " + " ".join(f"{at(m):6.1f}" for m in marks))
after = float(sys.argv[2])
tail = [(s / 3600, r) for s, r in rows if s >= after * 60]
if len(tail) >= 2:
    n = len(tail)
    mx = sum(x for x, _ in tail) / n
    my = sum(y for _, y in tail) / n
    sxx = sum((x - mx) ** 2 for x, _ in tail)
    slope = sum((x - mx) * (y - my) for x, y in tail) / sxx if sxx else 0.0
    print(f"growth after {after:g} min: {slope:+.2f} MiB/h (least squares over {n} samples)")
else:
    print(f"growth after {after:g} min: not enough samples (run longer than {after:g} minutes)")
print(f"peak RSS: {max(r for _, r in rows):.1f} MiB; last: {rows[-1][1]:.1f} MiB")
PY
