//! CPU kernels the backbone needs beyond candle's own ops, as candle custom
//! ops:
//!
//! - a depthwise convolution with TensorFlow "SAME" padding, its bias and
//!   ReLU6 in one pass. candle runs a grouped convolution as one small
//!   convolution per channel and concatenates the results, which costs more
//!   than the rest of EfficientNet-Lite0 together. Here each output plane is
//!   one task for rayon and the inner loop walks a contiguous output row,
//!   which the compiler vectorises when the stride is 1;
//! - a per-channel bias and optional ReLU6, applied in place to a fresh
//!   convolution output: one pass over memory instead of a broadcast add and
//!   a clamp that each allocate a new tensor.

use candle_core::{CpuStorage, CustomOp1, InplaceOp1, Layout, Shape};
use rayon::prelude::*;

/// Output size and the padding before the first row or column, following
/// TensorFlow's "SAME" rule: `out = ceil(in / stride)`, the total padding is
/// split with the smaller half on the top/left.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (out, total / 2)
}

/// The values of a contiguous f32 tensor; the ops here take no other.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: input not contiguous"),
        _ => candle_core::bail!("{op}: input must be f32"),
    }
}

/// Planes up to this many values take the whole-plane stride-1 path.
const SMALL_PLANE: usize = 4096;

/// Largest kernel side the depthwise kernel handles (Lite0 uses 3 and 5).
pub const MAX_KERNEL: usize = 7;

/// Depthwise weights with the BatchNorm already folded in.
#[derive(Debug, Clone)]
pub struct DepthwiseKernel {
    /// `[channels][kernel][kernel]`, row-major.
    pub weight: Vec<f32>,
    /// One bias per channel.
    pub bias: Vec<f32>,
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl DepthwiseKernel {
    /// The stride-1 case of [`DepthwiseKernel::plane`]. The plane is copied
    /// into a zero-bordered buffer of width `width + k − 1`; on that grid
    /// every tap is the same shift for every output, so each of the k×k taps
    /// is one long vectorisable loop over the whole plane instead of a short
    /// loop per output row (the late layers' rows are 7 to 28 wide). The
    /// extra columns of the accumulator are discarded.
    #[inline(always)]
    fn plane_stride1<const FMA: bool>(
        &self,
        channel: usize,
        input: &[f32],
        width: usize,
        height: usize,
        out: &mut [f32],
    ) {
        let k = self.kernel;
        let pad = (k - 1) / 2;
        let wide = width + k - 1;
        let mut padded = vec![0f32; (height + k - 1) * wide];
        for (y, row) in input.chunks_exact(width).enumerate() {
            padded[(y + pad) * wide + pad..][..width].copy_from_slice(row);
        }
        // The last k − 1 accumulator cells are discarded columns whose taps
        // would read past the buffer.
        let n = height * wide - (k - 1);
        let mut acc = vec![0f32; height * wide];
        let weights = &self.weight[channel * k * k..(channel + 1) * k * k];
        for ky in 0..k {
            for kx in 0..k {
                let w = weights[ky * k + kx];
                let src = &padded[ky * wide + kx..][..n];
                for (a, &v) in acc[..n].iter_mut().zip(src) {
                    *a = if FMA { v.mul_add(w, *a) } else { *a + w * v };
                }
            }
        }
        let bias = self.bias[channel];
        for (o, a) in out.chunks_exact_mut(width).zip(acc.chunks_exact(wide)) {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = (a + bias).clamp(0.0, 6.0);
            }
        }
    }

