#!/usr/bin/env bash
# Writes agent/hot-functions.txt: the functions the agent runs, steady state first,
# for the release build's code layout (agent/build.rs, docs/memory.md "Code layout").
#
#   scripts/code-layout.sh --binary PATH [--meters 10] [--warmup 45] [--seconds 90]
#                          [--out FILE] [--keep DIR] [--reuse DIR]
#
# `--binary` must be a release build with symbols (CARGO_PROFILE_RELEASE_STRIP=false
# cargo build --release -p edge-agent) and the tools (it serves the meters too). The
# agent runs under valgrind's callgrind in the footprint harness (scripts/footprint.sh:
# simulated SDM630 meters at 1 s, a Mosquitto upstream, the status API and /metrics
# read every 5 s); the functions it ran after the warm-up are the steady set, those it ran only before are the start-up set. Each
# becomes a section pattern, the per-build hash of Rust's symbol names replaced by `*`
# (and in v0-mangled names, the standard library's, its crates' disambiguators) so the
# list holds across builds, features and targets. `--keep DIR` keeps the run's files
# there; `--reuse DIR` writes the list from such a run again without running it.
# Needs valgrind, mosquitto, python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
meters=10
warmup=45
seconds=90
out=agent/hot-functions.txt
keep=
reuse=
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --meters) meters=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --reuse) reuse=$2; shift 2 ;;
    *) echo "code-layout.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -n "$reuse" ]; then
  dir=$reuse
else
[ -x "$binary" ] || { echo "code-layout.sh: --binary PATH (a release build with symbols) is required" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "code-layout.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 2; }
if ! nm "$binary" 2>/dev/null | grep ' _ZN' >/dev/null; then
  echo "code-layout.sh: $binary has no symbols (build with CARGO_PROFILE_RELEASE_STRIP=false)" >&2
  exit 2
fi
dir=${keep:-$(mktemp -d /tmp/edge-agent-layout.XXXXXX)}
mkdir -p "$dir"
binary=$(readlink -f "$binary")

# The agent under callgrind; every other subcommand (check-config) runs plainly.
cat >"$dir/agent" <<EOF
#!/usr/bin/env bash
if [ "\${1:-}" = run ]; then
  exec valgrind --tool=callgrind --demangle=no --dump-instr=no \\
    --callgrind-out-file="$dir/callgrind.out" "$binary" "\$@"
fi
exec "$binary" "\$@"
EOF
chmod +x "$dir/agent"

scripts/footprint.sh --binary "$dir/agent" --sim-binary "$binary" --meters "$meters" \
  --warmup "$warmup" --seconds "$seconds" --sync-seconds 0 --out "$dir/footprint" \
  >"$dir/footprint.txt" 2>&1 &
harness=$!

# The start-up set: dumped (and the counters zeroed) 10 s before the warm-up is over,
# so that the harness's first status request counts as steady.
pid=
for _ in $(seq 1 600); do
  pid=$(pgrep -f "callgrind-out-file=$dir/callgrind.out" | head -1 || true)
  [ -n "$pid" ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "code-layout.sh: the agent did not start; see $dir/footprint.txt" >&2; exit 1; }
sleep $((warmup - 10))
callgrind_control -d startup "$pid" >/dev/null 2>&1
# A dashboard and a Prometheus scraper: the status API and /metrics every 5 s.
http=$(sed -n '/^\[http\]/,/^\[/ s/^listen = "\(.*\)"$/\1/p' "$dir/footprint/$meters/config.toml")
( while kill -0 "$pid" 2>/dev/null; do
    curl -s "http://$http/api/v1/status" >/dev/null 2>&1 || true
    curl -s "http://$http/metrics" >/dev/null 2>&1 || true
    sleep 5
  done ) &
scraper=$!
# The steady set: dumped near the end of the sampled window.
sleep $((seconds + 5))
callgrind_control -d steady "$pid" >/dev/null 2>&1
kill "$scraper" 2>/dev/null || true
wait "$harness" || true
fi

python3 - "$dir" "$out" <<'PY'
import glob, os, re, sys
dir, out = sys.argv[1], sys.argv[2]
binary = None

def functions(path):
    """Mangled names of the functions of `binary` that ran, from a callgrind dump."""
    names, obs, fns = set(), {}, {}
    ob = None
    for line in open(path, errors="replace"):
        if line.startswith("cmd:"):
            global binary
            binary = os.path.realpath(line.split()[1])
        m = re.match(r"^(c?ob|c?fn|fl|fi|fe)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if not m:
            continue
        kind, ident, name = m.group(1), m.group(2), m.group(3)
        if kind in ("ob", "cob"):
            if name is not None:
                obs[ident] = name
            if kind == "ob":
                ob = obs.get(ident)
        elif kind in ("fn", "cfn"):
            if name is not None:
                fns[ident] = name
            # A callee's object may differ (cob=); only the caller's is certain.
            if kind == "fn" and ob is not None and os.path.realpath(ob) == binary:
                # Symbols only: callgrind names code without one by its address.
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.$]*", fns[ident]):
                    names.add(fns[ident])
    return names

def pattern(name):
    # Rust's legacy mangling ends in a hash that differs between builds; thin LTO
    # may add a `.llvm.N` suffix; v0 mangling names crates with a disambiguator.
    name = re.sub(r"17h[0-9a-f]{16}E(\.llvm\.\d+)?$", "17h*", name)
    name = re.sub(r"\.llvm\.\d+$", "*", name)
    if name.startswith("_R"):
        name = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", name)
    return ".text." + name

steady_files = sorted(p for p in glob.glob(os.path.join(dir, "callgrind.out*")) if "steady" in open(p, errors="replace").read(4096))
startup_files = sorted(p for p in glob.glob(os.path.join(dir, "callgrind.out*")) if "startup" in open(p, errors="replace").read(4096))
if not steady_files or not startup_files:
    sys.exit(f"code-layout.sh: no callgrind dumps in {dir}")
steady = set().union(*(functions(p) for p in steady_files))
startup = set().union(*(functions(p) for p in startup_files)) - steady
steady_p = sorted({pattern(n) for n in steady})
startup_p = sorted({pattern(n) for n in startup} - set(steady_p))
with open(out, "w") as f:
    f.write("# Generated by scripts/code-layout.sh: section order of the release build\n")
    f.write("# (agent/build.rs). Steady-state functions first, then start-up ones.\n")
    for p in steady_p + startup_p:
        f.write(p + "\n")
print(f"code-layout: {len(steady_p)} steady and {len(startup_p)} start-up patterns in {out}")
PY
