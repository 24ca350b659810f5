//! The depthwise kernel's two paths on one core, on the shapes of
//! EfficientNet-Lite0's depthwise layers at 224×448: row by row (taps at
//! the border skipped) and plane by plane (the strip's input copied with
//! its padding first). The backbone picks between them by this measurement.
//!
//!     cargo run --release --example depthwise_rate
//!     FLUKEID_ISA=avx2 cargo run --release --example depthwise_rate
use std::time::Instant;

use flukeid::kernels::{DepthwiseKernel, Isa};

/// Best of this many runs of each path.
const RUNS: usize = 200;

fn best(mut run: impl FnMut()) -> f64 {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let isa = Isa::detect();
    println!("{} kernels, one core, best of {RUNS}", isa.name());
    let shapes = [
        (112, 224, 32, 3, 1),
        (28, 56, 240, 5, 1),
        (14, 28, 480, 3, 1),
        (14, 28, 672, 5, 1),
        (14, 28, 672, 5, 2),
        (7, 14, 1152, 5, 1),
    ];
    for (h, w, c, k, s) in shapes {
        let input: Vec<f32> = (0..h * w * c)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let weight: Vec<f32> = (0..c * k * k)
            .map(|i| ((i * 31) % 100) as f32 / 100.0 - 0.5)
            .collect();
        let kernel = DepthwiseKernel::new(&weight, &vec![0.1; c], c, k, s);
        let (oh, ow) = kernel.output_size(h, w);
        let macs = (oh * ow * c * k * k) as f64;

        let mut by_rows = vec![0f32; oh * ow * c];
        let rows = best(|| {
            for (r, out) in by_rows.chunks_exact_mut(ow * c).enumerate() {
                kernel.run_row(isa, &input, h, w, r, out);
            }
        });
        let mut by_planes = vec![0f32; oh * ow * c];
        let mut scratch = Vec::new();
        let strips = kernel.plane_strips().expect("channels in whole strips");
        let planes = best(|| {
            for strip in 0..strips {
                // SAFETY: `by_planes` is the image's whole output.
                unsafe {
                    kernel.run_plane_strip(
                        isa,
                        &input,
                        h,
                        w,
                        strip,
                        0..oh,
                        by_planes.as_mut_ptr(),
                        &mut scratch,
                    )
                };
            }
        });
        let worst = by_rows
            .iter()
            .zip(&by_planes)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "the paths disagree by {worst}");
        println!(
            "{h:>3}x{w:<3} {c:>4} ch k{k} s{s}: rows {:6.1} us ({:4.1} GMAC/s), planes {:6.1} us ({:4.1} GMAC/s)",
            rows * 1e6,
            macs / rows / 1e9,
            planes * 1e6,
            macs / planes / 1e9
        );
    }
}
