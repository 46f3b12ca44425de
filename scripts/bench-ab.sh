#!/usr/bin/env bash
# Side-by-side A/B runs for one scenario: each contestant is started, loaded and stopped in
# turn, REPEAT rounds, alternating, and the medians of server CPU per relayed packet, p50/p99
# latency and loss are printed (and the raw JSON lines kept in target/bench/ab.jsonl).
# Use it to judge a data-plane change on a noisy machine before running bench-compare.sh.
#
#   scripts/bench-ab.sh uturn coturn floor          # default: channel 100 B one-way 100 kpps
#   MODE=send SIZE=1200 ECHO=1 RATE=50000 scripts/bench-ab.sh uturn coturn
#   scripts/bench-ab.sh uturn@/tmp/uturn-before uturn   # an older build beside this one
#
# A contestant is `uturn` (or `uturn@PATH` for another build of the binary), `coturn` or
# `floor`, optionally followed by `:VAR=VALUE[,VAR=VALUE]` environment for the relay process;
# the whole string is its label. Everything runs
# on 127.0.0.1; every run is bounded by DURATION + WARMUP seconds. Knobs: MODE=channel|send,
# SIZE=100, RATE=100000, ECHO=0, BURST=1 (datagrams per client turn), CLIENTS=64, DURATION=4, WARMUP=1, REPEAT=3, SERVER_CPUS=0,
# GEN_CPU=1, BUILD=1 (0 to skip the release build).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${MODE:-channel}; SIZE=${SIZE:-100}; RATE=${RATE:-100000}; ECHO=${ECHO:-0}; BURST=${BURST:-1}
CLIENTS=${CLIENTS:-64}; DURATION=${DURATION:-4}; WARMUP=${WARMUP:-1}; REPEAT=${REPEAT:-3}
SERVER_CPUS=${SERVER_CPUS:-0}; GEN_CPU=${GEN_CPU:-1}
[ $# -gt 0 ] || set -- uturn coturn floor
OUT=target/bench
mkdir -p "$OUT"
AB=$OUT/ab.jsonl
: > "$AB"
if [ "${BUILD:-1}" = 1 ]; then cargo build --release --workspace --bins >/dev/null; fi
BIN=target/release
ulimit -n "$(ulimit -Hn)" || true

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
}
trap stop_server EXIT

start_server() {
  local spec=$1 port=$2 peer=$3 name envs workers
  name=${spec%%:*}; envs=""; [ "$spec" != "$name" ] && envs=${spec#*:}
  local bin=$BIN/uturn
  if [ "${name#*@}" != "$name" ]; then bin=${name#*@}; name=${name%%@*}; fi
  workers=$(echo "$SERVER_CPUS" | tr ',' '\n' | wc -l)
  local -a env_args=()
  IFS=',' read -r -a env_args <<< "$envs"
  case $name in
    uturn)
      printf 'unauth-rate = 0\n' > "$OUT/uturn-ab.toml"
      env "${env_args[@]}" taskset -c "$SERVER_CPUS" "$bin" --config "$OUT/uturn-ab.toml" \
        --listen 127.0.0.1:"$port" --workers "$workers" --log-level warn --port-range 20000-30000 \
        >/dev/null 2>>"$OUT/uturn-ab.log" &
      ;;
    coturn)
      env "${env_args[@]}" taskset -c "$SERVER_CPUS" turnserver -n --listening-ip=127.0.0.1 --listening-port="$port" \
        --relay-ip=127.0.0.1 --lt-cred-mech --user=demo:demo --realm=uturn.local --no-tls --no-dtls --no-cli \
        --no-tcp-relay --relay-threads="$workers" --min-port=30001 --max-port=60000 --allow-loopback-peers \
        --pidfile="$OUT/coturn-ab.pid" --log-file="$OUT/coturn-ab.log" --simple-log >/dev/null 2>&1 &
      ;;
    floor)
      env "${env_args[@]}" taskset -c "$SERVER_CPUS" $BIN/udp-forwarder --listen 127.0.0.1:"$port" \
        --forward-to 127.0.0.1:"$peer" >/dev/null 2>&1 &
      ;;
    *) echo "unknown contestant $name" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  sleep 1
}

echo_flag=(); [ "$ECHO" = 1 ] && echo_flag=(--echo)
for round in $(seq 1 "$REPEAT"); do
  for spec in "$@"; do
    port=$(free_port); peer=$(free_port)
    start_server "$spec" "$port" "$peer"
    m=$MODE; [ "${spec%%:*}" = floor ] && m=raw
    taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --cpu "$GEN_CPU" --contestant "$spec" \
      --scenario "$MODE ${SIZE}B $([ "$ECHO" = 1 ] && echo echo || echo one-way) round $round" \
      --server-pid "$SERVER_PID" --clients "$CLIENTS" --duration "$DURATION" --warmup "$WARMUP" \
      --server 127.0.0.1:"$port" --peer 127.0.0.1:"$peer" --mode "$m" --size "$SIZE" --rate "$RATE" --burst "$BURST" \
      "${echo_flag[@]}" > "$OUT/ab-run.json" || { echo "  $spec round $round: uturn-load failed"; stop_server; continue; }
    python3 scripts/bench-line.py < "$OUT/ab-run.json"
    cat "$OUT/ab-run.json" >> "$AB"
    stop_server
  done
done

python3 - "$AB" "$@" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\nmedians over rounds ({runs[0]['scenario'].rsplit(' round', 1)[0] if runs else ''}, "
      f"{runs[0]['offered_pps'] if runs else 0} pkt/s offered):")
base = None
for spec in sys.argv[2:]:
    rs = [r for r in runs if r["contestant"] == spec]
    if not rs:
        continue
    cpu = statistics.median(r.get("server_cpu_us_per_packet") or 0.0 for r in rs)
    p50 = statistics.median(r["latency"]["p50_us"] for r in rs)
    p99 = statistics.median(r["latency"]["p99_us"] for r in rs)
    loss = statistics.median(r["loss_pct"] for r in rs)
    sw = statistics.median(r.get("server_switches_per_kpkt") or 0.0 for r in rs)
    base = base or cpu
    print(f"  {spec:40} cpu {cpu:5.2f} us/pkt ({cpu / base:4.2f}x first)  p50 {p50:6.0f} us  "
          f"p99 {p99:7.0f} us  loss {loss:.3f}%  switches/kpkt {sw:5.0f}  runs {len(rs)}")
EOF
