//! Ranking whales for a query photo, and the `new_whale` rule.
//!
//! A whale's score is the cosine similarity of its best-matching sighting
//! among the query's nearest neighbours. Whales are ranked by that score and
//! `new_whale` is inserted at the first rank whose score falls below the
//! threshold, so a query unlike anything in the catalog gets `new_whale`
//! first, and a clear match keeps its whale first with `new_whale` as a
//! later guess.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use image::RgbImage;
use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, Sighting};
use crate::embed::{EmbedError, Embedder};
use crate::index::{Hit, IndexError, Manifest, VectorIndex};
use crate::labels::NEW_WHALE;
use crate::score::average_precision;

/// Number of answers per query, as in the Kaggle competition.
pub const TOP: usize = 5;

/// Neighbours searched per query: enough that five distinct whales are
/// found even when the best whales have many sightings each.
pub const NEIGHBOURS: usize = 64;

/// Threshold used when neither the command line nor the catalog gives one.
/// It is the value `flukeid calibrate` chose on the flukes-dev catalog with
/// the ImageNet backbone (see docs/evaluation.md); calibrate your own catalog.
pub const DEFAULT_THRESHOLD: f32 = 0.82;

/// One ranked answer.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Prediction {
    /// A catalogued whale id, or `new_whale`.
    pub whale_id: String,
    /// Cosine similarity of the best-matching sighting; for `new_whale`,
    /// the threshold.
    pub score: f32,
    /// The best-matching sighting, for known whales.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sighting: Option<Sighting>,
}

/// Ranks whales from neighbour hits (any order) and inserts `new_whale`.
/// Returns at most `top` distinct ids; fewer only when the catalog holds
/// fewer than `top − 1` whales.
pub fn rank(hits: &[(Hit, &Sighting)], threshold: f32, top: usize) -> Vec<Prediction> {
    let mut best: HashMap<&str, (f32, &Sighting)> = HashMap::new();
    for (hit, sighting) in hits {
        let entry = best
            .entry(sighting.whale_id.as_str())
            .or_insert((hit.similarity, sighting));
        if hit.similarity > entry.0 {
            *entry = (hit.similarity, sighting);
        }
    }
    let mut whales: Vec<(&str, f32, &Sighting)> = best
        .into_iter()
        .filter(|(whale, _)| *whale != NEW_WHALE)
        .map(|(whale, (score, sighting))| (whale, score, sighting))
        .collect();
    // Ties broken by id so the answer does not depend on hash order.
    whales.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));

    let mut out = Vec::with_capacity(top);
    let mut new_whale_placed = false;
    for (whale, score, sighting) in whales {
        if out.len() == top {
            break;
        }
        if !new_whale_placed && score < threshold {
            out.push(new_whale(threshold));
            new_whale_placed = true;
            if out.len() == top {
                break;
            }
        }
        out.push(Prediction {
            whale_id: whale.to_owned(),
            score,
            sighting: Some(sighting.clone()),
        });
    }
    if !new_whale_placed && out.len() < top {
        out.push(new_whale(threshold));
    }
    out
}

fn new_whale(threshold: f32) -> Prediction {
    Prediction {
        whale_id: NEW_WHALE.to_owned(),
        score: threshold,
        sighting: None,
    }
}

/// Why identification could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Embed(Box<EmbedError>),
}

impl From<EmbedError> for IdentifyError {
    fn from(e: EmbedError) -> Self {
        Self::Embed(Box::new(e))
    }
}

/// A loaded catalog with its index and the embedder that fills it: all
/// that is needed to answer queries.
#[derive(Debug)]
pub struct Identifier {
    embedder: Embedder,
    sightings: HashMap<i64, Sighting>,
    index: VectorIndex,
    threshold: f32,
    whales: usize,
}

