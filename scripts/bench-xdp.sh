#!/usr/bin/env bash
# The XDP fast path against the socket path, coturn and the forwarder floor, across real
# interfaces: three network namespaces this script creates (client, relay, peer; veth pairs),
# the relay contestant in the relay namespace pinned to SERVER_CPUS, the generator
# (uturn-load) in the client namespace with its peer sockets in the peer namespace.
#
# XDP runs in softirq context and is charged to no process, so CPU per relayed packet is counted
# machine-wide for every contestant alike: the busy time of all CPUs from /proc/stat (softirq
# included), minus the generator's own process time, minus the machine's busy rate measured with
# no traffic for 1 s before each run (uturn-load --machine-cpu), minus the client's and the
# peer's veth receive threads. Every veth end receives in its own NAPI thread (as a NIC queue
# is served on its IRQ's CPU): the relay's pinned to SERVER_CPUS, the client's and peer's to
# GEN_CPU; otherwise veth runs the receive, XDP included, in the sender's system call. What
# remains is the relay's work wherever it ran: its process and its interfaces' receive threads. Results: target/bench/xdp-results.jsonl and
# docs/benchmarks-xdp.md. Needs root. Every run is bounded (DURATION + WARMUP + 1 s).
#
# Knobs: RATES="100000 200000" SIZE=160 DURATION=5 WARMUP=1 CLIENTS=64 REPEAT=3 ECHO_RATE=50000
#        SERVER_CPUS=0 GEN_CPU=1 CONTESTANTS="uturn-xdp-native uturn-xdp-generic uturn coturn
#        coturn-fast floor" COTURN_SRC=dir (else ../shared/anchors/coturn-*.tar.gz, else Debian's)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "bench-xdp.sh needs root (namespaces, XDP)" >&2; exit 1; }
RATES=${RATES:-"100000 200000"}
SIZE=${SIZE:-160}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
CLIENTS=${CLIENTS:-64}
REPEAT=${REPEAT:-3}
ECHO_RATE=${ECHO_RATE:-50000}
SERVER_CPUS=${SERVER_CPUS:-0}
GEN_CPU=${GEN_CPU:-1}
CONTESTANTS=${CONTESTANTS:-"uturn-xdp-native uturn-xdp-generic uturn coturn coturn-fast floor"}
OUT=target/bench
RESULTS=$OUT/xdp-results.jsonl
mkdir -p "$OUT"
: > "$RESULTS"

need=()
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
command -v clang >/dev/null 2>&1 || need+=(clang llvm libbpf-dev)
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
COTURN_BIN=$(scripts/build-coturn.sh 2>"$OUT/coturn-build.log" || command -v turnserver)
COTURN_VERSION=$("$COTURN_BIN" --version 2>/dev/null | head -1 || true)
echo "==> coturn: $COTURN_BIN ($COTURN_VERSION)"
echo "==> cargo build --release"
cargo build --release --workspace --bins >/dev/null
BIN=$PWD/target/release
ulimit -n "$(ulimit -Hn)" || true

P=uxb
C=${P}c R=${P}r Q=${P}p
LISTEN=10.201.1.2 RELAY=10.201.2.2 PEER=10.201.2.1
teardown() { for n in $C $R $Q; do ip netns del "$n" 2>/dev/null || true; done; }
setup() {
  teardown
  for n in $C $R $Q; do ip netns add "$n"; ip -n "$n" link set lo up; done
  ip link add ${P}c0 netns $C type veth peer name ${P}c1 netns $R
  ip link add ${P}p0 netns $Q type veth peer name ${P}p1 netns $R
  ip -n $C addr add 10.201.1.1/24 dev ${P}c0
  ip -n $R addr add $LISTEN/24 dev ${P}c1
  ip -n $R addr add $RELAY/24 dev ${P}p1
  ip -n $Q addr add $PEER/24 dev ${P}p0
  for x in "$C ${P}c0" "$R ${P}c1" "$R ${P}p1" "$Q ${P}p0"; do set -- $x; ip -n "$1" link set "$2" up; done
  ip -n $C route add default via $LISTEN
  ip -n $Q route add default via $RELAY
  # bpf_fib_lookup answers only on interfaces that forward (docs/xdp.md: an operator also
  # drops forwarded traffic in the firewall; nothing here sends any).
  ip netns exec $R sysctl -qw net.ipv4.conf.all.forwarding=1
  # veth delivers frames XDP sends into it only to an end with NAPI (GRO on); locally
  # generated datagrams need full checksums.
  for x in "$C ${P}c0" "$R ${P}c1" "$R ${P}p1" "$Q ${P}p0"; do
    set -- $x
    ip netns exec "$1" ethtool -K "$2" gro on tx off >/dev/null
    # Every veth end receives in its own NAPI kernel thread, as a NIC's receive queue is served
    # on its IRQ's CPU; otherwise veth runs the receive (XDP included) in the sender's system
    # call, charged to whoever sent.
    ip netns exec "$1" sh -c "echo 1 > /sys/class/net/$2/threaded"
  done
  pin_napi
}

# The relay's NAPI threads on SERVER_CPUS, the client's and the peer's on GEN_CPU (again after
# an XDP attach). Sets EXCLUDE: the client's and peer's threads, whose CPU time uturn-load
# subtracts with its own.
pin_napi() {
  local pid comm
  EXCLUDE=()
  while read -r pid comm; do
    case $comm in
      napi/${P}c1-*|napi/${P}p1-*) taskset -pc "$SERVER_CPUS" "$pid" >/dev/null ;;
      napi/${P}c0-*|napi/${P}p0-*) taskset -pc "$GEN_CPU" "$pid" >/dev/null; EXCLUDE+=(--exclude-pid "$pid") ;;
    esac
  done < <(ps -eo pid=,comm=)
}

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
  # The next contestant binds the same port: wait (5 s at most) until nothing holds it.
  for _ in $(seq 50); do
    ip netns exec $R ss -Huln 2>/dev/null | grep -q ":3478 " || break
    sleep 0.1
  done
}
trap 'stop_server; teardown' EXIT

