//! A synthetic catalog of embeddings shaped like a whale catalog, for
//! measuring the index at sizes no real catalog reaches yet.
//!
//! Each identity (a whale) gets a Gaussian centre whose spread falls with
//! the coordinate, as `(1 + i)^-spectrum`, scaled to unit length; each of
//! its sightings is the centre plus isotropic Gaussian noise, scaled back
//! to unit length. A falling spectrum makes the centres crowd into a few
//! directions, as learned embeddings do; with `spectrum` 0 they are uniform
//! on the sphere, which in 256 dimensions leaves a graph search nothing to
//! steer by until it is next to the answer. How many sightings an identity has follows
//! the Kaggle 2019 training set: the 5,004 named whales' sighting counts,
//! plus one-sighting identities standing for its 9,664 `new_whale` photos.
//! That makes most identities singletons and gives a mean of 1.73
//! sightings per identity.
//!
//! Queries are held-out sightings of identities with two or more, so every
//! query has at least one sighting of its own identity in the catalog.
//! Everything is drawn from a seeded generator of this module, so a seed
//! gives the same vectors on every machine and thread count.
//!
//! Real embeddings' spectra and noise are not these; the vectors only give
//! the index a task of the right shape and size.

use rayon::prelude::*;

/// Sightings per named whale in the Kaggle 2019 training set, and how many
/// whales have that many (`identity_sizes.csv` of the data set's notes).
const NAMED_WHALE_SIZES: [(u32, u32); 48] = [
    (1, 2073),
    (2, 1285),
    (3, 568),
    (4, 273),
    (5, 172),
    (6, 136),
    (7, 86),
    (8, 76),
    (9, 62),
    (10, 46),
    (11, 39),
    (12, 26),
    (13, 14),
    (14, 16),
    (15, 19),
    (16, 16),
    (17, 17),
    (18, 6),
    (19, 8),
    (20, 7),
    (21, 7),
    (22, 5),
    (23, 4),
    (24, 7),
    (25, 2),
    (27, 1),
    (29, 2),
    (30, 3),
    (31, 3),
    (32, 1),
    (33, 1),
    (34, 2),
    (35, 1),
    (36, 1),
    (37, 3),
    (40, 3),
    (45, 2),
    (47, 1),
    (48, 1),
    (49, 1),
    (50, 1),
    (51, 1),
    (54, 1),
    (57, 1),
    (61, 1),
    (62, 1),
    (65, 1),
    (73, 1),
];

/// `new_whale` photos of the same training set; each is taken as an
/// identity of its own.
const NEW_WHALE_SIGHTINGS: u32 = 9_664;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CatalogShape {
    /// Sightings in the catalog (queries not counted).
    pub vectors: usize,
    /// Held-out sightings to search for.
    pub queries: usize,
    pub dim: usize,
    /// Length of a sighting's noise relative to its unit-length centre.
    /// Two sightings of a whale are about `1 / (1 + noise²)` alike
    /// (cosine): 0.8 at noise 0.5.
    pub noise: f32,
    /// How fast the centres' spread falls with the coordinate (0: uniform
    /// on the sphere).
    pub spectrum: f32,
    pub seed: u64,
}

/// Why a catalog of that shape cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("vectors and dimension must be at least 1")]
    Empty,
    #[error(
        "{queries} queries need as many identities with two or more sightings; \
         {vectors} vectors give only {available}"
    )]
    TooFewRepeatIdentities {
        queries: usize,
        vectors: usize,
        available: usize,
    },
}

/// The generated catalog and queries.
#[derive(Debug, Clone)]
pub struct SyntheticCatalog {
    pub dim: usize,
    /// Catalog vectors, row after row, in a shuffled order so that the
    /// sightings of a whale do not arrive together.
    pub vectors: Vec<f32>,
    /// Identity of each catalog row.
    pub identities: Vec<u32>,
    /// Query vectors, row after row.
    pub queries: Vec<f32>,
    /// Identity of each query.
    pub query_identities: Vec<u32>,
    /// Catalog sightings of each identity (held-out ones not counted).
    pub members: Vec<u32>,
}

impl SyntheticCatalog {
    /// Number of catalog rows.
    pub fn len(&self) -> usize {
        self.identities.len()
    }

    /// True when the catalog has no rows.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// Catalog row `i`.
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// Query `i`.
    pub fn query(&self, i: usize) -> &[f32] {
        &self.queries[i * self.dim..(i + 1) * self.dim]
    }
}

