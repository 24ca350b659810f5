//! Adding a labelled folder of photos to a catalog: check the label file,
//! embed what is new, then store it all at once.
//!
//! Everything that can fail on the input (a bad row, a missing or
//! undecodable photo, a whale id that contradicts the catalog) fails before
//! the catalog is touched, so a failed run leaves it exactly as it was.

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, CatalogError, NewSighting};
use crate::embed::Embedder;
use crate::index::{IndexError, Manifest, VectorIndex};
use crate::labels::{self, LabelsError, NEW_WHALE};
use crate::photo::DecodeLimits;
use crate::score::{self, ScoreError};

/// Why a folder could not be added.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Labels(#[from] LabelsError),
    #[error("{0}: no such folder")]
    NoFolder(PathBuf),
    #[error("{labels}:{line}: {image} is already catalogued as {stored}, this file says {given}")]
    Conflict {
        labels: PathBuf,
        line: u64,
        image: String,
        stored: String,
        given: String,
    },
    #[error("{labels}:{line}: {source}")]
    Photo {
        labels: PathBuf,
        line: u64,
        source: Box<ScoreError>,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// What an ingest run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReport {
    pub added: usize,
    pub already_catalogued: usize,
    pub new_whale_rows: usize,
    pub total_sightings: usize,
}

/// Options of an ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub batch: usize,
    pub limits: DecodeLimits,
    pub progress: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            limits: DecodeLimits::default(),
            progress: false,
        }
    }
}

/// Adds the photos of `images` listed in `labels` (`Image,Id`) to the
/// catalog in `catalog_dir`, creating it if needed. Rows labelled
/// `new_whale` are not a whale and are skipped; photos already in the
/// catalog are skipped, so running again on a bigger folder adds only what
/// is new.
pub fn ingest_folder(
    embedder: &Embedder,
    images: &Path,
    labels_path: &Path,
    catalog_dir: &Path,
    options: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let rows = labels::read_labels(labels_path)?;
    if !images.is_dir() {
        return Err(IngestError::NoFolder(images.to_owned()));
    }
    labels::check_images_exist(&rows, images, labels_path)?;

    let existing = match Catalog::open_existing(catalog_dir)? {
        Some(catalog) => {
            catalog.check_fingerprint(&embedder.fingerprint())?;
            catalog.images()?
        }
        None => Default::default(),
    };
    let mut todo = Vec::new();
    let (mut already, mut new_whale_rows) = (0, 0);
    for row in &rows {
        if row.id == NEW_WHALE {
            new_whale_rows += 1;
            continue;
        }
        match existing.get(&row.image) {
            Some(stored) if *stored == row.id => already += 1,
            Some(stored) => {
                return Err(IngestError::Conflict {
                    labels: labels_path.to_owned(),
                    line: row.line,
                    image: row.image.clone(),
                    stored: stored.clone(),
                    given: row.id.clone(),
                })
            }
            None => todo.push(row),
        }
    }

    let names: Vec<String> = todo.iter().map(|r| r.image.clone()).collect();
    let bar = score::progress_bar(names.len() as u64, options.progress, "embedding");
    let mut new = Vec::with_capacity(todo.len());
    let result = score::decode_batches(
        images,
        &names,
        options.batch,
        options.limits,
        embedder.input(),
        |chunk, inputs| {
            let vectors = embedder
                .embed_inputs(&inputs)
                .map_err(|e| ScoreError::from(crate::identify::IdentifyError::from(e)))?;
            for (name, embedding) in chunk.iter().zip(vectors) {
                let row = todo[new.len()];
                debug_assert_eq!(&row.image, name);
                new.push(NewSighting {
                    image: name.clone(),
                    whale_id: row.id.clone(),
                    embedding,
                });
            }
            bar.inc(chunk.len() as u64);
            Ok(())
        },
    );
    bar.finish_and_clear();
    if let Err(source) = result {
        let line = match &source {
            ScoreError::Photo { path, .. } | ScoreError::Io { path, .. } => todo
                .iter()
                .find(|r| images.join(&r.image) == *path)
                .map_or(0, |r| r.line),
            _ => 0,
        };
        return Err(IngestError::Photo {
            labels: labels_path.to_owned(),
            line,
            source: Box::new(source),
        });
    }

    let mut catalog = Catalog::create_or_open(catalog_dir)?;
    let (count, max_id) = catalog.extent()?;
    let before = Manifest {
        count,
        max_id,
        dim: embedder.dim(),
    };
    let ids = catalog.add(&embedder.fingerprint(), &new)?;
    update_index(&catalog, catalog_dir, before, &ids, &new)?;
    let total_sightings = catalog.len()?;
    tracing::info!(
        added = new.len(),
        already_catalogued = already,
        total_sightings,
        catalog = %catalog_dir.display(),
        "catalog updated"
    );
    Ok(IngestReport {
        added: new.len(),
        already_catalogued: already,
        new_whale_rows,
        total_sightings,
    })
}

/// Adds the new vectors to the saved index, or rebuilds it from the catalog
/// when the saved one does not match what the catalog held `before` the
/// new sightings (only then are the stored vectors read back).
fn update_index(
    catalog: &Catalog,
    dir: &Path,
    before: Manifest,
    ids: &[i64],
    new: &[NewSighting],
) -> Result<(), IngestError> {
    let index = match VectorIndex::load(dir, before)? {
        // Nothing new and the saved graph is current: leave it as it is.
        Some(_) if ids.is_empty() => return Ok(()),
        Some(mut index) => {
            let items: Vec<(i64, &[f32])> = ids
                .iter()
                .zip(new)
                .map(|(id, s)| (*id, s.embedding.as_slice()))
                .collect();
            index.insert(&items)?;
            index
        }
        None => {
            let all = catalog.load_all()?;
            let items: Vec<(i64, &[f32])> = all.iter().map(|(s, v)| (s.id, v.as_slice())).collect();
            VectorIndex::build(before.dim, &items)
        }
    };
    index.save(dir)?;
    Ok(())
}
