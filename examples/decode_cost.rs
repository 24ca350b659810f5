//! Milliseconds per photo spent reading, decoding and resizing, one core:
//! the CPU the scoring pipeline spends beside the network; then the median
//! photo and the slowest, as the pipeline prepares them. Where the build has
//! libjpeg-turbo, the same photos also prepared with the pure-Rust decoders,
//! photo by photo beside it. Last, the same photos prepared on every thread
//! of rayon's pool, as bulk scoring prepares them and all as one job,
//! against one core: how much of the pool decoding gets to use.
//!
//!     cargo run --release --example decode_cost -- DIR [MAX_PHOTOS]
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: decode_cost DIR [MAX_PHOTOS]");
        std::process::exit(2);
    };
    let max: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(40);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.truncate(max);
    let (mut read, mut decode, mut resize, mut prepare) = (0.0, 0.0, 0.0, 0.0);
    let compare = flukeid::photo::JPEG_DECODER != "zune-jpeg";
    let mut pure_rust = 0.0;
    let mut each = Vec::with_capacity(paths.len());
    for path in &paths {
        let t = Instant::now();
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        read += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let image = flukeid::photo::decode(&bytes, Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        decode += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let input = flukeid::photo::to_chw(&image, Default::default());
        resize += t.elapsed().as_secs_f64();
        assert!(!input.is_empty());
        let t = Instant::now();
        let prepared = flukeid::photo::prepare(&bytes, Default::default(), Default::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let spent = t.elapsed().as_secs_f64();
        prepare += spent;
        assert_eq!(prepared.len(), input.len());
        each.push((spent, path, image.width(), image.height()));
        if compare {
            let t = Instant::now();
            let prepared =
                flukeid::photo::prepare_pure_rust(&bytes, Default::default(), Default::default())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            pure_rust += t.elapsed().as_secs_f64();
            assert_eq!(prepared.len(), input.len());
        }
    }
    let n = paths.len().max(1) as f64;
    println!("JPEG decoder: {}", flukeid::photo::JPEG_DECODER);
    println!(
        "{} photos: read {:.2} ms, decode {:.2} ms, resize to the input {:.2} ms per photo; \
         both as the pipeline does them (large JPEGs decoded at a reduced scale) {:.2} ms",
        paths.len(),
        read / n * 1e3,
        decode / n * 1e3,
        resize / n * 1e3,
        prepare / n * 1e3
    );
    if compare {
        println!(
            "prepared with the pure-Rust decoders instead: {:.2} ms per photo",
            pure_rust / n * 1e3
        );
    }
    each.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some(median) = each.get(each.len() / 2) {
        println!("prepared: median {:.2} ms", median.0 * 1e3);
    }
    for (spent, path, width, height) in each.iter().rev().take(3) {
        println!(
            "  slow: {:.2} ms {} ({width}x{height})",
            spent * 1e3,
            path.display()
        );
    }

    // Each timed twice, the faster counting: one core, from memory; every
    // thread as bulk scoring prepares them (`score::decode_batches`, which
    // also reads the files); the whole folder as one job, from memory.
    use rayon::prelude::*;
    let bytes: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let prepare_one = |b: &Vec<u8>| {
        let prepared = flukeid::photo::prepare(b, Default::default(), Default::default());
        std::hint::black_box(prepared.expect("prepared above"));
    };
    let best = |run: &dyn Fn()| {
        (0..2)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64() * 1e3 / n
            })
            .fold(f64::INFINITY, f64::min)
    };
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let one_core = best(&|| bytes.iter().for_each(prepare_one));
    let pipeline = best(&|| {
        let dir = std::path::Path::new(&dir);
        let input = Default::default();
        flukeid::score::decode_batches(dir, &names, 8, Default::default(), input, |_, inputs| {
            std::hint::black_box(inputs);
            Ok(())
        })
        .expect("prepared above");
    });
    let whole = best(&|| bytes.par_iter().for_each(prepare_one));
    println!(
        "from memory: {one_core:.2} ms per photo on one core; on {} threads {pipeline:.2} ms \
         as bulk scoring prepares them ({:.2}x), {whole:.2} ms as one job ({:.2}x)",
        rayon::current_num_threads(),
        one_core / pipeline,
        one_core / whole
    );
}
