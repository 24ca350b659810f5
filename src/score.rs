//! Scoring a folder of photos into a Kaggle submission, and MAP@5.
//!
//! MAP@5 follows the competition: a query scores 1/rank of the first
//! correct id among its five answers (later repeats of it do not count) and
//! 0 when the truth is not among them; the mean is over all queries.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::identify::{IdentifyError, Identifier, Prediction};
use crate::labels::{self, LabelRow, LabelsError};
use crate::photo::{self, DecodeLimits, PhotoError};

/// Average precision at 5 of one query's answers.
pub fn average_precision<S: AsRef<str>>(predicted: &[S], truth: &str) -> f64 {
    predicted
        .iter()
        .take(5)
        .position(|p| p.as_ref() == truth)
        .map_or(0.0, |rank| 1.0 / (rank + 1) as f64)
}

/// Mean average precision at 5 over `(answers, truth)` pairs; 0 for none.
pub fn map_at_5<S: AsRef<str>>(queries: &[(Vec<S>, String)]) -> f64 {
    if queries.is_empty() {
        return 0.0;
    }
    let sum: f64 = queries.iter().map(|(p, t)| average_precision(p, t)).sum();
    sum / queries.len() as f64
}

/// Why a scoring run failed. Nothing is written when it does.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Photo { path: PathBuf, source: PhotoError },
    #[error("{0}: no images (.jpg, .jpeg, .png, .webp) found")]
    NoImages(PathBuf),
    #[error(transparent)]
    Labels(#[from] LabelsError),
    #[error(transparent)]
    Identify(#[from] IdentifyError),
}

/// One scored photo.
#[derive(Debug, Clone)]
pub struct Scored {
    pub image: String,
    pub predictions: Vec<Prediction>,
}

/// The photo files in a folder, by name.
pub fn list_images(dir: &Path) -> Result<Vec<String>, ScoreError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ScoreError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ScoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ext = name.rsplit('.').next().unwrap_or_default().to_ascii_lowercase();
        if entry.path().is_file() && ["jpg", "jpeg", "png", "webp"].contains(&ext.as_str()) {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(ScoreError::NoImages(dir.to_owned()));
    }
    Ok(names)
}

