//! The stem: a k×k strided convolution from the photo's planar RGB
//! (`[batch][3][height][width]`, as the photo is prepared) to a channel-last
//! map, with "SAME" padding, the folded BatchNorm's bias and ReLU6. Each
//! output pixel gathers its 3·k·k inputs once and multiplies them by the
//! weights, laid out `[input][output]`, 16 output channels at a time.

use rayon::prelude::*;

use super::{relu6, same_padding, Isa};

/// Output channels computed together.
const BLOCK: usize = 16;

/// The stem convolution with its folded BatchNorm, ready to run.
#[derive(Debug, Clone)]
pub struct StemKernel {
    /// `[3·kernel·kernel][outputs]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    outputs: usize,
    kernel: usize,
    stride: usize,
}

/// Input channels of a photo.
const COLOURS: usize = 3;

impl StemKernel {
    /// Repacks `weight` (`[outputs][3][kernel][kernel]`). `outputs` must be a
    /// multiple of 16.
    pub fn new(weight: &[f32], bias: &[f32], outputs: usize, kernel: usize, stride: usize) -> Self {
        let taps = COLOURS * kernel * kernel;
        assert_eq!(weight.len(), outputs * taps, "stem weight size");
        assert_eq!(bias.len(), outputs, "stem bias size");
        assert_eq!(outputs % BLOCK, 0, "stem outputs must be a multiple of {BLOCK}");
        let mut packed = vec![0f32; weight.len()];
        for (o, row) in weight.chunks_exact(taps).enumerate() {
            for (t, &w) in row.iter().enumerate() {
                packed[t * outputs + o] = w;
            }
        }
        Self {
            weight: packed,
            bias: bias.to_vec(),
            outputs,
            kernel,
            stride,
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Output height and width for an input of `height × width`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        (
            same_padding(height, self.kernel, self.stride).0,
            same_padding(width, self.kernel, self.stride).0,
        )
    }

    /// Convolves `input` (`[batch][3][height][width]`) into `out`
    /// (`[batch][out_h][out_w][outputs]`).
    pub fn run(
        &self,
        isa: Isa,
        input: &[f32],
        batch: usize,
        height: usize,
        width: usize,
        out: &mut [f32],
    ) {
        let (out_h, _) = same_padding(height, self.kernel, self.stride);
        let (out_w, _) = same_padding(width, self.kernel, self.stride);
        assert_eq!(input.len(), batch * COLOURS * height * width, "stem input");
        assert_eq!(out.len(), batch * out_h * out_w * self.outputs, "stem output");
        out.par_chunks_mut(out_w * self.outputs)
            .enumerate()
            .for_each(|(row, out_row)| self.run_row(isa, input, height, width, row, out_row));
    }

    /// Output row `row` (counted over the whole batch) of [`StemKernel::run`].
    pub fn run_row(
        &self,
        isa: Isa,
        input: &[f32],
        height: usize,
        width: usize,
        row: usize,
        out: &mut [f32],
    ) {
        let (out_h, top) = same_padding(height, self.kernel, self.stride);
        let (_, left) = same_padding(width, self.kernel, self.stride);
        let photo = COLOURS * height * width;
        let (image, oy) = (row / out_h, row % out_h);
        let image = &input[image * photo..(image + 1) * photo];
        let first_row = (oy * self.stride) as isize - top as isize;
        let geometry = (height, width, first_row, left);
        match isa {
            // SAFETY: `Isa::Avx512` is only chosen when the CPU has it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.row_avx512(image, geometry, out) },
            // SAFETY: `Isa::Avx2` is only chosen with AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.row_avx2(image, geometry, out) },
            _ => self.row_body::<false>(image, geometry, out),
        }
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn row_avx512(&self, image: &[f32], g: (usize, usize, isize, usize), out: &mut [f32]) {
        self.row_body::<true>(image, g, out)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_avx2(&self, image: &[f32], g: (usize, usize, isize, usize), out: &mut [f32]) {
        self.row_body::<true>(image, g, out)
    }

    #[inline(always)]
    fn row_body<const FMA: bool>(
        &self,
        image: &[f32],
        (height, width, first_row, left): (usize, usize, isize, usize),
        out: &mut [f32],
    ) {
        let k = self.kernel;
        let plane = height * width;
        let mut patch = vec![0f32; COLOURS * k * k];
        for (ox, out) in out.chunks_exact_mut(self.outputs).enumerate() {
            let first_col = (ox * self.stride) as isize - left as isize;
            let mut t = 0;
            for colour in 0..COLOURS {
                for ky in 0..k {
                    let y = first_row + ky as isize;
                    for kx in 0..k {
                        let x = first_col + kx as isize;
                        let inside =
                            y >= 0 && x >= 0 && (y as usize) < height && (x as usize) < width;
                        patch[t] = if inside {
                            image[colour * plane + y as usize * width + x as usize]
                        } else {
                            0.0
                        };
                        t += 1;
                    }
                }
            }
            for (block, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                let start = block * BLOCK;
                let mut acc: [f32; BLOCK] = self.bias[start..start + BLOCK].try_into().expect("block");
                for (t, &v) in patch.iter().enumerate() {
                    let w: &[f32; BLOCK] = self.weight[t * self.outputs + start..][..BLOCK]
                        .try_into()
                        .expect("block");
                    for j in 0..BLOCK {
                        acc[j] = if FMA { v.mul_add(w[j], acc[j]) } else { acc[j] + v * w[j] };
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = relu6(a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn every_variant_matches_candle_convolution() {
        let device = Device::Cpu;
        for &(h, w, s) in &[(8, 12, 2), (7, 9, 2), (6, 5, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &device).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (32, 3, 3, 3), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 32, &device).unwrap();
            let (oh, top) = same_padding(h, 3, s);
            let (ow, left) = same_padding(w, 3, s);
            let bottom = ((oh - 1) * s + 3).saturating_sub(h) - top;
            let right = ((ow - 1) * s + 3).saturating_sub(w) - left;
            let reference = x
                .pad_with_zeros(2, top, bottom)
                .unwrap()
                .pad_with_zeros(3, left, right)
                .unwrap()
                .conv2d(&weight, 0, s, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 32, 1, 1)).unwrap())
                .unwrap()
                .clamp(0f32, 6f32)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let kernel = StemKernel::new(
                &weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &bias.to_vec1::<f32>().unwrap(),
                32,
                3,
                s,
            );
            let input = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for isa in Isa::supported() {
                let mut out = vec![f32::NAN; 2 * oh * ow * 32];
                kernel.run(isa, &input, 2, h, w, &mut out);
                let worst = out
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{isa:?} {h}x{w} s{s}: off by {worst}");
                assert!(out.iter().any(|v| *v > 0.0 && *v < 6.0));
            }
        }
    }
}
