use flukeid::kernels::{DepthwiseKernel, Isa, PointwiseKernel};
use std::time::Instant;
fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        f()
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}
fn main() {
    let isa = Isa::detect();
    // (h, w, cin, hidden, k, s, cout)
    let blocks = [
        (112, 224, 32, 32, 3, 1, 16),
        (112, 224, 16, 96, 3, 2, 24),
        (56, 112, 24, 144, 3, 1, 24),
        (56, 112, 24, 144, 5, 2, 40),
        (28, 56, 40, 240, 5, 1, 40),
        (28, 56, 40, 240, 3, 2, 80),
        (14, 28, 80, 480, 3, 1, 80),
        (14, 28, 80, 480, 5, 1, 112),
        (14, 28, 112, 672, 5, 1, 112),
        (14, 28, 112, 672, 5, 2, 192),
        (7, 14, 192, 1152, 5, 1, 192),
        (7, 14, 192, 1152, 3, 1, 320),
    ];
    let (mut te, mut td, mut tp) = (0.0, 0.0, 0.0);
    for &(h, w, cin, hid, k, s, cout) in &blocks {
        let x: Vec<f32> = (0..h * w * cin).map(|i| (i % 13) as f32 * 0.1).collect();
        let e = PointwiseKernel::new(&vec![0.01; cin * hid], &vec![0.1; hid], cin, hid, true);
        let d = DepthwiseKernel::new(&vec![0.1; hid * k * k], &vec![0.0; hid], hid, k, s);
        let (oh, ow) = d.output_size(h, w);
        let p = PointwiseKernel::new(&vec![0.01; hid * cout], &vec![0.1; cout], hid, cout, false);
        let mut ex = vec![0f32; h * w * hid];
        let mut dw = vec![0f32; oh * ow * hid];
        let mut out = vec![0f32; oh * ow * cout];
        let a = time(|| e.run(isa, &x, None, &mut ex));
        let b = time(|| d.run(isa, &ex, 1, h, w, &mut dw));
        let c = time(|| p.run(isa, &dw, None, &mut out));
        te += a;
        td += b;
        tp += c;
        println!("{h}x{w} {cin}->{hid} k{k}s{s} ->{cout}: expand {a:.3} ({:.0} GF/s) dw {b:.3} ({:.1} GB/s) project {c:.3} ({:.0} GF/s)",
          2.0*(h*w*cin*hid) as f64/a/1e6, 4.0*(h*w*hid + oh*ow*hid) as f64/b/1e6, 2.0*(oh*ow*hid*cout) as f64/c/1e6);
    }
    println!("total expand {te:.2} dw {td:.2} project {tp:.2}");
}
