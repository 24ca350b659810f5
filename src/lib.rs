//! flukeid: identify individual humpback whales from photos of their tail
//! flukes.
//!
//! A photo is decoded ([`photo`]), run through EfficientNet-Lite0
//! ([`backbone`]) and pooled into an embedding ([`embed`]). Embeddings of
//! known sightings live in a SQLite [`catalog`] and an HNSW [`index`];
//! [`identify`] ranks whales for a query and inserts `new_whale` below a
//! threshold. [`http`] serves that over HTTP and [`score`] writes Kaggle
//! submissions and computes MAP@5.

pub mod backbone;
pub mod bench;
pub mod bench_index;
pub mod catalog;
pub mod embed;
pub mod http;
pub mod identify;
pub mod index;
pub mod ingest;
pub mod kernels;
pub mod labels;
pub mod photo;
pub mod score;
pub mod synthetic_catalog;
pub mod weights;
