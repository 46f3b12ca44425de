#!/usr/bin/env bash
# Memory per UDP allocation with a permission and a channel (as every call has), two builds of
# uturn side by side in one run: the relay's resident memory (user space: the whole process,
# workers and control plane) after N allocations minus before them, divided by N, for each N in
# COUNTS. Each N is a fresh relay with one worker; `uturn-load --mode hold --with-channel` makes
# the allocations one after another on loopback (a permission and channel 0x4000 to PEER,
# nothing is sent to it) and holds them for 0.5 s. The kernel's share (socket, file, inode,
# ~2-3 KiB per allocation) is not in the figure; `uturn-load` prints its estimate beside it.
#
# Contestants: CONTESTANTS ("base this"): `this` is this tree's release build; `base` is
# BASE_REF (main) built from `git archive` under target/bench-memory/base-src. Any other entry
# NAME=PATH names a uturn binary. Run it under the build lock on a shared machine:
#   flock /tmp/uturn-cargo.lock ./scripts/bench-memory.sh
# Knobs: COUNTS ("10000 19000"; this machine's hard fd limit is 20,000 per process, and each
# allocation takes a relay socket in the relay and a client socket in the generator),
# SERVER_CPUS (0), LOAD_CPU (1), PEER (127.0.0.1:9), HOLD_TIMEOUT (seconds per hold run, 180),
# PORT_RANGE (the relay's port-range, 3000-31999: below the ephemeral ports),
# BENCH_BUILD (1: build first).
# Output: target/bench-memory/results.jsonl and a table of KiB per allocation.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
COUNTS=${COUNTS:-"10000 19000"}
SERVER_CPUS=${SERVER_CPUS:-0}
LOAD_CPU=${LOAD_CPU:-1}
PEER=${PEER:-127.0.0.1:9}
HOLD_TIMEOUT=${HOLD_TIMEOUT:-180}
# Relayed ports outside the kernel's ephemeral range, where the generator's 19,000 client
# sockets take theirs.
PORT_RANGE=${PORT_RANGE:-3000-31999}
BASE_REF=${BASE_REF:-main}
CONTESTANTS=${CONTESTANTS:-"base this"}
BIN=$root/target/release
OUT=$root/target/bench-memory
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

if [ "${BENCH_BUILD:-1}" = 1 ]; then
  # The base first, in its own source tree but this target folder (dependencies are shared),
  # copied out; then this tree, whose build puts its own binaries back in target/release.
  if [[ " $CONTESTANTS " == *" base "* ]]; then
    rm -rf "$OUT/base-src" && mkdir -p "$OUT/base-src"
    git archive "$BASE_REF" | tar -x -C "$OUT/base-src"
    (cd "$OUT/base-src" && CARGO_TARGET_DIR=$root/target cargo build --release -q --bin uturn)
    cp "$BIN/uturn" "$OUT/uturn-base"
    rm -rf "$OUT/base-src"
  fi
  cargo build --release -q --bin uturn --bin uturn-load
fi
[ -x "$OUT/uturn-base" ] || [[ " $CONTESTANTS " != *" base "* ]] || { echo "no $OUT/uturn-base: run with BENCH_BUILD=1" >&2; exit 1; }

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  SERVER_PID=""
}
trap stop_server EXIT
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

binary_of() {
  case $1 in
    base) echo "$OUT/uturn-base" ;;
    this) echo "$BIN/uturn" ;;
    *=*) echo "${1#*=}" ;;
    *) echo "unknown contestant $1" >&2; return 2 ;;
  esac
}

failed=0
for name in $CONTESTANTS; do
  bin=$(binary_of "$name"); label=${name%%=*}
  for n in $COUNTS; do
    port=$(free_port)
    printf 'unauth-rate = 0\n' > "$OUT/uturn.toml"
    taskset -c "$SERVER_CPUS" "$bin" --config "$OUT/uturn.toml" --listen 127.0.0.1:"$port" --workers 1 \
      --log-level warn --port-range "$PORT_RANGE" >/dev/null 2>>"$OUT/uturn.log" &
    SERVER_PID=$!
    sleep 1
    if ! line=$(timeout "$HOLD_TIMEOUT" taskset -c "$LOAD_CPU" "$BIN/uturn-load" --json --quiet --mode hold --with-channel \
        --contestant "$label" --server 127.0.0.1:"$port" --peer "$PEER" --server-pid "$SERVER_PID" --count "$n"); then
      echo "  $label: hold of $n failed (see $OUT/uturn.log)" >&2
      failed=1
    else
      echo "$line" >> "$OUT/results.jsonl"
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("  %s: %d allocations, RSS %d -> %d KiB, %.2f KiB/allocation" % (r["contestant"], r["allocations"], r["rss_before"] // 1024, r["rss_after"] // 1024, r["user_bytes_per_allocation"] / 1024))' "$line"
    fi
    stop_server
    sleep 1
  done
done

python3 - "$OUT/results.jsonl" "$COUNTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
counts = [int(c) for c in sys.argv[2].split()]
names = list(dict.fromkeys(r["contestant"] for r in rows))
print("\nUser-space RSS growth per UDP allocation with one permission and one channel (KiB):\n")
print("| build | " + " | ".join(f"{c:,} allocations" for c in counts) + " |")
print("|---|" + "---:|" * len(counts))
for n in names:
    cells = []
    for c in counts:
        r = [x for x in rows if x["contestant"] == n and x["allocations"] == c]
        cells.append(f"{r[-1]['user_bytes_per_allocation'] / 1024:.2f}" if r else "-")
    print(f"| {n} | " + " | ".join(cells) + " |")
EOF
exit $failed