impl Identifier {
    /// Loads the catalog in `dir` (an absent one is empty) and its index,
    /// rebuilding and saving the index when it is missing or stale.
    /// `threshold` overrides the catalog's calibrated one.
    pub fn open(
        dir: &Path,
        embedder: Embedder,
        threshold: Option<f32>,
    ) -> Result<Self, IdentifyError> {
        let catalog = Catalog::open_existing(dir)?;
        let (rows, stored_threshold) = match &catalog {
            Some(c) => {
                c.check_fingerprint(&embedder.fingerprint())?;
                (c.load_all()?, c.threshold()?)
            }
            None => (Vec::new(), None),
        };
        let expected = Manifest {
            count: rows.len(),
            max_id: rows.iter().map(|(s, _)| s.id).max().unwrap_or(0),
            dim: embedder.dim(),
        };
        let index = match VectorIndex::load_searchable(dir, expected)? {
            Some(index) => index,
            None => {
                let items: Vec<(i64, &[f32])> =
                    rows.iter().map(|(s, v)| (s.id, v.as_slice())).collect();
                let index = VectorIndex::build(embedder.dim(), &items);
                if catalog.is_some() {
                    index.save(dir)?;
                    tracing::info!(sightings = index.len(), "index rebuilt from the catalog");
                }
                index
            }
        };
        let whales = rows
            .iter()
            .map(|(s, _)| s.whale_id.as_str())
            .collect::<HashSet<_>>()
            .len();
        let sightings = rows.into_iter().map(|(s, _)| (s.id, s)).collect();
        Ok(Self {
            embedder,
            sightings,
            index,
            threshold: threshold.or(stored_threshold).unwrap_or(DEFAULT_THRESHOLD),
            whales,
        })
    }

    /// The embedder queries go through.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// The `new_whale` threshold in use.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Number of catalogued sightings.
    pub fn sightings(&self) -> usize {
        self.sightings.len()
    }

    /// Number of distinct catalogued whales.
    pub fn whales(&self) -> usize {
        self.whales
    }

    /// The sightings of one whale, oldest first; empty when unknown.
    pub fn whale_sightings(&self, whale_id: &str) -> Vec<Sighting> {
        let mut found: Vec<Sighting> = self
            .sightings
            .values()
            .filter(|s| s.whale_id == whale_id)
            .cloned()
            .collect();
        found.sort_by_key(|s| s.id);
        found
    }

    /// The nearest sightings of an embedding, each with its record.
    pub fn neighbours(&self, embedding: &[f32], k: usize) -> Vec<(Hit, &Sighting)> {
        self.index
            .search(embedding, k)
            .into_iter()
            .filter_map(|hit| self.sightings.get(&hit.sighting_id).map(|s| (hit, s)))
            .collect()
    }

    /// The five answers for an embedding.
    pub fn identify_embedding(&self, embedding: &[f32]) -> Vec<Prediction> {
        self.identify_with_neighbours(embedding).0
    }

    /// The five answers for an embedding, and the nearest sightings they
    /// were ranked from.
    pub fn identify_with_neighbours(
        &self,
        embedding: &[f32],
    ) -> (Vec<Prediction>, Vec<(Hit, &Sighting)>) {
        let neighbours = self.neighbours(embedding, NEIGHBOURS);
        (rank(&neighbours, self.threshold, TOP), neighbours)
    }

    /// The five answers for each of a batch of decoded photos.
    pub fn identify_images(
        &self,
        images: &[RgbImage],
    ) -> Result<Vec<Vec<Prediction>>, IdentifyError> {
        let inputs: Vec<Vec<f32>> = images.iter().map(|i| self.embedder.prepare(i)).collect();
        self.identify_inputs(&inputs)
    }

    /// The five answers for each of a batch of inputs already prepared with
    /// [`Embedder::prepare`].
    pub fn identify_inputs(
        &self,
        inputs: &[Vec<f32>],
    ) -> Result<Vec<Vec<Prediction>>, IdentifyError> {
        let embeddings = self.embedder.embed_inputs(inputs)?;
        Ok(embeddings
            .iter()
            .map(|e| self.identify_embedding(e))
            .collect())
    }
}

/// Result of a leave-one-out calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub threshold: f32,
    /// Leave-one-out MAP@5 at that threshold.
    pub map5: f64,
    /// Queries whose whale had another sighting (the rest count as new).
    pub known: usize,
    pub new: usize,
}

