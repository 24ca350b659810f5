#!/usr/bin/env bash
# flukeid's forward pass against onnxruntime on the same weights, in
# interleaved rounds so that a slow stretch of the machine hits both alike.
# Prints each engine's median ms per image at 224x448, batch 1 and 8, and
# the ratios flukeid / onnxruntime (below 1.0 means flukeid is faster).
#
#   scripts/bench-peers.sh [ROUNDS]
#
# Installs the peers from bench/requirements.txt into .venv-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
venv=.venv-bench
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -r bench/requirements.txt
cargo build --release -q
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for round in $(seq "$rounds"); do
  echo "round $round/$rounds" >&2
  RUST_LOG=warn target/release/flukeid bench --rounds 10 >>"$log"
  "$venv/bin/python" bench/onnx_lite0.py --rounds 10 >>"$log"
done

"$venv/bin/python" - "$log" <<'PY'
import re, statistics, sys
ours = {1: [], 8: []}
peer = {1: [], 8: []}
for line in open(sys.argv[1]):
    if m := re.match(r"embed batch (\d+)\s+([\d.]+) ms/image", line):
        ours[int(m[1])].append(float(m[2]))
    elif m := re.match(r"onnxruntime batch=(\d+) ms_per_image=([\d.]+)", line):
        peer[int(m[1])].append(float(m[2]))
    elif line.startswith("onnxruntime ") and "golden" in line:
        golden = line.strip()
print(golden)
print("224x448, 2 threads, median of per-round medians (ms per image)")
print(f"{'batch':>5} {'flukeid':>9} {'onnxruntime':>12} {'ratio':>7}")
for batch in (1, 8):
    a, b = statistics.median(ours[batch]), statistics.median(peer[batch])
    print(f"{batch:>5} {a:9.1f} {b:12.1f} {a / b:7.2f}")
PY
