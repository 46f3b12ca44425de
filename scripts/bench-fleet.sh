#!/usr/bin/env bash
# The cost of fleet mode (issue 22): authenticated allocations per second and server CPU per
# allocation (401 round, Allocate, Refresh 0; `uturn-load --mode allocs --delete`), and server
# CPU per relayed packet (channel mode, one-way, fixed rate), for uturn alone and with
# `fleet-redis` set, in alternating rounds on the same cores, side by side in one run. A third
# contestant runs in a registry of FLEET_NODES nodes (FLEET_NODES-1 entries the script writes
# into Redis), so the heartbeat reads as many entries as in a fleet of that size.
# Two more contestants set a user-quota (never reached), alone and in the fleet, where each
# Allocate then asks Redis (one EVAL) before it is answered.
# The Redis commands each run caused (INFO commandstats before and after) are reported per
# allocation (allocs run) and per second, with Redis's CPU (relay run, DURATION+1 s steady). Prints medians; writes target/bench/fleet.md (docs/scaling.md,
# "Redis in a fleet"). Everything stays on 127.0.0.1; every run is bounded by COUNT
# allocations or DURATION seconds.
#   ROUNDS=5 COUNT=20000 CLIENTS=4 RATE=20000 DURATION=5 FLEET_NODES=100 SERVER_CPUS=0 GEN_CPU=1
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
COUNT=${COUNT:-20000}
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
# CPU seconds Redis has used so far (user + system, main thread).
redis_cpu() { rcli INFO cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.4f", s}'; }

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

# start_uturn PORT FLEET [QUOTA]: uturn alone (FLEET empty) or in the fleet; QUOTA non-empty sets
# a user-quota no run reaches (with FLEET: one Lua check in Redis per Allocate, fleet/quota.rs).
start_uturn() {
  local port=$1 fleet=$2 quota=${3:-} workers
  workers=$(echo "$SERVER_CPUS" | tr ',' '\n' | wc -l)
  {
    echo 'unauth-rate = 0'
    if [ -n "$quota" ]; then echo 'user-quota = 1000000'; fi
    if [ -n "$fleet" ]; then echo "fleet-redis = \"redis://127.0.0.1:$redis_port/0\""; echo 'node-id = "bench"'; fi
  } > "$OUT/uturn-fleet.toml"
  taskset -c "$SERVER_CPUS" $BIN/uturn --config "$OUT/uturn-fleet.toml" --listen 127.0.0.1:"$port" \
    --workers "$workers" --log-level warn --port-range 20000-30000 >/dev/null 2>>"$OUT/uturn.log" &
  SERVER_PID=$!
  sleep 1.5
}

# run LABEL: the allocs run and the relay run against the server on $port, tagged LABEL.
run() {
  local label=$1 peer calls0 calls1 t0 t1 cpu0 cpu1
  calls0=$(redis_calls)
  taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --contestant "$label" --mode allocs \
    --server 127.0.0.1:"$port" --server-pid "$SERVER_PID" --clients "$CLIENTS" --count "$COUNT" --delete \
    --user demo --password demo > "$OUT/run.json" || { echo "  $label: allocs run failed"; return 0; }
  calls1=$(redis_calls)
  python3 - "$OUT/run.json" "$calls0" "$calls1" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
calls = max(int(sys.argv[3]) - int(sys.argv[2]) - 1, 0)   # less the INFO call itself
r["kind"] = "allocs"
r["redis_calls"] = calls
r["redis_calls_per_alloc"] = calls / max(r["succeeded"], 1)
print(json.dumps(r))
PY
  tail -1 "$RESULTS" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  %-34s %8.0f allocs/s  %7.1f us CPU/alloc  Redis: %d commands in the run (%.4f/alloc)  failures %s" % (r["contestant"], r["allocs_per_s"], r.get("server_cpu_us_per_alloc") or 0, r["redis_calls"], r["redis_calls_per_alloc"], r["failures"]))'
  peer=$(free_port)
  calls0=$(redis_calls); cpu0=$(redis_cpu); t0=$(date +%s.%N)
  taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --cpu "$GEN_CPU" --contestant "$label" --scenario relay \
    --server 127.0.0.1:"$port" --peer 127.0.0.1:"$peer" --server-pid "$SERVER_PID" --clients 64 --mode channel \
    --size 100 --rate "$RATE" --duration "$DURATION" --warmup 1 --user demo --password demo > "$OUT/run.json" \
    || { echo "  $label: relay run failed"; return 0; }
  calls1=$(redis_calls); cpu1=$(redis_cpu); t1=$(date +%s.%N)
  python3 - "$OUT/run.json" "$calls0" "$calls1" "$t0" "$t1" "$cpu0" "$cpu1" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
secs = float(sys.argv[5]) - float(sys.argv[4])
r["kind"] = "relay"
r["redis_calls_per_s"] = max(int(sys.argv[3]) - int(sys.argv[2]) - 2, 0) / secs   # less the INFO calls
r["redis_cpu_pct"] = (float(sys.argv[7]) - float(sys.argv[6])) / secs * 100
print(json.dumps(r))
PY
  tail -1 "$RESULTS" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  %-34s %8.0f pkts/s  %7.2f us CPU/packet  loss %.3f%%  Redis: %.1f commands/s, %.2f%% CPU" % (r["contestant"], r.get("delivered_pps") or 0, r.get("server_cpu_us_per_packet") or 0, r.get("loss_pct") or 0, r["redis_calls_per_s"], r["redis_cpu_pct"]))'
}

LABELS=("alone" "fleet-redis" "fleet-redis, $FLEET_NODES-node registry" "alone, user-quota" "fleet-redis, user-quota")
# ONLY=REGEX runs only the contestants whose label matches (e.g. ONLY=quota).
for round in $(seq 1 "$ROUNDS"); do
  echo "==> round $round of $ROUNDS"
  for label in "${LABELS[@]}"; do
    [[ -z "${ONLY:-}" || "$label" =~ $ONLY ]] || continue
    clear_registry
    port=$(free_port)
    case $label in
      alone) start_uturn "$port" "" ;;
      fleet-redis) start_uturn "$port" 1 ;;
      "alone, user-quota") start_uturn "$port" "" 1 ;;
      "fleet-redis, user-quota") start_uturn "$port" 1 1 ;;
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
med = lambda rs, k: statistics.median((x.get(k) or 0) for x in rs) if rs else 0
base = rows.get("alone")
# Each contestant is compared with the one of the same quota setting that runs alone.
alone_of = lambda name: "alone, user-quota" if "user-quota" in name else "alone"
print("| uturn | allocations/s | server CPU per allocation, µs | vs alone (same quota) | Redis commands per allocation | server CPU per relayed packet, µs | vs alone | Redis commands/s | Redis CPU, % of a core | runs |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name, rs in rows.items():
    cpu, pkt = med(rs, "server_cpu_us_per_alloc"), med(relay.get(name), "server_cpu_us_per_packet")
    ref = alone_of(name)
    vs = lambda v, k, rows_: "" if name == ref or not rows_.get(ref) else f"{(v / med(rows_[ref], k) - 1) * 100:+.1f}%"
    print(f"| {name} | {med(rs, 'allocs_per_s'):.0f} | {cpu:.1f} | {vs(cpu, 'server_cpu_us_per_alloc', rows)} | "
          f"{med(rs, 'redis_calls_per_alloc'):.4f} | {pkt:.2f} | {vs(pkt, 'server_cpu_us_per_packet', relay)} | "
          f"{med(relay.get(name), 'redis_calls_per_s'):.1f} | {med(relay.get(name), 'redis_cpu_pct'):.2f} | {len(rs)} |")
PY
cat "$OUT/fleet.md"
