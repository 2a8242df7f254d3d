#!/usr/bin/env bash
# Steady-state footprint: `edge-agent sim` serves N simulated SDM630 meters on one
# Modbus TCP listener, a Mosquitto on a free loopback port is the live upstream, and
# the agent polls every meter at 1 s with an otherwise default configuration. After a
# warm-up, the agent's RSS is sampled every few seconds; the median and the maximum
# are printed, one line per meter count, with the medians of its two parts: anonymous
# memory (heap, stacks) and file-backed pages (mostly the agent's own code).
#
# A second table gives the disk and upstream figures of the same window: bytes the
# agent wrote per stored record (/proc/PID/io write_bytes over the seqs stored),
# the lag from a reading's timestamp (the end of its Modbus read) to its arrival at
# an upstream subscriber, p50 and p99, and the upstream payload bytes per reading
# (`edge-agent bench lag`); then, in a window of its own (strace slows every system
# call), the agent's fsync, fdatasync and sync_file_range calls per minute. The
# device column is what reached the block device under `--out` over the window, per
# record, the filesystem's own journal included (all writers of that device: run it
# on a filesystem of its own, e.g. a loop-mounted ext4 image, for a clean figure).
#
#   scripts/footprint.sh [--binary PATH] [--sim-binary PATH] [--tool PATH]
#                        [--meters 10,32] [--interval 1s] [--warmup SECONDS]
#                        [--seconds SECONDS] [--every SECONDS] [--sync-seconds SECONDS]
#                        [--env NAME=VALUE]... [--store 'KEY = VALUE']...
#                        [--bus 'KEY = VALUE']... [--append 'TOML']... [--out DIR]
#
# `--binary` is the agent measured; `--sim-binary` serves the meters (default: the same
# binary). The simulator is a tool: to measure the packaged build (without the `tools`
# feature), pass a default build as `--sim-binary`.
# `--env` sets a variable for the agent only (for example MALLOC_ARENA_MAX=2).
# `--append` adds a line at the end of the config (after the meters: a table of its
# own, for example --append '[analytics]' --append 'persist_every = "15m"').
# `--store` adds a line to the agent's [store] section (for example
# 'upstream_sync_now = false'); `--bus` a line to the meters' bus (for example
# 'frame_gap = "0ms"': the default 20 ms gap between requests suits a Modbus TCP to
# RS-485 gateway, and with it one bus polls an SDM630 (several requests) in about 85 ms,
# so at 32 meters a 1 s interval is not met: about 12 readings a second).
# `--tool` is the binary whose `bench lag` subscribes upstream (default: `--sim-binary`;
# set it to measure an older agent). `--sync-seconds 0` skips the fsync count.
# Needs mosquitto, python3, curl and (for the fsync count) strace. The issue 13 goals:
# median <= 12 MiB at 10 meters and <= 16 MiB at 32 meters; issue 14: <= 150 bytes
# written per reading, lag p50 <= 50 ms.
set -euo pipefail