    /// [`DepthwiseKernel::plane_stride1`] compiled for AVX2 and FMA, which
    /// the baseline x86-64 target does not assume.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn plane_stride1_avx2(
        &self,
        channel: usize,
        input: &[f32],
        width: usize,
        height: usize,
        out: &mut [f32],
    ) {
        self.plane_stride1::<true>(channel, input, width, height, out)
    }

    /// Convolves one `height × width` plane into `out` (which must be
    /// zeroed), then adds the bias and clamps to [0, 6].
    fn plane(&self, channel: usize, input: &[f32], width: usize, height: usize, out: &mut [f32]) {
        // Large planes (the first block's 112×224) are bound by memory, and
        // their rows are long enough for the row-wise loops below.
        if self.stride == 1 && width * height <= SMALL_PLANE {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has just been seen to support AVX2 and FMA.
                return unsafe { self.plane_stride1_avx2(channel, input, width, height, out) };
            }
            return self.plane_stride1::<false>(channel, input, width, height, out);
        }
        let k = self.kernel;
        let s = self.stride;
        let (out_h, pad_top) = same_padding(height, k, s);
        let (out_w, pad_left) = same_padding(width, k, s);
        let weights = &self.weight[channel * k * k..(channel + 1) * k * k];

        // For each kernel column: the output columns whose input column
        // `ox*s + kx - pad_left` falls inside the row, and the first such
        // input column. The same for every row, so computed once.
        let mut spans = [(0usize, 0usize, 0usize); MAX_KERNEL];
        for (kx, span) in spans.iter_mut().enumerate().take(k) {
            let reach = (width + pad_left) as isize - kx as isize - 1;
            if reach < 0 {
                continue;
            }
            let first = pad_left.saturating_sub(kx).div_ceil(s);
            let last = (reach as usize / s + 1).min(out_w);
            if first < last {
                *span = (first, last, first * s + kx - pad_left);
            }
        }

        // With stride 2 an output row reads every other input column. Each
        // input row is split once into its even and odd columns, so that
        // every read below is contiguous and vectorises.
        let split;
        let (source, half) = if s == 2 {
            let half = width.div_ceil(2);
            let mut buffer = vec![0f32; height * width];
            for (src, dst) in input
                .chunks_exact(width)
                .zip(buffer.chunks_exact_mut(width))
            {
                let (even, odd) = dst.split_at_mut(half);
                for (i, v) in src.iter().enumerate() {
                    if i % 2 == 0 {
                        even[i / 2] = *v;
                    } else {
                        odd[i / 2] = *v;
                    }
                }
            }
            split = buffer;
            (split.as_slice(), half)
        } else {
            (input, 0)
        };

        for oy in 0..out_h {
            let row = &mut out[oy * out_w..(oy + 1) * out_w];
            for ky in 0..k {
                let iy = (oy * s + ky) as isize - pad_top as isize;
                if iy < 0 || iy >= height as isize {
                    continue;
                }
                let in_row = &source[iy as usize * width..(iy as usize + 1) * width];
                for (kx, &(first, last, start)) in spans.iter().enumerate().take(k) {
                    let w = weights[ky * k + kx];
                    let outputs = &mut row[first..last];
                    let offset = match s {
                        1 => start,
                        2 => (start % 2) * half + start / 2,
                        _ => usize::MAX,
                    };
                    if offset != usize::MAX {
                        let src = &in_row[offset..offset + outputs.len()];
                        for (o, &v) in outputs.iter_mut().zip(src) {
                            *o += w * v;
                        }
                    } else {
                        for (o, &v) in outputs.iter_mut().zip(in_row[start..].iter().step_by(s)) {
                            *o += w * v;
                        }
                    }
                }
            }
        }

        let bias = self.bias[channel];
        for v in out.iter_mut() {
            *v = (*v + bias).clamp(0.0, 6.0);
        }
    }
}

impl CustomOp1 for DepthwiseKernel {
    fn name(&self) -> &'static str {
        "depthwise-conv-bias-relu6"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if self.kernel > MAX_KERNEL {
            candle_core::bail!("depthwise: kernel {} is over {MAX_KERNEL}", self.kernel);
        }
        if channels != self.channels {
            candle_core::bail!(
                "depthwise: input has {channels} channels, weights have {}",
                self.channels
            );
        }
        let input = contiguous_f32(storage, layout, "depthwise")?;
        let (out_h, _) = same_padding(height, self.kernel, self.stride);
        let (out_w, _) = same_padding(width, self.kernel, self.stride);
        let plane_in = height * width;
        let plane_out = out_h * out_w;
        let mut output = vec![0f32; batch * channels * plane_out];

        // Late layers have many small planes: several per task keep the
        // scheduling overhead small.
        let per_task = (8192 / plane_in.max(1)).max(1);
        output
            .par_chunks_mut(plane_out * per_task)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, out) in chunk.chunks_mut(plane_out).enumerate() {
                    let index = task * per_task + i;
                    let src = &input[index * plane_in..(index + 1) * plane_in];
                    self.plane(index % channels, src, width, height, out);
                }
            });

        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, channels, out_h, out_w)),
        ))
    }
}

