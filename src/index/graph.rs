//! The graph hnsw_rs builds, copied into flat arrays for searching.
//!
//! hnsw_rs keeps every node behind reference-counted pointers and a lock,
//! so a search spends most of its time following pointers. Here every
//! node's vector sits in one array and its links in another at a fixed
//! stride; a search touches one vector per distance and one short run of
//! links per expanded node, prefetches what it reads next, and marks
//! visited nodes in a per-thread array of epochs instead of a hash set.
//!
//! The links are hnsw_rs's, tidied once: when a new node's back-link
//! overflows a neighbour's list, hnsw_rs drops that neighbour's farthest
//! link, so lists fill up with near links that all point the same way
//! (clustered catalogs suffer most). The copy re-selects every list from
//! its own links and the links that point at the node, with the paper's
//! heuristic (a candidate stays only when it is nearer to the node than to
//! every link kept), which spreads the links in different directions.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use hnsw_rs::prelude::{Distance, Hnsw};
use rayon::prelude::*;

use super::unit_distance as distance;

/// A node found by a search: its distance `1 − dot` to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    pub node: u32,
    pub distance: f32,
}

impl Eq for Neighbour {}

impl Ord for Neighbour {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for Neighbour {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The searchable copy. Node numbers are dense, in hnsw_rs's layer order.
pub struct FlatGraph {
    dim: usize,
    /// Links per node on the upper layers (`M`); `2M` on the bottom one.
    max_connections: usize,
    /// `dim` values per node.
    vectors: Vec<f32>,
    /// The id each node was inserted with (the sighting id).
    ids: Vec<i64>,
    /// Bottom-layer links, `1 + 2M` per node: the count, then the nodes.
    base_links: Vec<u32>,
    /// Where a node's upper-layer lists start in `upper_links` (`1 + M`
    /// per layer above the bottom).
    upper_start: Vec<u32>,
    upper_links: Vec<u32>,
    /// Entry node and its layer; `None` when empty.
    entry: Option<(u32, u8)>,
}

impl std::fmt::Debug for FlatGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlatGraph")
            .field("dim", &self.dim)
            .field("len", &self.ids.len())
            .finish()
    }
}

