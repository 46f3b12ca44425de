#!/usr/bin/env bash
# TURN over TCP and TLS (RFC 8656 §3.1), uturn beside coturn, side by side in one run:
#   1. server CPU per relayed packet and loss at each offered rate (one-way ChannelData from
#      CLIENTS connections to one UDP peer, `uturn-load --transport tcp|tls`), UDP alongside;
#   2. the highest offered rate with loss under 0.1 % (from the same sweep);
#   3. memory per idle TCP / TLS allocation: the server's RSS with IDLE_CLIENTS connections
#      (each with an allocation and a channel, 100 packets/s in all) minus its RSS with CLIENTS.
# Each relay runs pinned to SERVER_CPUS with one worker / relay thread. coturn is
# target/coturn's 4.17.1 build (scripts/build-coturn.sh), else Debian's turnserver.
# Output: target/bench-streams/results.jsonl (one JSON report per run) and a summary table.
# Knobs: RATES ("5000 10000 20000 40000"), CLIENTS (16), IDLE_CLIENTS (1016), SIZE (160),
# DURATION (5), SERVER_CPUS (0), LOAD_CPU (1), CONTESTANTS ("uturn coturn").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
RATES=${RATES:-"5000 10000 20000 40000"}
CLIENTS=${CLIENTS:-16}
IDLE_CLIENTS=${IDLE_CLIENTS:-1016}
SIZE=${SIZE:-160}
DURATION=${DURATION:-5}
SERVER_CPUS=${SERVER_CPUS:-0}
LOAD_CPU=${LOAD_CPU:-1}
CONTESTANTS=${CONTESTANTS:-"uturn coturn"}
BIN=${BIN:-$root/target/release}
OUT=$root/target/bench-streams
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

[ "${BENCH_BUILD:-1}" = 1 ] && cargo build --release -q --bin uturn --bin uturn-load
COTURN_BIN=${COTURN_BIN:-$(./scripts/build-coturn.sh 2>/dev/null || command -v turnserver)}
ulimit -n 65536 2>/dev/null || true

# stop_server, test_certificate and start_stream_relay (which sets PLAIN, SECURE and
# SERVER_PID) come from bench-lib.sh.
. scripts/bench-lib.sh
trap stop_server EXIT
test_certificate

# start NAME: the relay listening on UDP+TCP $PLAIN and TLS $SECURE.
start() { start_stream_relay "$1" "$(printf 'unauth-rate = 0\nmax-connections-per-ip = 4096')" --no-tcp-relay; }

# load NAME TRANSPORT RATE CLIENTS: one run, its JSON report appended with the contestant.
load() {
  local name=$1 transport=$2 rate=$3 clients=$4 server=127.0.0.1:$PLAIN line
  [ "$transport" = tls ] && server=127.0.0.1:$SECURE
  line=$(taskset -c "$LOAD_CPU" "$BIN/uturn-load" --server "$server" --transport "$transport" --clients "$clients" \
    --rate "$rate" --size "$SIZE" --duration "$DURATION" --warmup 1 --server-pid "$SERVER_PID" --json --quiet \
    --contestant "$name" 2>>"$OUT/load.log") || { echo "  $name $transport $rate pps: failed (see $OUT/load.log)"; return 0; }
  python3 - "$name" "$transport" "$line" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
r = json.loads(sys.argv[3]); r["contestant"] = sys.argv[1]; r["transport"] = sys.argv[2]
print(json.dumps(r))
EOF
  echo "  $name $transport $rate pps x $clients: $(tail -1 "$OUT/results.jsonl")"
}

for name in $CONTESTANTS; do
  echo "==> $name"
  start "$name"
  for transport in udp tcp tls; do
    for rate in $RATES; do load "$name" "$transport" "$rate" "$CLIENTS"; done
  done
  for transport in tcp tls; do load "$name" "$transport" 100 "$IDLE_CLIENTS"; done
  stop_server
done

python3 - "$OUT/results.jsonl" "$CLIENTS" "$IDLE_CLIENTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
clients, idle = int(sys.argv[2]), int(sys.argv[3])
def cpu(r):
    return r.get("server_cpu_us_per_pkt") or r.get("server_cpu_us_per_packet")
def us(c):
    return f"{c:.2f}" if c else "-"
def runs(name, t, n):
    return [r for r in rows if r["contestant"] == name and r["transport"] == t and r.get("clients", clients) == n]
names = list(dict.fromkeys(r["contestant"] for r in rows))
print("\n| relay | transport | offered pps | loss % | server CPU us/pkt |")
print("|---|---|---:|---:|---:|")
for r in rows:
    if r.get("clients", clients) == clients:
        print(f"| {r['contestant']} | {r['transport']} | {r['offered_pps']} | {r['loss_pct']:.3f} | {us(cpu(r))} |")
print("\n| relay | transport | highest rate with loss < 0.1 % | CPU us/pkt there |")
print("|---|---|---:|---:|")
for name in names:
    for t in ("udp", "tcp", "tls"):
        best = max((r for r in runs(name, t, clients) if r["loss_pct"] < 0.1), key=lambda r: r["offered_pps"], default=None)
        print(f"| {name} | {t} | {best['offered_pps']} | {us(cpu(best))} |" if best else f"| {name} | {t} | - | - |")
print(f"\n| relay | transport | memory per idle allocation (RSS with {idle} minus {clients} connections) |")
print("|---|---|---:|")
for name in names:
    for t in ("tcp", "tls"):
        many, few = runs(name, t, idle), runs(name, t, clients)
        if many and few and many[0].get("server_rss_bytes") and few[-1].get("server_rss_bytes"):
            per = (many[0]["server_rss_bytes"] - few[-1]["server_rss_bytes"]) / (idle - clients)
            print(f"| {name} | {t} | {per/1024:.1f} KiB |")
EOF
