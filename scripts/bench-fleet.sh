#!/usr/bin/env bash
# The cost of fleet mode (issue 22): authenticated allocations per second and server CPU per
# allocation (401 round, Allocate, Refresh 0; `uturn-load --mode allocs --delete`), and server
# CPU per relayed packet (channel mode, one-way, fixed rate), for uturn alone and with
# `fleet-redis` set, in alternating rounds on the same cores, side by side in one run. A third
# contestant runs in a registry of FLEET_NODES nodes (FLEET_NODES-1 entries the script writes
# into Redis), so the heartbeat reads as many entries as in a fleet of that size.
# The Redis commands each run caused (INFO commandstats before and after) are reported per
# allocation and per second. Prints medians; writes target/bench/fleet.md (docs/scaling.md,
# "Redis in a fleet"). Everything stays on 127.0.0.1; every run is bounded by COUNT
# allocations or DURATION seconds.
#   ROUNDS=3 COUNT=4000 CLIENTS=4 RATE=20000 DURATION=5 FLEET_NODES=100 SERVER_CPUS=0 GEN_CPU=1
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-4000}
CLIENTS=${CLIENTS:-4}
RATE=${RATE:-20000}
DURATION=${DURATION:-5}
FLEET_NODES=${FLEET_NODES:-100}
SERVER_CPUS=${SERVER_CPUS:-0}
GEN_CPU=${GEN_CPU:-1}
OUT=target/bench
mkdir -p "$OUT"
RESULTS=$OUT/fleet.jsonl
: > "$RESULTS"
: > "$OUT/uturn.log"

for tool in redis-server redis-cli; do
  command -v $tool >/dev/null || { echo "$tool missing: apt-get install redis-server" >&2; exit 1; }
done
echo "==> cargo build --release"
cargo build --release --bin uturn --bin uturn-load >/dev/null
BIN=target/release
ulimit -n "$(ulimit -Hn)" || true
. scripts/bench-lib.sh

