//! Building and growing a catalog from labelled folders: what is added,
//! what is refused, and that a refused run changes nothing.

mod common;

use std::path::Path;

use candle_core::Device;
use flukeid::catalog::Catalog;
use flukeid::embed::Embedder;
use flukeid::identify::Identifier;
use flukeid::ingest::{ingest_folder, IngestError, IngestOptions};
use flukeid::photo::InputSize;

fn ingest(
    photos: &Path,
    labels: &Path,
    catalog: &Path,
) -> Result<flukeid::ingest::IngestReport, IngestError> {
    ingest_folder(
        &common::embedder(),
        photos,
        labels,
        catalog,
        &IngestOptions::default(),
    )
}

#[test]
fn running_again_on_a_bigger_folder_adds_only_what_is_new() {
    let root = tempfile::tempdir().unwrap();
    let (photos, labels) = common::kaggle_folder(root.path(), 4, 2);
    let all = std::fs::read_to_string(&labels).unwrap();
    let first: String = all.lines().take(5).map(|l| format!("{l}\n")).collect();
    let first_labels = root.path().join("first.csv");
    std::fs::write(&first_labels, first).unwrap();
    let catalog = root.path().join("catalog");

    let report = ingest(&photos, &first_labels, &catalog).unwrap();
    assert_eq!(
        (
            report.added,
            report.already_catalogued,
            report.total_sightings
        ),
        (4, 0, 4)
    );

    let report = ingest(&photos, &labels, &catalog).unwrap();
    assert_eq!(
        (
            report.added,
            report.already_catalogued,
            report.total_sightings
        ),
        (4, 4, 8)
    );

    // Nothing new: nothing is rewritten.
    let before = common::snapshot(&catalog);
    let report = ingest(&photos, &labels, &catalog).unwrap();
    assert_eq!((report.added, report.already_catalogued), (0, 8));
    assert_eq!(common::snapshot(&catalog), before);

    let identifier = Identifier::open(&catalog, common::embedder(), None).unwrap();
    assert_eq!((identifier.sightings(), identifier.whales()), (8, 4));
    let answer = &identifier
        .identify_images(&[common::resighting(3)])
        .unwrap()[0];
    assert_eq!(answer[0].whale_id, "w_3");
}

#[test]
fn new_whale_rows_are_not_indexed_and_bom_is_accepted() {
    let root = tempfile::tempdir().unwrap();
    let (photos, _) = common::kaggle_folder(root.path(), 2, 1);
    let labels = root.path().join("bom.csv");
    std::fs::write(
        &labels,
        "\u{feff}Image,Id\r\nw0_0.png,w_0\r\nw1_0.png,new_whale\r\n",
    )
    .unwrap();
    let catalog = root.path().join("catalog");
    let report = ingest(&photos, &labels, &catalog).unwrap();
    assert_eq!((report.added, report.new_whale_rows), (1, 1));
    let stored = Catalog::open_existing(&catalog)
        .unwrap()
        .unwrap()
        .images()
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored["w0_0.png"], "w_0");
}

#[test]
fn missing_image_fails_naming_the_line_and_creates_no_catalog() {
    let root = tempfile::tempdir().unwrap();
    let (photos, labels) = common::kaggle_folder(root.path(), 2, 1);
    let mut text = std::fs::read_to_string(&labels).unwrap();
    text.push_str("gone.jpg,w_9\n");
    std::fs::write(&labels, text).unwrap();
    let catalog = root.path().join("catalog");

    let err = ingest(&photos, &labels, &catalog).unwrap_err().to_string();
    let expected = format!(
        "labels.csv:4: image gone.jpg is not in {}",
        photos.display()
    );
    assert!(err.ends_with(&expected), "{err}");
    assert!(!catalog.exists(), "a failed first run created the catalog");
}

#[test]
fn missing_photo_folder_is_named() {
    let root = tempfile::tempdir().unwrap();
    let (_, labels) = common::kaggle_folder(root.path(), 1, 1);
    let missing = root.path().join("nowhere");
    let err = ingest(&missing, &labels, &root.path().join("catalog")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no such folder", missing.display())
    );
}

