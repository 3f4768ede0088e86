#!/usr/bin/env bash
# The main job: build avail, start a local 3-node cluster on loopback, deploy the
# counter guest and curl it. The cluster keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
# protoc: building the etcd client compiles etcd's .proto files. Installed here when
# this runs as root with apt-get (a fresh machine); elsewhere named in one line.
if ! command -v protoc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "up.sh: installing protobuf-compiler" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq protobuf-compiler >/dev/null
    else
        echo "up.sh: missing protoc, which building the etcd client needs (as root: apt-get install protobuf-compiler)" >&2
        exit 1
    fi
fi
cargo build --release --locked --bin avail
AVAIL=${CARGO_TARGET_DIR:-target}/release/avail
DATA=${AVAIL_DATA:-avail-data}
# A cluster.json of an earlier run on this data dir is stale: wait for this run's.
rm -f "$DATA/cluster.json"
$AVAIL up --data-dir "$DATA" &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up' EXIT INT TERM
for _ in $(seq 1 600); do
    [ -f "$DATA/cluster.json" ] && break
    kill -0 $up 2>/dev/null || { echo "avail up failed; see $DATA/*.log" >&2; exit 1; }
    sleep 0.1
done
# A counter from an earlier run on this data dir is reused.
if ! $AVAIL workload show counter >/dev/null 2>&1; then
    $AVAIL workload run -f examples/counter.toml
fi
ingress=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["agents"][0]["ingress_url"])' "$DATA/cluster.json")
echo "+ curl -X POST $ingress/w/counter/incr"
curl -sS -X POST "$ingress/w/counter/incr"; echo
echo "The cluster is running (Ctrl-C to stop). Try: curl -X POST $ingress/w/counter/incr"
wait $up
