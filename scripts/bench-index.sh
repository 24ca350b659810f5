#!/usr/bin/env bash
# flukeid's HNSW index against hnswlib on the same synthetic catalog, in
# one run: `flukeid bench-index` generates N clustered unit vectors shaped
# like the Kaggle 2019 catalog, finds the exact neighbours, writes both to
# target/bench-index/ and measures its own index; bench/hnswlib_peer.py
# then measures hnswlib (same M, ef_construction, threads, ef list) on the
# files written there. Prints both side by side and the ratios
# flukeid / hnswlib.
#
#   scripts/bench-index.sh [N] [extra flukeid bench-index flags]
#
# N defaults to 1,000,000 (about 1 GiB of vectors; the two builds take tens
# of minutes on a 2-core machine). Installs the peers from
# bench/requirements.txt into .venv-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
shift || true
venv=.venv-bench
out=target/bench-index
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -r bench/requirements.txt
cargo build --release -q

echo "$(date -u +%FT%TZ) flukeid bench-index --vectors $n $*" >&2
RUST_LOG=${RUST_LOG:-info} \
  "${CARGO_TARGET_DIR:-target}/release/flukeid" bench-index --vectors "$n" --out "$out" "$@" >&2
echo "$(date -u +%FT%TZ) hnswlib" >&2
"$venv/bin/python" bench/hnswlib_peer.py "$out" >&2

"$venv/bin/python" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
ours = json.load(open(os.path.join(out, "flukeid.json")))
peer = json.load(open(os.path.join(out, "hnswlib.json")))
TARGET = 0.99

print(f"{ours['vectors']:,} vectors, {ours['dim']}-d, {ours['queries']:,} queries, "
      f"{ours['threads']} threads, M {ours['max_connections']}, "
      f"ef_construction {ours['ef_construction']}; flukeid vs {peer['engine']}")
print()
print(f"{'':>5} {'flukeid':^30} {peer['engine']:^30} {'QPS':>6}")
print(f"{'ef':>5} {'QPS':>8} {'recall@10':>10} {'own':>10} "
      f"{'QPS':>8} {'recall@10':>10} {'own':>10} {'ratio':>6}")
by_ef = {s["ef"]: s for s in ours["searches"]}
for p in peer["searches"]:
    o = by_ef[p["ef"]]
    print(f"{p['ef']:>5} {o['queries_per_second']:8.0f} {o['recall_at_10']:10.4f} "
          f"{o['own_identity_recall']:10.4f} {p['queries_per_second']:8.0f} "
          f"{p['recall_at_10']:10.4f} {p['own_identity_recall']:10.4f} "
          f"{o['queries_per_second'] / p['queries_per_second']:6.2f}")
print()

def first_reaching(searches, recall):
    return next((s for s in searches if s["own_identity_recall"] >= recall), None)

mark = first_reaching(peer["searches"], TARGET)
if mark is None:
    print(f"hnswlib does not reach own-identity recall {TARGET} at any ef listed")
else:
    same = by_ef[mark["ef"]]
    print(f"hnswlib reaches own-identity recall {TARGET} at ef {mark['ef']} "
          f"({mark['own_identity_recall']:.4f}, {mark['queries_per_second']:.0f} QPS)")
    print(f"  flukeid at the same ef: own {same['own_identity_recall']:.4f}, "
          f"{same['queries_per_second']:.0f} QPS, "
          f"ratio {same['queries_per_second'] / mark['queries_per_second']:.2f}")
    own = first_reaching(ours["searches"], mark["own_identity_recall"])
    if own is None:
        print("  flukeid does not reach that recall at any ef listed")
    else:
        print(f"  flukeid's smallest listed ef reaching it: ef {own['ef']} "
              f"(own {own['own_identity_recall']:.4f}, recall@10 {own['recall_at_10']:.4f}), "
              f"{own['queries_per_second']:.0f} QPS, "
              f"ratio {own['queries_per_second'] / mark['queries_per_second']:.2f}")
print()

def row(name, key, unit, scale=1.0, digits=1, peer_key=None):
    a, b = ours[key], peer[peer_key or key]
    if a is None or b is None:
        print(f"{name:<22} {'n/a':>12} {'n/a':>12}")
        return
    a, b = a * scale, b * scale
    print(f"{name:<22} {a:12.{digits}f} {b:12.{digits}f} {a / b:7.2f}  {unit}")

print(f"{'':<22} {'flukeid':>12} {'hnswlib':>12} {'ratio':>7}")
row("build", "build_seconds", "s")
row("memory per vector", "memory_bytes_per_vector", "B (resident-set growth)", digits=0)
row("saved size per vector", "saved_bytes", "B", scale=1 / ours["vectors"], digits=0)
row("save", "save_seconds", "s", digits=2)
row("reload", "load_seconds", "s", digits=2)
row("reload, search only", "search_load_seconds", "s (hnswlib: its one reload)", digits=2,
    peer_key="load_seconds")
row("memory, search only", "search_memory_bytes_per_vector",
    "B (the search copy's arrays; hnswlib: resident-set growth of its build)", digits=0,
    peer_key="memory_bytes_per_vector")
print(f"reloaded recall@10 at ef {ours['searches'][-1]['ef']}: flukeid "
      f"{ours['reloaded_recall_at_10']:.4f} (built {ours['searches'][-1]['recall_at_10']:.4f}), "
      f"hnswlib {peer['reloaded_recall_at_10']:.4f} (built {peer['searches'][-1]['recall_at_10']:.4f})")
PY
