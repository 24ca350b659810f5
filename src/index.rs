//! The HNSW index over catalogued embeddings, saved beside the catalog so
//! a restart does not rebuild it. Embeddings are unit vectors, so the
//! distance is `1 − a·b` ([`UnitDot`]): the same order as cosine without
//! the norms, in f32.
//!
//! hnsw_rs builds the graph, takes inserts and saves it; searches walk a
//! copy in flat arrays with re-selected links ([`graph`]), made after every
//! insert (12–25 s per million vectors on two cores) and saved beside
//! hnsw_rs's files. It searches three to four times as fast as hnsw_rs's
//! own search of its graph, with a better recall at the same `ef`
//! (`docs/benchmarks.md`). A process that only searches (the server,
//! scoring) loads the copy alone ([`VectorIndex::load_searchable`]); one
//! that inserts loads both.
//!
//! The catalog database is the source of truth. The saved graph carries a
//! manifest with the number of sightings and the largest sighting id it
//! holds; when they do not match the catalog (an interrupted run, a catalog
//! copied without its index) the index is rebuilt from the stored vectors.

use std::path::{Path, PathBuf};

use hnsw_rs::api::AnnT;
use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::{Distance, Hnsw};
use serde::{Deserialize, Serialize};

mod graph;

use graph::FlatGraph;

/// Folder of the saved graph inside a catalog folder.
pub const INDEX_DIR: &str = "hnsw";
const BASENAME: &str = "sightings";
const MANIFEST: &str = "manifest.json";
/// The saved search copy, beside hnsw_rs's files.
const GRAPH: &str = "search-graph.bin";

/// Links per node. 16 is the usual trade-off between recall and memory.
pub const MAX_CONNECTIONS: usize = 16;
/// Candidate list while building; high for recall, paid once per insert.
pub const EF_CONSTRUCTION: usize = 200;
/// Candidate list while searching, unless [`VectorIndex::search_with_ef`]
/// says otherwise.
pub const DEFAULT_EF: usize = 128;
/// The distance a saved graph was built with, recorded in its manifest.
/// Graphs saved without it (built with hnsw_rs's cosine distance) are not
/// loaded but rebuilt from the catalog.
const DISTANCE: &str = "unit-dot";

/// `1 − a·b`, the distance between unit vectors (0 for the same
/// direction), clamped at 0 against rounding.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        unit_distance(a, b)
    }
}

/// `1 − a·b`, floored at 0 against rounding: the distance both hnsw_rs's
/// build and the flat copy's searches rank by.
fn unit_distance(a: &[f32], b: &[f32]) -> f32 {
    (1.0 - dot(a, b)).max(0.0)
}

/// The dot product, with AVX-512, or AVX2 and FMA, where the CPU has them.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot product of different lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has just been seen to support AVX-512F.
            return unsafe { dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has just been seen to support AVX2 and FMA.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes::<false>(a, b)
}

/// Four independent 16-wide sums of products, then the tail.
///
/// # Safety
/// The CPU must support AVX-512F, and `a` and `b` must be equally long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;

    let n = a.len();
    let wide = n - n % 64;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut sums = [_mm512_setzero_ps(); 4];
    for i in (0..wide).step_by(64) {
        for (j, sum) in sums.iter_mut().enumerate() {
            // SAFETY: i + 64 <= n, so both loads stay inside the slices.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(pa.add(i + 16 * j)),
                    _mm512_loadu_ps(pb.add(i + 16 * j)),
                )
            };
            *sum = _mm512_fmadd_ps(x, y, *sum);
        }
    }
    let total = _mm512_add_ps(
        _mm512_add_ps(sums[0], sums[1]),
        _mm512_add_ps(sums[2], sums[3]),
    );
    _mm512_reduce_add_ps(total) + dot_lanes::<true>(&a[wide..], &b[wide..])
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

