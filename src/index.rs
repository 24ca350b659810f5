//! The HNSW index over catalogued embeddings (cosine distance on unit
//! vectors), saved beside the catalog so a restart does not rebuild it.
//!
//! The catalog database is the source of truth. The saved graph carries a
//! manifest with the number of sightings and the largest sighting id it
//! holds; when they do not match the catalog (an interrupted run, a catalog
//! copied without its index) the index is rebuilt from the stored vectors.

use std::path::{Path, PathBuf};

use hnsw_rs::api::AnnT;
use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::{DistCosine, Hnsw};
use serde::{Deserialize, Serialize};

/// Folder of the saved graph inside a catalog folder.
pub const INDEX_DIR: &str = "hnsw";
const BASENAME: &str = "sightings";
const MANIFEST: &str = "manifest.json";

/// Links per node. 16 is the usual trade-off between recall and memory.
const MAX_CONNECTIONS: usize = 16;
/// Candidate list while building; high for recall, paid once per insert.
const EF_CONSTRUCTION: usize = 200;
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
    hnsw: Hnsw<'static, f32, DistCosine>,
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
            DistCosine {},
        );
        Self {
            hnsw,
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
        index.insert(items);
        index
    }

    /// Adds `(sighting id, vector)` pairs, in parallel.
    pub fn insert(&mut self, items: &[(i64, &[f32])]) {
        if items.is_empty() {
            return;
        }
        let data: Vec<(&[f32], usize)> = items.iter().map(|(id, v)| (*v, *id as usize)).collect();
        self.hnsw.parallel_insert_slice(&data);
        self.manifest.count += items.len();
        self.manifest.max_id = items
            .iter()
            .map(|(id, _)| *id)
            .fold(self.manifest.max_id, i64::max);
    }

    /// What the index holds.
    pub fn manifest(&self) -> Manifest {
        self.manifest
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
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        // A wide candidate list: the catalogs are small enough that exact
        // recall of the top 50 is worth a few extra distance computations.
        let ef = (2 * k).max(128);
        let mut hits: Vec<Hit> = self
            .hnsw
            .search(query, k, ef)
            .into_iter()
            .map(|n| Hit {
                sighting_id: n.d_id as i64,
                similarity: 1.0 - n.distance,
            })
            .collect();
        hits.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        hits
    }

    /// Saves the graph to `catalog/hnsw/`. It is written to a temporary
    /// folder first and swapped in, so a crash leaves the old one or the new
    /// one, never a mix.
    pub fn save(&self, catalog: &Path) -> Result<(), IndexError> {
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
            let name = self
                .hnsw
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
        let manifest = serde_json::to_vec_pretty(&self.manifest).expect("manifest serialises");
        std::fs::write(partial.join(MANIFEST), manifest).map_err(io(&partial))?;

        let _ = std::fs::remove_dir_all(&old);
        if target.exists() {
            std::fs::rename(&target, &old).map_err(io(&target))?;
        }
        std::fs::rename(&partial, &target).map_err(io(&target))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Loads the saved graph when its manifest equals `expected`; `None`
    /// when there is none or it is stale.
    pub fn load(catalog: &Path, expected: Manifest) -> Result<Option<Self>, IndexError> {
        let dir = catalog.join(INDEX_DIR);
        let Ok(bytes) = std::fs::read(dir.join(MANIFEST)) else {
            return Ok(None);
        };
        let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
            return Ok(None);
        };
        if manifest != expected {
            return Ok(None);
        }
        if manifest.count == 0 {
            return Ok(Some(Self::new(manifest.dim, 0)));
        }
        // hnsw_rs ties a loaded graph's lifetime to its loader. The loader is
        // small and a process loads the index once, so it is leaked to get a
        // graph that can live in the server's state.
        let loader: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(&dir, BASENAME)));
        let hnsw: Hnsw<'static, f32, DistCosine> =
            loader.load_hnsw().map_err(|e| IndexError::Hnsw {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
        if hnsw.get_nb_point() != manifest.count {
            return Ok(None);
        }
        Ok(Some(Self { hnsw, manifest }))
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
    }
}