/// Generates the catalog and queries of `shape`, in parallel on the
/// current rayon pool.
pub fn generate(shape: &CatalogShape) -> Result<SyntheticCatalog, ShapeError> {
    if shape.vectors == 0 || shape.dim == 0 {
        return Err(ShapeError::Empty);
    }
    let mut rng = Rng::new(shape.seed, 0);
    let sizes = identity_sizes(&mut rng, shape.vectors + shape.queries);

    let repeat: Vec<u32> = (0..sizes.len() as u32)
        .filter(|&i| sizes[i as usize] >= 2)
        .collect();
    if repeat.len() < shape.queries {
        return Err(ShapeError::TooFewRepeatIdentities {
            queries: shape.queries,
            vectors: shape.vectors,
            available: repeat.len(),
        });
    }
    let mut query_identities = repeat;
    partial_shuffle(&mut rng, &mut query_identities, shape.queries);
    query_identities.truncate(shape.queries);
    query_identities.sort_unstable();

    let mut members = sizes.clone();
    for &identity in &query_identities {
        members[identity as usize] -= 1;
    }
    // Sighting 0 of a query's identity is the query; sightings are drawn
    // alike, so which one does not matter.
    let mut rows: Vec<(u32, u32)> = Vec::with_capacity(shape.vectors);
    for (identity, &size) in sizes.iter().enumerate() {
        let held_out = query_identities.binary_search(&(identity as u32)).is_ok();
        for member in u32::from(held_out)..size {
            rows.push((identity as u32, member));
        }
    }
    let len = rows.len();
    partial_shuffle(&mut rng, &mut rows, len);

    // Every sighting is drawn from streams of its own, straight into its
    // row, so the result does not depend on how rayon splits the work and
    // no second copy of the vectors is ever held.
    let spread: Vec<f64> = (0..shape.dim)
        .map(|i| (1.0 + i as f64).powf(-f64::from(shape.spectrum)))
        .collect();
    let mut vectors = vec![0.0f32; rows.len() * shape.dim];
    vectors
        .par_chunks_mut(shape.dim)
        .zip(&rows)
        .for_each(|(out, &(identity, member))| sighting(shape, &spread, identity, member, out));
    let mut queries = vec![0.0f32; query_identities.len() * shape.dim];
    queries
        .par_chunks_mut(shape.dim)
        .zip(&query_identities)
        .for_each(|(out, &identity)| sighting(shape, &spread, identity, 0, out));

    Ok(SyntheticCatalog {
        dim: shape.dim,
        vectors,
        identities: rows.iter().map(|(identity, _)| *identity).collect(),
        queries,
        query_identities,
        members,
    })
}

/// Sighting counts of identities until they add up to `total` (the last
/// one cut short if need be).
fn identity_sizes(rng: &mut Rng, total: usize) -> Vec<u32> {
    let mut table: Vec<(u32, u64)> = NAMED_WHALE_SIZES
        .iter()
        .map(|&(size, whales)| (size, u64::from(whales)))
        .collect();
    table[0].1 += u64::from(NEW_WHALE_SIGHTINGS);
    let identities: u64 = table.iter().map(|(_, n)| n).sum();

    let mut sizes = Vec::new();
    let mut sum = 0usize;
    while sum < total {
        let mut pick = rng.below(identities);
        let mut size = table[table.len() - 1].0;
        for &(s, n) in &table {
            if pick < n {
                size = s;
                break;
            }
            pick -= n;
        }
        let size = size.min((total - sum) as u32);
        sizes.push(size);
        sum += size as usize;
    }
    sizes
}

/// Sighting `member` of identity `identity`, written to `out`; `spread`
/// holds the centres' standard deviation per coordinate.
fn sighting(shape: &CatalogShape, spread: &[f64], identity: u32, member: u32, out: &mut [f32]) {
    let dim = shape.dim;
    let mut rng = Rng::new(shape.seed, u64::from(identity) + 1);
    let mut v: Vec<f64> = spread.iter().map(|s| s * rng.normal()).collect();
    scale_to_unit(&mut v);

    // Noise of expected length `noise`: each coordinate has variance
    // noise² / dim.
    let sigma = f64::from(shape.noise) / (dim as f64).sqrt();
    let stream = (u64::from(identity) << 32) | u64::from(member);
    let mut rng = Rng::new(shape.seed ^ 0x4E01_5E00, stream);
    for x in &mut v {
        *x += sigma * rng.normal();
    }
    scale_to_unit(&mut v);
    for (o, x) in out.iter_mut().zip(&v) {
        *o = *x as f32;
    }
}

