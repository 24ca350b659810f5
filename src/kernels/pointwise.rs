//! 1×1 convolutions on channel-last maps: `out[m][n] = bias[n] +
//! Σ_k in[m][k]·w[k][n]` over every pixel `m` of the batch, then ReLU6 or the
//! block's residual addition.
//!
//! The weights are packed once, when the network loads, into panels of
//! [`PANEL`] output channels laid out `[input][PANEL]`, zero-padded past the
//! last channel. A register tile is `tile_rows` pixels by one panel: for
//! each input channel it loads the panel's weights as vectors and
//! multiplies them by each pixel's value, read straight from the pixel's
//! row (pixels are not repacked: most layers have few output channels, so
//! a copy of the input would cost as much as the product). A tile's sums
//! stay in registers until the bias, residual and activation have been
//! applied and the result is stored.

use rayon::prelude::*;

use super::{relu6, Isa};

/// Output channels per packed weight panel.
const PANEL: usize = 32;

/// Pixels per register tile: as many as the accumulators for a whole panel
/// leave registers for (AVX-512 has 32 vector registers, AVX2 16).
fn tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 14,
        Isa::Avx2 => 6,
        Isa::Portable => 4,
    }
}

/// A 1×1 convolution with its folded BatchNorm, ready to run.
#[derive(Debug, Clone)]
pub struct PointwiseKernel {
    inputs: usize,
    outputs: usize,
    /// `ceil(outputs / PANEL)` panels of `[inputs][PANEL]`.
    packed: Vec<f32>,
    /// One bias per output channel, zero-padded to whole panels.
    bias: Vec<f32>,
    relu6: bool,
}

/// One register tile: up to `tile_rows` pixels by up to [`PANEL`] channels.
struct Tile<'a> {
    inputs: usize,
    /// The tile's pixels, `[rows][inputs]`.
    pixels: &'a [f32],
    /// Packed weights of one panel, `[inputs][PANEL]`.
    weights: &'a [f32],
    /// `PANEL` biases.
    bias: &'a [f32],
    /// The residual at the tile's first output, rows `stride` apart.
    residual: Option<&'a [f32]>,
    /// The tile's first output; rows are `stride` apart. Other tiles of the
    /// same rows may be written by other threads at the same time, so this
    /// is a pointer, not a slice over the rows.
    out: *mut f32,
    /// Values `out` may be written at.
    out_len: usize,
    stride: usize,
    rows: usize,
    cols: usize,
    relu6: bool,
}

