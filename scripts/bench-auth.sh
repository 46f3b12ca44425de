#!/usr/bin/env bash
# Authenticated allocations per second and server CPU per allocation (401 round, Allocate,
# Refresh 0; `uturn-load --mode allocs --delete`) with credentials from each source, beside
# coturn, in alternating rounds on the same cores; prints medians and writes them as a markdown
# table to target/bench/auth.md (pasted into docs/benchmarks.md).
#
# Contestants: uturn with a static user; with users in SQLite (10 and USERS_BIG users) and in
# Redis (10 and USERS_BIG), each with the key cache (default TTL 60 s) and without it
# (user-cache-ttl = 0: every Allocate asks the store); coturn 4.17.1 when COTURN_4171 names its
# turnserver binary (build it from ../shared/anchors/coturn-4.17.1.tar.gz: cmake -S . -B build
# && cmake --build build), and Debian's coturn (4.6.1). Every run is bounded by COUNT
# allocations. Everything stays on 127.0.0.1.
#   ROUNDS=3 COUNT=4000 CLIENTS=4 USERS_BIG=1000000 SERVER_CPUS=0 GEN_CPU=1 ONLY="regex of labels"
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-4000}
CLIENTS=${CLIENTS:-4}
USERS_BIG=${USERS_BIG:-1000000}
SERVER_CPUS=${SERVER_CPUS:-0}
GEN_CPU=${GEN_CPU:-1}
ONLY=${ONLY:-.}
OUT=target/bench
mkdir -p "$OUT"
RESULTS=$OUT/auth.jsonl
: > "$RESULTS"
: > "$OUT/uturn.log"

for tool in turnserver redis-server; do
  command -v $tool >/dev/null || { echo "$tool missing: apt-get install coturn redis-server" >&2; exit 1; }
done
echo "==> cargo build --release"
cargo build --release --bin uturn --bin uturn-load >/dev/null
BIN=target/release
ulimit -n "$(ulimit -Hn)" || true
. scripts/bench-lib.sh

REDIS_PID=""
cleanup() { stop_server; [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null || true; }
trap cleanup EXIT

# The user databases: user0..user(N-1), password "pw", realm uturn.local.
echo "==> user stores (10 and $USERS_BIG users)"
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
REDIS_PID=$!
sleep 0.5
for n in $(printf "%s\n" 10 "$USERS_BIG" | sort -un); do
  rm -f "$OUT/users-$n.db" "$OUT/users-$n.db-wal" "$OUT/users-$n.db-shm"
  seq 0 $((n - 1)) | sed 's/^/user/;s/$/:pw/' > "$OUT/users-$n.txt"
  db=1; [ "$n" != 10 ] && db=2
  t0=$(date +%s.%N)
  $BIN/uturn admin --store "sqlite://$PWD/$OUT/users-$n.db" user import "$OUT/users-$n.txt" --realm uturn.local
  $BIN/uturn admin --store "redis://127.0.0.1:$redis_port/$db" user import "$OUT/users-$n.txt" --realm uturn.local
  echo "  $n users into SQLite and Redis in $(python3 -c "import time; print(round(time.time()-$t0,1))") s"
  rm -f "$OUT/users-$n.txt"
done

# start_uturn LABEL STORE_URL TTL: uturn with that store (or none) and cache TTL.
start_uturn() {
  local store=$2 ttl=$3 port=$4 workers
  workers=$(echo "$SERVER_CPUS" | tr ',' '\n' | wc -l)
  {
    echo 'unauth-rate = 0'
    if [ -n "$store" ]; then echo "user-store = \"$store\""; echo "user-cache-ttl = $ttl"; fi
  } > "$OUT/uturn-auth.toml"
  taskset -c "$SERVER_CPUS" $BIN/uturn --config "$OUT/uturn-auth.toml" --listen 127.0.0.1:"$port" \
    --workers "$workers" --log-level warn --port-range 20000-30000 >/dev/null 2>>"$OUT/uturn.log" &
  SERVER_PID=$!
  sleep 1
}

# run LABEL USER_ARGS...: one allocs run against the server on $port, tagged LABEL.
run() {
  local label=$1; shift
  taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --contestant "$label" --mode allocs \
    --server 127.0.0.1:"$port" --server-pid "$SERVER_PID" --clients "$CLIENTS" --count "$COUNT" --delete "$@" \
    >> "$RESULTS" || echo "  $label: run failed"
  tail -1 "$RESULTS" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  %-30s %8.0f/s  %7.1f us CPU/alloc  failures %s" % (r["contestant"], r["allocs_per_s"], r.get("server_cpu_us_per_alloc") or 0, r["failures"]))'
}

declare -a LABELS=(
  "uturn static user||"
  "uturn sqlite 10 cached|sqlite://$PWD/$OUT/users-10.db|60"
  "uturn sqlite big cached|sqlite://$PWD/$OUT/users-$USERS_BIG.db|60"
  "uturn sqlite 10 uncached|sqlite://$PWD/$OUT/users-10.db|0"
  "uturn sqlite big uncached|sqlite://$PWD/$OUT/users-$USERS_BIG.db|0"
  "uturn redis 10 cached|redis://127.0.0.1:$redis_port/1|60"
  "uturn redis big cached|redis://127.0.0.1:$redis_port/2|60"
  "uturn redis 10 uncached|redis://127.0.0.1:$redis_port/1|0"
  "uturn redis big uncached|redis://127.0.0.1:$redis_port/2|0"
  "coturn 4.6.1||"
)
[ -n "${COTURN_4171:-}" ] && LABELS+=("coturn 4.17.1||")

for round in $(seq 1 "$ROUNDS"); do
  echo "==> round $round of $ROUNDS"
  for entry in "${LABELS[@]}"; do
    IFS='|' read -r label store ttl <<< "$entry"
    label=${label/big/$USERS_BIG}
    echo "$label" | grep -Eq "$ONLY" || continue
    port=$(free_port)
    case $label in
      "coturn 4.6.1") start_server coturn "$port" 0; run "$label" --user demo --password demo ;;
      "coturn 4.17.1") PATH="$(dirname "$COTURN_4171"):$PATH" start_server coturn "$port" 0
                       run "$label" --user demo --password demo ;;
      "uturn static user") start_uturn "$label" "" 0 "$port"; run "$label" --user demo --password demo ;;
      # Allocations spread over 10 users either way, so the databases differ only in size.
      *) start_uturn "$label" "$store" "$ttl" "$port"; run "$label" --user user --users 10 --password pw ;;
    esac
    stop_server
  done
done

python3 - "$RESULTS" > "$OUT/auth.md" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["contestant"], []).append(r)
print("| contestant | allocations/s (median) | server CPU per allocation, µs (median) | runs | failures |")
print("| --- | --- | --- | --- | --- |")
for name, rs in rows.items():
    a = statistics.median(x["allocs_per_s"] for x in rs)
    c = statistics.median(x.get("server_cpu_us_per_alloc") or 0 for x in rs)
    f = sum(sum(x["failures"].values()) for x in rs)
    print(f"| {name} | {a:.0f} | {c:.1f} | {len(rs)} | {f} |")
PY
cat "$OUT/auth.md"
