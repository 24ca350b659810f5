//! Scoring a folder of photos into a Kaggle submission, and MAP@5.
//!
//! MAP@5 follows the competition: a query scores 1/rank of the first
//! correct id among its five answers (later repeats of it do not count) and
//! 0 when the truth is not among them; the mean is over all queries.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::catalog::Sighting;
use crate::identify::{self, Identifier, IdentifyError, Prediction};
use crate::index::Hit;
use crate::labels::{self, LabelRow, LabelsError};
use crate::photo::{self, DecodeLimits, InputSize, PhotoError};

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
    Identify(Box<IdentifyError>),
}

impl From<IdentifyError> for ScoreError {
    fn from(e: IdentifyError) -> Self {
        Self::Identify(Box::new(e))
    }
}

/// One scored photo.
#[derive(Debug, Clone)]
pub struct Scored {
    pub image: String,
    pub predictions: Vec<Prediction>,
    /// The nearest sightings the predictions were ranked from, kept so the
    /// same photos can be re-ranked at other thresholds.
    pub neighbours: Vec<(Hit, Sighting)>,
}

impl Scored {
    /// The answers this photo would get at another threshold.
    pub fn rerank(&self, threshold: f32) -> Vec<String> {
        let hits: Vec<(Hit, &Sighting)> = self.neighbours.iter().map(|(h, s)| (*h, s)).collect();
        identify::rank(&hits, threshold, identify::TOP)
            .into_iter()
            .map(|p| p.whale_id)
            .collect()
    }
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
        let ext = name
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
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

/// Reads photo `name` in `dir` and prepares it for the network (see
/// [`photo::prepare`]); errors name the file.
pub fn prepare_file(
    dir: &Path,
    name: &str,
    limits: DecodeLimits,
    input: InputSize,
) -> Result<Vec<f32>, ScoreError> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|source| ScoreError::Io {
        path: path.clone(),
        source,
    })?;
    photo::prepare(&bytes, limits, input).map_err(|source| ScoreError::Photo { path, source })
}

/// Batches decoded per turn in [`decode_batches`].
const TURN_BATCHES: usize = 4;

/// Reads, decodes and resizes photos to `input` on rayon's pool, calling
/// `each` with batches of up to `batch` prepared inputs (see
/// [`photo::to_chw`]) in name order. Stops at the first photo, in name
/// order, that cannot be read.
///
/// Decoding does not overlap with `each`: the network already keeps every
/// core busy, so decoding on other threads meanwhile only takes cores from
/// the network's team (it measured no faster than taking turns, on 2 cores,
/// `docs/benchmarks.md`). A turn prepares [`TURN_BATCHES`] batches, largest
/// file first and one photo per task: a turn ends when its last photo is
/// done, and a large photo started last would keep one thread on it while
/// the others wait, once per turn.
pub fn decode_batches<F>(
    dir: &Path,
    names: &[String],
    batch: usize,
    limits: DecodeLimits,
    input: InputSize,
    mut each: F,
) -> Result<(), ScoreError>
where
    F: FnMut(&[String], Vec<Vec<f32>>) -> Result<(), ScoreError>,
{
    use rayon::prelude::*;
    let batch = batch.max(1);
    for turn in names.chunks(batch * TURN_BATCHES) {
        let size = |name: &String| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
        let mut order: Vec<(u64, usize)> = turn.iter().map(size).zip(0..).collect();
        order.sort_by(|a, b| b.cmp(a));
        let mut prepared: Vec<(usize, Result<Vec<f32>, ScoreError>)> = order
            .par_iter()
            .with_max_len(1)
            .map(|&(_, i)| (i, prepare_file(dir, &turn[i], limits, input)))
            .collect();
        prepared.sort_by_key(|&(i, _)| i);
        let mut inputs = prepared
            .into_iter()
            .map(|(_, input)| input)
            .collect::<Result<Vec<_>, _>>()?;
        for names in turn.chunks(batch) {
            each(names, inputs.drain(..names.len()).collect())?;
        }
    }
    Ok(())
}

