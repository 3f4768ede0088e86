#!/usr/bin/env bash
# Rebuilds the example guests and copies them to guests/<name>.wasm.
# Needs: rustup target add wasm32-unknown-unknown. No network (std only).
set -euo pipefail
cd "$(dirname "$0")"

guests=(counter kv bank faulty)
cargo build --release --target wasm32-unknown-unknown
for g in "${guests[@]}"; do
    install -m 644 "target/wasm32-unknown-unknown/release/$g.wasm" "$g.wasm"
done

# Check the exports and imports against docs/guest-abi.md.
if command -v python3 >/dev/null; then
    python3 check_wasm.py "${guests[@]/%/.wasm}"
else
    echo "python3 not found: skipping the ABI check" >&2
fi
