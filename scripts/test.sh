#!/usr/bin/env bash
# The test suite: guest unit tests (host target), then every workspace test, including
# the integration tests that start real clusters of `avail` processes on loopback.
# What the tests need from the machine is installed first when this runs as root with
# apt-get (as in CI); otherwise a missing piece is named in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
# command:Debian package. python3: the process workloads of the tests; pgrep/ps
# (procps): process checks; curl: the quickstart; iptables: the ft link-cut test;
# etcd: the etcd store backend's tests (avail-store/tests/etcd_conformance.rs);
# protoc: building etcd-client (its build script compiles etcd's .proto files).
needs=(python3:python3 pgrep:procps ps:procps curl:curl iptables:iptables
    etcd:etcd-server protoc:protobuf-compiler)
missing=()
for n in "${needs[@]}"; do
    command -v "${n%%:*}" >/dev/null 2>&1 || missing+=("${n##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test.sh: missing ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi
# qemu-system-x86_64: the qemu driver's tests (crates/avail/tests/vms.rs). Debian 12's
# qemu 7.2; this machine kind ships qemu-utils 10 from backports, which conflicts with
# it: qemu-utils is taken at the same 7.2 version (see shared/design/VMS.md).
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        [ ${#missing[@]} -gt 0 ] || apt-get update -qq
        ver="$(apt-cache madison qemu-system-x86 |
            awk -F'|' '!v && $2 ~ /7\.2/ {gsub(/ /, "", $2); v = $2} END {print v}')"
        if [ -z "$ver" ]; then
            echo "test.sh: no qemu 7.2 (qemu-system-x86) known to apt" >&2
            exit 1
        fi
        echo "test.sh: installing qemu-system-x86 $ver" >&2
        apt-get install -y -qq --no-install-recommends --allow-downgrades \
            "qemu-system-x86=$ver" "qemu-utils=$ver" >/dev/null
    else
        echo "test.sh: missing qemu-system-x86_64 (as root: apt-get install qemu-system-x86)" >&2
        exit 1
    fi
fi
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the tests need root (iptables partitions, workloads run as their own users)" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test.sh: missing cargo-nextest (cargo install cargo-nextest --locked)" >&2
    exit 1
fi
cargo test --quiet --manifest-path guests/Cargo.toml
cargo build --workspace --locked
# The VM test guest, from Debian packages (a second run finds it up to date).
./scripts/build-vm-guest.sh target/vm-guest
cargo nextest run --workspace --locked --no-fail-fast "$@"