/// Reads and decodes photos on a pool of threads while the caller embeds
/// the previous batch, calling `each` with batches of up to `batch` decoded
/// photos in name order. Stops at the first photo that cannot be read.
pub fn decode_batches<F>(
    dir: &Path,
    names: &[String],
    batch: usize,
    limits: DecodeLimits,
    mut each: F,
) -> Result<(), ScoreError>
where
    F: FnMut(&[String], Vec<image::RgbImage>) -> Result<(), ScoreError>,
{
    use rayon::prelude::*;
    let batch = batch.max(1);
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<image::RgbImage>, ScoreError>>(2);
    let dir = dir.to_owned();
    let chunks: Vec<Vec<String>> = names.chunks(batch).map(<[String]>::to_vec).collect();
    let producer_chunks = chunks.clone();
    let producer = std::thread::spawn(move || {
        for chunk in producer_chunks {
            let decoded: Result<Vec<_>, ScoreError> = chunk
                .par_iter()
                .map(|name| {
                    let path = dir.join(name);
                    let bytes = std::fs::read(&path).map_err(|source| ScoreError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    photo::decode(&bytes, limits).map_err(|source| ScoreError::Photo { path, source })
                })
                .collect();
            let failed = decoded.is_err();
            if tx.send(decoded).is_err() || failed {
                return;
            }
        }
    });
    let mut result = Ok(());
    for chunk in &chunks {
        match rx.recv() {
            Ok(Ok(images)) => {
                if let Err(e) = each(chunk, images) {
                    result = Err(e);
                    break;
                }
            }
            Ok(Err(e)) => {
                result = Err(e);
                break;
            }
            Err(_) => break,
        }
    }
    drop(rx);
    let _ = producer.join();
    result
}

/// Identifies every photo in `dir`, with a progress bar on stderr when
/// `progress` is set.
pub fn score_folder(identifier: &Identifier, dir: &Path, batch: usize, limits: DecodeLimits, progress: bool) -> Result<Vec<Scored>, ScoreError> {
    let names = list_images(dir)?;
    let bar = progress_bar(names.len() as u64, progress, "scoring");
    let mut scored = Vec::with_capacity(names.len());
    decode_batches(dir, &names, batch, limits, |chunk, images| {
        let predictions = identifier.identify_images(&images)?;
        for (name, predictions) in chunk.iter().zip(predictions) {
            scored.push(Scored {
                image: name.clone(),
                predictions,
            });
        }
        bar.inc(chunk.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(scored)
}

/// A progress bar on stderr, or a hidden one.
pub fn progress_bar(len: u64, visible: bool, what: &str) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Writes `Image,Id` with five space-separated ids per row. The file is
/// written under a temporary name and renamed, so a failed run leaves no
/// partial submission.
pub fn write_submission(path: &Path, scored: &[Scored]) -> Result<(), ScoreError> {
    let io = |source| ScoreError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_file_name(format!(
        ".{}.partial",
        path.file_name().map_or("submission".into(), |n| n.to_string_lossy())
    ));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    writeln!(out, "Image,Id").map_err(io)?;
    for s in scored {
        let ids: Vec<&str> = s.predictions.iter().map(|p| p.whale_id.as_str()).collect();
        writeln!(out, "{},{}", s.image, ids.join(" ")).map_err(io)?;
    }
    out.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// How a scored folder fares against a truth file.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub map5: f64,
    pub queries: usize,
    /// For each query whose truth is a known whale: image, whale, and the
    /// rank (1–5) at which it was found.
    pub known: Vec<(String, String, Option<usize>)>,
    /// Queries whose truth is `new_whale`, and how many had it first.
    pub new_total: usize,
    pub new_first: usize,
}

/// Compares scored photos with a truth file (`Image,Id`). Every truth row
/// must have been scored.
pub fn evaluate(scored: &[Scored], truth_path: &Path) -> Result<Evaluation, ScoreError> {
    let truth: Vec<LabelRow> = labels::read_labels(truth_path)?;
    let by_image: HashMap<&str, &Scored> = scored.iter().map(|s| (s.image.as_str(), s)).collect();
    let mut queries = Vec::with_capacity(truth.len());
    let mut known = Vec::new();
    let (mut new_total, mut new_first) = (0, 0);
    for row in &truth {
        let s = by_image.get(row.image.as_str()).ok_or_else(|| LabelsError::MissingImage {
            path: truth_path.to_owned(),
            line: row.line,
            image: row.image.clone(),
            dir: PathBuf::from("the scored folder"),
        })?;
        let ids: Vec<String> = s.predictions.iter().map(|p| p.whale_id.clone()).collect();
        let rank = ids.iter().position(|i| *i == row.id).map(|r| r + 1);
        if row.id == labels::NEW_WHALE {
            new_total += 1;
            new_first += usize::from(rank == Some(1));
        } else {
            known.push((row.image.clone(), row.id.clone(), rank));
        }
        queries.push((ids, row.id.clone()));
    }
    Ok(Evaluation {
        map5: map_at_5(&queries),
        queries: queries.len(),
        known,
        new_total,
        new_first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(p: &[&str], t: &str) -> (Vec<String>, String) {
        (p.iter().map(|s| s.to_string()).collect(), t.to_owned())
    }

    #[test]
    fn average_precision_is_reciprocal_rank_of_first_hit() {
        assert_eq!(average_precision(&["a", "b", "c", "d", "e"], "a"), 1.0);
        assert_eq!(average_precision(&["a", "b", "c", "d", "e"], "c"), 1.0 / 3.0);
        assert_eq!(average_precision(&["a", "b", "c", "d", "e"], "e"), 0.2);
        assert_eq!(average_precision(&["a", "b", "c", "d", "e"], "z"), 0.0);
    }

    #[test]
    fn only_first_five_answers_count() {
        assert_eq!(average_precision(&["a", "b", "c", "d", "e", "f"], "f"), 0.0);
    }

    #[test]
    fn repeated_correct_answer_counts_once_at_its_first_rank() {
        assert_eq!(average_precision(&["x", "a", "a", "a", "a"], "a"), 0.5);
    }

    #[test]
    fn map_at_5_averages_hand_worked_queries() {
        // 1 + 1/2 + 0 + 1/4 = 1.75, over 4 queries = 0.4375.
        let queries = vec![
            q(&["w_1", "new_whale", "w_2", "w_3", "w_4"], "w_1"),
            q(&["w_1", "new_whale", "w_2", "w_3", "w_4"], "new_whale"),
            q(&["w_1", "w_2", "w_3", "w_4", "w_5"], "new_whale"),
            q(&["w_9", "w_8", "w_7", "w_6", "w_5"], "w_6"),
        ];
        assert!((map_at_5(&queries) - 0.4375).abs() < 1e-12);
        assert_eq!(map_at_5::<String>(&[]), 0.0);
    }
}
