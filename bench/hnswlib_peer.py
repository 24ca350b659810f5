"""hnswlib on the vectors `flukeid bench-index` wrote, measured as flukeid
measures its own index (see src/bench_index.rs):

- build, save and reload: wall-clock time of one run each;
- memory per vector: growth of the resident set (VmRSS) over the build,
  divided by the number of vectors;
- queries per second: every query in one knn_query call on the same number
  of threads, the best of `rounds` passes;
- recall@10 against the exact neighbours flukeid wrote (truth.npy), and
  own-identity recall: the share of the query whale's catalogued sightings
  among the 10 answers, out of at most 10.

Same M, ef_construction, thread count and ef list as flukeid (meta.json).
Space 'ip' (1 - dot product): the vectors are unit length, so it ranks as
cosine does without normalising again. Writes hnswlib.json beside the data.

    bench/hnswlib_peer.py DATA_FOLDER
"""

import importlib.metadata
import json
import os
import sys
import tempfile
import time

import hnswlib
import numpy as np


def resident_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def own_identity_recall(labels, identities, query_identities, members, k):
    own = (identities[labels] == query_identities[:, None]).sum(axis=1)
    reachable = np.minimum(members[query_identities], k)
    return float(np.mean(own / reachable))


def recall_at_k(labels, truth):
    found = [len(np.intersect1d(a, t)) for a, t in zip(labels, truth)]
    return float(np.sum(found) / truth.size)


def main():
    folder = sys.argv[1]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    load = lambda name: np.load(os.path.join(folder, name))
    vectors = load("vectors.npy")
    queries = load("queries.npy")
    identities = load("identities.npy")
    query_identities = load("query_identities.npy")
    truth = load("truth.npy")
    k, threads = meta["k"], meta["threads"]
    members = np.bincount(identities, minlength=int(query_identities.max()) + 1)
    n, dim = vectors.shape

    before = resident_bytes()
    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(
        max_elements=n,
        M=meta["max_connections"],
        ef_construction=meta["ef_construction"],
        random_seed=1,
    )
    index.add_items(vectors, np.arange(n), num_threads=threads)
    build_seconds = time.perf_counter() - started
    after = resident_bytes()

    searches = []
    for ef in meta["efs"]:
        index.set_ef(ef)
        best = float("inf")
        for _ in range(max(1, meta["rounds"])):
            started = time.perf_counter()
            labels, _ = index.knn_query(queries, k=k, num_threads=threads)
            best = min(best, time.perf_counter() - started)
        searches.append(
            {
                "ef": ef,
                "queries_per_second": len(queries) / best,
                "recall_at_10": recall_at_k(labels, truth),
                "own_identity_recall": own_identity_recall(
                    labels, identities, query_identities, members, k
                ),
            }
        )
        print(f"hnswlib ef {ef} done", file=sys.stderr)

    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        path = os.path.join(scratch, "hnswlib.bin")
        started = time.perf_counter()
        index.save_index(path)
        save_seconds = time.perf_counter() - started
        saved_bytes = os.path.getsize(path)
        del index
        started = time.perf_counter()
        reloaded = hnswlib.Index(space="ip", dim=dim)
        reloaded.load_index(path, max_elements=n)
        load_seconds = time.perf_counter() - started
        reloaded.set_ef(meta["efs"][-1])
        labels, _ = reloaded.knn_query(queries, k=k, num_threads=threads)
        reloaded_recall = recall_at_k(labels, truth)

    figures = {
        "engine": f"hnswlib {importlib.metadata.version('hnswlib')}",
        "vectors": n,
        "queries": len(queries),
        "dim": dim,
        "threads": threads,
        "max_connections": meta["max_connections"],
        "ef_construction": meta["ef_construction"],
        "build_seconds": build_seconds,
        "memory_bytes_per_vector": (after - before) / n
        if before is not None and after is not None
        else None,
        "save_seconds": save_seconds,
        "saved_bytes": saved_bytes,
        "load_seconds": load_seconds,
        "reloaded_recall_at_10": reloaded_recall,
        "searches": searches,
    }
    with open(os.path.join(folder, "hnswlib.json"), "w") as out:
        json.dump(figures, out, indent=2)
    print(
        f"hnswlib: build {build_seconds:.1f} s, "
        f"memory {figures['memory_bytes_per_vector']:.0f} B/vector, "
        f"save {save_seconds:.2f} s, reload {load_seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
