#!/usr/bin/env bash
# The test suite: guest unit tests (host target), then every workspace test, including
# the integration tests that start real clusters of `avail` processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --quiet --manifest-path guests/Cargo.toml
cargo build --workspace --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
