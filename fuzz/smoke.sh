#!/usr/bin/env bash
# A bounded smoke run of every fuzz target: `bash fuzz/smoke.sh [seconds per target]` (60 by
# default). Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The seed
# corpora in fuzz/corpus/ are read, never written: what a run finds goes to a scratch corpus,
# and crashes to fuzz/artifacts/<target>/. Exits non-zero on the first crash.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flagstream-fuzz}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
targets=(decode_events stream_message flag_file targeting wal_recovery sql)
cargo +nightly fuzz build --dev -s none
for target in "${targets[@]}"; do
  echo "== $target ($seconds s)"
  mkdir -p "$scratch/$target"
  cargo +nightly fuzz run --dev -s none "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 2>&1 |
    grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==[0-9]+== ERROR|SUMMARY|thread .* panicked|Done [0-9]+ runs)" || true
  if compgen -G "artifacts/$target/crash-*" > /dev/null || compgen -G "artifacts/$target/oom-*" > /dev/null; then
    echo "!! $target found a crash: see fuzz/artifacts/$target/"
    exit 1
  fi
done
echo "== every target ran $seconds s without a crash"