/// A catalog of 2 whales, and its bytes.
fn built(
    root: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<(std::path::PathBuf, Vec<u8>)>,
) {
    let (photos, labels) = common::kaggle_folder(root, 2, 2);
    let catalog = root.join("catalog");
    ingest(&photos, &labels, &catalog).unwrap();
    let before = common::snapshot(&catalog);
    assert!(before.len() >= 3, "database, graph and manifest expected");
    (photos, catalog, before)
}

#[test]
fn failed_runs_leave_an_existing_catalog_unchanged() {
    let root = tempfile::tempdir().unwrap();
    let (photos, catalog, before) = built(root.path());
    std::fs::write(
        photos.join("broken.jpg"),
        b"\xFF\xD8\xFF\xE0 this is not really a JPEG",
    )
    .unwrap();
    std::fs::copy(photos.join("w0_0.png"), photos.join("extra.png")).unwrap();

    let cases = [
        (
            "bad_row.csv",
            "Image,Id\nextra.png,w_7\nw1_0.png\n",
            "bad_row.csv:3: expected 2 fields",
        ),
        (
            "undecodable.csv",
            "Image,Id\nextra.png,w_7\nbroken.jpg,w_8\n",
            "undecodable.csv:3: ",
        ),
        (
            "conflict.csv",
            "Image,Id\nextra.png,w_7\nw0_0.png,w_1\n",
            "conflict.csv:3: w0_0.png is already catalogued as w_0, this file says w_1",
        ),
        (
            "header.csv",
            "file,whale\nextra.png,w_7\n",
            "header.csv:1: expected the header",
        ),
    ];
    for (name, text, expected) in cases {
        let labels = root.path().join(name);
        std::fs::write(&labels, text).unwrap();
        let err = ingest(&photos, &labels, &catalog).unwrap_err().to_string();
        assert!(err.contains(expected), "{name}: {err}");
        assert_eq!(
            common::snapshot(&catalog),
            before,
            "{name} changed the catalog"
        );
    }
}

#[test]
fn reopening_loads_the_saved_index_and_rebuilds_a_missing_one() {
    let root = tempfile::tempdir().unwrap();
    let (_, catalog, before) = built(root.path());

    let identifier = Identifier::open(&catalog, common::embedder(), None).unwrap();
    assert_eq!(
        common::snapshot(&catalog),
        before,
        "opening rewrote the catalog or index"
    );
    let query = common::resighting(1);
    let expected = identifier
        .identify_images(std::slice::from_ref(&query))
        .unwrap();

    std::fs::remove_dir_all(catalog.join("hnsw")).unwrap();
    let rebuilt = Identifier::open(&catalog, common::embedder(), None).unwrap();
    assert!(
        catalog.join("hnsw/manifest.json").is_file(),
        "the rebuilt index was not saved"
    );
    assert_eq!(rebuilt.identify_images(&[query]).unwrap(), expected);
}

#[test]
fn catalog_refuses_an_embedder_with_another_input_size() {
    let root = tempfile::tempdir().unwrap();
    let (_, catalog, _) = built(root.path());
    let square = Embedder::load(
        &common::models(),
        InputSize {
            width: 224,
            height: 224,
        },
        &Device::Cpu,
    )
    .unwrap();
    let err = Identifier::open(&catalog, square, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("different embedder"), "{err}");
}

#[test]
fn calibrated_threshold_is_stored_and_used() {
    let root = tempfile::tempdir().unwrap();
    let (_, catalog, _) = built(root.path());
    Catalog::create_or_open(&catalog)
        .unwrap()
        .set_threshold(0.37)
        .unwrap();
    assert_eq!(
        Identifier::open(&catalog, common::embedder(), None)
            .unwrap()
            .threshold(),
        0.37
    );
    assert_eq!(
        Identifier::open(&catalog, common::embedder(), Some(0.5))
            .unwrap()
            .threshold(),
        0.5
    );
}
