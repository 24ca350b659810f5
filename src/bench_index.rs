//! `flukeid bench-index`: the HNSW index on a large synthetic catalog
//! ([`crate::synthetic_catalog`]), measured the way `bench/hnswlib_peer.py`
//! measures hnswlib on the same vectors.
//!
//! The command writes the catalog, the queries and the exact nearest
//! neighbours to a folder as `.npy` files (the peer reads them there),
//! builds a [`VectorIndex`] with a fixed number of threads, saves and
//! reloads it, and searches every query at each `ef` of a list. It prints
//! its figures and writes them to `flukeid.json` in the same folder.
//!
//! - Build, save and reload are wall-clock times of one run each.
//! - Memory per vector is the growth of the process's resident set
//!   (`VmRSS`) over the build, divided by the number of vectors: the
//!   index's own copy of the vectors, its graph and whatever the allocator
//!   keeps. The peer measures the same way.
//! - Queries per second: all queries searched on the thread pool, the best
//!   of `rounds` passes.
//! - Recall@10: the share of the exact 10 nearest neighbours (by brute
//!   force) among the 10 returned.
//! - Own-identity recall: the share of the query whale's catalogued
//!   sightings among the 10 returned, out of at most 10.
//!
//! Nothing here asserts a time; tests check only the figures' arithmetic.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::index::{self, Hit, IndexError, VectorIndex};
use crate::synthetic_catalog::{self, CatalogShape, ShapeError, SyntheticCatalog};

/// Neighbours asked for and compared, as in "recall@10".
pub const K: usize = 10;

/// What to measure.
#[derive(Debug, Clone)]
pub struct IndexBenchOptions {
    pub shape: CatalogShape,
    /// Candidate-list sizes to search with.
    pub efs: Vec<usize>,
    /// Threads for building, searching and the exact search.
    pub threads: usize,
    /// Timed passes over the queries at each `ef`; the best counts.
    pub rounds: usize,
    /// Folder for the data files, the saved index and `flukeid.json`.
    pub out: PathBuf,
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum IndexBenchError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("thread pool: {0}")]
    Threads(#[from] rayon::ThreadPoolBuildError),
    #[error("the saved index was not loaded back (manifest refused)")]
    NotReloaded,
    #[error("no ef to search with")]
    NoEf,
}

/// One `ef`'s figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SearchFigures {
    pub ef: usize,
    pub queries_per_second: f64,
    pub recall_at_10: f64,
    pub own_identity_recall: f64,
}

/// Everything `flukeid.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct IndexFigures {
    pub engine: String,
    pub vectors: usize,
    pub queries: usize,
    pub dim: usize,
    pub threads: usize,
    pub max_connections: usize,
    pub ef_construction: usize,
    pub build_seconds: f64,
    /// `None` where the resident set cannot be read (not Linux).
    pub memory_bytes_per_vector: Option<f64>,
    pub save_seconds: f64,
    pub saved_bytes: u64,
    /// Loading hnsw_rs's graph and remaking the search copy, as a process
    /// that inserts does.
    pub load_seconds: f64,
    /// Loading the saved search copy alone, as the server does.
    pub search_load_seconds: f64,
    /// What that load holds per vector: the search copy's arrays. (The
    /// resident-set growth of the load itself says little: it reuses the
    /// pages the built index just freed.)
    pub search_memory_bytes_per_vector: f64,
    /// Recall@10 of the reloaded index at the last `ef`, to show that the
    /// reloaded graph is the one that was saved.
    pub reloaded_recall_at_10: f64,
    pub searches: Vec<SearchFigures>,
}