fn scale_to_unit(v: &mut [f64]) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Puts a uniformly chosen sample of `count` items, in random order, at the
/// front of `items` (the first steps of a Fisher–Yates shuffle).
fn partial_shuffle<T>(rng: &mut Rng, items: &mut [T], count: usize) {
    let n = items.len();
    for i in 0..count.min(n.saturating_sub(1)) {
        let j = i + rng.below((n - i) as u64) as usize;
        items.swap(i, j);
    }
}

/// xoshiro256++ seeded through SplitMix64: small, fast, and the same on
/// every platform, so a seed names one catalog for good.
struct Rng {
    state: [u64; 4],
    spare_normal: Option<f64>,
}

impl Rng {
    /// The generator of stream `stream` under `seed`.
    fn new(seed: u64, stream: u64) -> Self {
        let mut x = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            state: [next(), next(), next(), next()],
            spare_normal: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n); the bias of the multiply-shift is below 2⁻⁴⁰ for
    /// the sizes used here.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Standard normal, by the Box–Muller transform (two per pair of
    /// uniforms).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        let r = (-2.0 * u.ln()).sqrt();
        let angle = std::f64::consts::TAU * v;
        self.spare_normal = Some(r * angle.sin());
        r * angle.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(vectors: usize, queries: usize) -> CatalogShape {
        CatalogShape {
            vectors,
            queries,
            dim: 16,
            noise: 0.65,
            spectrum: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_catalog() {
        let a = generate(&shape(2_000, 50)).unwrap();
        let b = generate(&shape(2_000, 50)).unwrap();
        assert_eq!(a.vectors, b.vectors);
        assert_eq!(a.queries, b.queries);
        assert_eq!(a.identities, b.identities);
        let c = generate(&CatalogShape {
            seed: 8,
            ..shape(2_000, 50)
        })
        .unwrap();
        assert_ne!(a.vectors, c.vectors);
    }

    #[test]
    fn catalog_has_the_asked_size_and_unit_vectors() {
        let c = generate(&shape(3_000, 100)).unwrap();
        assert_eq!(c.len(), 3_000);
        assert_eq!(c.vectors.len(), 3_000 * 16);
        assert_eq!(c.queries.len(), 100 * 16);
        for i in (0..c.len()).step_by(97) {
            let norm: f32 = c.vector(i).iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-5);
        }
        let counted = c.members.iter().map(|&m| m as usize).sum::<usize>();
        assert_eq!(counted, c.len());
    }

    #[test]
    fn every_query_keeps_a_sighting_of_its_whale_in_the_catalog() {
        let c = generate(&shape(3_000, 200)).unwrap();
        for (i, &identity) in c.query_identities.iter().enumerate() {
            assert!(c.members[identity as usize] >= 1);
            let row = c
                .identities
                .iter()
                .position(|&r| r == identity)
                .expect("a catalog row of the query's whale");
            let similarity: f32 = c
                .query(i)
                .iter()
                .zip(c.vector(row))
                .map(|(a, b)| a * b)
                .sum();
            // Sightings of one whale are about 0.70 alike at noise 0.65 (in
            // 16 dimensions the spread is wide; unrelated ones are near 0).
            assert!(similarity > 0.2, "query {i}: {similarity}");
        }
    }

    #[test]
    fn identity_sizes_follow_the_kaggle_shape() {
        let c = generate(&shape(50_000, 0)).unwrap();
        let identities = c.members.len() as f64;
        let singletons = c.members.iter().filter(|&&m| m == 1).count() as f64;
        // Kaggle 2019: 25,361 photos of 14,668 identities counting each
        // new_whale photo as one, 80 % of them singletons.
        let mean = c.len() as f64 / identities;
        assert!((mean - 1.729).abs() < 0.05, "mean {mean}");
        assert!((singletons / identities - 0.800).abs() < 0.01);
    }

    #[test]
    fn a_falling_spectrum_crowds_vectors_into_the_first_coordinates() {
        let flat = generate(&shape(2_000, 0)).unwrap();
        let falling = generate(&CatalogShape {
            spectrum: 1.0,
            ..shape(2_000, 0)
        })
        .unwrap();
        // Mean square of coordinate i over all vectors.
        let power = |c: &SyntheticCatalog, i: usize| {
            (0..c.len()).map(|r| c.vector(r)[i].powi(2)).sum::<f32>() / c.len() as f32
        };
        assert!(power(&falling, 0) > 4.0 * power(&falling, 15));
        assert!(power(&flat, 0) < 1.5 * power(&flat, 15));
    }

    #[test]
    fn too_many_queries_for_the_catalog_are_refused() {
        assert!(matches!(
            generate(&shape(100, 90)),
            Err(ShapeError::TooFewRepeatIdentities { .. })
        ));
    }
}