impl FlatGraph {
    /// Copies `hnsw`'s nodes (vectors of `dim` values) and links and
    /// re-selects every list, with hnsw_rs's `M`, on the current rayon pool.
    pub fn from_hnsw<D: Distance<f32> + Send + Sync>(hnsw: &Hnsw<'_, f32, D>, dim: usize) -> Self {
        let max_connections = usize::from(hnsw.get_max_nb_connection());
        let started = std::time::Instant::now();
        let points = hnsw.get_point_indexation();
        let top = points.get_max_level_observed() as usize;
        // hnsw_rs numbers a node by (its top layer, rank in that layer).
        let mut first_node = vec![0u32; top + 2];
        for layer in 0..=top {
            first_node[layer + 1] = first_node[layer] + points.get_layer_nb_point(layer) as u32;
        }
        let len = first_node[top + 1] as usize;
        let node_of = |layer: u8, rank: i32| first_node[layer as usize] + rank as u32;

        let mut vectors = vec![0f32; len * dim];
        let mut ids = vec![0i64; len];
        let mut levels = vec![0u8; len];
        // links[layer][node], hnsw_rs's lists as node numbers.
        let mut links: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); len]; top + 1];
        for layer in 0..=top {
            for point in points.get_layer_iterator(layer) {
                let p_id = point.get_point_id();
                let node = node_of(p_id.0, p_id.1) as usize;
                vectors[node * dim..(node + 1) * dim].copy_from_slice(point.get_v());
                ids[node] = point.get_origin_id() as i64;
                levels[node] = p_id.0;
                for (l, list) in point
                    .get_neighborhood_id()
                    .into_iter()
                    .enumerate()
                    .take(p_id.0 as usize + 1)
                {
                    links[l][node] = list
                        .iter()
                        .map(|n| node_of(n.p_id.0, n.p_id.1))
                        .filter(|&other| other as usize != node)
                        .collect();
                }
            }
        }

        let mut graph = Self {
            dim,
            max_connections,
            vectors,
            ids,
            base_links: Vec::new(),
            upper_start: Vec::with_capacity(len),
            upper_links: Vec::new(),
            entry: None,
        };
        let m = max_connections;
        let stride = 1 + 2 * m;
        let base = graph.reselect(&links[0], m, 2 * m);
        graph.base_links = vec![0u32; len * stride];
        for (node, list) in base.iter().enumerate() {
            write_list(
                &mut graph.base_links[node * stride..(node + 1) * stride],
                list,
            );
        }
        let upper: Vec<Vec<Vec<u32>>> =
            links[1..].iter().map(|l| graph.reselect(l, m, m)).collect();
        for (node, &level) in levels.iter().enumerate() {
            graph.upper_start.push(graph.upper_links.len() as u32);
            for layer in upper.iter().take(level as usize) {
                let start = graph.upper_links.len();
                graph.upper_links.resize(start + 1 + m, 0);
                write_list(&mut graph.upper_links[start..], &layer[node]);
            }
        }
        graph.entry = (len > 0).then(|| (first_node[top], top as u8));
        if len > 0 {
            tracing::info!(
                nodes = len,
                seconds = started.elapsed().as_secs_f64(),
                "index graph copied for searching"
            );
        }
        graph
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Values per vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bytes the copy's arrays hold.
    pub fn bytes(&self) -> usize {
        self.vectors.len() * size_of::<f32>()
            + self.ids.len() * size_of::<i64>()
            + (self.base_links.len() + self.upper_start.len() + self.upper_links.len())
                * size_of::<u32>()
    }

    /// The id `node` was inserted with.
    pub fn id(&self, node: u32) -> i64 {
        self.ids[node as usize]
    }

    fn vector(&self, node: u32) -> &[f32] {
        let start = node as usize * self.dim;
        &self.vectors[start..start + self.dim]
    }

    /// Every node's new list on one layer: the heuristic picks at most
    /// `chosen` from its own links and those that point at it, and links
    /// back from the nodes picked fill the list up to `capacity`, the way
    /// hnswlib's lists grow (`M` chosen, `2M` on the bottom layer).
    fn reselect(&self, lists: &[Vec<u32>], chosen: usize, capacity: usize) -> Vec<Vec<u32>> {
        let mut pointing: Vec<Vec<u32>> = vec![Vec::new(); lists.len()];
        for (node, list) in lists.iter().enumerate() {
            for &other in list {
                pointing[other as usize].push(node as u32);
            }
        }
        let mut picked: Vec<Vec<u32>> = (0..lists.len())
            .into_par_iter()
            .map(|node| {
                let base = self.vector(node as u32);
                let mut candidates: Vec<Neighbour> = lists[node]
                    .iter()
                    .chain(&pointing[node])
                    .map(|&other| Neighbour {
                        node: other,
                        distance: distance(base, self.vector(other)),
                    })
                    .collect();
                candidates.sort_unstable();
                candidates.dedup_by_key(|n| n.node);
                self.select(&candidates, chosen)
            })
            .collect();
        // A node the heuristic left out of its neighbours' lists can still
        // be reached through the links back from the nodes it picked; on
        // clustered catalogs, these are what lead a search to a whale's
        // other sightings.
        for node in 0..picked.len() {
            for i in 0..picked[node].len() {
                let other = picked[node][i];
                let back = &mut picked[other as usize];
                if back.len() < capacity && !back.contains(&(node as u32)) {
                    back.push(node as u32);
                }
            }
        }
        picked
    }

    /// The paper's heuristic: walk the candidates from the nearest and keep
    /// one only if it is nearer to the base than to every one kept.
    /// `candidates` are sorted by distance to the base.
    fn select(&self, candidates: &[Neighbour], capacity: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(capacity);
        for c in candidates {
            if kept.len() >= capacity {
                break;
            }
            let v = self.vector(c.node);
            if kept
                .iter()
                .all(|&k| distance(v, self.vector(k)) >= c.distance)
            {
                kept.push(c.node);
            }
        }
        kept
    }

    /// The `k` nodes nearest to `query` (of unit length), nearest first,
    /// keeping `ef` candidates (at least `k`) on the bottom layer.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<Neighbour> {
        let Some((entry, top)) = self.entry else {
            return Vec::new();
        };
        let mut nearest = Neighbour {
            node: entry,
            distance: distance(query, self.vector(entry)),
        };
        for layer in (1..=top).rev() {
            nearest = self.greedy(query, nearest, layer);
        }
        let mut found = VISITED.with(|cell| {
            let mut visited = cell.borrow_mut();
            self.search_bottom(query, nearest, ef.max(k), &mut visited)
        });
        found.sort_unstable();
        found.truncate(k);
        found
    }

    /// Walks `layer` from `start` to the nearest node it can reach by
    /// always stepping to a nearer neighbour.
    fn greedy(&self, query: &[f32], start: Neighbour, layer: u8) -> Neighbour {
        let mut nearest = start;
        loop {
            let mut moved = false;
            for &other in self.links(nearest.node, layer) {
                let d = distance(query, self.vector(other));
                if d < nearest.distance {
                    nearest = Neighbour {
                        node: other,
                        distance: d,
                    };
                    moved = true;
                }
            }
            if !moved {
                return nearest;
            }
        }
    }

    /// Best-first search of the bottom layer from `start`, keeping the
    /// `ef` nearest nodes seen; returns them in no particular order.
    fn search_bottom(
        &self,
        query: &[f32],
        start: Neighbour,
        ef: usize,
        visited: &mut Visited,
    ) -> Vec<Neighbour> {
        visited.start(self.len());
        visited.mark(start.node);
        let mut candidates = BinaryHeap::with_capacity(ef * 2);
        let mut nearest = BinaryHeap::with_capacity(ef + 1);
        candidates.push(Reverse(start));
        nearest.push(start);
        let mut fresh = [0u32; 64];

        while let Some(Reverse(current)) = candidates.pop() {
            let farthest = nearest
                .peek()
                .map_or(f32::INFINITY, |n: &Neighbour| n.distance);
            if current.distance > farthest && nearest.len() >= ef {
                break;
            }
            // The next node to expand is most likely the nearest candidate
            // left: start loading its links while this one's are scanned.
            if let Some(Reverse(next)) = candidates.peek() {
                prefetch(self.links(next.node, 0));
            }
            let links = self.links(current.node, 0);
            for &other in links {
                visited.prefetch(other);
            }
            let mut unseen = 0;
            for &other in links {
                if visited.mark(other) {
                    prefetch(self.vector(other));
                    fresh[unseen] = other;
                    unseen += 1;
                }
            }
            for &other in &fresh[..unseen] {
                let d = distance(query, self.vector(other));
                let farthest = nearest
                    .peek()
                    .map_or(f32::INFINITY, |n: &Neighbour| n.distance);
                if nearest.len() < ef || d < farthest {
                    let n = Neighbour {
                        node: other,
                        distance: d,
                    };
                    candidates.push(Reverse(n));
                    nearest.push(n);
                    if nearest.len() > ef {
                        nearest.pop();
                    }
                }
            }
        }
        nearest.into_vec()
    }

    /// The links of `node` on `layer`.
    fn links(&self, node: u32, layer: u8) -> &[u32] {
        let m = self.max_connections;
        let list = if layer == 0 {
            let stride = 1 + 2 * m;
            &self.base_links[node as usize * stride..(node as usize + 1) * stride]
        } else {
            let start = self.upper_start[node as usize] as usize + (layer as usize - 1) * (1 + m);
            &self.upper_links[start..start + 1 + m]
        };
        &list[1..1 + list[0] as usize]
    }
}

