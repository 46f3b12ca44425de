#!/usr/bin/env bash
# Soak test: runs uturn under uturn-load for SOAK_SECONDS (default 600, bounded) with steady
# ChannelData traffic, allocation churn (allocate, relay, refresh, delete) and a parallel
# garbage flood, all on 127.0.0.1. Reports sessions served, packets relayed, loss, the relay's
# resident memory at start, middle and end, open file descriptors at start and end, and every
# ERROR/WARN line logged. RSS is sampled every SOAK_SAMPLE seconds (default 15) into
# target/soak/rss.tsv; the verdict on memory is the slope of a least-squares line through the
# samples of the last half, extrapolated over the last third of the run: start-up (buffer rings,
# tables reaching their working size) is not growth, a slope that keeps going is. Exits non-zero
# when the relay died, leaked descriptors, grew more than 1 MiB over the last third by that
# slope, or lost more than 0.1% of the steady traffic.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${SOAK_SECONDS:-600}
RATE=${SOAK_RATE:-10000}
GARBAGE_RATE=${SOAK_GARBAGE_RATE:-5000}
# Pause between churn batches (200 allocations each), seconds: keeps the churn from taking a
# whole core of a small machine away from the relay.
CHURN_PAUSE=${SOAK_CHURN_PAUSE:-0.5}
BIN=${BIN:-target/release}
OUT=${SOAK_OUT:-target/soak}
mkdir -p "$OUT"
if [ "${SOAK_BUILD:-1}" = 1 ]; then
  if [ "$BIN" = target/release ]; then cargo build --release --bins -q; else cargo build --bins -q; fi
fi
ulimit -n "$(ulimit -Hn)" || true
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Churn comes from one IP far faster than a real client would: lift the unauthenticated rate
# limit for this run (docs/security.md).
printf 'unauth-rate = 0\n' > "$OUT/soak.toml"
"$BIN/uturn" --config "$OUT/soak.toml" --listen 127.0.0.1:"$port" --workers 2 --port-range 40000-48000 --log-level warn \
  >/dev/null 2>"$OUT/uturn.log" &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
trap cleanup EXIT
sleep 1
kill -0 "$PID"
rss() { awk '/VmRSS/ {print $2}' /proc/"$PID"/status; }
fds() { ls /proc/"$PID"/fd | wc -l; }
rss0=$(rss); fds0=$(fds)
echo "soak: ${SECONDS_TOTAL}s on 127.0.0.1:$port (pid $PID): RSS ${rss0} KiB, ${fds0} fds"

"$BIN/uturn-load" --json --quiet --server 127.0.0.1:"$port" --clients 32 --rate "$RATE" --duration "$SECONDS_TOTAL" \
  --warmup 1 --server-pid "$PID" > "$OUT/traffic.json" &
TRAFFIC=$!
"$BIN/uturn-load" --mode garbage --clients 8 --rate "$GARBAGE_RATE" --duration "$SECONDS_TOTAL" --server 127.0.0.1:"$port" \
  > "$OUT/garbage.json" &
GARBAGE=$!
: > "$OUT/churn.jsonl"
end=$(( $(date +%s) + SECONDS_TOTAL ))
half=$(( $(date +%s) + SECONDS_TOTAL / 2 ))
SAMPLE=${SOAK_SAMPLE:-15}
start_s=$(date +%s)
printf '0\t%s\n' "$rss0" > "$OUT/rss.tsv"
next_sample=$(( start_s + SAMPLE ))
rss_mid=""
while [ "$(date +%s)" -lt "$end" ]; do
  timeout 60 "$BIN/uturn-load" --json --quiet --mode allocs --count 200 --clients 4 --delete --server 127.0.0.1:"$port" \
    >> "$OUT/churn.jsonl" || true
  sleep "$CHURN_PAUSE"
  if [ -z "$rss_mid" ] && [ "$(date +%s)" -ge "$half" ]; then rss_mid=$(rss); fi
  now_s=$(date +%s)
  if [ "$now_s" -ge "$next_sample" ]; then
    printf '%s\t%s\n' "$(( now_s - start_s ))" "$(rss)" >> "$OUT/rss.tsv"
    next_sample=$(( now_s + SAMPLE ))
  fi
done
wait "$TRAFFIC" "$GARBAGE"
rss_mid=${rss_mid:-$(rss)}
sleep 1
rss1=$(rss); fds1=$(fds)
printf '%s\t%s\n' "$(( $(date +%s) - start_s ))" "$rss1" >> "$OUT/rss.tsv"
python3 - "$OUT" "$rss0" "$rss_mid" "$rss1" "$fds0" "$fds1" <<'PY'
import json, sys
out, rss0, rssm, rss1, fds0, fds1 = sys.argv[1], *map(int, sys.argv[2:])
samples = [tuple(map(int, l.split())) for l in open(f"{out}/rss.tsv") if l.strip()]
total_s = max(samples[-1][0], 1)
late = [(t, r) for t, r in samples if t >= total_s / 2]
if len(late) >= 2:
    mt = sum(t for t, _ in late) / len(late); mr = sum(r for _, r in late) / len(late)
    var = sum((t - mt) ** 2 for t, _ in late)
    slope = sum((t - mt) * (r - mr) for t, r in late) / var if var else 0.0  # KiB per second
else:
    slope = 0.0
growth_last_third = slope * total_s / 3
t = json.load(open(f"{out}/traffic.json"))
churn = [json.loads(l) for l in open(f"{out}/churn.jsonl") if l.strip()]
g = json.load(open(f"{out}/garbage.json"))
sessions = sum(c["succeeded"] for c in churn) + t["clients"]
failures = {}
for c in churn:
    for k, v in c["failures"].items():
        failures[k] = failures.get(k, 0) + v
log = [l for l in open(f"{out}/uturn.log") if "ERROR" in l or "WARN" in l]
print(f"sessions served     {sessions} ({t['clients']} steady, {sessions - t['clients']} churned; churn failures {failures or 'none'})")
print(f"packets relayed     {t['delivered']} of {t['sent']} steady ChannelData, loss {t['loss_pct']:.4f}%, p99 {t['latency']['p99_us']} us")
print(f"garbage datagrams   {g['garbage_sent']}")
print(f"relay RSS (KiB)     start {rss0}, middle {rssm}, end {rss1}; last half {slope * 60:.1f} KiB/min over {len(late)} samples, {growth_last_third:.0f} KiB over the last third")
print(f"relay fds           start {fds0}, end {fds1}")
print(f"ERROR/WARN logged   {len(log)}" + "".join("\n  " + l.rstrip() for l in log[:20]))
bad = []
if t["loss_pct"] > 0.1: bad.append("loss above 0.1%")
if fds1 > fds0 + 4: bad.append("file descriptors leaked")
if growth_last_third > 1024: bad.append("memory still growing in the last half (more than 1 MiB over the last third)")
if t.get("refresh_failures", 0): bad.append("refreshes failed")
if any("ERROR" in l for l in log): bad.append("errors logged")
print("soak: " + ("FAILED: " + ", ".join(bad) if bad else "passed"))
sys.exit(1 if bad else 0)
PY
