#!/usr/bin/env bash
# A client's own order and the request turnaround beside coturn (docs/benchmarks.md, "Pipelined
# requests and ICE connect time"), all on 127.0.0.1:
#  1. uturn-pipeline: 20 CreatePermission + Send pairs and 20 ChannelBind + ChannelData pairs,
#     each pair back to back, counting the checks relayed; then 2,000 sequential
#     CreatePermission and ChannelBind requests each, their round trips' p50 and p99.
#  2. With ICE=1 (default when chromium is installed): CALLS relay-only Chromium calls over UDP
#     (tests/python/browser_call.py --repeat) through each contestant, the median ICE connect
#     time (from creating the two RTCPeerConnections to both connected).
# Contestants: CONTESTANTS (default "uturn coturn"): `uturn`, `uturn@PATH` (another build, e.g.
# the commit before a change), `coturn` (COTURN_BIN, default Debian's turnserver) and
# `coturn417` (coturn 4.17.1 built by scripts/build-coturn.sh). Each runs ROUNDS times (3),
# interleaved, one worker / relay thread pinned to SERVER_CPUS (0); the generator runs beside.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin uturn --bin uturn-pipeline
BIN=$PWD/target/release
OUT=$(mktemp -d)
SERVER_CPUS=${SERVER_CPUS:-0}
ROUNDS=${ROUNDS:-3}
CALLS=${CALLS:-5}
PAIRS=${PAIRS:-20}
REQUESTS=${REQUESTS:-2000}
if [ -z "${ICE:-}" ]; then
  ICE=0; command -v chromium >/dev/null 2>&1 && ICE=1
fi
# shellcheck source=bench-lib.sh
. scripts/bench-lib.sh
trap 'stop_server; rm -rf "$OUT"' EXIT
read -r -a contestants <<< "${CONTESTANTS:-uturn coturn}"
coturn417=""
for c in "${contestants[@]}"; do
  if [ "$c" = coturn417 ]; then
    coturn417=$(scripts/build-coturn.sh) || { echo "coturn417 asked for but scripts/build-coturn.sh failed" >&2; exit 1; }
  fi
done

start() {
  local c=$1 port=$2
  case $c in
    coturn417) COTURN_BIN=$coturn417 start_server coturn "$port" 0 ;;
    *) start_server "$c" "$port" 0 ;;
  esac
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "$c did not start" >&2
    cat "$OUT"/*.log >&2 2>/dev/null || true
    exit 1
  fi
}

results=$OUT/results.jsonl
for round in $(seq 1 "$ROUNDS"); do
  for c in "${contestants[@]}"; do
    port=$(free_port)
    start "$c" "$port"
    name=$c
    case $c in
      uturn@*) # another build: named by its commit when it lies in a git checkout
        rev=$(git -C "$(dirname "${c#uturn@}")" rev-parse --short HEAD 2>/dev/null || echo other)
        name="uturn@$rev" ;;
    esac
    timeout 120 "$BIN"/uturn-pipeline --server 127.0.0.1:"$port" --pairs "$PAIRS" --requests "$REQUESTS" \
      --contestant "$name" --json >> "$results"
    if [ "$ICE" = 1 ]; then
      timeout 150 python3 tests/python/browser_call.py --host 127.0.0.1 --udp-port "$port" \
        --repeat "$CALLS" --timeout 140 --messages 5 --min-audio-packets 5 > "$OUT/ice.txt" 2>&1 \
        || { echo "browser calls through $name failed:" >&2; tail -20 "$OUT/ice.txt" >&2; exit 1; }
      grep -o '^connect time over udp: [0-9]* ms' "$OUT/ice.txt" | awk -v n="$name" '{print n, $5}' \
        >> "$OUT/ice.tsv"
    fi
    stop_server
    echo "round $round: $name done" >&2
  done
done

python3 - "$results" "$OUT/ice.tsv" "$ROUNDS" <<'EOF'
import json, statistics, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.OrderedDict()
for r in rows:
    by.setdefault(r["contestant"], []).append(r)
print(f"Pipelined pairs (relayed of sent, per round) and request round trips (median of {sys.argv[3]} rounds' p50 / p99, us)\n")
print("| server | CreatePermission + Send | ChannelBind + ChannelData | CreatePermission p50 / p99 | ChannelBind p50 / p99 |")
print("|---|---|---|---|---|")
med = lambda xs: int(statistics.median(xs))
for name, rs in by.items():
    sends = ", ".join(f"{r['send_relayed']}/{r['pairs']}" for r in rs)
    chans = ", ".join(f"{r['channel_data_relayed']}/{r['pairs']}" for r in rs)
    cp = f"{med([r['create_permission']['p50_us'] for r in rs])} / {med([r['create_permission']['p99_us'] for r in rs])}"
    cb = f"{med([r['channel_bind']['p50_us'] for r in rs])} / {med([r['channel_bind']['p99_us'] for r in rs])}"
    print(f"| {name} | {sends} | {chans} | {cp} | {cb} |")
try:
    ice = collections.OrderedDict()
    for line in open(sys.argv[2]):
        n, ms = line.split()
        ice.setdefault(n, []).append(int(ms))
except FileNotFoundError:
    ice = {}
if ice:
    print("\nRelay-only Chromium calls over UDP: ICE connect time, ms\n")
    print("| server | calls | median | min | max |")
    print("|---|---|---|---|---|")
    for n, ms in ice.items():
        print(f"| {n} | {len(ms)} | {statistics.median(ms):.0f} | {min(ms)} | {max(ms)} |")
EOF