/// Runs the benchmark and prints its figures.
pub fn run(options: &IndexBenchOptions) -> Result<(), IndexBenchError> {
    if options.efs.is_empty() {
        return Err(IndexBenchError::NoEf);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build()?;
    let out = &options.out;
    std::fs::create_dir_all(out).map_err(io(out))?;

    let (catalog, truth) = prepare_data(&pool, options)?;
    let figures = measure_index(&pool, options, &catalog, &truth)?;

    print_figures(&figures);
    let json = out.join("flukeid.json");
    let text = serde_json::to_vec_pretty(&figures).expect("figures serialise");
    std::fs::write(&json, text).map_err(io(&json))
}

/// Generates the catalog, finds the exact neighbours of its queries and
/// writes both for the peer.
fn prepare_data(
    pool: &rayon::ThreadPool,
    options: &IndexBenchOptions,
) -> Result<(SyntheticCatalog, Vec<u32>), IndexBenchError> {
    let started = Instant::now();
    let catalog = pool.install(|| synthetic_catalog::generate(&options.shape))?;
    tracing::info!(
        vectors = catalog.len(),
        queries = catalog.query_identities.len(),
        seconds = started.elapsed().as_secs_f64(),
        "synthetic catalog generated"
    );

    let started = Instant::now();
    let truth = pool.install(|| exact_neighbours(&catalog));
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "exact neighbours found"
    );
    write_data(&options.out, options, &catalog, &truth)?;
    Ok((catalog, truth))
}

/// Builds, searches at every `ef`, saves and reloads the index.
fn measure_index(
    pool: &rayon::ThreadPool,
    options: &IndexBenchOptions,
    catalog: &SyntheticCatalog,
    truth: &[u32],
) -> Result<IndexFigures, IndexBenchError> {
    let items: Vec<(i64, &[f32])> = (0..catalog.len())
        .map(|i| (i as i64, catalog.vector(i)))
        .collect();
    let resident_before = resident_bytes();
    let started = Instant::now();
    let built = pool.install(|| VectorIndex::build(catalog.dim, &items));
    let build_seconds = started.elapsed().as_secs_f64();
    let memory_bytes_per_vector = match (resident_before, resident_bytes()) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 / catalog.len() as f64)
        }
        _ => None,
    };
    tracing::info!(seconds = build_seconds, "index built");

    let mut searches = Vec::with_capacity(options.efs.len());
    for &ef in &options.efs {
        let figures = measure_searches(pool, &built, catalog, truth, ef, options.rounds);
        tracing::info!(
            ef,
            qps = figures.queries_per_second,
            recall_at_10 = figures.recall_at_10,
            own_identity_recall = figures.own_identity_recall,
            "searched"
        );
        searches.push(figures);
    }

    let folder = options.out.join("flukeid-index");
    std::fs::create_dir_all(&folder).map_err(io(&folder))?;
    let manifest = built.manifest();
    let started = Instant::now();
    built.save(&folder)?;
    let save_seconds = started.elapsed().as_secs_f64();
    let saved_bytes = folder_bytes(&folder.join(index::INDEX_DIR))?;
    // One copy at a time, as in a restarted server.
    drop(built);
    let last_ef = searches.last().map_or(index::DEFAULT_EF, |s| s.ef);
    let started = Instant::now();
    let searchable =
        VectorIndex::load_searchable(&folder, manifest)?.ok_or(IndexBenchError::NotReloaded)?;
    let search_load_seconds = started.elapsed().as_secs_f64();
    let search_memory_bytes_per_vector =
        searchable.search_copy_bytes() as f64 / catalog.len() as f64;
    let searchable_recall_at_10 =
        measure_searches(pool, &searchable, catalog, truth, last_ef, 1).recall_at_10;
    drop(searchable);
    let started = Instant::now();
    let reloaded = VectorIndex::load(&folder, manifest)?.ok_or(IndexBenchError::NotReloaded)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let reloaded_recall_at_10 =
        measure_searches(pool, &reloaded, catalog, truth, last_ef, 1).recall_at_10;
    if reloaded_recall_at_10 != searchable_recall_at_10 {
        tracing::warn!(
            searchable_recall_at_10,
            reloaded_recall_at_10,
            "the two reloaded indexes answer differently"
        );
    }

    Ok(IndexFigures {
        engine: "flukeid".to_owned(),
        vectors: catalog.len(),
        queries: catalog.query_identities.len(),
        dim: catalog.dim,
        threads: options.threads,
        max_connections: index::MAX_CONNECTIONS,
        ef_construction: index::EF_CONSTRUCTION,
        build_seconds,
        memory_bytes_per_vector,
        save_seconds,
        saved_bytes,
        load_seconds,
        search_load_seconds,
        search_memory_bytes_per_vector,
        reloaded_recall_at_10,
        searches,
    })
}

