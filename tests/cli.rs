//! The `flukeid` command as a user runs it: errors that name the file and
//! line, and a scored submission whose MAP@5 can be checked by hand.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use flukeid::score::average_precision;

fn flukeid(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flukeid"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("flukeid runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn models() -> String {
    common::models().display().to_string()
}

/// `flukeid index` of `dir/photos` and `dir/labels.csv` into `dir/cat`.
fn index_photos(dir: &Path) -> Output {
    index_photos_with_models(dir, Some(&models()))
}

/// `flukeid index` of `photos/` into `cat/`, with `--models` when given.
fn index_photos_with_models(dir: &Path, models: Option<&str>) -> Output {
    let mut args = vec!["index"];
    if let Some(models) = models {
        args.extend(["--models", models]);
    }
    args.extend([
        "--images",
        "photos",
        "--labels",
        "labels.csv",
        "--catalog",
        "cat",
    ]);
    let out = flukeid(&args, dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    out
}

#[test]
fn index_error_names_file_and_line_and_exits_nonzero() {
    let root = tempfile::tempdir().unwrap();
    let (_, _) = common::kaggle_folder(root.path(), 1, 1);
    std::fs::write(
        root.path().join("bad.csv"),
        "Image,Id\nw0_0.png,w_0\nw0_0.png;w_1\n",
    )
    .unwrap();
    let out = flukeid(
        &[
            "index",
            "--models",
            &models(),
            "--images",
            "photos",
            "--labels",
            "bad.csv",
            "--catalog",
            "cat",
        ],
        root.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: bad.csv:3: expected 2 fields (Image,Id), found 1"),
        "{stderr}"
    );
    assert!(!root.path().join("cat").exists());
}

#[test]
fn score_writes_every_image_once_and_prints_map5_of_its_own_submission() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    common::kaggle_folder(dir, 5, 1);
    let out = index_photos(dir);
    assert!(
        text(&out.stdout).starts_with("added 5 sightings"),
        "{}",
        text(&out.stdout)
    );

    // Queries: re-sightings of three catalogued whales and two unseen ones.
    let queries = dir.join("queries");
    std::fs::create_dir_all(&queries).unwrap();
    let mut truth = String::from("Image,Id\n");
    for whale in [0u32, 2, 4] {
        common::resighting(whale)
            .save(queries.join(format!("q{whale}.png")))
            .unwrap();
        truth.push_str(&format!("q{whale}.png,w_{whale}\n"));
    }
    for seed in [50u32, 51] {
        flukeid::bench::synthetic_fluke(seed, 600, 300)
            .save(queries.join(format!("n{seed}.png")))
            .unwrap();
        truth.push_str(&format!("n{seed}.png,new_whale\n"));
    }
    std::fs::write(dir.join("truth.csv"), &truth).unwrap();

    let out = flukeid(
        &[
            "score",
            "--models",
            &models(),
            "--images",
            "queries",
            "--out",
            "sub.csv",
            "--truth",
            "truth.csv",
            "--catalog",
            "cat",
        ],
        dir,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let submission = std::fs::read_to_string(dir.join("sub.csv")).unwrap();
    let mut lines = submission.lines();
    assert_eq!(lines.next(), Some("Image,Id"));
    let rows: HashMap<String, Vec<String>> = lines
        .map(|l| {
            let (image, ids) = l.split_once(',').unwrap();
            (
                image.to_owned(),
                ids.split(' ').map(str::to_owned).collect(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 5, "{submission}");
    for ids in rows.values() {
        assert_eq!(ids.len(), 5, "{submission}");
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 5, "{submission}");
    }
    for whale in [0, 2, 4] {
        assert_eq!(
            rows[&format!("q{whale}.png")][0],
            format!("w_{whale}"),
            "{submission}"
        );
    }

    let by_hand: f64 = truth
        .lines()
        .skip(1)
        .map(|l| {
            let (image, id) = l.split_once(',').unwrap();
            average_precision(&rows[image], id)
        })
        .sum::<f64>()
        / 5.0;
    let printed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MAP@5 "))
        .expect("MAP@5 line");
    assert_eq!(printed, format!("{by_hand:.4}"), "{stdout}");
}

#[test]
fn score_with_a_truth_row_for_a_missing_image_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    common::kaggle_folder(dir, 1, 1);
    index_photos(dir);
    std::fs::write(
        dir.join("truth.csv"),
        "Image,Id\nw0_0.png,w_0\nelsewhere.png,w_0\n",
    )
    .unwrap();
    let out = flukeid(
        &[
            "score",
            "--models",
            &models(),
            "--images",
            "photos",
            "--out",
            "sub.csv",
            "--truth",
            "truth.csv",
            "--catalog",
            "cat",
        ],
        dir,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("truth.csv:3: image elsewhere.png"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.join("sub.csv").exists());
}

#[test]
fn score_against_a_missing_catalog_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    common::kaggle_folder(dir, 1, 1);
    let out = flukeid(
        &[
            "score",
            "--models",
            &models(),
            "--images",
            "photos",
            "--out",
            "sub.csv",
            "--catalog",
            "typo",
        ],
        dir,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("error: typo: no catalog here"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.join("sub.csv").exists());
}

#[test]
fn commands_run_outside_the_checkout_find_its_models() {
    // No `--models`, and the working directory has no models/ folder: the
    // binary falls back to the models/ of the checkout it was built from.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    common::kaggle_folder(dir, 2, 1);
    assert!(!dir.join("models").exists());
    let out = index_photos_with_models(dir, None);
    assert!(
        text(&out.stdout).starts_with("added 2 sightings"),
        "{}",
        text(&out.stdout)
    );
    // A models folder that is named and missing is still an error.
    let out = flukeid(
        &[
            "index",
            "--models",
            "nowhere",
            "--images",
            "photos",
            "--labels",
            "labels.csv",
            "--catalog",
            "cat2",
        ],
        dir,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nowhere"),
        "{}",
        text(&out.stderr)
    );
}
