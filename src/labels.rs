//! Kaggle-style label files: a header `Image,Id`, then one row per photo.
//! Every error names the file and the line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The Id Kaggle uses for a photo of a whale that is not in the catalog.
pub const NEW_WHALE: &str = "new_whale";

/// One row of a label file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRow {
    /// 1-based line number in the file, for messages.
    pub line: u64,
    pub image: String,
    pub id: String,
}

/// Why a label file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:1: expected the header `Image,Id`, found {found:?}")]
    Header { path: PathBuf, found: String },
    #[error("{path}:{line}: {reason}")]
    Row {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{path}:{line}: image {image} is listed again (first on line {first})")]
    Duplicate {
        path: PathBuf,
        line: u64,
        image: String,
        first: u64,
    },
    #[error("{path}:{line}: image {image} is not in {dir}")]
    MissingImage {
        path: PathBuf,
        line: u64,
        image: String,
        dir: PathBuf,
    },
}

/// Reads a label file. A UTF-8 byte-order mark and CRLF line ends are
/// accepted; a row with the wrong number of fields, an empty field, a name
/// that is not a plain file name, or an image listed twice is an error.
pub fn read_labels(path: &Path) -> Result<Vec<LabelRow>, LabelsError> {
    let bytes = std::fs::read(path).map_err(|source| LabelsError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_labels(&bytes, path)
}

/// Parses label bytes; `path` is only used in messages.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<LabelRow>, LabelsError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let row_err = |line: u64, reason: String| LabelsError::Row {
        path: path.to_owned(),
        line,
        reason,
    };

    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut records = reader.records();
    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => return Err(row_err(1, e.to_string())),
        None => {
            return Err(LabelsError::Header {
                path: path.to_owned(),
                found: String::new(),
            })
        }
    };
    let fields: Vec<&str> = header.iter().map(str::trim).collect();
    if fields != ["Image", "Id"] {
        return Err(LabelsError::Header {
            path: path.to_owned(),
            found: fields.join(","),
        });
    }

    let mut rows = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for record in records {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            row_err(line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        if record.len() != 2 {
            return Err(row_err(
                line,
                format!("expected 2 fields (Image,Id), found {}", record.len()),
            ));
        }
        let image = record[0].trim().to_owned();
        let id = record[1].trim().to_owned();
        check_image_name(&image).map_err(|reason| row_err(line, reason))?;
        if id.is_empty() {
            return Err(row_err(line, format!("image {image} has an empty Id")));
        }
        if id.contains(char::is_whitespace) {
            return Err(row_err(line, format!("Id {id:?} contains white space")));
        }
        if let Some(&first) = seen.get(&image) {
            return Err(LabelsError::Duplicate {
                path: path.to_owned(),
                line,
                image,
                first,
            });
        }
        seen.insert(image.clone(), line);
        rows.push(LabelRow { line, image, id });
    }
    Ok(rows)
}

/// Accepts plain file names only, so a label file cannot point outside its
/// image folder.
pub fn check_image_name(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("empty image name".into());
    }
    if image.contains(['/', '\\']) || image == "." || image == ".." || image.contains('\0') {
        return Err(format!("image name {image:?} is not a plain file name"));
    }
    Ok(())
}

/// Fails on the first row whose image is not a file in `dir`.
pub fn check_images_exist(rows: &[LabelRow], dir: &Path, labels: &Path) -> Result<(), LabelsError> {
    for row in rows {
        if !dir.join(&row.image).is_file() {
            return Err(LabelsError::MissingImage {
                path: labels.to_owned(),
                line: row.line,
                image: row.image.clone(),
                dir: dir.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<LabelRow>, LabelsError> {
        parse_labels(text.as_bytes(), Path::new("train.csv"))
    }

    #[test]
    fn reads_rows_with_line_numbers() {
        let rows = parse("Image,Id\na.jpg,w_1\nb.jpg,new_whale\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].line, 3);
        assert_eq!(rows[1].id, NEW_WHALE);
    }

    #[test]
    fn byte_order_mark_and_crlf_are_accepted() {
        let rows = parse("\u{feff}Image,Id\r\na.jpg,w_1\r\n").unwrap();
        assert_eq!(rows[0].image, "a.jpg");
        assert_eq!(rows[0].id, "w_1");
    }

    #[test]
    fn bad_row_names_file_and_line() {
        let err = parse("Image,Id\na.jpg,w_1\nb.jpg\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "train.csv:3: expected 2 fields (Image,Id), found 1"
        );
    }

    #[test]
    fn wrong_header_is_refused() {
        let err = parse("file,whale\na.jpg,w_1\n").unwrap_err();
        assert!(matches!(err, LabelsError::Header { .. }), "{err}");
    }

    #[test]
    fn path_in_image_name_is_refused() {
        let err = parse("Image,Id\n../secret.jpg,w_1\n").unwrap_err();
        assert!(
            err.to_string().starts_with("train.csv:2: image name"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_image_is_refused() {
        let err = parse("Image,Id\na.jpg,w_1\na.jpg,w_2\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "train.csv:3: image a.jpg is listed again (first on line 2)"
        );
    }
}