/// Searches every query at `ef` on `pool`, `rounds` times, and scores the
/// answers.
fn measure_searches(
    pool: &rayon::ThreadPool,
    index: &VectorIndex,
    catalog: &SyntheticCatalog,
    truth: &[u32],
    ef: usize,
    rounds: usize,
) -> SearchFigures {
    let queries = catalog.query_identities.len();
    let mut best = f64::INFINITY;
    let mut answers = Vec::new();
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        answers = pool.install(|| {
            (0..queries)
                .into_par_iter()
                .map(|q| index.search_with_ef(catalog.query(q), K, ef))
                .collect::<Vec<Vec<Hit>>>()
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    let rows: Vec<Vec<u32>> = answers
        .iter()
        .map(|hits| hits.iter().map(|h| h.sighting_id as u32).collect())
        .collect();
    SearchFigures {
        ef,
        queries_per_second: queries as f64 / best,
        recall_at_10: recall_at_10(&rows, truth),
        own_identity_recall: own_identity_recall(&rows, catalog),
    }
}

/// The exact `K` nearest catalog rows of every query, by dot product, as
/// one row of `K` indices per query (nearest first).
pub fn exact_neighbours(catalog: &SyntheticCatalog) -> Vec<u32> {
    // Blocks of queries small enough to stay in cache while the catalog
    // streams past once per block.
    const BLOCK: usize = 64;
    let queries = catalog.query_identities.len();
    let blocks: Vec<Vec<u32>> = (0..queries.div_ceil(BLOCK))
        .into_par_iter()
        .map(|b| {
            let range = b * BLOCK..((b + 1) * BLOCK).min(queries);
            let mut best: Vec<TopK> = range.clone().map(|_| TopK::new(K)).collect();
            for row in 0..catalog.len() {
                let v = catalog.vector(row);
                for (top, q) in best.iter_mut().zip(range.clone()) {
                    top.offer(index::dot(catalog.query(q), v), row as u32);
                }
            }
            best.into_iter().flat_map(TopK::into_sorted).collect()
        })
        .collect();
    blocks.concat()
}

/// The `k` largest scores offered so far, kept sorted, largest first.
struct TopK {
    k: usize,
    items: Vec<(f32, u32)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    fn offer(&mut self, score: f32, row: u32) {
        if self.items.len() == self.k && score <= self.items[self.k - 1].0 {
            return;
        }
        let at = self.items.partition_point(|&(s, _)| s >= score);
        self.items.insert(at, (score, row));
        self.items.truncate(self.k);
    }

    fn into_sorted(self) -> Vec<u32> {
        self.items.into_iter().map(|(_, row)| row).collect()
    }
}

/// Mean share of each query's exact neighbours (`K` per row of `truth`)
/// found among its answers.
pub fn recall_at_10(answers: &[Vec<u32>], truth: &[u32]) -> f64 {
    let total: usize = answers
        .iter()
        .zip(truth.chunks_exact(K))
        .map(|(found, exact)| found.iter().filter(|r| exact.contains(r)).count())
        .sum();
    total as f64 / (K * answers.len()).max(1) as f64
}

/// Mean share of each query whale's catalogued sightings among its answers,
/// out of the most the answers can hold: min(10, sightings).
pub fn own_identity_recall(answers: &[Vec<u32>], catalog: &SyntheticCatalog) -> f64 {
    let total: f64 = answers
        .iter()
        .zip(&catalog.query_identities)
        .map(|(found, &identity)| {
            let own = found
                .iter()
                .filter(|&&r| catalog.identities[r as usize] == identity)
                .count();
            let reachable = (catalog.members[identity as usize] as usize).min(K);
            own as f64 / reachable as f64
        })
        .sum();
    total / answers.len().max(1) as f64
}

fn print_figures(f: &IndexFigures) {
    println!(
        "flukeid index: {} vectors of {} dimensions, {} queries, {} threads, M {}, ef_construction {}",
        f.vectors, f.dim, f.queries, f.threads, f.max_connections, f.ef_construction
    );
    let memory = f
        .memory_bytes_per_vector
        .map_or("n/a".to_owned(), |b| format!("{b:.0} B/vector"));
    println!(
        "build {:.1} s, memory {memory} (resident-set growth), save {:.2} s ({:.0} B/vector on disk), \
         reload {:.2} s (search copy alone: {:.2} s, {:.0} B/vector)",
        f.build_seconds,
        f.save_seconds,
        f.saved_bytes as f64 / f.vectors as f64,
        f.load_seconds,
        f.search_load_seconds,
        f.search_memory_bytes_per_vector
    );
    println!(
        "{:>5} {:>10} {:>10} {:>10}",
        "ef", "QPS", "recall@10", "own"
    );
    for s in &f.searches {
        println!(
            "{:>5} {:>10.0} {:>10.4} {:>10.4}",
            s.ef, s.queries_per_second, s.recall_at_10, s.own_identity_recall
        );
    }
    println!(
        "reloaded index: recall@10 {:.4} at ef {}",
        f.reloaded_recall_at_10,
        f.searches.last().map_or(0, |s| s.ef)
    );
}

/// Writes what the peer needs: the vectors, the identities, the exact
/// neighbours and `meta.json` with the settings both engines use.
fn write_data(
    out: &Path,
    options: &IndexBenchOptions,
    catalog: &SyntheticCatalog,
    truth: &[u32],
) -> Result<(), IndexBenchError> {
    let dim = catalog.dim;
    let queries = catalog.query_identities.len();
    write_npy(
        &out.join("vectors.npy"),
        &[catalog.len(), dim],
        &catalog.vectors,
    )?;
    write_npy(&out.join("queries.npy"), &[queries, dim], &catalog.queries)?;
    write_npy(
        &out.join("identities.npy"),
        &[catalog.len()],
        &catalog.identities,
    )?;
    write_npy(
        &out.join("query_identities.npy"),
        &[queries],
        &catalog.query_identities,
    )?;
    write_npy(&out.join("truth.npy"), &[queries, K], truth)?;
    let meta = serde_json::json!({
        "vectors": catalog.len(),
        "queries": queries,
        "dim": dim,
        "noise": options.shape.noise,
        "spectrum": options.shape.spectrum,
        "seed": options.shape.seed,
        "k": K,
        "max_connections": index::MAX_CONNECTIONS,
        "ef_construction": index::EF_CONSTRUCTION,
        "efs": options.efs,
        "threads": options.threads,
        "rounds": options.rounds,
    });
    let path = out.join("meta.json");
    let text = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    std::fs::write(&path, text).map_err(io(&path))
}

/// A value `.npy` files can hold, stored little-endian.
pub trait NpyElement: Copy {
    /// NumPy's name of the type.
    const DESCR: &'static str;
    fn le_bytes(self) -> [u8; 4];
}

impl NpyElement for f32 {
    const DESCR: &'static str = "<f4";
    fn le_bytes(self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

impl NpyElement for u32 {
    const DESCR: &'static str = "<u4";
    fn le_bytes(self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

/// Writes `values` as a C-ordered NumPy array of `shape` (format 1.0).
pub fn write_npy<T: NpyElement>(
    path: &Path,
    shape: &[usize],
    values: &[T],
) -> Result<(), IndexBenchError> {
    let mut file = BufWriter::new(File::create(path).map_err(io(path))?);
    file.write_all(&npy_header::<T>(shape)).map_err(io(path))?;
    for chunk in values.chunks(1 << 14) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.le_bytes()).collect();
        file.write_all(&bytes).map_err(io(path))?;
    }
    file.flush().map_err(io(path))
}

/// The magic, version and header dictionary, padded with spaces so that
/// the data starts at a multiple of 64 bytes, as NumPy writes it.
fn npy_header<T: NpyElement>(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        T::DESCR
    );
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header
}

/// Resident set of this process, from `/proc/self/status`.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of the files directly in `folder`.
fn folder_bytes(folder: &Path) -> Result<u64, IndexBenchError> {
    let mut total = 0;
    for entry in std::fs::read_dir(folder).map_err(io(folder))? {
        let entry = entry.map_err(io(folder))?;
        total += entry.metadata().map_err(io(folder))?.len();
    }
    Ok(total)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IndexBenchError {
    let path = path.to_owned();
    move |source| IndexBenchError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_catalog() -> SyntheticCatalog {
        synthetic_catalog::generate(&CatalogShape {
            vectors: 2_000,
            queries: 40,
            dim: 64,
            noise: 0.65,
            spectrum: 0.0,
            seed: 3,
        })
        .unwrap()
    }

    #[test]
    fn exact_neighbours_are_the_most_similar_rows_in_order() {
        let catalog = small_catalog();
        let truth = exact_neighbours(&catalog);
        assert_eq!(truth.len(), 40 * K);
        for q in [0, 17, 39] {
            let mut all: Vec<(f32, u32)> = (0..catalog.len())
                .map(|r| (index::dot(catalog.query(q), catalog.vector(r)), r as u32))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            let expected: Vec<u32> = all[..K].iter().map(|(_, r)| *r).collect();
            assert_eq!(&truth[q * K..(q + 1) * K], expected.as_slice());
        }
    }

    #[test]
    fn exact_answers_score_full_recall() {
        let catalog = small_catalog();
        let truth = exact_neighbours(&catalog);
        let answers: Vec<Vec<u32>> = truth.chunks(K).map(<[u32]>::to_vec).collect();
        assert_eq!(recall_at_10(&answers, &truth), 1.0);
        // At noise 0.65 in 64 dimensions a whale's sightings are nearly
        // always nearer than other whales', so exact search finds them.
        assert!(own_identity_recall(&answers, &catalog) > 0.95);
    }

    #[test]
    fn own_identity_recall_is_capped_by_the_sightings_there_are() {
        let catalog = SyntheticCatalog {
            dim: 1,
            vectors: vec![0.0; 13],
            // Identity 0 has 2 sightings, identity 1 has 11.
            identities: vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            queries: vec![0.0; 2],
            query_identities: vec![0, 1],
            members: vec![2, 11],
        };
        let answers = vec![vec![0, 1, 2], vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 0]];
        // Both of identity 0's sightings: 1.0; 9 of identity 1's 10 reachable: 0.9.
        assert!((own_identity_recall(&answers, &catalog) - 0.95).abs() < 1e-12);
        let truth: Vec<u32> = (0..10).chain(0..10).collect();
        assert!((recall_at_10(&answers, &truth) - 12.0 / 20.0).abs() < 1e-12);
    }

    #[test]
    fn npy_header_is_aligned_and_names_type_and_shape() {
        let header = npy_header::<f32>(&[3, 256]);
        assert_eq!(header.len() % 64, 0);
        let text = String::from_utf8_lossy(&header[10..]);
        assert!(text.contains("'descr': '<f4'") && text.contains("'shape': (3, 256)"));
        assert!(text.ends_with('\n'));
        let header = npy_header::<u32>(&[5]);
        assert!(String::from_utf8_lossy(&header).contains("'shape': (5,)"));
    }
}
