#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (libFuzzer) for FUZZ_SECONDS each (default 60; CI runs
# the default, a longer campaign is e.g. FUZZ_SECONDS=3600 ./scripts/fuzz.sh). Targets:
#   stun_parse     the STUN parser; a parsed message must re-encode to the same bytes
#   channel_data   the ChannelData / Send / Data paths in both directions
#   state_machine  the per-worker state machine driven by operation scripts from several
#                  5-tuples; the tables' counts must match their contents after every step
# Seeds are in fuzz/corpus/<target> (RFC 5769 vectors and hand-made messages); new inputs
# libFuzzer finds go to target/fuzz-corpus/<target>, so the committed seeds stay small.
# The toolchain here is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-"stun_parse channel_data state_machine"}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
for t in $TARGETS; do
  mkdir -p "target/fuzz-corpus/$t"
  echo "==> fuzz $t for ${SECS}s"
  log="target/fuzz-$t.log"
  if ! cargo fuzz run --sanitizer none "$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t FAILED (crash input under fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$log" | tail -2 || true
done
echo "fuzz: all targets ran ${SECS}s without a finding"
