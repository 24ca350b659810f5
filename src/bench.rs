//! `flukeid bench`: milliseconds per image for the embedding at batch 1
//! and batch 8, the latency of one identify request through the HTTP
//! service, and bulk scoring (`score::decode_batches`: reading, decoding
//! and resizing a few batches of photos on every thread, then embedding
//! them) against embedding the same photos already decoded, with the most
//! bulk scoring can reach given what preparing a photo costs; measured in
//! interleaved rounds so that a slow stretch of the machine hits every
//! figure alike. Nothing here asserts a time.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use image::{Rgb, RgbImage};

use crate::backbone::LayerTimes;
use crate::embed::Embedder;
use crate::http::{self, ServeOptions, Service};
use crate::identify::Identifier;
use crate::ingest::{self, IngestOptions};
use crate::photo::{DecodeLimits, InputSize};
use crate::score;

/// Photos per batch in the batched and bulk measurements.
const BATCH: usize = 8;
/// At most this many photos in the bulk-scoring measurement.
const BULK_PHOTOS: usize = 96;

/// A deterministic fluke-like picture: a dark wide shape on a bright sea,
/// with white spots placed by `seed`. Used by the benchmark and tests.
pub fn synthetic_fluke(seed: u32, width: u32, height: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let spots: Vec<(f32, f32, f32)> = (0..12)
        .map(|_| {
            let x = (next() % 1000) as f32 / 1000.0;
            let y = (next() % 1000) as f32 / 1000.0;
            let r = 0.02 + (next() % 100) as f32 / 2000.0;
            (x, y, r)
        })
        .collect();
    RgbImage::from_fn(width, height, |x, y| {
        let u = x as f32 / width as f32;
        let v = y as f32 / height as f32;
        // Two lobes meeting in a notch at the centre.
        let lobe =
            (v - 0.35 - 0.25 * (2.0 * (u - 0.5)).powi(2)).abs() < 0.18 && (0.08..0.92).contains(&u);
        if !lobe {
            return Rgb([70, 110, 150]);
        }
        let spotted = spots.iter().any(|(sx, sy, r)| {
            let dx = u - sx;
            let dy = (v - sy) * 0.5;
            dx * dx + dy * dy < r * r
        });
        if spotted {
            Rgb([235, 235, 230])
        } else {
            Rgb([25, 25, 30])
        }
    })
}

/// The most bulk scoring can reach, as a share of the bare batched
/// embedding's `bare` images per second, when every one of `threads` cores
/// either runs the network or prepares photos (`prepare` ms of one core
/// each): a photo then takes the network's time plus its preparation
/// shared out among the cores.
fn prepare_bound(bare: f64, prepare: f64, threads: usize) -> f64 {
    let embed = 1e3 / bare;
    embed / (embed + prepare / threads.max(1) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let middle = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[middle - 1] + v[middle]) / 2.0
    } else {
        v[middle]
    }
}

