use flukeid::embed::Embedder;
use std::time::Instant;
fn main() {
    let batch: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1);
    let embedder = Embedder::load(
        std::path::Path::new("models"),
        Default::default(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let img = flukeid::bench::synthetic_fluke(1, 1050, 700);
    let input = embedder.prepare(&img);
    let inputs = vec![input; batch];
    for _ in 0..3 {
        embedder.embed_inputs(&inputs).unwrap();
    }
    let t = Instant::now();
    let mut n = 0;
    let mut v = Vec::new();
    while t.elapsed().as_secs_f64() < 4.0 {
        let s = Instant::now();
        embedder.embed_inputs(&inputs).unwrap();
        v.push(s.elapsed().as_secs_f64() * 1e3 / batch as f64);
        n += 1;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let x =
        flukeid::photo::batch_tensor(&inputs, embedder.input(), &candle_core::Device::Cpu).unwrap();
    let mut f = Vec::new();
    for _ in 0..100 {
        let s = Instant::now();
        let feats = embedder.backbone().features(&x).unwrap();
        f.push(s.elapsed().as_secs_f64() * 1e3 / batch as f64);
        let s2 = Instant::now();
        let _ = flukeid::embed::gem(&feats, 3.0).unwrap();
        if f.len() == 100 {
            println!("gem {:.3} ms", s2.elapsed().as_secs_f64() * 1e3);
        }
    }
    f.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("features only: median {:.2} ms/image", f[50]);
    println!(
        "batch {batch}: {n} passes, median {:.2} ms/image, min {:.2}",
        v[v.len() / 2],
        v[0]
    );
}

#[allow(dead_code)]
fn features_only() {}
