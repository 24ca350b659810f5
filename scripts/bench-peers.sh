#!/usr/bin/env bash
# flukeid's forward pass against onnxruntime on the same weights, in
# interleaved rounds so that a slow stretch of the machine hits both alike.
# Prints each engine's median ms per image at 224x224 batch 1 and 224x448
# batch 1 and 8, and the ratios flukeid / onnxruntime (below 1.0 means
# flukeid is faster).
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
  "$venv/bin/python" bench/onnx_lite0.py --rounds 10 --width 224 >>"$log"
done

"$venv/bin/python" - "$log" <<'PY'
import re, statistics, sys
ours = {"224x224 b1": [], "224x448 b1": [], "224x448 b8": []}
peer = {key: [] for key in ours}
golden = "onnxruntime: golden check line missing"
for line in open(sys.argv[1]):
    if m := re.match(r"embed 224x224 batch 1\s+([\d.]+) ms/image", line):
        ours["224x224 b1"].append(float(m[1]))
    elif m := re.match(r"embed batch (\d+)\s+([\d.]+) ms/image", line):
        ours[f"224x448 b{m[1]}"].append(float(m[2]))
    elif m := re.match(r"onnxruntime (\d+x\d+) batch=(\d+) ms_per_image=([\d.]+)", line):
        key = f"{m[1]} b{m[2]}"
        if key in peer:
            peer[key].append(float(m[3]))
    elif line.startswith("onnxruntime ") and "golden" in line:
        golden = line.strip()
    elif line.startswith("flukeid bench:"):
        setup = line.strip()
print(golden)
print(setup)
print("median of per-round medians, ms per image")
print(f"{'input':>10} {'batch':>5} {'flukeid':>9} {'onnxruntime':>12} {'ratio':>7}")
for key in ours:
    size, batch = key.split(" b")
    a, b = statistics.median(ours[key]), statistics.median(peer[key])
    print(f"{size:>10} {batch:>5} {a:9.1f} {b:12.1f} {a / b:7.2f}")
PY
