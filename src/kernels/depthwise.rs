//! Depthwise k×k convolutions on channel-last maps, with TensorFlow "SAME"
//! padding, the folded BatchNorm's bias and ReLU6.
//!
//! With channels last, one tap of one output pixel is a contiguous run of
//! channels in the input and in the (repacked) weights, so the inner loop is
//! a vector multiply-add over channels. Two ways through a layer:
//!
//! - row by row ([`DepthwiseKernel::run_row`]), 16 channels at a time with
//!   the tap weights held for the row, taps in the padding skipped; the
//!   fused blocks use it on their ring of rows;
//! - plane by plane ([`DepthwiseKernel::run_plane_strip`]), 16 channels of
//!   a band of rows copied first with their padding as zeros, so every
//!   pixel takes the same branch-free path; on the small late maps, where
//!   most pixels touch the padding, this measured about twice as fast.

use rayon::prelude::*;

use super::{relu6, same_padding, Isa};

/// Channels per strip: one AVX-512 vector.
const STRIP: usize = 16;

/// `acc += v · w`, lane by lane, for `B` lanes; `FMA` only where the
/// caller's target has fused multiply-add.
#[inline(always)]
fn multiply_add<const B: usize, const FMA: bool>(acc: &mut [f32; B], v: &[f32; B], w: &[f32; B]) {
    for j in 0..B {
        acc[j] = if FMA {
            v[j].mul_add(w[j], acc[j])
        } else {
            acc[j] + v[j] * w[j]
        };
    }
}

/// A depthwise convolution with its folded BatchNorm, ready to run.
#[derive(Debug, Clone)]
pub struct DepthwiseKernel {
    /// `[kernel·kernel][channels]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
    kernel: usize,
    stride: usize,
}

/// The columns under one output pixel: the first input column (possibly in
/// the padding) and the taps that land inside the row.
#[derive(Clone, Copy)]
struct Window {
    col: isize,
    kx: (usize, usize),
}

/// One strip of one image in [`DepthwiseKernel::run_plane_strip`].
struct Plane<'a> {
    /// `[padded_h][padded_w][STRIP]`, zeros in the padding.
    padded: &'a [f32],
    padded_w: usize,
    out: *mut f32,
    out_w: usize,
    out_h: usize,
    channels: usize,
    /// The strip's first channel.
    start: usize,
}

/// One strip of one output pixel near the edge of the row, whose first
/// tap is column `col` (possibly in the padding): one sum per kernel row,
/// so the chain of dependent multiply-adds is K long, not K·K.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn edge_pixel<const K: usize, const FMA: bool>(
    rows: &[Option<&[f32]>; K],
    weights: &[[[f32; STRIP]; K]; K],
    bias: [f32; STRIP],
    col: isize,
    width: usize,
    c: usize,
    start: usize,
    out: &mut [f32; STRIP],
) {
    let (lo, hi) = inside(col, K, width);
    let mut sums = [bias; K];
    sums[1..].fill([0.0; STRIP]);
    for ((row, weights), sum) in rows.iter().zip(weights).zip(sums.iter_mut()) {
        let Some(row) = row else { continue };
        let mut local = *sum;
        for (kx, w) in weights.iter().enumerate().take(hi).skip(lo) {
            let x = (col + kx as isize) as usize;
            let v: &[f32; STRIP] = row[x * c + start..][..STRIP].try_into().expect("strip");
            multiply_add::<STRIP, FMA>(&mut local, v, w);
        }
        *sum = local;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = relu6(sums.iter().map(|sum| sum[j]).sum());
    }
}

/// Taps `lo..hi` of a kernel starting at `first` that land in `0..size`.
fn inside(first: isize, kernel: usize, size: usize) -> (usize, usize) {
    let lo = (-first).clamp(0, kernel as isize) as usize;
    let hi = (size as isize - first).clamp(lo as isize, kernel as isize) as usize;
    (lo, hi)
}