impl PointwiseKernel {
    /// Packs `weight` (`[outputs][inputs]`, as the checkpoint stores it) and
    /// `bias`. With `relu6` the output is clamped to [0, 6].
    pub fn new(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize, relu6: bool) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "pointwise weight size");
        assert_eq!(bias.len(), outputs, "pointwise bias size");
        let panels = outputs.div_ceil(PANEL);
        let mut packed = vec![0f32; panels * inputs * PANEL];
        for (o, row) in weight.chunks_exact(inputs).enumerate() {
            let (panel, col) = (o / PANEL, o % PANEL);
            for (i, &w) in row.iter().enumerate() {
                packed[(panel * inputs + i) * PANEL + col] = w;
            }
        }
        let mut padded = vec![0f32; panels * PANEL];
        padded[..outputs].copy_from_slice(bias);
        Self {
            inputs,
            outputs,
            packed,
            bias: padded,
            relu6,
        }
    }

    /// Input channels.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Convolves `input` (`[pixels][inputs]`) into `out`
    /// (`[pixels][outputs]`), adding `residual` (`[pixels][outputs]`) when
    /// given.
    pub fn run(&self, isa: Isa, input: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        let (k, n) = (self.inputs, self.outputs);
        let rows = input.len() / k;
        assert_eq!(input.len(), rows * k, "pointwise input size");
        assert_eq!(out.len(), rows * n, "pointwise output size");
        if let Some(residual) = residual {
            assert_eq!(residual.len(), rows * n, "pointwise residual size");
        }
        if rows == 0 {
            return;
        }
        let chunk = self.chunk_rows(isa, rows, rayon::current_num_threads());
        out.par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|(index, out)| {
                let first = index * chunk;
                let count = out.len() / n;
                let pixels = &input[first * k..(first + count) * k];
                let residual = residual.map(|r| &r[first * n..(first + count) * n]);
                self.run_chunk(isa, pixels, count, residual, out);
            });
    }

    /// How many rows to give each thread at a time: enough chunks to
    /// balance `threads`, each a whole number of register tiles.
    pub fn chunk_rows(&self, isa: Isa, rows: usize, threads: usize) -> usize {
        let mr = tile_rows(isa);
        mr * rows.div_ceil(mr * threads * 4).clamp(1, 16)
    }

    /// [`PointwiseKernel::run`] on the calling thread only.
    pub fn run_here(&self, isa: Isa, input: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        let rows = input.len() / self.inputs;
        assert_eq!(input.len(), rows * self.inputs, "pointwise input size");
        assert_eq!(out.len(), rows * self.outputs, "pointwise output size");
        if let Some(residual) = residual {
            assert_eq!(
                residual.len(),
                rows * self.outputs,
                "pointwise residual size"
            );
        }
        if rows > 0 {
            self.run_chunk(isa, input, rows, residual, out);
        }
    }

    fn run_chunk(
        &self,
        isa: Isa,
        input: &[f32],
        rows: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), rows * self.outputs, "pointwise output size");
        // SAFETY: `out` is exclusively borrowed and holds every output.
        unsafe { self.run_panels(isa, input, residual, out.as_mut_ptr(), 0..self.panels()) }
    }

    /// Output panels: groups of 32 output channels (the last may be
    /// partial), the unit [`PointwiseKernel::run_panels`] splits work by.
    pub fn panels(&self) -> usize {
        self.outputs.div_ceil(PANEL)
    }

    /// Output channels of `panels` only, for all pixels of `input`
    /// (`[pixels][inputs]`) into `out` (`[pixels][outputs]`), adding the
    /// same part of `residual` when given. Lets threads share a layer with
    /// too few pixels to split by rows alone.
    ///
    /// # Safety
    /// `out` must be valid for writes of `pixels·outputs` values, and
    /// nobody else may touch these panels' channels of it meanwhile.
    pub unsafe fn run_panels(
        &self,
        isa: Isa,
        input: &[f32],
        residual: Option<&[f32]>,
        out: *mut f32,
        panels: std::ops::Range<usize>,
    ) {
        let (k, n) = (self.inputs, self.outputs);
        let rows = input.len() / k;
        assert_eq!(input.len(), rows * k, "pointwise input size");
        assert!(panels.end <= self.panels(), "pointwise panels");
        if let Some(residual) = residual {
            assert_eq!(residual.len(), rows * n, "pointwise residual size");
        }
        let mr = tile_rows(isa);
        for panel in panels {
            let col = panel * PANEL;
            let weights = &self.packed[panel * k * PANEL..(panel + 1) * k * PANEL];
            let bias = &self.bias[col..col + PANEL];
            for first in (0..rows).step_by(mr) {
                let mut tile = Tile {
                    inputs: k,
                    pixels: &input[first * k..],
                    weights,
                    bias,
                    residual: residual.map(|r| &r[first * n + col..]),
                    // SAFETY: inside the caller's `rows·n` values.
                    out: unsafe { out.add(first * n + col) },
                    out_len: (rows - first) * n - col,
                    stride: n,
                    rows: (rows - first).min(mr),
                    cols: (n - col).min(PANEL),
                    relu6: self.relu6,
                };
                tile.run(isa);
            }
        }
    }
}