/// Unfolds an NCHW image into the `[batch, C·k·k, OH·OW]` patch matrix of a
/// k×k convolution with stride `stride` and TensorFlow "SAME" padding, so
/// the convolution becomes one matrix product whose result is already in
/// NCHW order (candle's own unfolding produces the transpose, which costs a
/// copy of the largest feature map of the network).
#[derive(Debug, Clone, Copy)]
pub struct Patches {
    pub kernel: usize,
    pub stride: usize,
}

impl CustomOp1 for Patches {
    fn name(&self) -> &'static str {
        "same-padding-patches"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, channels, height, width) = layout.shape().dims4()?;
        let input = contiguous_f32(storage, layout, "patches")?;
        let (k, s) = (self.kernel, self.stride);
        let (out_h, pad_top) = same_padding(height, k, s);
        let (out_w, pad_left) = same_padding(width, k, s);
        let rows = channels * k * k;
        let positions = out_h * out_w;
        let mut output = vec![0f32; batch * rows * positions];

        // One task per row of the patch matrix: (image, channel, ky, kx).
        output
            .par_chunks_mut(positions)
            .enumerate()
            .for_each(|(index, row)| {
                let (b, r) = (index / rows, index % rows);
                let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
                let plane = &input[(b * channels + c) * height * width..][..height * width];
                for oy in 0..out_h {
                    let iy = (oy * s + ky) as isize - pad_top as isize;
                    if iy < 0 || iy >= height as isize {
                        continue;
                    }
                    let in_row = &plane[iy as usize * width..][..width];
                    let out_row = &mut row[oy * out_w..][..out_w];
                    for (ox, o) in out_row.iter_mut().enumerate() {
                        let ix = (ox * s + kx) as isize - pad_left as isize;
                        if ix >= 0 && (ix as usize) < width {
                            *o = in_row[ix as usize];
                        }
                    }
                }
            });
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, rows, positions)),
        ))
    }
}

/// Adds a per-channel bias to an NC… tensor in place, then clamps to
/// [0, 6] when `relu6` is set.
#[derive(Debug, Clone)]
pub struct BiasActivation {
    pub bias: Vec<f32>,
    pub relu6: bool,
}

