//! Helpers shared by the integration tests: the shipped model, and small
//! catalogs of synthetic flukes made on the fly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use flukeid::bench::synthetic_fluke;
use flukeid::embed::Embedder;
use flukeid::photo::InputSize;
use image::RgbImage;

pub fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn embedder() -> Embedder {
    Embedder::load(&models(), InputSize::default(), &Device::Cpu).expect("shipped model loads")
}

/// A second photo of the same synthetic whale: another size, a little
/// brighter, shifted by a few pixels.
pub fn resighting(seed: u32) -> RgbImage {
    let base = synthetic_fluke(seed, 700, 350);
    let mut shifted = RgbImage::from_pixel(700, 350, image::Rgb([70, 110, 150]));
    image::imageops::overlay(&mut shifted, &base, 9, 5);
    for p in shifted.pixels_mut() {
        for c in p.0.iter_mut() {
            *c = c.saturating_add(12);
        }
    }
    shifted
}

/// A folder in Kaggle layout: `photos/` with `whales × per_whale` PNGs of
/// synthetic whales `w_0 …`, and `labels.csv`. Returns (photos, labels).
pub fn kaggle_folder(root: &Path, whales: u32, per_whale: u32) -> (PathBuf, PathBuf) {
    let photos = root.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let mut labels = String::from("Image,Id\n");
    for whale in 0..whales {
        for k in 0..per_whale {
            let name = format!("w{whale}_{k}.png");
            let image = if k == 0 {
                synthetic_fluke(whale, 640, 320)
            } else {
                resighting(whale)
            };
            image.save(photos.join(&name)).unwrap();
            labels.push_str(&format!("{name},w_{whale}\n"));
        }
    }
    let labels_path = root.join("labels.csv");
    std::fs::write(&labels_path, labels).unwrap();
    (photos, labels_path)
}

/// Every file under `dir` with its bytes, sorted, to prove a failed
/// operation changed nothing.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(snapshot(&path));
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn png_bytes(image: &image::DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

pub fn jpeg_bytes(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    out
}

/// A valid PNG whose header claims 50,000 × 50,000 pixels (with a correct
/// CRC), so only a pixel limit can stop it.
pub fn huge_png_header() -> Vec<u8> {
    let mut png = png_bytes(&image::DynamicImage::ImageRgb8(RgbImage::new(4, 4)));
    // IHDR data starts at byte 16: width, height (big-endian); CRC at 29.
    png[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// CRC-32 as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