impl Tile<'_> {
    fn run(&mut self, isa: Isa) {
        let reach = (self.rows - 1) * self.stride + self.cols;
        assert!(self.out_len >= reach, "pointwise tile output");
        if let Some(residual) = self.residual {
            assert!(residual.len() >= reach, "pointwise tile residual");
        }
        assert!(self.rows >= 1 && self.pixels.len() >= self.rows * self.inputs);
        assert_eq!(self.weights.len(), self.inputs * PANEL);
        assert_eq!(self.bias.len(), PANEL);
        match isa {
            // SAFETY: `Isa::Avx512` is only chosen when the CPU has AVX-512F
            // (see `Isa::supported`); the slice lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if self.cols <= 16 => unsafe { self.avx512_half() },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.avx512() },
            // SAFETY: as above, for AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.avx2() },
            _ => self.portable(),
        }
    }

    fn portable(&mut self) {
        const MR: usize = 4;
        let mut acc = [[0f32; PANEL]; MR];
        for row in &mut acc {
            row.copy_from_slice(self.bias);
        }
        for (i, row) in acc.iter_mut().enumerate().take(self.rows) {
            let pixel = &self.pixels[i * self.inputs..(i + 1) * self.inputs];
            for (&x, w) in pixel.iter().zip(self.weights.chunks_exact(PANEL)) {
                for (a, &w) in row.iter_mut().zip(w) {
                    *a += x * w;
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(self.rows) {
            for (j, &a) in row.iter().enumerate().take(self.cols) {
                let at = i * self.stride + j;
                let v = a + self.residual.map_or(0.0, |r| r[at]);
                // SAFETY: `at < reach <= out_len`, checked in `run`.
                unsafe { *self.out.add(at) = if self.relu6 { relu6(v) } else { v } };
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F, and the slices must have the lengths
    /// [`Tile::run`] checks.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(&mut self) {
        use std::arch::x86_64::*;
        const MR: usize = 14;
        let bias = self.bias.as_ptr();
        let mut acc0 = [_mm512_loadu_ps(bias); MR];
        let mut acc1 = [_mm512_loadu_ps(bias.add(16)); MR];
        // Rows past the last pixel repeat it; their sums are not stored.
        let x: [*const f32; MR] =
            std::array::from_fn(|i| self.pixels.as_ptr().add(i.min(self.rows - 1) * self.inputs));
        let w = self.weights.as_ptr();
        for p in 0..self.inputs {
            let w0 = _mm512_loadu_ps(w.add(p * PANEL));
            let w1 = _mm512_loadu_ps(w.add(p * PANEL + 16));
            for i in 0..MR {
                let v = _mm512_set1_ps(*x[i].add(p));
                acc0[i] = _mm512_fmadd_ps(v, w0, acc0[i]);
                acc1[i] = _mm512_fmadd_ps(v, w1, acc1[i]);
            }
        }
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let mask0 = lanes(self.cols);
        let mask1 = lanes(self.cols.saturating_sub(16));
        let zero = _mm512_setzero_ps();
        let six = _mm512_set1_ps(6.0);
        let out = self.out;
        let residual = self.residual.map(|r| r.as_ptr());
        // Constant indices keep the accumulators in registers.
        for i in 0..MR {
            if i < self.rows {
                let (mut a0, mut a1) = (acc0[i], acc1[i]);
                let at = i * self.stride;
                if let Some(r) = residual {
                    a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(mask0, r.add(at)));
                    a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(mask1, r.add(at + 16)));
                }
                if self.relu6 {
                    a0 = _mm512_min_ps(_mm512_max_ps(a0, zero), six);
                    a1 = _mm512_min_ps(_mm512_max_ps(a1, zero), six);
                }
                _mm512_mask_storeu_ps(out.add(at), mask0, a0);
                _mm512_mask_storeu_ps(out.add(at + 16), mask1, a1);
            }
        }
    }

    /// [`Tile::avx512`] for a panel whose last 16 channels are padding
    /// (layers with 16, 40, 80 or 112 outputs end with one).
    ///
    /// # Safety
    /// As for [`Tile::avx512`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_half(&mut self) {
        use std::arch::x86_64::*;
        const MR: usize = 14;
        let mut acc = [_mm512_loadu_ps(self.bias.as_ptr()); MR];
        let x: [*const f32; MR] =
            std::array::from_fn(|i| self.pixels.as_ptr().add(i.min(self.rows - 1) * self.inputs));
        let w = self.weights.as_ptr();
        for p in 0..self.inputs {
            let w0 = _mm512_loadu_ps(w.add(p * PANEL));
            for i in 0..MR {
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(*x[i].add(p)), w0, acc[i]);
            }
        }
        let mask = ((1u32 << self.cols) - 1) as __mmask16;
        let zero = _mm512_setzero_ps();
        let six = _mm512_set1_ps(6.0);
        let out = self.out;
        let residual = self.residual.map(|r| r.as_ptr());
        // Constant indices keep the accumulators in registers.
        #[allow(clippy::needless_range_loop)]
        for i in 0..MR {
            if i < self.rows {
                let mut a = acc[i];
                let at = i * self.stride;
                if let Some(r) = residual {
                    a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(mask, r.add(at)));
                }
                if self.relu6 {
                    a = _mm512_min_ps(_mm512_max_ps(a, zero), six);
                }
                _mm512_mask_storeu_ps(out.add(at), mask, a);
            }
        }
    }

    /// The panel as two halves of 16 channels, each six pixels by two
    /// 8-lane vectors.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and the slices must have the
    /// lengths [`Tile::run`] checks.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&mut self) {
        use std::arch::x86_64::*;
        const MR: usize = 6;
        let zero = _mm256_setzero_ps();
        let six = _mm256_set1_ps(6.0);
        // Rows past the last pixel repeat it; their sums are not stored.
        let x: [*const f32; MR] =
            std::array::from_fn(|i| self.pixels.as_ptr().add(i.min(self.rows - 1) * self.inputs));
        let out = self.out;
        let residual = self.residual.map(|r| r.as_ptr());
        for half in [0, 16] {
            if half >= self.cols {
                break;
            }
            let bias = self.bias.as_ptr().add(half);
            let mut acc0 = [_mm256_loadu_ps(bias); MR];
            let mut acc1 = [_mm256_loadu_ps(bias.add(8)); MR];
            let w = self.weights.as_ptr().add(half);
            for p in 0..self.inputs {
                let w0 = _mm256_loadu_ps(w.add(p * PANEL));
                let w1 = _mm256_loadu_ps(w.add(p * PANEL + 8));
                for i in 0..MR {
                    let v = _mm256_broadcast_ss(&*x[i].add(p));
                    acc0[i] = _mm256_fmadd_ps(v, w0, acc0[i]);
                    acc1[i] = _mm256_fmadd_ps(v, w1, acc1[i]);
                }
            }
            let cols = (self.cols - half).min(16);
            for i in 0..MR {
                if i < self.rows {
                    let at = i * self.stride + half;
                    if cols == 16 {
                        let (mut a0, mut a1) = (acc0[i], acc1[i]);
                        if let Some(r) = residual {
                            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(r.add(at)));
                            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(r.add(at + 8)));
                        }
                        if self.relu6 {
                            a0 = _mm256_min_ps(_mm256_max_ps(a0, zero), six);
                            a1 = _mm256_min_ps(_mm256_max_ps(a1, zero), six);
                        }
                        _mm256_storeu_ps(out.add(at), a0);
                        _mm256_storeu_ps(out.add(at + 8), a1);
                    } else {
                        let mut tile = [0f32; 16];
                        _mm256_storeu_ps(tile.as_mut_ptr(), acc0[i]);
                        _mm256_storeu_ps(tile.as_mut_ptr().add(8), acc1[i]);
                        for (j, &a) in tile.iter().enumerate().take(cols) {
                            let v = a + residual.map_or(0.0, |r| *r.add(at + j));
                            *out.add(at + j) = if self.relu6 { relu6(v) } else { v };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn reference(
        weight: &[f32],
        bias: &[f32],
        input: &[f32],
        residual: Option<&[f32]>,
        k: usize,
        n: usize,
        relu: bool,
    ) -> Vec<f32> {
        let rows = input.len() / k;
        let mut out = vec![0f32; rows * n];
        for m in 0..rows {
            for o in 0..n {
                let mut sum = bias[o] as f64;
                for i in 0..k {
                    sum += input[m * k + i] as f64 * weight[o * k + i] as f64;
                }
                let mut v = sum as f32 + residual.map_or(0.0, |r| r[m * n + o]);
                if relu {
                    v = relu6(v);
                }
                out[m * n + o] = v;
            }
        }
        out
    }

    #[test]
    fn every_variant_matches_the_plain_product_on_ragged_shapes() {
        // Rows and channels that leave partial tiles and partial panels.
        for &(rows, k, n) in &[
            (1, 3, 5),
            (13, 16, 24),
            (29, 40, 80),
            (98, 33, 70),
            (200, 8, 32),
        ] {
            let weight = values(k * n, 1);
            let bias = values(n, 2);
            let input: Vec<f32> = values(rows * k, 3).iter().map(|v| v * 4.0).collect();
            let residual = values(rows * n, 4);
            for relu in [false, true] {
                let kernel = PointwiseKernel::new(&weight, &bias, k, n, relu);
                for res in [None, Some(residual.as_slice())] {
                    let expected = reference(&weight, &bias, &input, res, k, n, relu);
                    for isa in Isa::supported() {
                        let mut out = vec![f32::NAN; rows * n];
                        kernel.run(isa, &input, res, &mut out);
                        let worst = out
                            .iter()
                            .zip(&expected)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            worst < 1e-4,
                            "{isa:?} {rows}x{k}x{n} relu {relu} residual {}: off by {worst}",
                            res.is_some()
                        );
                        // Panel by panel, in any order, the same values.
                        let mut by_panels = vec![f32::NAN; rows * n];
                        for panel in (0..kernel.panels()).rev() {
                            // SAFETY: `by_panels` holds every output.
                            unsafe {
                                kernel.run_panels(
                                    isa,
                                    &input,
                                    res,
                                    by_panels.as_mut_ptr(),
                                    panel..panel + 1,
                                )
                            };
                        }
                        assert_eq!(by_panels, out, "{isa:?} {rows}x{k}x{n} by panels");
                    }
                }
                // ReLU6 really clamps: the inputs are large enough to reach both ends.
                if relu {
                    let mut out = vec![0f32; rows * n];
                    kernel.run(Isa::detect(), &input, None, &mut out);
                    assert!(out.iter().all(|v| (0.0..=6.0).contains(v)));
                    if rows * n > 100 {
                        assert!(out.contains(&0.0) && out.contains(&6.0));
                    }
                }
            }
        }
    }
}