impl DepthwiseKernel {
    /// Repacks `weight` (`[channels][kernel][kernel]`, as the checkpoint
    /// stores it) channel-last.
    pub fn new(
        weight: &[f32],
        bias: &[f32],
        channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Self {
        let taps = kernel * kernel;
        assert_eq!(weight.len(), channels * taps, "depthwise weight size");
        assert_eq!(bias.len(), channels, "depthwise bias size");
        assert!(stride >= 1, "depthwise stride");
        let mut packed = vec![0f32; weight.len()];
        for (c, taps_of_c) in weight.chunks_exact(taps).enumerate() {
            for (t, &w) in taps_of_c.iter().enumerate() {
                packed[t * channels + c] = w;
            }
        }
        Self {
            weight: packed,
            bias: bias.to_vec(),
            channels,
            kernel,
            stride,
        }
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Output height and width for an input of `height × width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        (
            same_padding(height, self.kernel, self.stride).0,
            same_padding(width, self.kernel, self.stride).0,
        )
    }

    /// Convolves `input` (`[batch][height][width][channels]`) into `out`
    /// (`[batch][out_h][out_w][channels]`, see
    /// [`DepthwiseKernel::output_size`]).
    pub fn run(
        &self,
        isa: Isa,
        input: &[f32],
        batch: usize,
        height: usize,
        width: usize,
        out: &mut [f32],
    ) {
        let c = self.channels;
        let (out_h, _) = same_padding(height, self.kernel, self.stride);
        let (out_w, _) = same_padding(width, self.kernel, self.stride);
        assert_eq!(input.len(), batch * height * width * c, "depthwise input");
        assert_eq!(out.len(), batch * out_h * out_w * c, "depthwise output");
        out.par_chunks_mut(out_w * c)
            .enumerate()
            .for_each(|(row, out_row)| self.run_row(isa, input, height, width, row, out_row));
    }

    /// Output row `row` (counted over the whole batch) of
    /// [`DepthwiseKernel::run`].
    pub fn run_row(
        &self,
        isa: Isa,
        input: &[f32],
        height: usize,
        width: usize,
        row: usize,
        out: &mut [f32],
    ) {
        let c = self.channels;
        let (out_h, top) = same_padding(height, self.kernel, self.stride);
        let (_, left) = same_padding(width, self.kernel, self.stride);
        let plane = height * width * c;
        let (image, oy) = (row / out_h, row % out_h);
        let image = &input[image * plane..(image + 1) * plane];
        let first = (oy * self.stride) as isize - top as isize;
        let rows = self.input_rows(first, height, |y| {
            &image[y * width * c..(y + 1) * width * c]
        });
        self.row(isa, &rows, width, left, out);
    }

    /// The input rows under output row whose first tap is input row `first`:
    /// `kernel` entries, `None` where the tap falls in the padding.
    pub fn input_rows<'a>(
        &self,
        first: isize,
        height: usize,
        row: impl Fn(usize) -> &'a [f32],
    ) -> Vec<Option<&'a [f32]>> {
        (0..self.kernel as isize)
            .map(|ky| {
                let y = first + ky;
                (y >= 0 && (y as usize) < height).then(|| row(y as usize))
            })
            .collect()
    }

    /// One output row (`[out_w][channels]`) from the `kernel` input rows
    /// under it (each `[width][channels]`, `None` in the padding), `left`
    /// being the padding before the first column.
    pub fn row(
        &self,
        isa: Isa,
        rows: &[Option<&[f32]>],
        width: usize,
        left: usize,
        out: &mut [f32],
    ) {
        assert_eq!(rows.len(), self.kernel, "depthwise rows");
        for row in rows.iter().flatten() {
            assert_eq!(row.len(), width * self.channels, "depthwise row width");
        }
        match isa {
            // SAFETY: `Isa::Avx512` is only chosen when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.row_avx512(rows, width, left, out) },
            // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.row_avx2(rows, width, left, out) },
            _ => self.row_body::<false>(rows, width, left, out),
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn row_avx512(
        &self,
        rows: &[Option<&[f32]>],
        width: usize,
        left: usize,
        out: &mut [f32],
    ) {
        if self.channels.is_multiple_of(STRIP) {
            // SAFETY: passed on from the caller.
            match self.kernel {
                3 => return unsafe { self.strips_avx512::<3>(rows, width, left, out) },
                5 => return unsafe { self.strips_avx512::<5>(rows, width, left, out) },
                _ => {}
            }
        }
        self.row_body::<true>(rows, width, left, out)
    }

    /// [`DepthwiseKernel::strip`] for every strip of the row in AVX-512
    /// registers: pixels whose taps all lie inside the row go eight at a
    /// time, reading the input rows in place (no bounds check per tap);
    /// the few at the row's ends take the edge path.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn strips_avx512<const K: usize>(
        &self,
        rows: &[Option<&[f32]>],
        width: usize,
        left: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let (c, s) = (self.channels, self.stride);
        let out_w = out.len() / c;
        assert_eq!(out.len(), out_w * c, "depthwise output row");
        let rows: [Option<&[f32]>; K] = std::array::from_fn(|ky| rows[ky]);
        // Output pixels `inner` have all K taps inside the row: the first
        // tap's column `ox·s − left` is at least 0 and at most `width − K`.
        let lo = left.div_ceil(s).min(out_w);
        let hi = if width + left >= K {
            ((width + left - K) / s + 1).clamp(lo, out_w)
        } else {
            lo
        };
        let out_ptr = out.as_mut_ptr();
        for start in (0..c).step_by(STRIP) {
            let weights = self.strip_weights::<K>(start);
            let bias: [f32; STRIP] = self.bias[start..start + STRIP].try_into().expect("strip");
            for ox in (0..lo).chain(hi..out_w) {
                let col = (ox * s) as isize - left as isize;
                let at = ox * c + start;
                let pixel: &mut [f32; STRIP] =
                    (&mut out[at..at + STRIP]).try_into().expect("strip");
                edge_pixel::<K, true>(&rows, &weights, bias, col, width, c, start, pixel);
            }
            let bias = _mm512_loadu_ps(bias.as_ptr());
            let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
            let mut ox = lo;
            // SAFETY: for `ox` in `lo..hi` every tap's column lies in
            // `0..width`, so each load reads inside its row (`width·c`
            // values, checked by `row`); each store writes this strip of
            // pixel `ox + p < hi <= out_w` inside `out`.
            macro_rules! pixels {
                ($n:literal) => {{
                    let col = ox * s - left;
                    let mut acc = [bias; $n];
                    for ky in 0..K {
                        let Some(row) = rows[ky] else { continue };
                        let base = row.as_ptr().add(col * c + start);
                        for kx in 0..K {
                            let w = _mm512_loadu_ps(weights[ky][kx].as_ptr());
                            for p in 0..$n {
                                let v = _mm512_loadu_ps(base.add((p * s + kx) * c));
                                acc[p] = _mm512_fmadd_ps(v, w, acc[p]);
                            }
                        }
                    }
                    for p in 0..$n {
                        let v = _mm512_min_ps(_mm512_max_ps(acc[p], zero), six);
                        _mm512_storeu_ps(out_ptr.add((ox + p) * c + start), v);
                    }
                }};
            }
            unsafe {
                while ox + 8 <= hi {
                    pixels!(8);
                    ox += 8;
                }
                if ox + 4 <= hi {
                    pixels!(4);
                    ox += 4;
                }
                if ox + 2 <= hi {
                    pixels!(2);
                    ox += 2;
                }
                if ox < hi {
                    pixels!(1);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(&self, rows: &[Option<&[f32]>], width: usize, left: usize, out: &mut [f32]) {
        self.row_body::<true>(rows, width, left, out)
    }

    /// One output row. `FMA` only where the caller's target has fused
    /// multiply-add; elsewhere `mul_add` would be a library call.
    #[inline(always)]
    fn row_body<const FMA: bool>(
        &self,
        rows: &[Option<&[f32]>],
        width: usize,
        left: usize,
        out: &mut [f32],
    ) {
        let c = self.channels;
        if c.is_multiple_of(STRIP) && (self.kernel == 3 || self.kernel == 5) {
            for start in (0..c).step_by(STRIP) {
                if self.kernel == 3 {
                    self.strip::<3, FMA>(rows, width, left, start, out);
                } else {
                    self.strip::<5, FMA>(rows, width, left, start, out);
                }
            }
            return;
        }
        for (ox, out) in out.chunks_exact_mut(c).enumerate() {
            let col = (ox * self.stride) as isize - left as isize;
            let window = Window {
                col,
                kx: inside(col, self.kernel, width),
            };
            let mut start = 0;
            while start + 64 <= c {
                self.block::<64, FMA>(rows, window, start, &mut out[start..start + 64]);
                start += 64;
            }
            while start + 16 <= c {
                self.block::<16, FMA>(rows, window, start, &mut out[start..start + 16]);
                start += 16;
            }
            while start < c {
                self.block::<1, FMA>(rows, window, start, &mut out[start..start + 1]);
                start += 1;
            }
        }
    }

    /// Channels `start..start + STRIP` of a whole output row, for a kernel
    /// of side `K`: the strip's weights are loaded once for the row, and
    /// pixels whose taps are all inside the row go four at a time, four
    /// independent sums, so the multiply-adds do not wait on each other.
    #[inline(always)]
    fn strip<const K: usize, const FMA: bool>(
        &self,
        rows: &[Option<&[f32]>],
        width: usize,
        left: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let c = self.channels;
        let s = self.stride;
        let weights = self.strip_weights::<K>(start);
        let bias: [f32; STRIP] = self.bias[start..start + STRIP].try_into().expect("strip");
        let rows: [Option<&[f32]>; K] = std::array::from_fn(|ky| rows[ky]);
        let out_w = out.len() / c;
        let mut ox = 0;
        while ox < out_w {
            let col = (ox * s) as isize - left as isize;
            if ox + 4 <= out_w && col >= 0 && col as usize + 3 * s + K <= width {
                let col = col as usize;
                let (mut a0, mut a1, mut a2, mut a3) = (bias, bias, bias, bias);
                for (row, weights) in rows.iter().zip(&weights) {
                    let Some(row) = row else { continue };
                    for (kx, w) in weights.iter().enumerate() {
                        let at = |p: usize| -> &[f32; STRIP] {
                            row[(col + p * s + kx) * c + start..][..STRIP]
                                .try_into()
                                .expect("strip")
                        };
                        multiply_add::<STRIP, FMA>(&mut a0, at(0), w);
                        multiply_add::<STRIP, FMA>(&mut a1, at(1), w);
                        multiply_add::<STRIP, FMA>(&mut a2, at(2), w);
                        multiply_add::<STRIP, FMA>(&mut a3, at(3), w);
                    }
                }
                for (p, acc) in [a0, a1, a2, a3].iter().enumerate() {
                    let at = (ox + p) * c + start;
                    for (o, &a) in out[at..at + STRIP].iter_mut().zip(acc) {
                        *o = relu6(a);
                    }
                }
                ox += 4;
                continue;
            }
            let at = ox * c + start;
            let pixel: &mut [f32; STRIP] = (&mut out[at..at + STRIP]).try_into().expect("strip");
            edge_pixel::<K, FMA>(&rows, &weights, bias, col, width, c, start, pixel);
            ox += 1;
        }
    }

    /// Whether [`DepthwiseKernel::run_plane_strip`] takes this layer: 3×3
    /// or 5×5, stride 1 or 2, channels a multiple of the strip width.
    pub fn plane_strips(&self) -> Option<usize> {
        let shape = matches!(self.kernel, 3 | 5) && matches!(self.stride, 1 | 2);
        (shape && self.channels.is_multiple_of(STRIP)).then_some(self.channels / STRIP)
    }

    /// Floats of scratch one strip of an `height × width` image takes in
    /// [`DepthwiseKernel::run_plane_strip`]: the strip's input with its
    /// padding written out as zeros.
    pub fn plane_scratch(&self, height: usize, width: usize) -> usize {
        let (out_h, out_w) = self.output_size(height, width);
        ((out_h - 1) * self.stride + self.kernel)
            * ((out_w - 1) * self.stride + self.kernel)
            * STRIP
    }

    /// Channels `strip·16..strip·16 + 16` of output rows `rows` of one
    /// image: the strip's input under those rows is first copied, padding
    /// included, into `scratch`, so every output pixel then takes the same
    /// branch-free path over contiguous memory. Small late maps are mostly
    /// border; this is their fast path.
    ///
    /// # Safety
    /// `out` must be valid for writes of the image's whole output
    /// (`out_h·out_w·channels` floats), and no one else may touch this
    /// strip's channels of it meanwhile. `plane_strips` must be `Some`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_plane_strip(
        &self,
        isa: Isa,
        image: &[f32],
        height: usize,
        width: usize,
        strip: usize,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        scratch: &mut Vec<f32>,
    ) {
        let c = self.channels;
        assert!(
            self.plane_strips().is_some_and(|n| strip < n),
            "depthwise strip"
        );
        assert_eq!(image.len(), height * width * c, "depthwise image");
        let (out_h, top) = same_padding(height, self.kernel, self.stride);
        let (out_w, left) = same_padding(width, self.kernel, self.stride);
        assert!(rows.start < rows.end && rows.end <= out_h, "depthwise rows");
        // Padded row `p` of the scratch is input row `first + p`.
        let first = (rows.start * self.stride) as isize - top as isize;
        let padded_h = (rows.len() - 1) * self.stride + self.kernel;
        let padded_w = (out_w - 1) * self.stride + self.kernel;
        scratch.clear();
        scratch.resize(padded_h * padded_w * STRIP, 0.0);
        let start = strip * STRIP;
        let from = first.max(0) as usize;
        let to = ((first + padded_h as isize).max(0) as usize).min(height);
        for y in from..to {
            let line = &image[y * width * c..(y + 1) * width * c];
            let at = (y as isize - first) as usize;
            let padded = &mut scratch[(at * padded_w + left) * STRIP..];
            for x in 0..width.min(padded_w - left) {
                padded[x * STRIP..(x + 1) * STRIP]
                    .copy_from_slice(&line[x * c + start..x * c + start + STRIP]);
            }
        }
        let plane = Plane {
            padded: scratch,
            padded_w,
            // SAFETY: row `rows.start` is inside the image's output.
            out: unsafe { out.add(rows.start * out_w * c) },
            out_w,
            out_h: rows.len(),
            channels: c,
            start,
        };
        // SAFETY (all four): the caller's promise about `out`.
        unsafe {
            match (self.kernel, self.stride) {
                (3, 1) => self.plane_variant::<3, 1>(isa, &plane),
                (3, 2) => self.plane_variant::<3, 2>(isa, &plane),
                (5, 1) => self.plane_variant::<5, 1>(isa, &plane),
                _ => self.plane_variant::<5, 2>(isa, &plane),
            }
        }
    }

    /// The plane path of a `K`×`K`, stride-`S` layer in `isa`'s variant.
    ///
    /// # Safety
    /// `plane.out` as in `run_plane_strip`.
    unsafe fn plane_variant<const K: usize, const S: usize>(&self, isa: Isa, plane: &Plane) {
        // SAFETY: `Isa::Avx512` and `Isa::Avx2` are only chosen when the
        // CPU has them; `plane.out` as the caller promised.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => self.plane_rows_avx512::<K, S>(plane),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => self.plane_rows_avx2::<K, S>(plane),
                _ => self.plane_rows::<K, S>(plane),
            }
        }
    }

    /// [`DepthwiseKernel::plane_rows`] in AVX-512 registers: one vector per
    /// strip pixel, the strip's weights loaded once per call.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `plane.out` as in `run_plane_strip`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn plane_rows_avx512<const K: usize, const S: usize>(&self, plane: &Plane) {
        use std::arch::x86_64::*;
        let c = self.channels;
        // SAFETY: every load below is inside `self.weight`, `self.bias` or
        // `plane.padded` (asserted per row); stores as the caller promised.
        unsafe {
            let weights = self.strip_weights::<K>(plane.start);
            let bias = _mm512_loadu_ps(self.bias[plane.start..][..STRIP].as_ptr());
            let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
            let rows = plane.padded.len() / (plane.padded_w * STRIP);
            for oy in 0..plane.out_h {
                assert!(oy * S + K <= rows, "depthwise plane rows");
                let base = plane.padded.as_ptr().add(oy * S * plane.padded_w * STRIP);
                let out = plane.out.add(oy * plane.out_w * c + plane.start);
                let mut ox = 0;
                macro_rules! pixels {
                    ($n:literal) => {{
                        let mut acc = [bias; $n];
                        for ky in 0..K {
                            let row = base.add((ky * plane.padded_w + ox * S) * STRIP);
                            for kx in 0..K {
                                let w = _mm512_loadu_ps(weights[ky][kx].as_ptr());
                                for p in 0..$n {
                                    let v = _mm512_loadu_ps(row.add((p * S + kx) * STRIP));
                                    acc[p] = _mm512_fmadd_ps(v, w, acc[p]);
                                }
                            }
                        }
                        for p in 0..$n {
                            let v = _mm512_min_ps(_mm512_max_ps(acc[p], zero), six);
                            _mm512_storeu_ps(out.add((ox + p) * c), v);
                        }
                    }};
                }
                while ox + 8 <= plane.out_w {
                    pixels!(8);
                    ox += 8;
                }
                if ox + 4 <= plane.out_w {
                    pixels!(4);
                    ox += 4;
                }
                if ox + 2 <= plane.out_w {
                    pixels!(2);
                    ox += 2;
                }
                if ox < plane.out_w {
                    pixels!(1);
                }
            }
        }
    }

    /// [`DepthwiseKernel::plane_rows`] in AVX2 registers: two 8-lane
    /// vectors per strip pixel, four pixels at a time (AVX2 has sixteen
    /// vector registers).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `plane.out` as in
    /// `run_plane_strip`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn plane_rows_avx2<const K: usize, const S: usize>(&self, plane: &Plane) {
        use std::arch::x86_64::*;
        let c = self.channels;
        // SAFETY: as in `plane_rows_avx512`.
        unsafe {
            let weights = self.strip_weights::<K>(plane.start);
            let bias = self.bias[plane.start..][..STRIP].as_ptr();
            let (bias0, bias1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
            let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
            let rows = plane.padded.len() / (plane.padded_w * STRIP);
            for oy in 0..plane.out_h {
                assert!(oy * S + K <= rows, "depthwise plane rows");
                let base = plane.padded.as_ptr().add(oy * S * plane.padded_w * STRIP);
                let out = plane.out.add(oy * plane.out_w * c + plane.start);
                let mut ox = 0;
                macro_rules! pixels {
                    ($n:literal) => {{
                        let (mut acc0, mut acc1) = ([bias0; $n], [bias1; $n]);
                        for ky in 0..K {
                            let row = base.add((ky * plane.padded_w + ox * S) * STRIP);
                            for kx in 0..K {
                                let w = weights[ky][kx].as_ptr();
                                let (w0, w1) = (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)));
                                for p in 0..$n {
                                    let v = row.add((p * S + kx) * STRIP);
                                    acc0[p] = _mm256_fmadd_ps(_mm256_loadu_ps(v), w0, acc0[p]);
                                    acc1[p] =
                                        _mm256_fmadd_ps(_mm256_loadu_ps(v.add(8)), w1, acc1[p]);
                                }
                            }
                        }
                        for p in 0..$n {
                            let at = out.add((ox + p) * c);
                            let v0 = _mm256_min_ps(_mm256_max_ps(acc0[p], zero), six);
                            let v1 = _mm256_min_ps(_mm256_max_ps(acc1[p], zero), six);
                            _mm256_storeu_ps(at, v0);
                            _mm256_storeu_ps(at.add(8), v1);
                        }
                    }};
                }
                while ox + 4 <= plane.out_w {
                    pixels!(4);
                    ox += 4;
                }
                if ox + 2 <= plane.out_w {
                    pixels!(2);
                    ox += 2;
                }
                if ox < plane.out_w {
                    pixels!(1);
                }
            }
        }
    }

    /// The plane path in portable Rust.
    ///
    /// # Safety
    /// `plane.out` as in `run_plane_strip`.
    unsafe fn plane_rows<const K: usize, const S: usize>(&self, plane: &Plane) {
        let weights = self.strip_weights::<K>(plane.start);
        let bias: [f32; STRIP] = self.bias[plane.start..plane.start + STRIP]
            .try_into()
            .expect("strip");
        for oy in 0..plane.out_h {
            let mut ox = 0;
            // SAFETY (all four): passed on from the caller.
            unsafe {
                while ox + 8 <= plane.out_w {
                    self.plane_pixels::<K, S, 8>(plane, &weights, bias, oy, ox);
                    ox += 8;
                }
                if ox + 4 <= plane.out_w {
                    self.plane_pixels::<K, S, 4>(plane, &weights, bias, oy, ox);
                    ox += 4;
                }
                if ox + 2 <= plane.out_w {
                    self.plane_pixels::<K, S, 2>(plane, &weights, bias, oy, ox);
                    ox += 2;
                }
                if ox < plane.out_w {
                    self.plane_pixels::<K, S, 1>(plane, &weights, bias, oy, ox);
                }
            }
        }
    }

    /// `N` neighbouring output pixels `(oy, ox..ox + N)` of a strip, `N`
    /// independent sums so the multiply-adds do not wait on each other.
    ///
    /// # Safety
    /// `plane.out` as in `run_plane_strip`; `ox + N <= out_w`, `oy < out_h`.
    #[inline(always)]
    unsafe fn plane_pixels<const K: usize, const S: usize, const N: usize>(
        &self,
        plane: &Plane,
        weights: &[[[f32; STRIP]; K]; K],
        bias: [f32; STRIP],
        oy: usize,
        ox: usize,
    ) {
        let span = ((N - 1) * S + K) * STRIP;
        let mut acc = [bias; N];
        for (ky, weights) in weights.iter().enumerate() {
            let at = ((oy * S + ky) * plane.padded_w + ox * S) * STRIP;
            let row = &plane.padded[at..at + span];
            for (kx, w) in weights.iter().enumerate() {
                for (p, acc) in acc.iter_mut().enumerate() {
                    let v: &[f32; STRIP] = row[(p * S + kx) * STRIP..][..STRIP]
                        .try_into()
                        .expect("strip");
                    multiply_add::<STRIP, false>(acc, v, w);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            let at = ((oy * plane.out_w + ox + p) * plane.channels + plane.start) as isize;
            for (j, &a) in acc.iter().enumerate() {
                // SAFETY: inside the image's output, in this strip's channels.
                unsafe { *plane.out.offset(at + j as isize) = relu6(a) };
            }
        }
    }

    /// The `K`×`K` tap weights of channels `start..start + STRIP`, by row
    /// and column of the kernel.
    #[inline(always)]
    fn strip_weights<const K: usize>(&self, start: usize) -> [[[f32; STRIP]; K]; K] {
        let c = self.channels;
        std::array::from_fn(|ky| {
            std::array::from_fn(|kx| {
                self.weight[(ky * K + kx) * c + start..][..STRIP]
                    .try_into()
                    .expect("strip")
            })
        })
    }

    /// Channels `start..start + B` of one output pixel.
    #[inline(always)]
    fn block<const B: usize, const FMA: bool>(
        &self,
        rows: &[Option<&[f32]>],
        window: Window,
        start: usize,
        out: &mut [f32],
    ) {
        let c = self.channels;
        let k = self.kernel;
        let mut acc: [f32; B] = self.bias[start..start + B].try_into().expect("block");
        for (ky, row) in rows.iter().enumerate() {
            let Some(row) = row else { continue };
            for kx in window.kx.0..window.kx.1 {
                let x = (window.col + kx as isize) as usize;
                let v: &[f32; B] = row[x * c + start..][..B].try_into().expect("block");
                let w: &[f32; B] = self.weight[(ky * k + kx) * c + start..][..B]
                    .try_into()
                    .expect("block");
                multiply_add::<B, FMA>(&mut acc, v, w);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = relu6(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn every_variant_and_path_matches_candle_grouped_convolution_on_odd_sizes() {
        let device = Device::Cpu;
        for &(h, w) in &[(9, 13), (10, 7), (4, 4), (1, 6), (2, 1)] {
            for &(k, s) in &[(3, 1), (3, 2), (5, 1), (5, 2)] {
                // 83 channels: one block of 64, one of 16 and three single
                // lanes; 96: the strip path.
                for channels in [83, 96] {
                    let x = Tensor::randn(0f32, 2.0, (2, channels, h, w), &device).unwrap();
                    let weight = Tensor::randn(0f32, 0.5, (channels, 1, k, k), &device).unwrap();
                    let bias = Tensor::randn(0f32, 1.0, channels, &device).unwrap();

                    let (oh, top) = same_padding(h, k, s);
                    let (ow, left) = same_padding(w, k, s);
                    let bottom = ((oh - 1) * s + k).saturating_sub(h) - top;
                    let right = ((ow - 1) * s + k).saturating_sub(w) - left;
                    let reference = x
                        .pad_with_zeros(2, top, bottom)
                        .unwrap()
                        .pad_with_zeros(3, left, right)
                        .unwrap()
                        .conv2d(&weight, 0, s, 1, channels)
                        .unwrap()
                        .broadcast_add(&bias.reshape((1, channels, 1, 1)).unwrap())
                        .unwrap()
                        .clamp(0f32, 6f32)
                        .unwrap()
                        .permute((0, 2, 3, 1))
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let input = x
                        .permute((0, 2, 3, 1))
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    let kernel = DepthwiseKernel::new(
                        &weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        &bias.to_vec1::<f32>().unwrap(),
                        channels,
                        k,
                        s,
                    );
                    assert_eq!(kernel.output_size(h, w), (oh, ow));
                    for isa in Isa::supported() {
                        let mut out = vec![f32::NAN; 2 * oh * ow * channels];
                        kernel.run(isa, &input, 2, h, w, &mut out);
                        let worst = out
                            .iter()
                            .zip(&reference)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            worst < 1e-5,
                            "{isa:?} {channels}ch {h}x{w} k{k} s{s}: off by {worst}"
                        );
                        let Some(strips) = kernel.plane_strips() else {
                            assert_ne!(channels % STRIP, 0);
                            continue;
                        };
                        // Plane by plane, each image in two bands of rows
                        // (one when it has a single row).
                        let mut out = vec![f32::NAN; 2 * oh * ow * channels];
                        let mut scratch = Vec::new();
                        let image_in = h * w * channels;
                        for (image, out) in out.chunks_exact_mut(oh * ow * channels).enumerate() {
                            let middle = oh / 2;
                            for rows in [0..middle, middle..oh] {
                                for strip in (0..strips).filter(|_| !rows.is_empty()) {
                                    // SAFETY: `out` is this image's output.
                                    unsafe {
                                        kernel.run_plane_strip(
                                            isa,
                                            &input[image * image_in..][..image_in],
                                            h,
                                            w,
                                            strip,
                                            rows.clone(),
                                            out.as_mut_ptr(),
                                            &mut scratch,
                                        )
                                    };
                                }
                            }
                        }
                        let worst = out
                            .iter()
                            .zip(&reference)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            worst < 1e-5,
                            "{isa:?} {channels}ch {h}x{w} k{k} s{s} by planes: off by {worst}"
                        );
                    }
                }
            }
        }
    }
}
