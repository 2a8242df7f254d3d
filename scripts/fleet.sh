#!/usr/bin/env bash
# A fleet on one machine: N agents, each with its own store, gateway id (gw-001 ...),
# two simulated SDM630 meters polled every second (`edge-agent sim`, shared by up to
# 100 agents on per-agent unit ids) and a reading pushed over HTTP every few seconds,
# all syncing into ONE Mosquitto with persistence on. During the run the broker is
# restarted twice (SIGTERM, started again on the same port with its persistence), and
# a third of the agents are killed with SIGKILL and started again. Then the load stops
# (pushes end, the simulators stop), the agents drain, and ONE `edge-agent verify`,
# listening from the start, proves every gateway complete: nothing missing from seq 1
# to the agent's last stored seq, and every manifest matching what arrived.
#
# With --two-tier the agents publish to a site Mosquitto, which bridges the fleet's
# topics to a central Mosquitto (QoS 1, `cleansession false`, persistence on both):
# records, manifests and status up, resend commands down. `verify` listens on the
# central broker; the first restart is the central broker's, the second the site's.
#
#   scripts/fleet.sh [--agents N] [--seconds S] [--outage SECONDS] [--two-tier]
#                    [--binary PATH] [--push-every SECONDS] [--drain SECONDS]
#                    [--backlog RECORDS] [--out DIR]
#
# --seconds is the length of the loaded run (polling and pushes); --outage how long
# the broker stays down at the second restart (the reconnect storm is measured after
# it: the time from the broker listening again until every agent is connected, and
# the peak connect rate in any one-second window, from the agents' logs); --drain
# how long, after the load stops, the agents and verify get to finish (verify ends
# that long after the run). --backlog pushes that many extra readings (CSV, meter
# `backlog`) into every agent before the brokers first start, and measures the
# fleet's drain when they do: records/s into the broker until every agent's cursor
# has passed what it held, with the broker's and the agents' CPU meanwhile.
# The binary needs the `tools` feature (sim, verify).
#
# Prints one line per gateway (records, missing, duplicates, manifests ok/failed),
# then the fleet's figures: records/s into the broker, the broker's CPU, per-agent
# RSS median and maximum, per-agent CPU share, the reconnect storm, and the load
# average. Exits 1 if any gateway is incomplete, 2 on a usage or setup error.
# Needs mosquitto and python3.
set -euo pipefail

binary=${CARGO_TARGET_DIR:-target}/release/edge-agent
agents=20
seconds=180
outage=10
push_every=5
drain=45
backlog=0
two_tier=0
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --agents) agents=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --outage) outage=$2; shift 2 ;;
    --push-every) push_every=$2; shift 2 ;;
    --drain) drain=$2; shift 2 ;;
    --backlog) backlog=$2; shift 2 ;;
    --two-tier) two_tier=1; shift ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fleet.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
fail() { echo "fleet.sh: $*" >&2; exit 2; }
for v in agents seconds outage push_every drain backlog; do
  [[ ${!v} =~ ^[0-9]+$ ]] || fail "--${v//_/-} must be a whole number, not '${!v}'"
done
[ "$agents" -ge 1 ] && [ "$agents" -le 999 ] || fail "--agents must be 1..=999"
[ "$seconds" -ge 30 ] || fail "--seconds must be at least 30"
[ -x "$binary" ] || fail "no agent binary at $binary (cargo build --release -p edge-agent, or --binary)"
"$binary" sim --help >/dev/null 2>&1 || fail "$binary has no simulator: build it with the tools feature"
# Debian installs the broker in /usr/sbin, which a user's PATH may lack.
mosquitto_bin=$(command -v mosquitto || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; }) ||
  fail "mosquitto is missing (apt-get install mosquitto)"
