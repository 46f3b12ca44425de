#!/usr/bin/env bash
# RFC 6062 TCP allocations, uturn beside coturn, side by side in one run: bulk data through
# PAIRS bound data connection pairs (half peer -> client, half client -> peer, as fast as both
# ends go), over TCP and TLS control and data connections (`uturn-tcp-relay`). Reports the
# throughput (MB/s, both directions together) and the server's CPU microseconds per MB relayed,
# median of ROUNDS rounds, contestants alternating within each round.
# Each relay runs pinned to SERVER_CPUS with one worker / relay thread; the client runs on
# LOAD_CPUS. coturn is target/coturn's 4.17.1 build (scripts/build-coturn.sh), else Debian's.
# Output: target/bench-tcp-relay/results.jsonl and a summary table.
# Knobs: PAIRS (4), BYTES per pair (100000000), ROUNDS (3), SERVER_CPUS (0), LOAD_CPUS (1),
# CONTESTANTS ("uturn coturn").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PAIRS=${PAIRS:-4}
BYTES=${BYTES:-100000000}
ROUNDS=${ROUNDS:-3}
SERVER_CPUS=${SERVER_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
CONTESTANTS=${CONTESTANTS:-"uturn coturn"}
BIN=${BIN:-$root/target/release}
OUT=$root/target/bench-tcp-relay
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

[ "${BENCH_BUILD:-1}" = 1 ] && cargo build --release -q --bin uturn --bin uturn-tcp-relay
COTURN_BIN=${COTURN_BIN:-$(./scripts/build-coturn.sh 2>/dev/null || command -v turnserver)}
ulimit -n 65536 2>/dev/null || true

# stop_server, test_certificate and start_stream_relay (which sets PLAIN, SECURE and
# SERVER_PID) come from bench-lib.sh.
. scripts/bench-lib.sh
trap stop_server EXIT
test_certificate

# start NAME: the relay listening on UDP+TCP $PLAIN and TLS $SECURE.
# The peers listen on 127.0.0.1, the relay's own address: TCP allocations reach them only
# through allow-peer (coturn: --allow-loopback-peers).
start() { start_stream_relay "$1" 'allow-peer = ["127.0.0.1/32"]'; }

for round in $(seq "$ROUNDS"); do
  for name in $CONTESTANTS; do
    start "$name"
    for transport in tcp tls; do
      server=127.0.0.1:$PLAIN; flag=()
      [ "$transport" = tls ] && { server=127.0.0.1:$SECURE; flag=(--tls); }
      if line=$(taskset -c "$LOAD_CPUS" "$BIN/uturn-tcp-relay" --server "$server" "${flag[@]}" --pairs "$PAIRS" \
        --bytes "$BYTES" --server-pid "$SERVER_PID" --json 2>>"$OUT/client.log"); then
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(contestant=sys.argv[2], transport=sys.argv[3], round=int(sys.argv[4])); print(json.dumps(r))' \
          "$line" "$name" "$transport" "$round" >> "$OUT/results.jsonl"
        echo "  round $round $name $transport: $line"
      else
        echo "  round $round $name $transport: failed (see $OUT/client.log)"
      fi
    done
    stop_server
  done
done

python3 - "$OUT/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
names = list(dict.fromkeys(r["contestant"] for r in rows))
print("\n| relay | transport | rounds | MB/s (median) | server CPU us/MB (median) |")
print("|---|---|---:|---:|---:|")
med = {}
for name in names:
    for t in ("tcp", "tls"):
        rs = [r for r in rows if r["contestant"] == name and r["transport"] == t]
        if not rs:
            continue
        mbs = statistics.median(r["mb_per_s"] for r in rs)
        cpus = [r["server_cpu_us_per_mb"] for r in rs if r.get("server_cpu_us_per_mb")]
        cpu = statistics.median(cpus) if cpus else None
        med[(name, t)] = cpu
        print(f"| {name} | {t} | {len(rs)} | {mbs:.0f} | {cpu:.0f} |" if cpu else f"| {name} | {t} | {len(rs)} | {mbs:.0f} | - |")
for t in ("tcp", "tls"):
    a, b = med.get(("uturn", t)), med.get(("coturn", t))
    if a and b:
        print(f"\n{t}: uturn uses {a / b:.2f}x coturn's CPU per MB")
EOF
