#!/usr/bin/env bash
# Steady-state footprint: `edge-agent sim` serves N simulated SDM630 meters on one
# Modbus TCP listener, a Mosquitto on a free loopback port is the live upstream, and
# the agent polls every meter at 1 s with an otherwise default configuration. After a
# warm-up, the agent's RSS is sampled every few seconds; the median and the maximum
# are printed, one line per meter count, with the medians of its two parts: anonymous
# memory (heap, stacks) and file-backed pages (mostly the agent's own code).
#
#   scripts/footprint.sh [--binary PATH] [--sim-binary PATH] [--meters 10,32]
#                        [--interval 1s] [--warmup SECONDS] [--seconds SECONDS]
#                        [--every SECONDS] [--env NAME=VALUE]... [--out DIR]
#
# `--binary` is the agent measured; `--sim-binary` serves the meters (default: the same
# binary). The simulator is a tool: to measure the packaged build (without the `tools`
# feature), pass a default build as `--sim-binary`.
# `--env` sets a variable for the agent only (for example MALLOC_ARENA_MAX=2).
# Needs mosquitto and python3. The issue 13 goals: median <= 12 MiB at 10 meters and
# <= 16 MiB at 32 meters.
set -euo pipefail

binary=${CARGO_TARGET_DIR:-target}/release/edge-agent
sim_binary=
meters=10,32
interval=1s
warmup=60
seconds=180
every=5
out=
agent_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --sim-binary) sim_binary=$2; shift 2 ;;
    --meters) meters=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --env) agent_env+=("$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "footprint.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "footprint.sh: no agent binary at $binary (build with cargo build --release)" >&2; exit 2; }
sim_binary=${sim_binary:-$binary}
[ -x "$sim_binary" ] || { echo "footprint.sh: no simulator binary at $sim_binary" >&2; exit 2; }
command -v mosquitto >/dev/null || { echo "footprint.sh: mosquitto is missing (apt-get install mosquitto)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "footprint.sh: python3 is missing" >&2; exit 2; }
out=${out:-$(mktemp -d /tmp/edge-agent-footprint.XXXXXX)}
mkdir -p "$out"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "footprint.sh: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# One run: N meters; prints "N median max" and keeps the samples in $out/N/rss.csv.
run_one() {
  local n=$1 dir=$out/$1
  rm -rf "$dir"; mkdir -p "$dir"
  local modbus mqtt http up
  modbus=$(free_port); mqtt=$(free_port); http=$(free_port); up=$(free_port)

  "$sim_binary" sim --profile sdm630 --meters "$n" --listen "127.0.0.1:$modbus" >"$dir/sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$up" >"$dir/mosquitto.conf"
  mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
  local broker=$!; pids+=("$broker")
  wait_port "$modbus"; wait_port "$up"

  {
    echo 'gateway_id = "footprint"'
    echo '[store]'
    echo "path = \"$dir/store\""
    echo '[mqtt]'
    echo "listen = \"127.0.0.1:$mqtt\""
    echo '[http]'
    echo "listen = \"127.0.0.1:$http\""
    echo '[upstream]'
    echo 'host = "127.0.0.1"'
    echo "port = $up"
    echo '[[buses]]'
    echo 'id = "lan"'
    echo 'type = "tcp"'
    echo "address = \"127.0.0.1:$modbus\""
    echo 'timeout = "1s"'
    for i in $(seq 1 "$n"); do
      echo '[[meters]]'
      echo "id = \"m$i\""
      echo 'bus = "lan"'
      echo "unit_id = $i"
      echo 'profile = "sdm630"'
      echo "interval = \"$interval\""
    done
  } >"$dir/config.toml"
  "$binary" check-config "$dir/config.toml" >/dev/null

  env "${agent_env[@]}" "$binary" run --config "$dir/config.toml" >"$dir/agent.log" 2>&1 &
  local agent=$!; pids+=("$agent")
  wait_port "$http"
  sleep "$warmup"
  echo "seconds,rss_kib,anon_kib,file_kib" >"$dir/rss.csv"
  local start end
  start=$(date +%s); end=$((start + seconds))
  while [ "$(date +%s)" -lt "$end" ]; do
    kill -0 "$agent" 2>/dev/null || { echo "footprint.sh: the agent exited; see $dir/agent.log" >&2; return 1; }
    echo "$(( $(date +%s) - start )),$(awk '/^(VmRSS|RssAnon|RssFile):/ { v[$1] = $2 } END { print v["VmRSS:"] "," v["RssAnon:"] "," v["RssFile:"] }' "/proc/$agent/status")" >>"$dir/rss.csv"
    sleep "$every"
  done
  curl -s "http://127.0.0.1:$http/api/v1/status" >"$dir/status.json" 2>/dev/null || true
  local threads
  threads=$(awk '/^Threads:/ { print $2 }' "/proc/$agent/status")
  # The agent first, so that it stops with its upstream and meters still there.
  kill "$agent" 2>/dev/null || true
  wait "$agent" 2>/dev/null || true
  kill "$sim" "$broker" 2>/dev/null || true
  wait "$sim" "$broker" 2>/dev/null || true
  python3 - "$dir/rss.csv" "$n" "$threads" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if not rows:
    sys.exit("footprint.sh: no samples")
def median(key):
    return statistics.median(int(r[key]) / 1024 for r in rows)
rss = [int(r["rss_kib"]) / 1024 for r in rows]
print(f"{sys.argv[2]:>6} {median('rss_kib'):10.1f} {max(rss):8.1f} {median('anon_kib'):9.1f} {median('file_kib'):9.1f} {len(rss):8} {sys.argv[3]:>7}")
PY
}

echo "footprint: $binary, poll $interval, warm-up ${warmup}s, ${seconds}s sampled every ${every}s${agent_env:+, env ${agent_env[*]}}; runs in $out"
echo "meters  RSS median MiB  max MiB  anon MiB  file MiB  samples  threads"
IFS=, read -r -a counts <<<"$meters"
for n in "${counts[@]}"; do
  run_one "$n"
done
