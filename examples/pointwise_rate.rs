//! The 1×1 kernel on one core on the shapes of EfficientNet-Lite0's late
//! layers at 224×448 (98 or 392 pixels) and one large product, in
//! multiply-adds per second.
//!
//!     cargo run --release --example pointwise_rate
use std::time::Instant;

use flukeid::kernels::{Isa, PointwiseKernel};

fn main() {
    let isa = Isa::detect();
    println!("{} kernels, one core, best of 100", isa.name());
    for (rows, k, n) in [
        (4096, 256, 256),
        (98, 192, 1152),
        (98, 1152, 192),
        (98, 1152, 320),
        (98, 320, 1280),
        (392, 112, 672),
        (392, 672, 112),
    ] {
        let weight: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
        let input: Vec<f32> = (0..rows * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let kernel = PointwiseKernel::new(&weight, &vec![0.0; n], k, n, true);
        let mut out = vec![0f32; rows * n];
        let best = (0..100)
            .map(|_| {
                let t = Instant::now();
                kernel.run_here(isa, &input, None, &mut out);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        let macs = (rows * k * n) as f64;
        println!(
            "{rows:>5} x {k:>4} -> {n:>4}: {:7.1} us, {:5.1} GMAC/s",
            best * 1e6,
            macs / best / 1e9
        );
    }
}