/// Chooses the threshold that maximises MAP@5 when each catalogued sighting
/// in turn is a query against all the others. A sighting whose whale has no
/// other sighting plays a `new_whale` query. By default the catalog's own
/// mix of repeat and one-off whales decides the balance; `new_share`
/// instead weighs the two kinds of query so that new whales make up that
/// share of the queries, for a catalog whose mix differs from the queries
/// it will see. Candidate thresholds are 0.00, 0.01, … 1.00; ties go to the
/// lowest.
pub fn calibrate(rows: &[(Sighting, Vec<f32>)], new_share: Option<f64>) -> Option<Calibration> {
    if rows.len() < 2 {
        return None;
    }
    let dim = rows[0].1.len();
    let items: Vec<(i64, &[f32])> = rows.iter().map(|(s, v)| (s.id, v.as_slice())).collect();
    let index = VectorIndex::build(dim, &items);
    let by_id: HashMap<i64, &Sighting> = rows.iter().map(|(s, _)| (s.id, s)).collect();
    let mut per_whale: HashMap<&str, usize> = HashMap::new();
    for (s, _) in rows {
        *per_whale.entry(s.whale_id.as_str()).or_default() += 1;
    }

    let queries: Vec<(Vec<(Hit, &Sighting)>, &str)> = rows
        .iter()
        .map(|(s, v)| {
            let hits = index
                .search(v, NEIGHBOURS + 1)
                .into_iter()
                .filter(|h| h.sighting_id != s.id)
                .filter_map(|h| by_id.get(&h.sighting_id).map(|t| (h, *t)))
                .collect();
            let truth = if per_whale[s.whale_id.as_str()] > 1 {
                s.whale_id.as_str()
            } else {
                NEW_WHALE
            };
            (hits, truth)
        })
        .collect();

    let new = queries.iter().filter(|(_, t)| *t == NEW_WHALE).count();
    let known = queries.len() - new;
    // Weight of one query of each kind.
    let (w_new, w_known) = match new_share {
        Some(share) if new > 0 && known > 0 => (share / new as f64, (1.0 - share) / known as f64),
        _ => (1.0 / queries.len() as f64, 1.0 / queries.len() as f64),
    };

    let mut best: Option<Calibration> = None;
    for step in 0..=100 {
        let threshold = step as f32 / 100.0;
        let map5: f64 = queries
            .iter()
            .map(|(hits, truth)| {
                let ids: Vec<String> = rank(hits, threshold, TOP)
                    .into_iter()
                    .map(|p| p.whale_id)
                    .collect();
                let weight = if *truth == NEW_WHALE { w_new } else { w_known };
                weight * average_precision(&ids, truth)
            })
            .sum();
        if best.as_ref().is_none_or(|b| map5 > b.map5 + 1e-12) {
            best = Some(Calibration {
                threshold,
                map5,
                known,
                new,
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sighting(id: i64, whale: &str) -> Sighting {
        Sighting {
            id,
            image: format!("{id}.jpg"),
            whale_id: whale.to_owned(),
            added_at: "2026-12-04T00:00:00Z".to_owned(),
        }
    }

    fn ids(p: &[Prediction]) -> Vec<&str> {
        p.iter().map(|p| p.whale_id.as_str()).collect()
    }

    fn hits<'a>(list: &[(i64, f32)], records: &'a [Sighting]) -> Vec<(Hit, &'a Sighting)> {
        list.iter()
            .map(|&(id, similarity)| {
                let s = records.iter().find(|s| s.id == id).unwrap();
                (
                    Hit {
                        sighting_id: id,
                        similarity,
                    },
                    s,
                )
            })
            .collect()
    }

    fn records() -> Vec<Sighting> {
        vec![
            sighting(1, "w_a"),
            sighting(2, "w_a"),
            sighting(3, "w_b"),
            sighting(4, "w_c"),
            sighting(5, "w_d"),
            sighting(6, "w_e"),
            sighting(7, "w_f"),
        ]
    }

    #[test]
    fn whale_ranked_by_best_sighting_without_duplicates() {
        let r = records();
        let h = hits(
            &[
                (1, 0.70),
                (3, 0.92),
                (2, 0.95),
                (4, 0.91),
                (5, 0.90),
                (6, 0.89),
            ],
            &r,
        );
        let p = rank(&h, 0.5, TOP);
        assert_eq!(ids(&p), ["w_a", "w_b", "w_c", "w_d", "w_e"]);
        assert_eq!(p[0].score, 0.95);
        assert_eq!(p[0].sighting.as_ref().unwrap().id, 2);
    }

    #[test]
    fn identify_inserts_new_whale_below_threshold() {
        let r = records();
        let h = hits(&[(1, 0.95), (3, 0.85), (4, 0.75), (5, 0.70)], &r);
        let p = rank(&h, 0.80, TOP);
        assert_eq!(ids(&p), ["w_a", "w_b", "new_whale", "w_c", "w_d"]);
        assert_eq!(p[2].score, 0.80);
        assert!(p[2].sighting.is_none());
    }

    #[test]
    fn new_whale_first_when_nothing_is_similar() {
        let r = records();
        let h = hits(&[(1, 0.30), (3, 0.20), (4, 0.10), (5, 0.05), (6, 0.01)], &r);
        assert_eq!(
            ids(&rank(&h, 0.5, TOP)),
            ["new_whale", "w_a", "w_b", "w_c", "w_d"]
        );
    }

    #[test]
    fn new_whale_last_when_five_whales_all_pass() {
        let r = records();
        let h = hits(
            &[
                (1, 0.99),
                (3, 0.98),
                (4, 0.97),
                (5, 0.96),
                (6, 0.95),
                (7, 0.94),
            ],
            &r,
        );
        assert_eq!(
            ids(&rank(&h, 0.5, TOP)),
            ["w_a", "w_b", "w_c", "w_d", "w_e"]
        );
        let h = hits(&[(1, 0.99), (3, 0.98)], &r);
        assert_eq!(ids(&rank(&h, 0.5, TOP)), ["w_a", "w_b", "new_whale"]);
    }

    #[test]
    fn empty_catalog_answers_new_whale_only() {
        assert_eq!(ids(&rank(&[], 0.5, TOP)), ["new_whale"]);
    }

    #[test]
    fn calibration_separates_repeat_whales_from_singletons() {
        // Two whales with two close sightings each, two singletons far from
        // everything: any threshold between the cross and same-whale
        // similarities gives a perfect leave-one-out score.
        let rows = vec![
            (sighting(1, "w_a"), vec![1.0, 0.0, 0.0]),
            (sighting(2, "w_a"), vec![0.98, 0.199, 0.0]),
            (sighting(3, "w_b"), vec![0.0, 1.0, 0.0]),
            (sighting(4, "w_b"), vec![0.199, 0.98, 0.0]),
            (sighting(5, "w_c"), vec![0.0, 0.0, 1.0]),
            (sighting(6, "w_d"), vec![0.6, 0.0, -0.8]),
        ];
        let c = calibrate(&rows, None).unwrap();
        assert_eq!((c.known, c.new), (4, 2));
        assert!((c.map5 - 1.0).abs() < 1e-9, "{c:?}");
        assert!(c.threshold > 0.6 && c.threshold <= 0.98, "{c:?}");
    }

    #[test]
    fn calibration_share_of_new_whales_moves_the_threshold() {
        // One repeat whale whose sightings are only 0.7 alike, and a
        // singleton 0.8 from one of them. Only a threshold of about 0.8 puts
        // new_whale first for the singleton, and that costs the repeat
        // whale's queries; the expected share of new whales decides.
        let rows = vec![
            (sighting(1, "w_a"), vec![1.0, 0.0]),
            (sighting(2, "w_a"), vec![0.7, 0.714_142_8]),
            (sighting(3, "w_b"), vec![0.8, -0.6]),
        ];
        let mostly_new = calibrate(&rows, Some(0.9)).unwrap();
        let mostly_known = calibrate(&rows, Some(0.1)).unwrap();
        assert!(mostly_new.threshold > 0.75, "{mostly_new:?}");
        assert!(mostly_known.threshold <= 0.7, "{mostly_known:?}");
    }
}
