//! A depthwise convolution with TensorFlow "SAME" padding, its bias and
//! ReLU6 in one pass, as a candle custom op for the CPU.
//!
//! candle runs a grouped convolution as one small convolution per channel and
//! concatenates the results, which costs more than the rest of
//! EfficientNet-Lite0 together. Here each output plane is one task for rayon
//! and the inner loop walks a contiguous output row, which the compiler
//! vectorises when the stride is 1.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// Output size and the padding before the first row or column, following
/// TensorFlow's "SAME" rule: `out = ceil(in / stride)`, the total padding is
/// split with the smaller half on the top/left.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (out, total / 2)
}

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
    /// Convolves one `height × width` plane into `out`, then adds the bias
    /// and clamps to [0, 6].
    fn plane(&self, channel: usize, input: &[f32], width: usize, height: usize, out: &mut [f32]) {
        let k = self.kernel;
        let s = self.stride;
        let (out_h, pad_top) = same_padding(height, k, s);
        let (out_w, pad_left) = same_padding(width, k, s);
        let weights = &self.weight[channel * k * k..(channel + 1) * k * k];
        out.fill(0.0);

        for oy in 0..out_h {
            let row = &mut out[oy * out_w..(oy + 1) * out_w];
            for ky in 0..k {
                let iy = (oy * s + ky) as isize - pad_top as isize;
                if iy < 0 || iy >= height as isize {
                    continue;
                }
                let in_row = &input[iy as usize * width..(iy as usize + 1) * width];
                for kx in 0..k {
                    let w = weights[ky * k + kx];
                    // Output columns whose input column `ox*s + kx - pad_left`
                    // falls inside the row.
                    let reach = (width + pad_left) as isize - kx as isize - 1;
                    if reach < 0 {
                        continue;
                    }
                    let first = pad_left.saturating_sub(kx).div_ceil(s);
                    let last = (reach as usize / s + 1).min(out_w);
                    if first >= last {
                        continue;
                    }
                    let start = first * s + kx - pad_left;
                    if s == 1 {
                        let src = &in_row[start..start + (last - first)];
                        for (o, &v) in row[first..last].iter_mut().zip(src) {
                            *o += w * v;
                        }
                    } else {
                        for (i, o) in row[first..last].iter_mut().enumerate() {
                            *o += w * in_row[start + i * s];
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
        if channels != self.channels {
            candle_core::bail!(
                "depthwise: input has {channels} channels, weights have {}",
                self.channels
            );
        }
        let input = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) => &data[start..end],
            (CpuStorage::F32(_), None) => candle_core::bail!("depthwise: input not contiguous"),
            _ => candle_core::bail!("depthwise: input must be f32"),
        };
        let (out_h, _) = same_padding(height, self.kernel, self.stride);
        let (out_w, _) = same_padding(width, self.kernel, self.stride);
        let plane_in = height * width;
        let plane_out = out_h * out_w;
        let mut output = vec![0f32; batch * channels * plane_out];

        output
            .par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(index, out)| {
                let channel = index % channels;
                let src = &input[index * plane_in..(index + 1) * plane_in];
                self.plane(channel, src, width, height, out);
            });

        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, channels, out_h, out_w)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
