//! The stem: a k×k strided convolution from the photo's planar RGB
//! (`[batch][3][height][width]`, as the photo is prepared) to a channel-last
//! map, with "SAME" padding, the folded BatchNorm's bias and ReLU6. Each
//! output row gathers the 3·k·k inputs of each of its pixels into a small
//! `[pixel][3·k·k]` matrix, which the 1×1 kernel ([`PointwiseKernel`])
//! multiplies by the weights in register tiles.

use rayon::prelude::*;

use super::{same_padding, Isa, PointwiseKernel};

/// The stem convolution with its folded BatchNorm, ready to run.
#[derive(Debug, Clone)]
pub struct StemKernel {
    /// The weights as a product from 3·k·k gathered inputs to the outputs.
    product: PointwiseKernel,
    kernel: usize,
    stride: usize,
}

thread_local! {
    /// Gathered patches of the output row being computed, reused.
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Input channels of a photo.
const COLOURS: usize = 3;

impl StemKernel {
    /// Takes `weight` as the checkpoint stores it, `[outputs][3][kernel][kernel]`.
    pub fn new(weight: &[f32], bias: &[f32], outputs: usize, kernel: usize, stride: usize) -> Self {
        let taps = COLOURS * kernel * kernel;
        Self {
            product: PointwiseKernel::new(weight, bias, taps, outputs, true),
            kernel,
            stride,
        }
    }

    pub fn outputs(&self) -> usize {
        self.product.outputs()
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
        let (out_h, out_w) = self.output_size(height, width);
        assert_eq!(input.len(), batch * COLOURS * height * width, "stem input");
        assert_eq!(
            out.len(),
            batch * out_h * out_w * self.outputs(),
            "stem output"
        );
        let image_len = COLOURS * height * width;
        out.par_chunks_mut(out_w * self.outputs())
            .enumerate()
            .for_each(|(row, out_row)| {
                let image = &input[row / out_h * image_len..][..image_len];
                self.run_row(isa, image, height, width, row % out_h, out_row)
            });
    }

    /// Output row `oy` of one image (`[3][height][width]`).
    pub fn run_row(
        &self,
        isa: Isa,
        image: &[f32],
        height: usize,
        width: usize,
        oy: usize,
        out: &mut [f32],
    ) {
        let k = self.kernel;
        let (_, top) = same_padding(height, k, self.stride);
        let (out_w, left) = same_padding(width, k, self.stride);
        assert_eq!(image.len(), COLOURS * height * width, "stem image");
        let first_row = (oy * self.stride) as isize - top as isize;
        let taps = COLOURS * k * k;
        PATCHES.with_borrow_mut(|patches| {
            patches.clear();
            patches.resize(out_w * taps, 0.0);
            self.gather(image, height, width, first_row, left, patches);
            self.product.run_here(isa, patches, None, out);
        });
    }

    /// The `3·k·k` inputs under each pixel of one output row whose first
    /// tap is input row `first_row`, into `patches` (zeros, `[out_w][3·k·k]`).
    fn gather(
        &self,
        image: &[f32],
        height: usize,
        width: usize,
        first_row: isize,
        left: usize,
        patches: &mut [f32],
    ) {
        let k = self.kernel;
        let plane = height * width;
        let taps = COLOURS * k * k;
        for colour in 0..COLOURS {
            for ky in 0..k {
                let y = first_row + ky as isize;
                if y < 0 || y as usize >= height {
                    continue;
                }
                let line = &image[colour * plane + y as usize * width..][..width];
                let tap = (colour * k + ky) * k;
                for (ox, patch) in patches.chunks_exact_mut(taps).enumerate() {
                    let first_col = (ox * self.stride) as isize - left as isize;
                    if k == 3 && first_col >= 0 && first_col as usize + 3 <= width {
                        // Three loads and stores, not a call to `memcpy`.
                        let x = first_col as usize;
                        let (from, to) = (&line[x..x + 3], &mut patch[tap..tap + 3]);
                        (to[0], to[1], to[2]) = (from[0], from[1], from[2]);
                        continue;
                    }
                    for kx in 0..k {
                        let x = first_col + kx as isize;
                        if x >= 0 && (x as usize) < width {
                            patch[tap + kx] = line[x as usize];
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