command -v python3 >/dev/null || fail "python3 is missing"
out=${out:-$(mktemp -d /tmp/edge-agent-fleet.XXXXXX)}
mkdir -p "$out"
# A directory of an earlier run is emptied; any other must be empty.
if [ -n "$(ls -A "$out")" ]; then
  [ -e "$out/.fleet-run" ] || fail "--out $out is not empty and not an earlier run's directory"
  rm -rf "${out:?}"/*
fi
touch "$out/.fleet-run"
tck=$(getconf CLK_TCK)

# All ports at once, each held until all are chosen, so that none repeats.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "fleet.sh: nothing listens on 127.0.0.1:$1" >&2
  return 1
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
now() { date +%s.%N; }

nsims=$(( (agents + 99) / 100 ))
read -r -a ports <<<"$(free_ports $((2 + nsims + 2 * agents)))"
central_port=${ports[0]}
site_port=${ports[1]}
sim_ports=("${ports[@]:2:nsims}")
agent_ports=("${ports[@]:$((2 + nsims))}")
upstream_port=$central_port
[ "$two_tier" = 1 ] && upstream_port=$site_port

pids=()
cleanup() {
  touch "$out/stop" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$out"/agents/*/pid "$out"/brokers/*/pid; do
    [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# --- brokers -------------------------------------------------------------------
mkdir -p "$out/brokers/central" "$out/brokers/site"
broker_conf() { # name port
  local dir=$out/brokers/$1
  {
    echo "listener $2 127.0.0.1"
    echo "allow_anonymous true"
    echo "user $(id -un)"
    echo "persistence true"
    echo "persistence_location $dir/db/"
    echo "autosave_interval 30"
    echo "max_queued_messages 100000"
    echo "log_dest file $dir/mosquitto.log"
    echo "log_type error"
    echo "log_type warning"
    echo "log_type notice"
    echo "connection_messages true"
    echo "sys_interval 1"
  } >"$dir/mosquitto.conf"
  mkdir -p "$dir/db"
}
broker_conf central "$central_port"
if [ "$two_tier" = 1 ]; then
  broker_conf site "$site_port"
  cat >>"$out/brokers/site/mosquitto.conf" <<EOF
connection central
address 127.0.0.1:$central_port
bridge_protocol_version mqttv311
remote_clientid fleet-site-bridge
cleansession false
restart_timeout 1 5
keepalive_interval 15
topic edge/+/records out 1
topic edge/+/manifest out 1
topic edge/+/status out 1
topic edge/+/cmd/# in 1
EOF
fi
echo 0 >"$out/brokers/central/ticks"
echo 0 >"$out/brokers/site/ticks"
start_broker() { # name port
  local dir=$out/brokers/$1
  "$mosquitto_bin" -c "$dir/mosquitto.conf" >>"$dir/stdout.log" 2>&1 &
  echo $! >"$dir/pid"
  wait_port "$2"
}
stop_broker() { # name
  local dir=$out/brokers/$1 pid
  pid=$(cat "$dir/pid")
  echo $(( $(cat "$dir/ticks") + $(ticks "$pid") )) >"$dir/ticks"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

# --- meters --------------------------------------------------------------------
sim_pids=()
for s in $(seq 0 $((nsims - 1))); do
  n=$(( agents - s * 100 )); [ "$n" -gt 100 ] && n=100
  "$binary" sim --profile sdm630 --meters $((2 * n)) --listen "127.0.0.1:${sim_ports[$s]}" >"$out/sim-$s.log" 2>&1 &
  sim_pids+=($!); pids+=($!)
  wait_port "${sim_ports[$s]}"
done

# --- agents --------------------------------------------------------------------
gws=()
for i in $(seq 0 $((agents - 1))); do
  gw=$(printf 'gw-%03d' $((i + 1)))
  gws+=("$gw")
  dir=$out/agents/$gw
  mkdir -p "$dir"
  mqtt=${agent_ports[$((2 * i))]}; http=${agent_ports[$((2 * i + 1))]}
  unit=$(( 2 * (i % 100) + 1 ))
  echo "$http" >"$dir/http"
  echo 0 >"$dir/ticks"
  cat >"$dir/config.toml" <<EOF
gateway_id = "$gw"
[store]
path = "$dir/store"
[mqtt]
listen = "127.0.0.1:$mqtt"
[http]
listen = "127.0.0.1:$http"
[upstream]
host = "127.0.0.1"
port = $upstream_port
manifest_interval = "10s"
[[buses]]
id = "lan"
type = "tcp"
address = "127.0.0.1:${sim_ports[$((i / 100))]}"
timeout = "1s"
[[meters]]
id = "m1"
bus = "lan"
unit_id = $unit
profile = "sdm630"
interval = "1s"
[[meters]]
id = "m2"
bus = "lan"
unit_id = $((unit + 1))
profile = "sdm630"
interval = "1s"
EOF
done
"$binary" check-config "$out/agents/gw-001/config.toml" >/dev/null
start_agent() { # gw
  local dir=$out/agents/$1
  "$binary" run --config "$dir/config.toml" >>"$dir/agent.log" 2>&1 &
  echo $! >"$dir/pid"
}

mode="one Mosquitto"
[ "$two_tier" = 1 ] && mode="site Mosquitto bridged to a central Mosquitto"
echo "fleet: $agents agents, ${seconds}s of polling (2 SDM630 at 1 s each) and a push every ${push_every}s, into $mode; $binary; runs in $out"
started=$(now)
for gw in "${gws[@]}"; do start_agent "$gw"; done
for gw in "${gws[@]}"; do wait_port "$(cat "$out/agents/$gw/http")"; done
echo "  $(date -u +%T) all $agents agents listening ($(python3 -c "print(f'{$(now) - $started:.1f}')") s)"
if [ "$backlog" -gt 0 ]; then
  python3 - "$out" "$backlog" "${gws[@]}" <<'PY'
import concurrent.futures, sys, time, urllib.request
out, n, gws = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
start = int(time.time() * 1000) - 86_400_000
def push(gw):
    port = open(f"{out}/agents/{gw}/http").read().strip()
    for first in range(0, n, 20_000):
        lines = "".join(f"backlog,{start + k},power,{k % 10_000}\n" for k in range(first, min(n, first + 20_000)))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/ingest", data=lines.encode(),
                                     headers={"Content-Type": "text/csv"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
        except Exception as e:
            print(f"fleet.sh: backlog push to {gw} failed: {e}", file=sys.stderr)
            return False
    return True
# A few agents at a time: the machine's cores are the limit, not the requests.
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    ok = all(list(pool.map(push, gws)))
sys.exit(0 if ok else 1)
PY
  echo "  $(date -u +%T) pushed $backlog readings into each agent (the broker is not started yet)"
fi
# Each agent's last seq and cursor just before the broker is back: its backlog.
python3 - "$out" "${gws[@]}" <<'PY' >"$out/backlog.txt"
import json, sys, urllib.request
for gw in sys.argv[2:]:
    port = open(f"{sys.argv[1]}/agents/{gw}/http").read().strip()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=3) as r:
            d = json.load(r)
        print(gw, d["store"]["last_seq"], d["upstream"]["cursor"])
    except Exception:
        pass
PY

# verify listens from before the broker starts to the end of the drain.
verify_wait=$(( seconds + drain + 15 ))
gw_args=()
for gw in "${gws[@]}"; do gw_args+=(--gateway "$gw"); done
"$binary" verify --broker "mqtt://127.0.0.1:$central_port" --prefix edge "${gw_args[@]}" \
  --wait "${verify_wait}s" >"$out/verify.txt" 2>"$out/verify.log" &
verify_pid=$!; pids+=($verify_pid)
sleep 1

# The brokers start: the run's clock starts.
start_broker central "$central_port"
[ "$two_tier" = 1 ] && start_broker site "$site_port"
t0=$(now)
# The agents' CPU is counted from here (not the backlog's ingest before).
for gw in "${gws[@]}"; do
  echo $(( 0 - $(ticks "$(cat "$out/agents/$gw/pid")") )) >"$out/agents/$gw/ticks"
done
upstream_broker=central
[ "$two_tier" = 1 ] && upstream_broker=site
if [ "$backlog" -gt 0 ]; then
  # The drain: every agent's cursor up to its last seq of before the broker started;
  # CPU of the broker and the agents meanwhile.
  pids_now=()
  for gw in "${gws[@]}"; do pids_now+=("$(cat "$out/agents/$gw/pid")"); done
  python3 - "$out" "$t0" "$tck" "$(cat "$out/brokers/$upstream_broker/pid")" "${pids_now[*]}" "${gws[@]}" <<'PY' | tee "$out/drain.txt"
import json, sys, time, urllib.request
out, up, tck, broker, agents, gws = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5].split(), sys.argv[6:]
def ticks(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except Exception:
        return 0
def status():
    """Each agent's (last seq, cursor); None where it does not answer."""
    out_ = {}
    for gw in gws:
        port = open(f"{out}/agents/{gw}/http").read().strip()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=3) as r:
                d = json.load(r)
            out_[gw] = (d["store"]["last_seq"], d["upstream"]["cursor"])
        except Exception:
            out_[gw] = None
    return out_
b0, a0 = ticks(broker), sum(ticks(p) for p in agents)
# The backlog is what each agent held when the broker came back: drained once every
# cursor reached that seq (the live readings go on meanwhile).
target, first = {}, 0
for line in open(f"{out}/backlog.txt"):
    gw, last, cursor = line.split()
    target[gw] = int(last)
    first += int(last) - int(cursor)
while True:
    now = status()
    left = sum(max(0, target[gw] - now[gw][1]) if now.get(gw) else 1 for gw in target)
    if left == 0 or time.time() > up + 300:
        break
    time.sleep(0.05)
t = time.time() - up
b1, a1 = ticks(broker), sum(ticks(p) for p in agents)
print(f"drain: {first} records (backlog when the broker was back) in {t:.1f} s: {first / t:.0f} records/s; "
      f"broker CPU {100 * (b1 - b0) / tck / t:.0f} % of a core, the agents together {100 * (a1 - a0) / tck / t:.0f} %"
      + ("" if left == 0 else f"; NOT drained after 300 s ({left} left)"))
PY
fi


# Pushes: one reading of meter `push` per agent every --push-every seconds; each
# answer's status goes to pushes.txt.
python3 - "$out" "$push_every" "${gws[@]}" <<'PY' &
import os, sys, time, urllib.error, urllib.request
out, every, gws = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
ports = {gw: open(f"{out}/agents/{gw}/http").read().strip() for gw in gws}
n = 0
with open(f"{out}/pushes.txt", "a") as log:
    while not os.path.exists(f"{out}/stop"):
        started = time.time()
        ms = int(started * 1000)
        for gw in gws:
            body = ('{"meter":"push","unit":"W","kind":"power","points":[{"ts":%d,"value":%d}]}'
                    % (ms, n % 5000)).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{ports[gw]}/api/v1/ingest", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=3) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except Exception:
                code = "failed"
            log.write(f"{gw} {code}\n")
        log.flush()
        n += 1
        time.sleep(max(0.0, started + every - time.time()))
PY
pids+=($!)

# RSS of every agent every 5 s.
(
  while [ ! -e "$out/stop" ]; do
    t=$(date +%s)
    for gw in "${gws[@]}"; do
      pid=$(cat "$out/agents/$gw/pid" 2>/dev/null) || continue
      rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
      [ -n "$rss" ] && echo "$t $gw $rss" >>"$out/rss.txt"
    done
    sleep 5
  done
) &
pids+=($!)

# The broker's counters (PUBLISHes and bytes received since it started, from $SYS)
# and the sum of the agents' last stored seqs, as "publishes bytes records".
counters() { # port
  local pubs=? bytes=?
  if command -v mosquitto_sub >/dev/null; then
    pubs=$(mosquitto_sub -p "$1" -t '$SYS/broker/publish/messages/received' -C 1 -W 3 2>/dev/null) || pubs=?
    bytes=$(mosquitto_sub -p "$1" -t '$SYS/broker/bytes/received' -C 1 -W 3 2>/dev/null) || bytes=?
  fi
  python3 - "$out" "${gws[@]}" <<'PY'
import json, sys, urllib.request
total = 0
for gw in sys.argv[2:]:
    port = open(f"{sys.argv[1]}/agents/{gw}/http").read().strip()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=3) as r:
            total += json.load(r)["store"]["last_seq"]
    except Exception:
        pass
print(total)
PY
  echo "$pubs $bytes"
}

at() { # seconds since t0: sleep until then
  local left
  left=$(python3 -c "print(max(0.0, $t0 + $1 - $(now)))")
  sleep "$left"
}
say() { echo "  $(date -u +%T) +$(python3 -c "print(f'{$(now) - $t0:.0f}')")s $*"; }

first=central; second=central
if [ "$two_tier" = 1 ]; then second=site; fi
port_of() { if [ "$1" = central ]; then echo "$central_port"; else echo "$site_port"; fi; }

at $(( seconds * 20 / 100 ))
say "restart of the $first broker (SIGTERM, 2 s down)"
stop_broker "$first"; sleep 2; start_broker "$first" "$(port_of "$first")"

at $(( seconds * 40 / 100 ))
killed=()
for i in $(seq 0 3 $((agents - 1))); do killed+=("${gws[$i]}"); done
say "SIGKILL of ${#killed[@]} agents, started again 2 s later"
for gw in "${killed[@]}"; do
  dir=$out/agents/$gw; pid=$(cat "$dir/pid")
  echo $(( $(cat "$dir/ticks") + $(ticks "$pid") )) >"$dir/ticks"
  kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
done
sleep 2
for gw in "${killed[@]}"; do start_agent "$gw"; done

at $(( seconds * 55 / 100 ))
say "restart of the $second broker (SIGTERM, ${outage} s down)"
stop_broker "$second"
down_at=$(now)
sleep "$(python3 -c "print(max(0.0, $down_at + $outage - $(now)))")"
start_broker "$second" "$(port_of "$second")"
storm_up=$(now)
say "the $second broker is back"
# A steady window for the broker's rates: from 20 s after the restart (after verify's
# repairs of what it missed meanwhile) to the end.
at $(( seconds * 55 / 100 + outage + 20 ))
window0=$(now); read -r -d '' c0 < <(counters "$(port_of "$second")") || true

at "$seconds"
window1=$(now); read -r -d '' c1 < <(counters "$(port_of "$second")") || true
echo "$window0 $window1 $(echo $c0) $(echo $c1)" >"$out/window.txt"
say "load stops: no more pushes, the simulators stop"
touch "$out/stop"
kill "${sim_pids[@]}" 2>/dev/null || true

# Drain: every agent's backlog 0 and its last seq unchanged for two looks in a row;
# each agent's last seq, cursor and backlog go to agents/GW/final.
drained=0
python3 - "$out" "$drain" "${gws[@]}" <<'PY' && drained=1
import json, sys, time, urllib.request
out, drain, gws = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
last, stable, deadline = {}, 0, time.time() + drain
while True:
    ok = True
    for gw in gws:
        port = open(f"{out}/agents/{gw}/http").read().strip()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=3) as r:
                d = json.load(r)
            seq, u = d["store"]["last_seq"], d["upstream"]
            row = (seq, u["cursor"], u["backlog"])
        except Exception:
            seq, row = None, ("?", "?", "?")
        if row[2] != 0 or seq is None or last.get(gw) != seq:
            ok = False
        last[gw] = seq
        with open(f"{out}/agents/{gw}/final", "w") as f:
            f.write(f"{gw} {row[0]} {row[1]} {row[2]}\n")
    stable = stable + 1 if ok else 0
    if stable >= 2:
        sys.exit(0)
    if time.time() >= deadline:
        sys.exit(1)
    time.sleep(1)
PY
say "agents drained ($( [ "$drained" = 1 ] && echo "all acknowledged" || echo "NOT all acknowledged within ${drain}s"))"
load=$(cut -d' ' -f1-3 /proc/loadavg)

# The agents' CPU and the brokers' CPU up to now, then verify's verdict.
t_end=$(now)
for gw in "${gws[@]}"; do
  dir=$out/agents/$gw; pid=$(cat "$dir/pid")
  echo $(( $(cat "$dir/ticks") + $(ticks "$pid") )) >"$dir/ticks"
done
for b in central site; do
  f=$out/brokers/$b/pid
  [ -e "$f" ] && echo $(( $(cat "$out/brokers/$b/ticks") + $(ticks "$(cat "$f")") )) >"$out/brokers/$b/ticks"
done
say "waiting for verify (it listens until +$((verify_wait - 1))s)"
verify_rc=0
wait "$verify_pid" || verify_rc=$?
for gw in "${gws[@]}"; do kill "$(cat "$out/agents/$gw/pid")" 2>/dev/null || true; done
for gw in "${gws[@]}"; do wait "$(cat "$out/agents/$gw/pid")" 2>/dev/null || true; done
for b in central site; do
  f=$out/brokers/$b/pid
  if [ -e "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; wait "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi
done

python3 - "$out" "$t0" "$t_end" "$storm_up" "$tck" "$verify_rc" "$load" "$two_tier" "${killed[@]}" <<'PY'
import glob, os, re, statistics, sys
from datetime import datetime

out, t0, t_end, storm_up, tck, verify_rc, load, two_tier = sys.argv[1:9]
killed = set(sys.argv[9:])
t0, t_end, storm_up, tck = float(t0), float(t_end), float(storm_up), int(tck)
wall = t_end - t0
gws = sorted(os.path.basename(d) for d in glob.glob(f"{out}/agents/gw-*"))

line_re = re.compile(
    r"gateway (\S+): received (\d+) \(highest seq (\d+)\), missing (\d+), dropped by the gateway (\d+), "
    r"duplicates (\d+), out of order (\d+), resend requests (\d+), manifests ok (\d+) / failed (\d+) / "
    r"incomplete (\d+), malformed messages (\d+), readings without their schema (\d+)")
seen = {}
verify_text = open(f"{out}/verify.txt").read()
for m in line_re.finditer(verify_text):
    seen[m.group(1)] = [int(x) for x in m.groups()[1:]]
absent = set(re.findall(r"gateway (\S+): nothing received", verify_text))

print()
print(f"{'gateway':8} {'records':>8} {'last seq':>8} {'missing':>7} {'dups':>6} {'resends':>7} {'manifests ok/failed':>19}  result")
bad = 0
totals = dict(records=0, dups=0, missing=0)
for gw in gws:
    final = open(f"{out}/agents/{gw}/final").read().split()
    last = int(final[1]) if final[1].isdigit() else None
    cursor = int(final[2]) if final[2].isdigit() else None
    v = seen.get(gw)
    if v is None:
        print(f"{gw:8} {'-':>8} {last if last is not None else '?':>8} {'?':>7} {'?':>6} {'?':>7} {'-':>19}  INCOMPLETE: verify got nothing")
        bad += 1
        continue
    received, highest, missing, dropped, dups, ooo, resends, mok, mfail, mpend, malformed, undecoded = v
    problems = []
    if last is None:
        problems.append("no status")
    else:
        if cursor != last:
            problems.append(f"cursor {cursor} behind last seq {last}")
        # Records stored after the drain (a meter's availability event, say) may
        # arrive too; everything up to the last seq of the drained agent must.
        if highest < last:
            problems.append(f"verify's highest seq {highest}")
        if received + dropped < last:
            problems.append(f"only {received} of {last}")
    if missing: problems.append(f"{missing} missing")
    if mfail: problems.append(f"{mfail} manifests failed")
    if undecoded: problems.append(f"{undecoded} undecodable")
    if mok == 0: problems.append("no manifest checked")
    note = " (SIGKILLed)" if gw in killed else ""
    result = "ok" + note if not problems else "INCOMPLETE: " + ", ".join(problems)
    bad += bool(problems)
    totals["records"] += received
    totals["dups"] += dups
    totals["missing"] += missing
    print(f"{gw:8} {received:8} {last if last is not None else '?':>8} {missing:7} {dups:6} {resends:7} {f'{mok}/{mfail}':>19}  {result}")

# Resource figures.
def ticks(path):
    try:
        return int(open(path).read().split()[0])
    except Exception:
        return 0
agent_cpu = [ticks(f"{out}/agents/{gw}/ticks") / tck for gw in gws]
rss = {}
try:
    for l in open(f"{out}/rss.txt"):
        t, gw, kib = l.split()
        if float(t) >= t0 + 20:   # after the start-up
            rss.setdefault(gw, []).append(int(kib) / 1024)
except FileNotFoundError:
    pass
medians = [statistics.median(v) for v in rss.values() if v]
peaks = [max(v) for v in rss.values() if v]
brokers = {b: ticks(f"{out}/brokers/{b}/ticks") / tck for b in ("central", "site")}

# Reconnect storm: each agent's first connect after the broker came back.
storm = []
for gw in gws:
    for l in open(f"{out}/agents/{gw}/agent.log", errors="replace"):
        if "upstream connected" not in l:
            continue
        try:
            ts = datetime.fromisoformat(l.split()[0].replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        if ts >= storm_up - 0.5:
            storm.append(ts)
            break
storm.sort()
# The same from the broker's log: CONNECTs of gateways per second after the outage.
storm_broker = "site" if two_tier == "1" else "central"
per_second = {}
for l in open(f"{out}/brokers/{storm_broker}/mosquitto.log", errors="replace"):
    m = re.match(r"(\d+): New client connected from \S+ as (gw-\d+) ", l)
    if m and int(m.group(1)) >= int(storm_up) - 1:
        per_second[int(m.group(1))] = per_second.get(int(m.group(1)), 0) + 1
peak = 0
j = 0
for i, t in enumerate(storm):
    while storm[j] < t - 1.0:
        j += 1
    peak = max(peak, i - j + 1)

# The broker's rates over the steady window (records, PUBLISHes, bytes received).
window = None
try:
    w = open(f"{out}/window.txt").read().split()
    w0, w1, r0, p0, b0, r1, p1, b1 = w
    span = float(w1) - float(w0)
    records = int(r1) - int(r0)
    window = (span, records, p0, p1, b0, b1)
except Exception:
    pass

pushes = [l.split()[1] for l in open(f"{out}/pushes.txt")] if os.path.exists(f"{out}/pushes.txt") else []
print()
print(f"fleet: {len(gws)} gateways, {wall:.0f} s from start to drained, load average at the end {load}")
print(f"  records into the broker: {totals['records']} ({totals['records'] / wall:.1f}/s), duplicates {totals['dups']}, missing {totals['missing']}; pushes answered 200: {pushes.count('200')} of {len(pushes)}")
if window:
    span, records, p0, p1, b0, b1 = window
    line = f"  steady window of {span:.0f} s after the second restart: {records / span:.1f} records/s"
    if all(x.isdigit() for x in (p0, p1, b0, b1)) and records > 0:
        pubs, nbytes = int(p1) - int(p0), int(b1) - int(b0)
        line += (f", {pubs / span:.1f} PUBLISHes/s ({records / max(pubs, 1):.1f} records each), "
                 f"{nbytes / span / 1024:.1f} KiB/s into the {storm_broker} broker ({nbytes / records:.0f} B per record, all packets and MQTT framing)")
    print(line)
if two_tier == "1":
    print(f"  broker CPU: central {brokers['central']:.2f} s ({100 * brokers['central'] / wall:.1f} % of a core), site {brokers['site']:.2f} s ({100 * brokers['site'] / wall:.1f} %)")
else:
    print(f"  broker CPU: {brokers['central']:.2f} s over the run ({100 * brokers['central'] / wall:.1f} % of a core)")
if medians:
    print(f"  agent RSS: median {statistics.median(medians):.1f} MiB, max {max(peaks):.1f} MiB (per-agent medians, samples every 5 s after the first 20 s)")
if agent_cpu:
    share = [100 * c / wall for c in agent_cpu]
    print(f"  agent CPU: median {statistics.median(share):.2f} %, max {max(share):.2f} % of a core; all agents together {sum(agent_cpu):.1f} s ({sum(share):.1f} %)")
if storm:
    print(f"  reconnect storm: {len(storm)} of {len(gws)} agents back {storm[-1] - storm_up:.2f} s after the broker listened again; peak {peak} connects in one second"
          f" (broker log: {sum(per_second.values())} gateway CONNECTs, at most {max(per_second.values(), default=0)} in one clock second)")
else:
    print("  reconnect storm: no agent reconnected")
if os.path.exists(f"{out}/drain.txt"):
    print("  " + open(f"{out}/drain.txt").read().strip())
print(f"  verify: exit status {verify_rc}, {'complete' if 'complete: nothing missing' in verify_text else 'INCOMPLETE'}")
if absent:
    print(f"  verify never heard from: {' '.join(sorted(absent))}")
ok = bad == 0 and verify_rc == "0" and not absent
print("FLEET COMPLETE" if ok else f"FLEET INCOMPLETE: {bad} gateway(s)")
sys.exit(0 if ok else 1)
PY
