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

. scripts/bench-lib.sh
trap stop_server EXIT

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