/// Sixteen independent partial sums, which the compiler turns into vector
/// registers. `FMA` only where the target has fused multiply-add.
#[inline(always)]
fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 16];
    let (chunks_a, chunks_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in chunks_a.zip(chunks_b) {
        for j in 0..16 {
            sums[j] = if FMA {
                x[j].mul_add(y[j], sums[j])
            } else {
                sums[j] + x[j] * y[j]
            };
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// The manifest as saved: what the graph holds and its distance.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(flatten)]
    manifest: Manifest,
    #[serde(default)]
    distance: String,
}
const MAX_LAYERS: usize = 16;

/// Why the index could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("index {path}: {reason}")]
    Hnsw { path: PathBuf, reason: String },
    #[error("index loaded for searching only; load it with VectorIndex::load to {0}")]
    SearchOnly(&'static str),
}

/// What a saved graph holds, to check it against the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub count: usize,
    pub max_id: i64,
    pub dim: usize,
}

/// A neighbour found by a search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub sighting_id: i64,
    /// Cosine similarity, 1 for the same direction.
    pub similarity: f32,
}

/// An in-memory HNSW graph of sighting embeddings.
pub struct VectorIndex {
    /// The graph of record: inserts go here, and it is what is saved.
    /// `None` in an index loaded for searching only.
    hnsw: Option<Hnsw<'static, f32, UnitDot>>,
    /// The copy searches walk, remade after every insert.
    flat: FlatGraph,
    manifest: Manifest,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("manifest", &self.manifest)
            .finish()
    }
}

impl VectorIndex {
    /// An empty index for vectors of `dim` values.
    pub fn new(dim: usize, expected: usize) -> Self {
        let hnsw = Hnsw::new(
            MAX_CONNECTIONS,
            expected.max(1024),
            MAX_LAYERS,
            EF_CONSTRUCTION,
            UnitDot,
        );
        let flat = FlatGraph::from_hnsw(&hnsw, dim);
        Self {
            hnsw: Some(hnsw),
            flat,
            manifest: Manifest {
                count: 0,
                max_id: 0,
                dim,
            },
        }
    }

    /// Builds an index from `(sighting id, vector)` pairs.
    pub fn build(dim: usize, items: &[(i64, &[f32])]) -> Self {
        let mut index = Self::new(dim, items.len());
        index
            .insert(items)
            .expect("a new index has hnsw_rs's graph");
        index
    }

    /// Adds `(sighting id, vector)` pairs, in parallel. Fails on an index
    /// loaded for searching only.
    pub fn insert(&mut self, items: &[(i64, &[f32])]) -> Result<(), IndexError> {
        let hnsw = self.hnsw.as_mut().ok_or(IndexError::SearchOnly("insert"))?;
        if items.is_empty() {
            return Ok(());
        }
        let data: Vec<(&[f32], usize)> = items.iter().map(|(id, v)| (*v, *id as usize)).collect();
        hnsw.parallel_insert_slice(&data);
        self.flat = FlatGraph::from_hnsw(hnsw, self.manifest.dim);
        self.manifest.count += items.len();
        self.manifest.max_id = items
            .iter()
            .map(|(id, _)| *id)
            .fold(self.manifest.max_id, i64::max);
        Ok(())
    }

    /// What the index holds.
    pub fn manifest(&self) -> Manifest {
        self.manifest
    }

    /// Bytes of the search copy's arrays: all a searchable index loaded
    /// with [`VectorIndex::load_searchable`] holds, beside small headers.
    pub fn search_copy_bytes(&self) -> usize {
        self.flat.bytes()
    }

    /// Number of indexed vectors.
    pub fn len(&self) -> usize {
        self.manifest.count
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.manifest.count == 0
    }