/// First bytes of a saved copy, with the format's version.
const MAGIC: &[u8; 8] = b"FLUKEIDG";
const VERSION: u32 = 1;

/// Why a saved copy could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GraphFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a saved search graph, or of another version")]
    Format,
    #[error("inconsistent saved graph: {0}")]
    Inconsistent(&'static str),
}

impl FlatGraph {
    /// Writes the copy: a header, then each array in little-endian order.
    pub fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        let (entry, layer) = self.entry.map_or((u32::MAX, 0), |(n, l)| (n, l));
        for v in [
            self.dim as u64,
            self.max_connections as u64,
            self.ids.len() as u64,
            self.upper_links.len() as u64,
            u64::from(entry),
            u64::from(layer),
        ] {
            out.write_all(&v.to_le_bytes())?;
        }
        write_values(out, &self.vectors, f32::to_le_bytes)?;
        write_values(out, &self.ids, i64::to_le_bytes)?;
        write_values(out, &self.base_links, u32::to_le_bytes)?;
        write_values(out, &self.upper_start, u32::to_le_bytes)?;
        write_values(out, &self.upper_links, u32::to_le_bytes)
    }

    /// Reads what [`FlatGraph::write`] wrote, checking that every array
    /// has its length and every link names a node, so that a damaged file
    /// cannot make a search read out of bounds.
    pub fn read(input: &mut impl std::io::Read) -> Result<Self, GraphFileError> {
        let mut magic = [0u8; 12];
        input.read_exact(&mut magic)?;
        if magic[..8] != MAGIC[..] || magic[8..] != VERSION.to_le_bytes() {
            return Err(GraphFileError::Format);
        }
        let mut header = [0u64; 6];
        for v in &mut header {
            let mut bytes = [0u8; 8];
            input.read_exact(&mut bytes)?;
            *v = u64::from_le_bytes(bytes);
        }
        let size = |v: u64| usize::try_from(v).map_err(|_| GraphFileError::Format);
        let [dim, m, len, upper_len, entry, layer] = header;
        let (dim, m, len, upper_len) = (size(dim)?, size(m)?, size(len)?, size(upper_len)?);
        // Sizes from a damaged header must not wrap around: a short array
        // would pass the checks below and be indexed past its end.
        let product = |a: usize, b: usize| {
            a.checked_mul(b)
                .ok_or(GraphFileError::Inconsistent("sizes"))
        };
        if dim == 0 || m == 0 || len >= u32::MAX as usize {
            return Err(GraphFileError::Inconsistent("sizes"));
        }
        let stride = product(2, m)? + 1;
        let vectors = read_values(input, product(len, dim)?, f32::from_le_bytes)?;
        let ids = read_values(input, len, i64::from_le_bytes)?;
        let base_links = read_values(input, product(len, stride)?, u32::from_le_bytes)?;
        let upper_start = read_values(input, len, u32::from_le_bytes)?;
        let upper_links = read_values(input, upper_len, u32::from_le_bytes)?;
        let entry = if len == 0 {
            None
        } else if entry < len as u64 && layer <= u64::from(u8::MAX) {
            Some((entry as u32, layer as u8))
        } else {
            return Err(GraphFileError::Inconsistent("entry node"));
        };
        let lists_fit = |links: &[u32], width: usize| {
            links.chunks(1 + width).all(|list| {
                (list[0] as usize) < list.len()
                    && list[1..=list[0] as usize]
                        .iter()
                        .all(|&n| (n as usize) < len)
            })
        };
        if !lists_fit(&base_links, 2 * m) || !lists_fit(&upper_links, m) {
            return Err(GraphFileError::Inconsistent("links"));
        }
        let starts_fit = upper_start.windows(2).all(|w| w[0] <= w[1])
            && upper_start.iter().all(|&s| s as usize <= upper_len)
            && upper_start
                .iter()
                .all(|&s| (s as usize).is_multiple_of(1 + m));
        if !starts_fit || !upper_len.is_multiple_of(1 + m) {
            return Err(GraphFileError::Inconsistent("upper layers"));
        }
        let mut rest = [0u8; 1];
        if input.read(&mut rest)? != 0 {
            return Err(GraphFileError::Inconsistent("bytes after the end"));
        }
        Ok(Self {
            dim,
            max_connections: m,
            vectors,
            ids,
            base_links,
            upper_start,
            upper_links,
            entry,
        })
    }
}

