//! Milliseconds per photo spent reading, decoding and resizing, one core:
//! the CPU the scoring pipeline spends beside the network.
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
        prepare += t.elapsed().as_secs_f64();
        assert_eq!(prepared.len(), input.len());
    }
    let n = paths.len().max(1) as f64;
    println!(
        "{} photos: read {:.2} ms, decode {:.2} ms, resize to the input {:.2} ms per photo; \
         both as the pipeline does them (large JPEGs decoded at a reduced scale) {:.2} ms",
        paths.len(),
        read / n * 1e3,
        decode / n * 1e3,
        resize / n * 1e3,
        prepare / n * 1e3
    );
}
