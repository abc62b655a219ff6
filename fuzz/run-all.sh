#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) one after another and
# appends a line per target to fuzz/RUNS.md-style log fuzz/last-run.txt.
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
[ -d corpus ] || ./seeds.sh
cargo +nightly fuzz build -O
: > last-run.txt
for t in $(cargo +nightly fuzz list); do
  log=$(mktemp)
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=131072 \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || true
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  crash=$(ls artifacts/"$t" 2>/dev/null | wc -l)
  echo "$t: ${secs}s, $execs executions, $crash artifacts" | tee -a last-run.txt
  rm -f "$log"
done
