//! The sighting catalog: one SQLite file holding every catalogued photo
//! (image name, whale id, embedding, when it was added) and the fingerprint
//! of the embedder that made the vectors. It is the source of truth; the
//! HNSW index beside it can always be rebuilt from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::embed::Fingerprint;

/// File name of the SQLite database inside a catalog folder.
pub const DB_FILE: &str = "catalog.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sightings (
    id        INTEGER PRIMARY KEY,
    image     TEXT NOT NULL UNIQUE,
    whale_id  TEXT NOT NULL,
    embedding BLOB NOT NULL,
    added_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sightings_by_whale ON sightings (whale_id);
";

/// Why the catalog could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("catalog {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("catalog {path} was built with a different embedder ({stored}); this one is {current}. Build a new catalog or use the matching model")]
    Mismatch {
        path: PathBuf,
        stored: String,
        current: String,
    },
    #[error("catalog {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// A catalogued photo of a known whale.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Sighting {
    /// Catalog-wide id of the sighting.
    pub id: i64,
    /// Image file name as it was indexed.
    pub image: String,
    pub whale_id: String,
    /// When it was added, UTC, RFC 3339.
    pub added_at: String,
}

/// A sighting about to be added.
#[derive(Debug, Clone)]
pub struct NewSighting {
    pub image: String,
    pub whale_id: String,
    pub embedding: Vec<f32>,
}

/// An open catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

impl Catalog {
    /// Opens the catalog in `dir`, creating the folder and database when
    /// they do not exist.
    pub fn create_or_open(dir: &Path) -> Result<Self, CatalogError> {
        std::fs::create_dir_all(dir).map_err(|source| CatalogError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let conn = Connection::open(&path).map_err(|source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let catalog = Self { conn, path };
        catalog
            .conn
            .execute_batch(SCHEMA)
            .map_err(|e| catalog.sql(e))?;
        Ok(catalog)
    }

    /// Opens an existing catalog read-only; `None` when `dir` holds none.
    pub fn open_existing(dir: &Path) -> Result<Option<Self>, CatalogError> {
        let path = dir.join(DB_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| CatalogError::Sqlite {
                path: path.clone(),
                source,
            },
        )?;
        Ok(Some(Self { conn, path }))
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> CatalogError {
        CatalogError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn meta(&self, key: &str) -> Result<Option<String>, CatalogError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// The embedder the stored vectors came from; `None` for an empty catalog.
    pub fn fingerprint(&self) -> Result<Option<Fingerprint>, CatalogError> {
        match self.meta("fingerprint")? {
            None => Ok(None),
            Some(json) => {
                serde_json::from_str(&json)
                    .map(Some)
                    .map_err(|e| CatalogError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("bad fingerprint: {e}"),
                    })
            }
        }
    }

    /// Fails when the catalog's vectors came from another embedder.
    pub fn check_fingerprint(&self, current: &Fingerprint) -> Result<(), CatalogError> {
        match self.fingerprint()? {
            Some(stored) if &stored != current => Err(CatalogError::Mismatch {
                path: self.path.clone(),
                stored: describe(&stored),
                current: describe(current),
            }),
            _ => Ok(()),
        }
    }

    /// The calibrated `new_whale` threshold stored by `calibrate`, if any.
    pub fn threshold(&self) -> Result<Option<f32>, CatalogError> {
        Ok(self.meta("threshold")?.and_then(|v| v.parse().ok()))
    }

    /// Stores the calibrated `new_whale` threshold.
    pub fn set_threshold(&mut self, threshold: f32) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('threshold', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [threshold.to_string()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Image name → whale id for every sighting.
    pub fn images(&self) -> Result<HashMap<String, String>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare("SELECT image, whale_id FROM sightings")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Adds sightings in one transaction: either all are stored or none.
    /// Records the embedder's fingerprint on the first addition and refuses
    /// vectors from a different one. Returns the new sightings' ids.
    pub fn add(
        &mut self,
        fingerprint: &Fingerprint,
        new: &[NewSighting],
    ) -> Result<Vec<i64>, CatalogError> {
        self.check_fingerprint(fingerprint)?;
        let path = self.path.clone();
        let sql = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let json = serde_json::to_string(fingerprint).expect("fingerprint serialises");
        tx.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('fingerprint', ?1)",
            [json],
        )
        .map_err(sql)?;
        let mut ids = Vec::with_capacity(new.len());
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO sightings (image, whale_id, embedding, added_at)
                     VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))",
                )
                .map_err(sql)?;
            for s in new {
                insert
                    .execute(params![s.image, s.whale_id, to_blob(&s.embedding)])
                    .map_err(sql)?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit().map_err(sql)?;
        Ok(ids)
    }

    /// Every sighting's id, whale, image and embedding, in id order.
    pub fn load_all(&self) -> Result<Vec<(Sighting, Vec<f32>)>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, image, whale_id, added_at, embedding FROM sightings ORDER BY id")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                let blob: Vec<u8> = r.get(4)?;
                Ok((sighting_from_row(r)?, from_blob(&blob)))
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// The sightings of one whale, oldest first; empty when unknown.
    pub fn whale(&self, whale_id: &str) -> Result<Vec<Sighting>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, image, whale_id, added_at FROM sightings WHERE whale_id = ?1 ORDER BY id")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([whale_id], sighting_from_row)
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Number of sightings.
    pub fn len(&self) -> Result<usize, CatalogError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM sightings", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(|e| self.sql(e))
    }

    /// Number of sightings and the largest sighting id (0 when empty): what
    /// an index built from this catalog records in its manifest.
    pub fn extent(&self) -> Result<(usize, i64), CatalogError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM sightings",
                [],
                |r| Ok((r.get::<_, i64>(0)? as usize, r.get(1)?)),
            )
            .map_err(|e| self.sql(e))
    }

    /// True when no sighting is stored.
    pub fn is_empty(&self) -> Result<bool, CatalogError> {
        Ok(self.len()? == 0)
    }
}

fn sighting_from_row(r: &rusqlite::Row) -> rusqlite::Result<Sighting> {
    Ok(Sighting {
        id: r.get(0)?,
        image: r.get(1)?,
        whale_id: r.get(2)?,
        added_at: r.get(3)?,
    })
}

fn describe(f: &Fingerprint) -> String {
    format!(
        "backbone {}…, head {}, input {}, {}-d",
        &f.backbone_sha256[..f.backbone_sha256.len().min(12)],
        f.head_sha256
            .as_deref()
            .map_or("none", |h| &h[..h.len().min(12)]),
        f.input,
        f.dim
    )
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