binary=${CARGO_TARGET_DIR:-target}/release/edge-agent
tool=
sync_seconds=30
sim_binary=
meters=10,32
interval=1s
warmup=60
seconds=180
every=5
out=
agent_env=()
store_lines=()
bus_lines=()
append_lines=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --tool) tool=$2; shift 2 ;;
    --sync-seconds) sync_seconds=$2; shift 2 ;;
    --sim-binary) sim_binary=$2; shift 2 ;;
    --meters) meters=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --every) every=$2; shift 2 ;;
    --env) agent_env+=("$2"); shift 2 ;;
    --store) store_lines+=("$2"); shift 2 ;;
    --bus) bus_lines+=("$2"); shift 2 ;;
    --append) append_lines+=("$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "footprint.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$binary" ] || { echo "footprint.sh: no agent binary at $binary (build with cargo build --release)" >&2; exit 2; }
command -v curl >/dev/null || { echo "footprint.sh: curl is missing" >&2; exit 2; }
if [ "$sync_seconds" != 0 ]; then
  command -v strace >/dev/null || { echo "footprint.sh: strace is missing (apt-get install strace, or --sync-seconds 0)" >&2; exit 2; }
fi
sim_binary=${sim_binary:-$binary}
[ -x "$sim_binary" ] || { echo "footprint.sh: no simulator binary at $sim_binary" >&2; exit 2; }
tool=${tool:-$sim_binary}
[ -x "$tool" ] || { echo "footprint.sh: no binary at $tool" >&2; exit 2; }
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
    for line in "${store_lines[@]}"; do echo "$line"; done
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
    for line in "${bus_lines[@]}"; do echo "$line"; done
    for i in $(seq 1 "$n"); do
      echo '[[meters]]'
      echo "id = \"m$i\""
      echo 'bus = "lan"'
      echo "unit_id = $i"
      echo 'profile = "sdm630"'
      echo "interval = \"$interval\""
    done
    for line in "${append_lines[@]}"; do echo "$line"; done
  } >"$dir/config.toml"
  "$binary" check-config "$dir/config.toml" >/dev/null

  env "${agent_env[@]}" "$binary" run --config "$dir/config.toml" >"$dir/agent.log" 2>&1 &
  local agent=$!; pids+=("$agent")
  wait_port "$http"
  sleep "$warmup"
  echo "seconds,rss_kib,anon_kib,file_kib" >"$dir/rss.csv"
  local start end
  "$tool" bench lag --broker "127.0.0.1:$up" --topic "edge/footprint/records" --seconds "$seconds" >"$dir/lag.txt" 2>"$dir/lag.log" &
  local lag=$!; pids+=("$lag")
  local io0 seq0 dev0
  io0=$(awk '/^write_bytes:/ { print $2 }' "/proc/$agent/io")
  dev0=$(device_sectors "$dir")
  seq0=$(last_seq "$http")
  start=$(date +%s); end=$((start + seconds))
  while [ "$(date +%s)" -lt "$end" ]; do
    kill -0 "$agent" 2>/dev/null || { echo "footprint.sh: the agent exited; see $dir/agent.log" >&2; return 1; }
    echo "$(( $(date +%s) - start )),$(awk '/^(VmRSS|RssAnon|RssFile):/ { v[$1] = $2 } END { print v["VmRSS:"] "," v["RssAnon:"] "," v["RssFile:"] }' "/proc/$agent/status")" >>"$dir/rss.csv"
    sleep "$every"
  done
  local io1 seq1 dev1
  io1=$(awk '/^write_bytes:/ { print $2 }' "/proc/$agent/io")
  dev1=$(device_sectors "$dir")
  seq1=$(last_seq "$http")
  wait "$lag" || true
  echo "$n $io0 $io1 $seq0 $seq1 $dev0 $dev1 $(cat "$dir/lag.txt")" >"$dir/wear.txt"
  if [ "$sync_seconds" != 0 ]; then
    timeout "$sync_seconds" strace -f -qq -e trace=fsync,fdatasync,sync_file_range,syncfs -o "$dir/strace.txt" -p "$agent" 2>/dev/null || true
    # grep -c prints 0 (and fails) when there is none.
    echo "$sync_seconds $(grep -c -E '(fsync|fdatasync|sync_file_range|syncfs)\(' "$dir/strace.txt" 2>/dev/null || true)" >"$dir/syncs.txt"
  else
    echo "0 0" >"$dir/syncs.txt"
  fi
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

# Sectors written to the block device holding $1 (/sys/dev/block/MAJ:MIN/stat, field
# 7), or - where there is none (tmpfs, overlay). Everything written to that device
# counts, the filesystem's own journal included: meaningful on a filesystem of the
# run's own (`--out` on a loop-mounted image).
device_sectors() {
  local id
  id=$(stat -c '%Hd:%Ld' "$1" 2>/dev/null) || { echo -; return; }
  if [ -r "/sys/dev/block/$id/stat" ]; then
    awk '{ print $7 }' "/sys/dev/block/$id/stat"
  else
    echo -
  fi
}

last_seq() {
  curl -s "http://127.0.0.1:$1/api/v1/status" | python3 -c 'import json, sys; print(json.load(sys.stdin)["store"]["last_seq"])'
}

echo "footprint: $binary, poll $interval, warm-up ${warmup}s, ${seconds}s sampled every ${every}s${agent_env:+, env ${agent_env[*]}}; runs in $out"
echo "meters  RSS median MiB  max MiB  anon MiB  file MiB  samples  threads"
IFS=, read -r -a counts <<<"$meters"
for n in "${counts[@]}"; do
  run_one "$n"
done
echo
echo "meters  records  written B/record  device B/record  fsyncs/min  lag p50 ms  lag p99 ms  upstream B/reading"
for n in "${counts[@]}"; do
  python3 - "$out/$n/wear.txt" "$out/$n/syncs.txt" <<'PY'
import sys
w = open(sys.argv[1]).read().split()
n, io0, io1, seq0, seq1 = w[0], int(w[1]), int(w[2]), int(w[3]), int(w[4])
dev0, dev1 = w[5], w[6]
lag = dict(zip(w[7::2], w[8::2]))
secs, syncs = (int(x) for x in open(sys.argv[2]).read().split())
records = max(seq1 - seq0, 1)
per_min = f"{syncs * 60 / secs:.0f}" if secs else "-"
device = f"{(int(dev1) - int(dev0)) * 512 / records:.0f}" if "-" not in (dev0, dev1) else "-"
print(f"{n:>6} {records:8} {(io1 - io0) / records:17.0f} {device:>16} {per_min:>11} {lag.get('lag_p50_ms', '-'):>11} {lag.get('lag_p99_ms', '-'):>11} {lag.get('upstream_bytes_per_reading', '-'):>19}")
PY
done
