#!/usr/bin/env bash
# Puts uturn beside coturn and a bare UDP forwarder (the floor) under the same generator, on
# the same cores, and writes docs/benchmarks.md with tables and charts (docs/img/*.png).
#
# Each relay is pinned to SERVER_CPUS, the generator to GEN_CPU. Everything runs on 127.0.0.1.
# Every run is bounded by DURATION seconds (+ WARMUP); the whole sweep takes about 20 minutes
# with the defaults. Environment knobs:
#   RATES="25000 50000 100000 200000"  SIZES="100 1200"  MODES="channel send"
#   DURATION=5 WARMUP=1 CLIENTS=64 SERVER_CPUS=0 GEN_CPU=1 QUICK=1 (one rate, one size)
#   BURST=8 BURST_SIZE=1200 (the video-like runs: datagrams per client turn, and their size)
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${RATES:-"25000 50000 100000 200000"}
SIZES=${SIZES:-"100 1200"}
MODES=${MODES:-"channel send"}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CLIENTS=${CLIENTS:-64}
BURST=${BURST:-8}
BURST_SIZE=${BURST_SIZE:-1200}
SERVER_CPUS=${SERVER_CPUS:-0}
GEN_CPU=${GEN_CPU:-1}
if [ "${QUICK:-0}" = 1 ]; then RATES="50000"; SIZES="100"; DURATION=2; fi
OUT=target/bench
RESULTS=$OUT/results.jsonl
mkdir -p "$OUT" docs/img
: > "$RESULTS"
: > "$OUT/uturn.log"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
need=()
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The newest coturn where its source is here (COTURN_SRC, or the release tarball in
# ../shared/anchors), built by scripts/build-coturn.sh; Debian's package otherwise, which has
# no --multiplex-peer / --udp-gso (so no coturn-fast contestant).
COTURN_BIN=$(scripts/build-coturn.sh 2>"$OUT/coturn-build.log" || command -v turnserver)
export COTURN_BIN
CONTESTANTS=${CONTESTANTS:-"uturn coturn floor"}
if "$COTURN_BIN" --help 2>&1 | grep -q -- --udp-gso; then CONTESTANTS=${CONTESTANTS/coturn /coturn coturn-fast }; fi
echo "==> coturn: $COTURN_BIN ($("$COTURN_BIN" --version 2>/dev/null | head -1))"
echo "==> cargo build --release"
cargo build --release --workspace --bins >/dev/null
BIN=target/release
ulimit -n "$(ulimit -Hn)" || true

. scripts/bench-lib.sh
trap stop_server EXIT

# load CONTESTANT SCENARIO ARGS...: one generator run, its JSON appended to RESULTS.
load() {
  local who=$1 scen=$2; shift 2
  taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --cpu "$GEN_CPU" --contestant "$who" --scenario "$scen" \
    --server-pid "$SERVER_PID" --clients "$CLIENTS" --duration "$DURATION" --warmup "$WARMUP" "$@" > "$OUT/run.json" \
    || { echo "  $who $scen: uturn-load failed, skipped"; return 0; }
  cat "$OUT/run.json" >> "$RESULTS"
  python3 scripts/bench-line.py < "$OUT/run.json"
}

for who in $CONTESTANTS; do
  port=$(free_port); peer=$(free_port)
  echo "==> $who"
  start_server "$who" "$port" "$peer"
  for size in $SIZES; do
    for mode in $MODES; do
      [ "$who" = floor ] && [ "$mode" = send ] && continue
      m=$mode; [ "$who" = floor ] && m=raw
      for rate in $RATES; do
        load "$who" "$mode ${size}B one-way" --server 127.0.0.1:"$port" --peer 127.0.0.1:"$peer" --mode "$m" --size "$size" --rate "$rate"
      done
      load "$who" "$mode ${size}B echo" --server 127.0.0.1:"$port" --peer 127.0.0.1:"$peer" --mode "$m" --size "$size" --rate 50000 --echo
    done
  done
  # Video-like traffic: each client sends BURST datagrams back to back (a frame's packets).
  for mode in $MODES; do
    [ "$who" = floor ] && [ "$mode" = send ] && continue
    m=$mode; [ "$who" = floor ] && m=raw
    load "$who" "$mode ${BURST_SIZE}B burst$BURST one-way" --server 127.0.0.1:"$port" --peer 127.0.0.1:"$peer" \
      --mode "$m" --size "$BURST_SIZE" --rate 100000 --burst "$BURST"
  done
  # The highest rate with loss under 0.1% (channel, smallest size), by bisection.
  lo=0; hi=400000
  for _ in 1 2 3 4 5; do
    mid=$(( (lo + hi) / 2 ))
    m=channel; [ "$who" = floor ] && m=raw
    r=$(taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --cpu "$GEN_CPU" --contestant "$who" --scenario max \
        --server-pid "$SERVER_PID" --clients "$CLIENTS" --duration 2 --warmup 1 --server 127.0.0.1:"$port" \
        --peer 127.0.0.1:"$peer" --mode $m --size "${SIZES%% *}" --rate "$mid") || r='{"loss_pct": 100}'
    if python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["loss_pct"] < 0.1 else 1)' "$r"; then lo=$mid; else hi=$mid; fi
  done
  echo "{\"contestant\":\"$who\",\"scenario\":\"max-rate\",\"max_rate_pps\":$lo}" >> "$RESULTS"
  echo "  $who: highest rate with loss < 0.1%: ~$lo packets/s"
  if [ "$who" != floor ]; then
    taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --contestant "$who" --mode allocs --server 127.0.0.1:"$port" \
      --server-pid "$SERVER_PID" --clients 4 --count 10000 --delete | tee -a "$RESULTS" || echo "  allocs run failed"
  fi
  stop_server
  if [ "$who" != floor ]; then
    for n in 1000 10000; do
      port=$(free_port)
      start_server "$who" "$port" 0
      taskset -c "$GEN_CPU" $BIN/uturn-load --json --quiet --contestant "$who" --mode hold --server 127.0.0.1:"$port" \
        --server-pid "$SERVER_PID" --count "$n" | tee -a "$RESULTS" || echo "  hold run failed"
      stop_server
    done
  fi
done

echo "==> charts and docs/benchmarks.md"
cp "$RESULTS" docs/benchmarks-results.jsonl
$BIN/uturn-plot "$RESULTS" --out docs/img
python3 scripts/bench-report.py "$RESULTS" "$0 (RATES='$RATES' SIZES='$SIZES' MODES='$MODES' DURATION=$DURATION WARMUP=$WARMUP CLIENTS=$CLIENTS BURST=$BURST BURST_SIZE=$BURST_SIZE SERVER_CPUS=$SERVER_CPUS GEN_CPU=$GEN_CPU)" > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