REDIS_PID=""
cleanup() { stop_server; [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true; }
trap cleanup EXIT
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
REDIS_PID=$!
sleep 0.5
rcli() { redis-cli -p "$redis_port" "$@"; }
# Total commands Redis has served so far.
redis_calls() { rcli INFO commandstats | awk -F'[=,]' '/^cmdstat_/ {n += $2} END {print n + 0}'; }

# The other nodes of a FLEET_NODES registry: entries like a real node's, held for the run.
fake_registry() {
  local n=$1 i now
  now=$(( $(date +%s) * 1000 ))
  for i in $(seq 2 "$n"); do
    printf 'SET uturn:fleet:node:fake-%d "{\\"node\\":\\"fake-%d\\",\\"region\\":null,\\"addresses\\":[{\\"transport\\":\\"udp\\",\\"addr\\":\\"127.0.0.2:3478\\",\\"url\\":\\"turn:127.0.0.2:3478?transport=udp\\"}],\\"health\\":\\"ready\\",\\"over_budget\\":false,\\"allocations\\":%d,\\"relayed_bps\\":0,\\"cpu_percent\\":0.0,\\"load\\":0.5,\\"updated_ms\\":%d}" PX 3600000\n' "$i" "$i" "$i" "$now"
    printf 'ZADD uturn:fleet:nodes %d fake-%d\n' $((now + 3600000)) "$i"
  done | rcli >/dev/null
}
clear_registry() { rcli FLUSHALL >/dev/null; }

# start_uturn FLEET: uturn alone (FLEET empty) or in the fleet.
start_uturn() {
  local port=$1 fleet=$2 workers
  workers=$(echo "$SERVER_CPUS" | tr ',' '\n' | wc -l)
  {
    echo 'unauth-rate = 0'
    if [ -n "$fleet" ]; then echo "fleet-redis = \"redis://127.0.0.1:$redis_port/0\""; echo 'node-id = "bench"'; fi
  } > "$OUT/uturn-fleet.toml"
  taskset -c "$SERVER_CPUS" $BIN/uturn --config "$OUT/uturn-fleet.toml" --listen 127.0.0.1:"$port" \
    --workers "$workers" --log-level warn --port-range 20000-30000 >/dev/null 2>>"$OUT/uturn.log" &
  SERVER_PID=$!
  sleep 1.5
}

# run LABEL: the allocs run and the relay run against the server on $port, tagged LABEL.
run() {
  local label=$1 peer calls0 calls1 t0 t1
  calls0=$(redis_calls); t0=$(date +%s.%N)
  taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --contestant "$label" --mode allocs \
    --server 127.0.0.1:"$port" --server-pid "$SERVER_PID" --clients "$CLIENTS" --count "$COUNT" --delete \
    --user demo --password demo > "$OUT/run.json" || { echo "  $label: allocs run failed"; return 0; }
  calls1=$(redis_calls); t1=$(date +%s.%N)
  python3 - "$OUT/run.json" "$calls0" "$calls1" "$t0" "$t1" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
calls = int(sys.argv[3]) - int(sys.argv[2]) - 2   # less the two INFO calls
secs = float(sys.argv[5]) - float(sys.argv[4])
r["kind"] = "allocs"
r["redis_calls"] = max(calls, 0)
r["redis_calls_per_s"] = max(calls, 0) / secs
r["redis_calls_per_alloc"] = max(calls, 0) / max(r["succeeded"], 1)
print(json.dumps(r))
PY
  tail -1 "$RESULTS" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  %-28s %8.0f allocs/s  %7.1f us CPU/alloc  Redis: %.3f cmds/alloc, %.1f cmds/s  failures %s" % (r["contestant"], r["allocs_per_s"], r.get("server_cpu_us_per_alloc") or 0, r["redis_calls_per_alloc"], r["redis_calls_per_s"], r["failures"]))'
  peer=$(free_port)
  taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --cpu "$GEN_CPU" --contestant "$label" --scenario relay \
    --server 127.0.0.1:"$port" --peer 127.0.0.1:"$peer" --server-pid "$SERVER_PID" --clients 64 --mode channel \
    --size 100 --rate "$RATE" --duration "$DURATION" --warmup 1 --user demo --password demo > "$OUT/run.json" \
    || { echo "  $label: relay run failed"; return 0; }
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["kind"]="relay"; print(json.dumps(r))' "$OUT/run.json" >> "$RESULTS"
  tail -1 "$RESULTS" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  %-28s %8.0f pkts/s  %7.2f us CPU/packet  loss %.3f%%" % (r["contestant"], r.get("delivered_pps") or 0, r.get("server_cpu_us_per_packet") or 0, r.get("loss_pct") or 0))'
}

LABELS=("alone" "fleet-redis" "fleet-redis, $FLEET_NODES-node registry")
for round in $(seq 1 "$ROUNDS"); do
  echo "==> round $round of $ROUNDS"
  for label in "${LABELS[@]}"; do
    clear_registry
    port=$(free_port)
    case $label in
      alone) start_uturn "$port" "" ;;
      fleet-redis) start_uturn "$port" 1 ;;
      *) fake_registry "$FLEET_NODES"; start_uturn "$port" 1 ;;
    esac
    run "$label"
    stop_server
  done
done

python3 - "$RESULTS" > "$OUT/fleet.md" <<'PY'
import json, statistics, sys
rows, relay = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    (rows if r["kind"] == "allocs" else relay).setdefault(r["contestant"], []).append(r)
med = lambda rs, k: statistics.median((x.get(k) or 0) for x in rs)
base = rows.get("alone")
print("| uturn | allocations/s | server CPU per allocation, µs | vs alone | Redis commands per allocation | Redis commands/s | server CPU per relayed packet, µs | runs |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, rs in rows.items():
    cpu = med(rs, "server_cpu_us_per_alloc")
    vs = "" if not base or name == "alone" else f"{(cpu / med(base, 'server_cpu_us_per_alloc') - 1) * 100:+.1f}%"
    pkt = med(relay.get(name, []), "server_cpu_us_per_packet") if relay.get(name) else 0
    print(f"| {name} | {med(rs, 'allocs_per_s'):.0f} | {cpu:.1f} | {vs} | {med(rs, 'redis_calls_per_alloc'):.4f} | "
          f"{med(rs, 'redis_calls_per_s'):.1f} | {pkt:.2f} | {len(rs)} |")
PY
cat "$OUT/fleet.md"