fn write_values<T: Copy, const N: usize>(
    out: &mut impl std::io::Write,
    values: &[T],
    bytes: fn(T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(N * 4096);
    for chunk in values.chunks(4096) {
        buffer.clear();
        buffer.extend(chunk.iter().flat_map(|&v| bytes(v)));
        out.write_all(&buffer)?;
    }
    Ok(())
}

fn read_values<T, const N: usize>(
    input: &mut impl std::io::Read,
    count: usize,
    value: fn([u8; N]) -> T,
) -> Result<Vec<T>, GraphFileError> {
    let mut out = Vec::with_capacity(count.min(1 << 28));
    let mut buffer = vec![0u8; N * 4096];
    let mut left = count;
    while left > 0 {
        let n = left.min(4096);
        input.read_exact(&mut buffer[..n * N])?;
        out.extend(
            buffer[..n * N]
                .chunks_exact(N)
                .map(|b| value(b.try_into().expect("N bytes"))),
        );
        left -= n;
    }
    Ok(out)
}

/// Writes `list` into `slots` as its length and then its nodes.
fn write_list(slots: &mut [u32], list: &[u32]) {
    slots[0] = list.len() as u32;
    slots[1..1 + list.len()].copy_from_slice(list);
}

/// Asks the CPU to start loading the first two cache lines of `items`.
#[inline]
fn prefetch<T>(items: &[T]) {
    let p = items.as_ptr().cast::<u8>();
    prefetch_line(p);
    prefetch_line(p.wrapping_add(64));
}

#[inline]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address, and changes
    // nothing the program can see.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Nodes seen by the current search: a node is seen when its slot holds
/// the current epoch, so starting a search costs one increment. 16-bit
/// epochs keep a million nodes' marks within 2 MiB of cache; the array is
/// cleared once every 65,535 searches.
struct Visited {
    epochs: Vec<u16>,
    epoch: u16,
}

thread_local! {
    static VISITED: RefCell<Visited> = const { RefCell::new(Visited { epochs: Vec::new(), epoch: 0 }) };
}

impl Visited {
    fn start(&mut self, len: usize) {
        if self.epochs.len() < len {
            self.epochs.resize(len, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.epochs.fill(0);
            self.epoch = 1;
        }
    }

    fn prefetch(&self, node: u32) {
        prefetch_line(self.epochs.as_ptr().wrapping_add(node as usize).cast());
    }

    /// Marks `node`; false when it was marked already.
    fn mark(&mut self, node: u32) -> bool {
        let slot = &mut self.epochs[node as usize];
        let fresh = *slot != self.epoch;
        *slot = self.epoch;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{dot, UnitDot};

    /// `n` unit vectors of `dim` values from a fixed seed, in clusters of
    /// three around `n / 3` centres.
    fn clustered(n: usize, dim: usize) -> Vec<Vec<f32>> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let unit = |v: Vec<f32>| {
            let norm = dot(&v, &v).sqrt();
            v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
        };
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let centre: Vec<f32> = (0..dim).map(|_| next()).collect();
            for _ in 0..3 {
                out.push(unit(centre.iter().map(|c| c + 0.3 * next()).collect()));
            }
        }
        out.truncate(n);
        out
    }

    fn built(vectors: &[Vec<f32>], m: usize) -> FlatGraph {
        let hnsw = Hnsw::<f32, UnitDot>::new(m, vectors.len(), 16, 100, UnitDot);
        let data: Vec<(&[f32], usize)> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_slice(), 1000 + i))
            .collect();
        hnsw.parallel_insert_slice(&data);
        FlatGraph::from_hnsw(&hnsw, vectors[0].len())
    }

    #[test]
    fn copy_keeps_every_vector_under_its_id_and_lists_fit_their_slots() {
        let vectors = clustered(1500, 24);
        let graph = built(&vectors, 8);
        assert_eq!(graph.len(), 1500);
        let mut seen = vec![false; 1500];
        for node in 0..graph.len() as u32 {
            let row = (graph.id(node) - 1000) as usize;
            assert!(!seen[row], "id {} copied twice", graph.id(node));
            seen[row] = true;
            assert_eq!(graph.vector(node), vectors[row].as_slice());
            let links = graph.links(node, 0);
            assert!(
                !links.is_empty() && links.len() <= 16,
                "{} links",
                links.len()
            );
            assert!(links
                .iter()
                .all(|&l| l != node && (l as usize) < graph.len()));
        }
        let (entry, top) = graph.entry.unwrap();
        assert!(top >= 1, "1500 nodes with M 8 reach a second layer");
        assert!(graph.links(entry, top).len() <= 8);
    }

    #[test]
    fn search_finds_the_exact_nearest_neighbours() {
        let vectors = clustered(3000, 32);
        let graph = built(&vectors, 8);
        let queries = clustered(3300, 32).split_off(3000);
        let mut found = 0;
        for query in &queries {
            let mut exact: Vec<(f32, usize)> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (distance(query, v), i))
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            let hits = graph.search(query, 10, 64);
            assert_eq!(hits.len(), 10);
            assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
            let hit_rows: Vec<usize> = hits
                .iter()
                .map(|h| (graph.id(h.node) - 1000) as usize)
                .collect();
            found += exact[..10]
                .iter()
                .filter(|(_, i)| hit_rows.contains(i))
                .count();
            // Distances reported are the true ones.
            let first = &vectors[hit_rows[0]];
            assert!((hits[0].distance - distance(query, first)).abs() < 1e-6);
        }
        let recall = found as f64 / (10 * queries.len()) as f64;
        assert!(recall > 0.97, "recall@10 {recall}");
    }

    #[test]
    fn heuristic_keeps_the_nearest_and_drops_a_link_behind_a_kept_one() {
        // Base at x; a and b point the same way (b behind a), c elsewhere.
        let unit = |v: [f32; 2]| {
            let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
            vec![v[0] / n, v[1] / n]
        };
        let vectors = [
            unit([1.0, 0.0]),
            unit([1.0, 0.3]),
            unit([1.0, 0.5]),
            unit([1.0, -0.4]),
        ];
        let graph = FlatGraph {
            dim: 2,
            max_connections: 2,
            vectors: vectors.concat(),
            ids: vec![0, 1, 2, 3],
            base_links: Vec::new(),
            upper_start: Vec::new(),
            upper_links: Vec::new(),
            entry: None,
        };
        let mut candidates: Vec<Neighbour> = (1..4)
            .map(|node| Neighbour {
                node,
                distance: distance(&vectors[0], &vectors[node as usize]),
            })
            .collect();
        candidates.sort_unstable();
        assert_eq!(graph.select(&candidates, 3), vec![1, 3]);
        assert_eq!(graph.select(&candidates, 1), vec![1]);
    }

    #[test]
    fn a_written_copy_reads_back_the_same_and_a_damaged_one_is_refused() {
        let vectors = clustered(400, 8);
        let graph = built(&vectors, 8);
        let mut bytes = Vec::new();
        graph.write(&mut bytes).unwrap();
        let read = FlatGraph::read(&mut bytes.as_slice()).unwrap();
        assert_eq!(read.vectors, graph.vectors);
        assert_eq!(read.ids, graph.ids);
        assert_eq!(read.base_links, graph.base_links);
        assert_eq!(read.upper_start, graph.upper_start);
        assert_eq!(read.upper_links, graph.upper_links);
        assert_eq!(read.entry, graph.entry);
        assert_eq!(
            read.search(&vectors[9], 10, 64),
            graph.search(&vectors[9], 10, 64)
        );

        // Cut short, another format, or a link to a node that is not there.
        let cut = &bytes[..bytes.len() - 1];
        assert!(matches!(
            FlatGraph::read(&mut &cut[..]),
            Err(GraphFileError::Io(_))
        ));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(matches!(
            FlatGraph::read(&mut other.as_slice()),
            Err(GraphFileError::Format)
        ));
        let header = 12 + 6 * 8;
        let links_at = header + graph.vectors.len() * 4 + graph.ids.len() * 8;
        let mut bad = bytes.clone();
        bad[links_at + 4..links_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(graph.base_links[0] > 0, "node 0 has links");
        assert!(matches!(
            FlatGraph::read(&mut bad.as_slice()),
            Err(GraphFileError::Inconsistent("links"))
        ));
        // A dimension whose product with the node count wraps to zero.
        let mut wrapping = bytes.clone();
        wrapping[12..20].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert_eq!(graph.ids.len() % 4, 0, "400 · 2^62 wraps to 0");
        assert!(matches!(
            FlatGraph::read(&mut wrapping.as_slice()),
            Err(GraphFileError::Inconsistent("sizes"))
        ));
        let mut longer = bytes;
        longer.push(0);
        assert!(FlatGraph::read(&mut longer.as_slice()).is_err());
    }
}
