#!/usr/bin/env bash
# Fuzzes what untrusted bytes reach first: the public listener's own request-head path, cursor
# decoding, WebSocket client frames, JSON request bodies (targets in fuzz/, their bodies in
# gateway/src/fuzzing.rs). Each target runs SECONDS (default 60) from its kept corpus
# (fuzz/corpus/<target>), which is then minimized and kept; a crash stops the script with
# the input in fuzz/artifacts/<target>/ — copy it to fuzz/regressions/<target>/, where the
# test suite replays it (tests/api/fuzz_corpus.rs), and fix the bug.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_head cursor ws_frame json_body)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# cargo fuzz's coverage instrumentation flags are nightly-only; the machine's one toolchain is
# stable. No sanitizer (ASan needs nightly's build-std): the targets are safe Rust, the
# fuzzer looks for panics, hangs and out-of-memory.
export RUSTC_BOOTSTRAP=1
report=target/fuzz-report.md
mkdir -p target
printf '| target | seconds | executions | coverage (edges) | features | corpus files |\n|---|---|---|---|---|---|\n' >"$report"
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="target/fuzz-$t.log"
  (cd fuzz && cargo fuzz run -s none --target-dir ../target/fuzz "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10) >"$log" 2>&1 || {
    echo "fuzz target $t failed; see $log and fuzz/artifacts/$t/" >&2
    tail -30 "$log" >&2
    exit 1
  }
  (cd fuzz && cargo fuzz cmin -s none --target-dir ../target/fuzz "$t" "corpus/$t") >>"$log" 2>&1
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  files=$(find "fuzz/corpus/$t" -type f | wc -l)
  printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$seconds" "$runs" "$cov" "$ft" "$files" | tee -a "$report"
done
echo "report: $report"