/// Runs the benchmark and prints its figures.
pub fn run(
    models: &Path,
    rounds: usize,
    bulk_photos: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let rounds = rounds.max(1);
    let input = InputSize::default();
    let embedder = Embedder::load(models, input, &Device::Cpu)?;
    let images: Vec<RgbImage> = (0..8).map(|i| synthetic_fluke(i, 1050, 700)).collect();
    let inputs: Vec<Vec<f32>> = images.iter().map(|i| embedder.prepare(i)).collect();

    // A catalog of synthetic sightings for the request measurement.
    let scratch = std::env::temp_dir().join(format!("flukeid-bench-{}", std::process::id()));
    let photos = scratch.join("photos");
    std::fs::create_dir_all(&photos)?;
    let mut labels = String::from("Image,Id\n");
    for i in 0..32 {
        let name = format!("s{i}.png");
        synthetic_fluke(100 + i, 640, 320).save(photos.join(&name))?;
        labels.push_str(&format!("{name},w_{}\n", i / 2));
    }
    std::fs::write(scratch.join("labels.csv"), labels)?;
    let catalog = scratch.join("catalog");
    ingest::ingest_folder(
        &embedder,
        &photos,
        &scratch.join("labels.csv"),
        &catalog,
        &IngestOptions::default(),
    )?;
    let identifier = Identifier::open(&catalog, embedder.clone(), None)?;

    // Photos for bulk scoring: the caller's, or synthetic JPEGs.
    let (photo_dir, mut names) = match bulk_photos {
        Some(dir) => (dir.to_owned(), score::list_images(dir)?),
        None => {
            let dir = scratch.join("bulk");
            std::fs::create_dir_all(&dir)?;
            let mut names = Vec::new();
            for i in 0..48 {
                let name = format!("b{i:02}.jpg");
                synthetic_fluke(500 + i, 1050, 700).save(dir.join(&name))?;
                names.push(name);
            }
            (dir, names)
        }
    };
    names.truncate(BULK_PHOTOS);
    let limits = DecodeLimits::default();
    let mut decoded = Vec::new();
    score::decode_batches(&photo_dir, &names, BATCH, limits, input, |_, inputs| {
        decoded.extend(inputs);
        Ok(())
    })?;
    let service = Service::new(ServeOptions::default());
    service.set_ready(identifier);
    let mut jpeg = Vec::new();
    synthetic_fluke(7, 1050, 700).write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )?;

    let system = actix_web::rt::System::new();
    let app = system.block_on(actix_web::test::init_service(
        actix_web::App::new().configure(http::configure(service.clone())),
    ));
    let request = |body: &[u8]| {
        let boundary = "flukeidbench";
        let mut payload = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        )
        .into_bytes();
        payload.extend_from_slice(body);
        payload.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        actix_web::test::TestRequest::post()
            .uri("/v1/identify")
            .insert_header((
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            ))
            .set_payload(payload)
            .to_request()
    };

    // The same network on square 224×224 photos, as ImageNet models are
    // usually compared.
    let square_size = InputSize {
        width: 224,
        height: 224,
    };
    let square = Embedder::load(models, square_size, &Device::Cpu)?;
    let square_input = vec![square.prepare(&images[0])];

    // Warm-up: first passes allocate and fault in the weights.
    embedder.embed_inputs(&inputs[..1])?;
    embedder.embed_inputs(&inputs)?;
    square.embed_inputs(&square_input)?;

    let single_input = crate::photo::batch_tensor(&inputs[..1], input, &Device::Cpu)?;
    let mut layers = Vec::new();
    let (mut single, mut batched, mut requests) = (Vec::new(), Vec::new(), Vec::new());
    let mut squares = Vec::new();
    let (mut bare, mut piped, mut prepare) = (Vec::new(), Vec::new(), Vec::new());
    let mut piped_preparing = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        square.embed_inputs(&square_input)?;
        squares.push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        embedder.embed_inputs(&inputs[..1])?;
        single.push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        embedder.embed_inputs(&inputs)?;
        batched.push(t.elapsed().as_secs_f64() * 1e3 / inputs.len() as f64);

        let t = Instant::now();
        let response = system.block_on(actix_web::test::call_service(&app, request(&jpeg)));
        if !response.status().is_success() {
            return Err(format!("identify request failed with {}", response.status()).into());
        }
        requests.push(t.elapsed().as_secs_f64() * 1e3);

        layers.push(embedder.backbone().layer_times(&single_input)?);

        let t = Instant::now();
        for chunk in decoded.chunks(BATCH) {
            embedder.embed_inputs(chunk)?;
        }
        bare.push(decoded.len() as f64 / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut embedding = 0.0;
        score::decode_batches(&photo_dir, &names, BATCH, limits, input, |_, inputs| {
            let t = Instant::now();
            let done = embedder
                .embed_inputs(&inputs)
                .map(drop)
                .map_err(|e| score::ScoreError::from(crate::identify::IdentifyError::from(e)));
            embedding += t.elapsed().as_secs_f64();
            done
        })?;
        let spent = t.elapsed().as_secs_f64();
        piped.push(names.len() as f64 / spent);
        piped_preparing.push((spent - embedding) * 1e3 / names.len() as f64);

        // The same photos read and prepared one after another on this
        // thread: the core time bulk scoring spends beside the network.
        let t = Instant::now();
        for name in &names {
            std::hint::black_box(score::prepare_file(&photo_dir, name, limits, input)?);
        }
        prepare.push(t.elapsed().as_secs_f64() * 1e3 / names.len() as f64);
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let (b1, b8, req) = (median(single), median(batched), median(requests));
    println!(
        "flukeid bench: {rounds} interleaved rounds, median, input {input}, {} threads, {} kernels, JPEGs by {}",
        rayon::current_num_threads(),
        embedder.backbone().isa().name(),
        crate::photo::JPEG_DECODER
    );
    println!("embed 224x224 batch 1 {:6.1} ms/image", median(squares));
    println!("embed batch 1      {b1:9.1} ms/image");
    println!(
        "embed batch 8      {b8:9.1} ms/image  ({:.2}x batch 1)",
        b8 / b1
    );
    println!("identify request   {req:9.1} ms        ({:.2}x embed batch 1; 1050x700 JPEG, 32-sighting catalog)", req / b1);
    let (bare, piped, prepare) = (median(bare), median(piped), median(prepare));
    println!(
        "bulk scoring  {piped:9.1} images/s ({:.2}x bare batched embedding, {bare:.1} images/s; {} photos from {})",
        piped / bare,
        names.len(),
        bulk_photos.map_or("synthetic 1050x700 JPEGs".to_owned(), |p| p.display().to_string())
    );
    let threads = rayon::current_num_threads();
    println!(
        "preparing a photo {prepare:6.2} ms on one core; with the network on every core, the most bulk scoring can reach is about {:.2}x",
        prepare_bound(bare, prepare, threads)
    );
    let piped_preparing = median(piped_preparing);
    println!(
        "  in bulk scoring, preparing took {piped_preparing:.2} ms a photo on {threads} threads ({:.2}x one core)",
        prepare / piped_preparing
    );
    let kind = |f: fn(&LayerTimes) -> f64| median(layers.iter().map(f).collect());
    println!(
        "batch 1 by layer kind (ms): stem {:.1}, fused blocks {:.1}, expand 1x1 {:.1}, depthwise {:.1}, project 1x1 + residual {:.1}, head {:.1}",
        kind(|t| t.stem),
        kind(|t| t.fused),
        kind(|t| t.expand),
        kind(|t| t.depthwise),
        kind(|t| t.project),
        kind(|t| t.head)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prepare_bound;

    #[test]
    fn the_bulk_bound_shares_preparation_among_the_cores() {
        // 100 images/s is 10 ms a photo; 4 ms of preparation on two
        // cores adds 2 ms: 10 / 12.
        assert!((prepare_bound(100.0, 4.0, 2) - 10.0 / 12.0).abs() < 1e-12);
        // One core takes all 4 ms.
        assert!((prepare_bound(100.0, 4.0, 1) - 10.0 / 14.0).abs() < 1e-12);
        assert_eq!(prepare_bound(100.0, 0.0, 2), 1.0);
    }
}