# start WHO: the contestant in the relay namespace on SERVER_CPUS, listening on $LISTEN:3478.
start() {
  local who=$1 workers
  workers=$(echo "$SERVER_CPUS" | tr ',' '\n' | wc -l)
  printf 'unauth-rate = 0\n' > "$OUT/uturn-xdp.toml"
  case $who in
    uturn-xdp-native|uturn-xdp-generic|uturn)
      local xdp=off
      [ "$who" = uturn-xdp-native ] && xdp=native
      [ "$who" = uturn-xdp-generic ] && xdp=generic
      ip netns exec $R taskset -c "$SERVER_CPUS" "$BIN/uturn" --config "$OUT/uturn-xdp.toml" \
        --listen $LISTEN:3478 --relay-ip $RELAY --user bench:bench --allow-peer 10.201.2.0/24 \
        --workers "$workers" --xdp $xdp --log-level warn >/dev/null 2>>"$OUT/uturn-xdp.log" &
      ;;
    coturn|coturn-fast)
      local -a fast=()
      [ "$who" = coturn-fast ] && fast=(--multiplex-peer --udp-gso)
      ip netns exec $R taskset -c "$SERVER_CPUS" "$COTURN_BIN" -n --listening-ip=$LISTEN --listening-port=3478 \
        --relay-ip=$RELAY --lt-cred-mech --user=bench:bench --realm=uturn.local --no-tls --no-dtls --no-cli \
        --no-tcp-relay --relay-threads="$workers" --min-port=30001 --max-port=60000 "${fast[@]}" \
        --pidfile="$OUT/coturn-xdp.pid" --log-file="$OUT/coturn-xdp.log" --simple-log >/dev/null 2>&1 &
      ;;
    floor)
      ip netns exec $R taskset -c "$SERVER_CPUS" "$BIN/udp-forwarder" --listen $LISTEN:3478 \
        --forward-to $PEER:3481 >>"$OUT/floor-xdp.log" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  sleep 1
  pin_napi
}

# run WHO SCENARIO ARGS...: one generator run in the client namespace.
run() {
  local who=$1 scen=$2 mode=channel; shift 2
  [ "$who" = floor ] && mode=raw
  ip netns exec $C taskset -c "$GEN_CPU" "$BIN/uturn-load" --json --quiet --cpu "$GEN_CPU" --contestant "$who" \
    --scenario "$scen" --server $LISTEN:3478 --user bench --password bench --peer $PEER:3481 \
    --peer-netns $Q --peer-ip $PEER --machine-cpu "${EXCLUDE[@]}" --server-pid "$SERVER_PID" --clients "$CLIENTS" \
    --duration "$DURATION" --warmup "$WARMUP" --mode $mode --size "$SIZE" "$@" > "$OUT/xdp-run.json" \
    || { echo "  $who $scen: uturn-load failed, skipped"; return 0; }
  cat "$OUT/xdp-run.json" >> "$RESULTS"
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print("  %-18s %-22s machine %5.2f us/pkt  process %s  loss %.3f%%" % (r["contestant"], r["scenario"],
      r.get("machine_cpu_us_per_packet") or 0, "%.2f" % r["server_cpu_us_per_packet"] if r.get("server_cpu_us_per_packet") is not None else "-",
      r["loss_pct"]))' "$OUT/xdp-run.json"
}

setup
echo "==> kernel $(uname -r); relay on CPU $SERVER_CPUS, generator on CPU $GEN_CPU; ${SIZE}-byte ChannelData"
for rep in $(seq "$REPEAT"); do
  echo "==> round $rep of $REPEAT"
  for who in $CONTESTANTS; do
    start "$who"
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      # A contestant asked for must be in the report: no report without its row.
      SERVER_PID=""
      echo "bench-xdp: FAILED: contestant $who did not start; no report written. Its log:" >&2
      case $who in
        uturn*) tail -5 "$OUT/uturn-xdp.log" >&2 ;;
        coturn*) tail -5 "$OUT/coturn-xdp.log" >&2 2>/dev/null || true ;;
        floor) tail -5 "$OUT/floor-xdp.log" >&2 ;;
      esac
      case $who in
        uturn-xdp-*) echo "bench-xdp: is $BIN/uturn built with the XDP program? (clang and libbpf-dev at build time; 'cargo build --release' again after installing them)" >&2 ;;
      esac
      exit 1
    fi
    for rate in $RATES; do
      run "$who" "one-way ${rate}" --rate "$rate"
    done
    [ "$who" != floor ] && run "$who" "echo ${ECHO_RATE}" --rate "$ECHO_RATE" --echo
    stop_server
  done
done

python3 scripts/bench-xdp-report.py "$RESULTS" "$COTURN_VERSION" \
  "$0 (RATES='$RATES' SIZE=$SIZE DURATION=$DURATION WARMUP=$WARMUP CLIENTS=$CLIENTS REPEAT=$REPEAT ECHO_RATE=$ECHO_RATE SERVER_CPUS=$SERVER_CPUS GEN_CPU=$GEN_CPU)" \
  > docs/benchmarks-xdp.md
cp "$RESULTS" docs/benchmarks-xdp-results.jsonl
echo "wrote docs/benchmarks-xdp.md"
