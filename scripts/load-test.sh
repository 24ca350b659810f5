#!/usr/bin/env bash
# Load test of POST /v1/identify with wrk (Debian package `wrk`) against a
# flukeid server this script starts on loopback and stops again.
#
#   scripts/load-test.sh PHOTO CATALOG [SECONDS]
#
# Runs two loads for SECONDS (default 20) each: 8 concurrent clients, then
# 64 (several times what 2 cores can serve), and prints the latency
# percentiles and the count of answers by status (503 = the model queue was
# full and the request was turned away with Retry-After). After the
# overload it checks that a single request is answered again.
set -euo pipefail
cd "$(dirname "$0")/.."
photo=${1:?usage: load-test.sh PHOTO CATALOG [SECONDS]}
catalog=${2:?usage: load-test.sh PHOTO CATALOG [SECONDS]}
seconds=${3:-20}
bind=127.0.0.1:18099
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

cargo build --release -q
RUST_LOG=warn target/release/flukeid serve --catalog "$catalog" --bind "$bind" --no-seed &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://$bind/readyz" >/dev/null && break
  sleep 1
done
curl -sf "http://$bind/readyz" >/dev/null || { echo "server did not become ready" >&2; exit 1; }

# One request first, so that the first pass's allocations are not timed.
curl -s -o /dev/null -F "image=@$photo" "http://$bind/v1/identify"

export FLUKEID_PHOTO="$photo"
for clients in 8 64; do
  echo "== $clients concurrent clients, ${seconds}s"
  wrk -t 2 -c "$clients" -d "${seconds}s" --timeout 30s -s bench/identify.lua "http://$bind/v1/identify" \
    | grep -E "Requests/sec|status|latency p"
done
echo "== after the overload (requests still in progress drain first)"
sleep 3
curl -s -o /dev/null -w "single request: HTTP %{http_code} in %{time_total} s\n" -F "image=@$photo" "http://$bind/v1/identify"