impl InplaceOp1 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-relu6"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let dims = layout.shape().dims();
        if dims.len() < 2 || dims[1] != self.bias.len() {
            candle_core::bail!(
                "bias: shape {dims:?} does not match {} channels",
                self.bias.len()
            );
        }
        let plane: usize = dims[2..].iter().product();
        let channels = self.bias.len();
        let data = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) => &mut data[start..end],
            (CpuStorage::F32(_), None) => candle_core::bail!("bias: tensor not contiguous"),
            _ => candle_core::bail!("bias: tensor must be f32"),
        };
        // Small planes (late layers) are grouped so each task has real work.
        let per_task = (4096 / plane.max(1)).max(1);
        data.par_chunks_mut(plane * per_task)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, values) in chunk.chunks_mut(plane).enumerate() {
                    let bias = self.bias[(task * per_task + i) % channels];
                    if self.relu6 {
                        for v in values.iter_mut() {
                            *v = (*v + bias).clamp(0.0, 6.0);
                        }
                    } else {
                        for v in values.iter_mut() {
                            *v += bias;
                        }
                    }
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Zero-pads the TensorFlow "SAME" way, for the candle reference.
    fn pad_same(x: &Tensor, k: usize, s: usize) -> Tensor {
        let (_, _, h, w) = x.dims4().unwrap();
        let (oh, top) = same_padding(h, k, s);
        let (ow, left) = same_padding(w, k, s);
        let th = ((oh - 1) * s + k).saturating_sub(h);
        let tw = ((ow - 1) * s + k).saturating_sub(w);
        x.pad_with_zeros(2, top, th - top)
            .unwrap()
            .pad_with_zeros(3, left, tw - left)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn depthwise_matches_grouped_convolution_on_odd_sizes() {
        let device = Device::Cpu;
        for &(h, w) in &[(9, 13), (10, 7), (4, 4), (1, 6)] {
            for &(k, s) in &[(3, 1), (3, 2), (5, 1), (5, 2)] {
                let channels = 5;
                let x = Tensor::randn(0f32, 2.0, (2, channels, h, w), &device).unwrap();
                let weight = Tensor::randn(0f32, 0.5, (channels, 1, k, k), &device).unwrap();
                let bias = Tensor::randn(0f32, 1.0, channels, &device).unwrap();
                let kernel = DepthwiseKernel {
                    weight: weight.flatten_all().unwrap().to_vec1().unwrap(),
                    bias: bias.to_vec1().unwrap(),
                    channels,
                    kernel: k,
                    stride: s,
                };
                let ours = x.apply_op1_no_bwd(&kernel).unwrap();
                let reference = pad_same(&x, k, s)
                    .conv2d(&weight, 0, s, 1, channels)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, channels, 1, 1)).unwrap())
                    .unwrap()
                    .clamp(0f32, 6f32)
                    .unwrap();
                let d = max_diff(&ours, &reference);
                assert!(d < 1e-5, "{h}x{w} k{k} s{s}: differs by {d}");
            }
        }
    }

    #[test]
    fn stride1_plane_agrees_with_and_without_fused_multiply_add() {
        // Only one of the two variants runs on a given CPU; this keeps the
        // other honest.
        let (h, w, k) = (6, 11, 5);
        let input: Vec<f32> = (0..h * w)
            .map(|i| ((i * 37) % 17) as f32 / 7.0 - 1.0)
            .collect();
        let kernel = DepthwiseKernel {
            weight: (0..k * k).map(|i| (i as f32 - 12.0) / 20.0).collect(),
            bias: vec![0.25],
            channels: 1,
            kernel: k,
            stride: 1,
        };
        let mut plain = vec![0f32; h * w];
        let mut fused = vec![0f32; h * w];
        kernel.plane_stride1::<false>(0, &input, w, h, &mut plain);
        kernel.plane_stride1::<true>(0, &input, w, h, &mut fused);
        for (a, b) in plain.iter().zip(&fused) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(plain.iter().any(|&v| v > 0.0 && v < 6.0), "{plain:?}");
    }

    #[test]
    fn patches_times_weights_match_convolution() {
        let device = Device::Cpu;
        for &(h, w, s) in &[(8, 12, 2), (7, 9, 2), (6, 5, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &device).unwrap();
            let patches = x
                .apply_op1_no_bwd(&Patches {
                    kernel: 3,
                    stride: s,
                })
                .unwrap();
            let (oh, _) = same_padding(h, 3, s);
            let (ow, _) = same_padding(w, 3, s);
            let ours = weight
                .reshape((4, 27))
                .unwrap()
                .broadcast_matmul(&patches)
                .unwrap()
                .reshape((2, 4, oh, ow))
                .unwrap();
            let reference = pad_same(&x, 3, s).conv2d(&weight, 0, s, 1, 1).unwrap();
            let d = max_diff(&ours, &reference);
            assert!(d < 1e-4, "{h}x{w} s{s}: differs by {d}");
        }
    }

    #[test]
    fn bias_activation_adds_per_channel_and_clamps() {
        let x = Tensor::new(
            &[[[[-1f32, 2.0], [5.0, 9.0]], [[0.5, -3.0], [1.0, 1.0]]]],
            &Device::Cpu,
        )
        .unwrap();
        x.inplace_op1(&BiasActivation {
            bias: vec![1.0, -1.0],
            relu6: true,
        })
        .unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0.0, 3.0, 6.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
        let y = Tensor::new(&[[[-1f32, 8.0]]], &Device::Cpu).unwrap();
        y.inplace_op1(&BiasActivation {
            bias: vec![1.0],
            relu6: false,
        })
        .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 9.0]
        );
    }

    #[test]
    fn same_padding_matches_tensorflow_rule() {
        // Stride 2 on an even size pads one more at the bottom/right.
        assert_eq!(same_padding(224, 3, 2), (112, 0));
        assert_eq!(same_padding(112, 5, 2), (56, 1));
        // Stride 1 pads (k-1)/2 on each side.
        assert_eq!(same_padding(14, 5, 1), (14, 2));
        // Odd sizes pad symmetrically.
        assert_eq!(same_padding(225, 3, 2), (113, 1));
    }
}