    /// The `k` nearest sightings, most similar first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Hit> {
        // A wide candidate list: the catalogs are small enough that exact
        // recall of the top 50 is worth a few extra distance computations.
        self.search_with_ef(query, k, (2 * k).max(DEFAULT_EF))
    }

    /// The `k` nearest sightings, most similar first, keeping `ef`
    /// candidates (at least `k`) on the bottom layer: larger finds more of
    /// the true neighbours and takes longer.
    pub fn search_with_ef(&self, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        self.flat
            .search(query, k, ef)
            .into_iter()
            .map(|n| Hit {
                sighting_id: self.flat.id(n.node),
                similarity: 1.0 - n.distance,
            })
            .collect()
    }

    /// Saves the graph and its search copy to `catalog/hnsw/`. They are
    /// written to a temporary folder first and swapped in, so a crash
    /// leaves the old ones or the new ones, never a mix. Fails on an index
    /// loaded for searching only.
    pub fn save(&self, catalog: &Path) -> Result<(), IndexError> {
        let hnsw = self.hnsw.as_ref().ok_or(IndexError::SearchOnly("save"))?;
        let target = catalog.join(INDEX_DIR);
        let partial = catalog.join(format!("{INDEX_DIR}.partial"));
        let old = catalog.join(format!("{INDEX_DIR}.old"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IndexError::Io { path, source }
        };
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;

        if !self.is_empty() {
            let name = hnsw
                .file_dump(&partial, BASENAME)
                .map_err(|e| IndexError::Hnsw {
                    path: partial.clone(),
                    reason: e.to_string(),
                })?;
            if name != BASENAME {
                return Err(IndexError::Hnsw {
                    path: partial,
                    reason: format!("hnsw_rs wrote {name} instead of {BASENAME}"),
                });
            }
        }
        let saved = Saved {
            manifest: self.manifest,
            distance: DISTANCE.to_owned(),
        };
        let graph = partial.join(GRAPH);
        let mut out = std::io::BufWriter::new(std::fs::File::create(&graph).map_err(io(&graph))?);
        self.flat.write(&mut out).map_err(io(&graph))?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .map_err(io(&graph))?;
        let manifest = serde_json::to_vec_pretty(&saved).expect("manifest serialises");
        std::fs::write(partial.join(MANIFEST), manifest).map_err(io(&partial))?;

        let _ = std::fs::remove_dir_all(&old);
        if target.exists() {
            std::fs::rename(&target, &old).map_err(io(&target))?;
        }
        std::fs::rename(&partial, &target).map_err(io(&target))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The saved manifest when it equals `expected`.
    fn current_manifest(dir: &Path, expected: Manifest) -> Option<Manifest> {
        let bytes = std::fs::read(dir.join(MANIFEST)).ok()?;
        let saved = serde_json::from_slice::<Saved>(&bytes).ok()?;
        (saved.manifest == expected && saved.distance == DISTANCE).then_some(saved.manifest)
    }

    /// Loads the saved search copy alone when the manifest equals
    /// `expected`: a fraction of the memory and load time of
    /// [`VectorIndex::load`], for a process that only searches. A copy
    /// that is missing (saved by an older version) or damaged is remade
    /// from hnsw_rs's graph, as `load` does. `None` when the saved index is
    /// missing or stale.
    pub fn load_searchable(catalog: &Path, expected: Manifest) -> Result<Option<Self>, IndexError> {
        let dir = catalog.join(INDEX_DIR);
        let Some(manifest) = Self::current_manifest(&dir, expected) else {
            return Ok(None);
        };
        let path = dir.join(GRAPH);
        let read = std::fs::File::open(&path)
            .map_err(graph::GraphFileError::from)
            .and_then(|file| FlatGraph::read(&mut std::io::BufReader::new(file)));
        match read {
            Ok(flat) if flat.len() == manifest.count && flat.dim() == manifest.dim => {
                return Ok(Some(Self {
                    hnsw: None,
                    flat,
                    manifest,
                }));
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "search graph does not match the manifest; remaking it")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "search graph unreadable; remaking it")
            }
        }
        Self::load(catalog, expected)
    }

    /// Loads the saved graph, for inserting, when its manifest equals
    /// `expected`; `None` when there is none or it is stale.
    pub fn load(catalog: &Path, expected: Manifest) -> Result<Option<Self>, IndexError> {
        let dir = catalog.join(INDEX_DIR);
        let Some(manifest) = Self::current_manifest(&dir, expected) else {
            return Ok(None);
        };
        if manifest.count == 0 {
            return Ok(Some(Self::new(manifest.dim, 0)));
        }
        // hnsw_rs ties a loaded graph's lifetime to its loader. The loader is
        // small and a process loads the index once, so it is leaked to get a
        // graph that can live in the server's state.
        let loader: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(&dir, BASENAME)));
        let hnsw: Hnsw<'static, f32, UnitDot> =
            loader.load_hnsw().map_err(|e| IndexError::Hnsw {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
        if hnsw.get_nb_point() != manifest.count {
            return Ok(None);
        }
        let flat = FlatGraph::from_hnsw(&hnsw, manifest.dim);
        Ok(Some(Self {
            hnsw: Some(hnsw),
            flat,
            manifest,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn search_returns_nearest_first_with_cosine_similarity() {
        let a = unit(&[1.0, 0.0, 0.0]);
        let b = unit(&[0.8, 0.6, 0.0]);
        let c = unit(&[0.0, 0.0, 1.0]);
        let index = VectorIndex::build(3, &[(7, &a), (8, &b), (9, &c)]);
        let hits = index.search(&a, 3);
        assert_eq!(
            hits.iter().map(|h| h.sighting_id).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        assert!((hits[1].similarity - 0.8).abs() < 1e-5);
        assert!(hits[2].similarity.abs() < 1e-5);
    }

    #[test]
    fn saved_index_reloads_and_stale_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vectors: Vec<Vec<f32>> = (0..40)
            .map(|i| unit(&[(i as f32).sin(), (i as f32).cos(), 0.1 * i as f32]))
            .collect();
        let items: Vec<(i64, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i as i64 + 1, v.as_slice()))
            .collect();
        let index = VectorIndex::build(3, &items);
        index.save(dir.path()).unwrap();

        let loaded = VectorIndex::load(dir.path(), index.manifest())
            .unwrap()
            .unwrap();
        assert_eq!(loaded.search(&vectors[5], 1)[0].sighting_id, 6);

        let stale = Manifest {
            count: 41,
            ..index.manifest()
        };
        assert!(VectorIndex::load(dir.path(), stale).unwrap().is_none());

        // A manifest without the distance (saved by the cosine versions)
        // is refused too, so the graph is rebuilt.
        let path = dir.path().join(INDEX_DIR).join(MANIFEST);
        std::fs::write(&path, serde_json::to_vec(&index.manifest()).unwrap()).unwrap();
        assert!(VectorIndex::load(dir.path(), index.manifest())
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_saved_search_copy_loads_alone_and_answers_as_the_full_index() {
        let dir = tempfile::tempdir().unwrap();
        let vectors: Vec<Vec<f32>> = (0..300)
            .map(|i| {
                let t = i as f32 * 0.37;
                unit(&[t.sin(), t.cos(), (3.0 * t).sin(), 0.01 * i as f32])
            })
            .collect();
        let items: Vec<(i64, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (10 * i as i64, v.as_slice()))
            .collect();
        let index = VectorIndex::build(4, &items);
        index.save(dir.path()).unwrap();
        let manifest = index.manifest();

        let mut searchable = VectorIndex::load_searchable(dir.path(), manifest)
            .unwrap()
            .unwrap();
        assert!(searchable.hnsw.is_none(), "loaded without hnsw_rs's graph");
        for query in vectors.iter().step_by(7) {
            assert_eq!(searchable.search(query, 10), index.search(query, 10));
        }
        assert!(matches!(
            searchable.insert(&items[..1]),
            Err(IndexError::SearchOnly("insert"))
        ));
        assert!(matches!(
            searchable.save(dir.path()),
            Err(IndexError::SearchOnly("save"))
        ));
        let stale = Manifest {
            count: 299,
            ..manifest
        };
        assert!(VectorIndex::load_searchable(dir.path(), stale)
            .unwrap()
            .is_none());

        // A damaged copy is remade from hnsw_rs's graph.
        let graph = dir.path().join(INDEX_DIR).join(GRAPH);
        let bytes = std::fs::read(&graph).unwrap();
        std::fs::write(&graph, &bytes[..bytes.len() - 5]).unwrap();
        let remade = VectorIndex::load_searchable(dir.path(), manifest)
            .unwrap()
            .unwrap();
        assert!(remade.hnsw.is_some());
        assert_eq!(remade.search(&vectors[3], 5), index.search(&vectors[3], 5));
    }

    #[test]
    fn dot_product_matches_the_plain_sum_at_any_length() {
        for n in [1, 15, 16, 17, 256, 1283] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7) % 11) as f32 / 10.0 - 0.5).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5) % 13) as f32 / 12.0 - 0.5).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - plain).abs() < 1e-4, "{n}");
            assert!(
                (dot_lanes::<false>(&a, &b) as f64 - plain).abs() < 1e-4,
                "{n}"
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has just been seen to support both.
                let avx2 = unsafe { dot_avx2(&a, &b) };
                assert!((avx2 as f64 - plain).abs() < 1e-4, "{n}");
            }
        }
        // A unit vector against itself is at distance 0, never below.
        let u = unit(&[0.3, 0.4, 0.5, 0.6, 0.7]);
        assert!(UnitDot.eval(&u, &u) >= 0.0);
        assert!(UnitDot.eval(&u, &u) < 1e-6);
    }
}
