#!/usr/bin/env bash
# Fuzz the checkpoint frame decoder with libFuzzer (cargo-fuzz), for SECONDS (default 60).
# Needs `cargo install cargo-fuzz`; the sanitizer flags need a nightly compiler, which
# RUSTC_BOOTSTRAP=1 stands in for on a stable toolchain. Seeds: valid frames written by
# the proptest corpus are not needed; libFuzzer finds the magic and header by itself.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_TO_RUN="${1:-60}"
RUSTC_BOOTSTRAP=1 cargo fuzz run frame_decode -- -max_total_time="$SECONDS_TO_RUN" -max_len=65536