/// Identifies every photo in `dir`, with a progress bar on stderr when
/// `progress` is set.
pub fn score_folder(
    identifier: &Identifier,
    dir: &Path,
    batch: usize,
    limits: DecodeLimits,
    progress: bool,
) -> Result<Vec<Scored>, ScoreError> {
    let names = list_images(dir)?;
    let bar = progress_bar(names.len() as u64, progress, "scoring");
    let mut scored = Vec::with_capacity(names.len());
    let input = identifier.embedder().input();
    decode_batches(dir, &names, batch, limits, input, |chunk, inputs| {
        let embeddings = identifier
            .embedder()
            .embed_inputs(&inputs)
            .map_err(|e| ScoreError::from(IdentifyError::from(e)))?;
        for (name, embedding) in chunk.iter().zip(embeddings) {
            let (predictions, neighbours) = identifier.identify_with_neighbours(&embedding);
            scored.push(Scored {
                image: name.clone(),
                predictions,
                neighbours: neighbours
                    .into_iter()
                    .map(|(h, s)| (h, s.clone()))
                    .collect(),
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
        ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
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
        path.file_name()
            .map_or("submission".into(), |n| n.to_string_lossy())
    ));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    writeln!(out, "Image,Id").map_err(io)?;
    for s in scored {
        let ids: Vec<&str> = s.predictions.iter().map(|p| p.whale_id.as_str()).collect();
        writeln!(out, "{},{}", s.image, ids.join(" ")).map_err(io)?;
    }
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
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
    let answers: HashMap<String, Vec<String>> = scored
        .iter()
        .map(|s| {
            (
                s.image.clone(),
                s.predictions.iter().map(|p| p.whale_id.clone()).collect(),
            )
        })
        .collect();
    evaluate_answers(&answers, truth_path, Path::new("the scored folder"))
}

/// MAP@5 of the same scored photos at thresholds `from`, `from + step`, …
/// up to `to`. Chosen on a truth file, such a threshold is tuned to it: the
/// table shows how sensitive the score is, not a fair result.
pub fn threshold_sweep(
    scored: &[Scored],
    truth_path: &Path,
    from: f32,
    to: f32,
    step: f32,
) -> Result<Vec<(f32, f64)>, ScoreError> {
    let mut table = Vec::new();
    let steps = ((to - from) / step).round() as usize;
    for i in 0..=steps {
        let threshold = from + i as f32 * step;
        let answers: HashMap<String, Vec<String>> = scored
            .iter()
            .map(|s| (s.image.clone(), s.rerank(threshold)))
            .collect();
        let e = evaluate_answers(&answers, truth_path, Path::new("the scored folder"))?;
        table.push((threshold, e.map5));
    }
    Ok(table)
}

/// Compares answers (image → ids, best first) with a truth file.
/// `source` names where the answers came from, for the error when a truth
/// row has none.
pub fn evaluate_answers(
    answers: &HashMap<String, Vec<String>>,
    truth_path: &Path,
    source: &Path,
) -> Result<Evaluation, ScoreError> {
    let truth: Vec<LabelRow> = labels::read_labels(truth_path)?;
    let mut queries = Vec::with_capacity(truth.len());
    let mut known = Vec::new();
    let (mut new_total, mut new_first) = (0, 0);
    for row in &truth {
        let ids = answers
            .get(&row.image)
            .ok_or_else(|| LabelsError::MissingImage {
                path: truth_path.to_owned(),
                line: row.line,
                image: row.image.clone(),
                dir: source.to_owned(),
            })?;
        let rank = ids.iter().take(5).position(|i| *i == row.id).map(|r| r + 1);
        if row.id == labels::NEW_WHALE {
            new_total += 1;
            new_first += usize::from(rank == Some(1));
        } else {
            known.push((row.image.clone(), row.id.clone(), rank));
        }
        queries.push((ids.clone(), row.id.clone()));
    }
    Ok(Evaluation {
        map5: map_at_5(&queries),
        queries: queries.len(),
        known,
        new_total,
        new_first,
    })
}

/// Reads a Kaggle submission (`Image,Id`, space-separated ids, best
/// first). Errors name the file and line.
pub fn read_submission(path: &Path) -> Result<HashMap<String, Vec<String>>, ScoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScoreError::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let bad = |line: usize, reason: String| {
        ScoreError::Labels(LabelsError::Row {
            path: path.to_owned(),
            line: line as u64,
            reason,
        })
    };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim() == "Image,Id" => {}
        other => {
            return Err(bad(
                1,
                format!(
                    "expected the header `Image,Id`, found {:?}",
                    other.map_or("", |o| o.1)
                ),
            ))
        }
    }
    let mut answers = HashMap::new();
    for (index, line) in lines {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let (image, ids) = line
            .split_once(',')
            .ok_or_else(|| bad(line_no, "expected `Image,Id`".into()))?;
        let ids: Vec<String> = ids.split_whitespace().map(str::to_owned).collect();
        if ids.is_empty() {
            return Err(bad(line_no, format!("no ids for {image}")));
        }
        if answers.insert(image.trim().to_owned(), ids).is_some() {
            return Err(bad(line_no, format!("image {image} is listed again")));
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` noise PNGs `p00.png`, `p01.png`, … whose sizes do not grow
    /// with the name, so largest-first is not name order.
    fn noise_photos(dir: &Path, count: u32) -> Vec<String> {
        let mut state = 12345u32;
        let names: Vec<String> = (0..count).map(|i| format!("p{i:02}.png")).collect();
        for (i, name) in (0..count).zip(&names) {
            let (width, height) = (40 + (i * 7 % count) * 12, 30 + i % 3 * 10);
            let image = image::RgbImage::from_fn(width, height, |_, _| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                image::Rgb([(state >> 24) as u8, (state >> 16) as u8, (state >> 8) as u8])
            });
            image.save(dir.join(name)).unwrap();
        }
        names
    }

    fn size_of(dir: &Path, name: &str) -> u64 {
        std::fs::metadata(dir.join(name)).unwrap().len()
    }

    const SMALL: InputSize = InputSize {
        width: 64,
        height: 32,
    };

    #[test]
    fn batches_come_in_name_order_whatever_order_the_photos_decode_in() {
        let dir = tempfile::tempdir().unwrap();
        let names = noise_photos(dir.path(), 11);
        let sizes: Vec<u64> = names.iter().map(|n| size_of(dir.path(), n)).collect();
        assert!(sizes.windows(2).any(|w| w[0] < w[1]) && sizes.windows(2).any(|w| w[0] > w[1]));
        let mut seen = Vec::new();
        decode_batches(
            dir.path(),
            &names,
            2,
            DecodeLimits::default(),
            SMALL,
            |chunk, inputs| {
                seen.push((chunk.to_vec(), inputs));
                Ok(())
            },
        )
        .unwrap();
        // Batches of 2 in name order, across turns of 4 batches.
        let expected: Vec<Vec<String>> = names.chunks(2).map(<[String]>::to_vec).collect();
        assert_eq!(
            seen.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            expected
        );
        for (chunk, inputs) in &seen {
            assert_eq!(chunk.len(), inputs.len());
            for (name, input) in chunk.iter().zip(inputs) {
                let bytes = std::fs::read(dir.path().join(name)).unwrap();
                let alone = photo::prepare(&bytes, DecodeLimits::default(), SMALL).unwrap();
                assert!(input == &alone, "{name}: not its own input");
            }
        }
    }

    #[test]
    fn the_first_bad_photo_in_name_order_is_reported_even_if_another_fails_first() {
        let dir = tempfile::tempdir().unwrap();
        let names = noise_photos(dir.path(), 6);
        // p04 is the larger of the two, so it is decoded before p02.
        std::fs::write(dir.path().join("p02.png"), b"not a photo").unwrap();
        std::fs::write(dir.path().join("p04.png"), vec![b'x'; 100_000]).unwrap();
        let mut batches = 0;
        let result = decode_batches(
            dir.path(),
            &names,
            2,
            DecodeLimits::default(),
            SMALL,
            |_, _| {
                batches += 1;
                Ok(())
            },
        );
        match result {
            Err(ScoreError::Photo { path, .. }) => assert!(path.ends_with("p02.png"), "{path:?}"),
            other => panic!("expected p02.png's error, got {other:?}"),
        }
        // All six are one turn, which fails before handing any batch over.
        assert_eq!(batches, 0);
    }

    fn q(p: &[&str], t: &str) -> (Vec<String>, String) {
        (p.iter().map(|s| s.to_string()).collect(), t.to_owned())
    }

    #[test]
    fn average_precision_is_reciprocal_rank_of_first_hit() {
        assert_eq!(average_precision(&["a", "b", "c", "d", "e"], "a"), 1.0);
        assert_eq!(
            average_precision(&["a", "b", "c", "d", "e"], "c"),
            1.0 / 3.0
        );
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
