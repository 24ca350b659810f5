//! CPU kernels for the backbone, on channel-last (NHWC) feature maps.
//!
//! EfficientNet-Lite0 is almost all 1×1 convolutions and depthwise
//! convolutions. With channels last, a 1×1 convolution is one matrix product
//! over all pixels of the batch ([`pointwise`]), and a depthwise convolution
//! reads each tap's channels as one contiguous vector ([`depthwise`]).
//! Every kernel adds its bias and applies ReLU6 (and the block's residual
//! addition) before it writes its output, so each layer is one pass over
//! memory. The stem ([`stem`]) reads the photo's planar RGB directly.
//!
//! Each kernel has three variants picked at run time by [`Isa`]: AVX-512,
//! AVX2 with FMA, and portable Rust for any other CPU. Work is split over
//! rayon's pool by rows of the output.

pub mod depthwise;
pub mod pointwise;
pub mod stem;
pub mod team;

pub use depthwise::DepthwiseKernel;
pub use pointwise::PointwiseKernel;
pub use stem::StemKernel;

/// Output size and the padding before the first row or column, following
/// TensorFlow's "SAME" rule: `out = ceil(in / stride)`, the total padding is
/// split with the smaller half on the top/left.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (out, total / 2)
}

/// The vector instructions a kernel variant uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit vectors (AVX-512F).
    Avx512,
    /// 256-bit vectors with fused multiply-add (AVX2 and FMA).
    Avx2,
    /// Plain Rust, whatever the compiler makes of it for the baseline target.
    Portable,
}

impl Isa {
    /// The best variant this CPU runs. `FLUKEID_ISA=avx2` or `portable`
    /// asks for a lesser one (to compare them); an unknown or unsupported
    /// request is ignored.
    pub fn detect() -> Self {
        let best = Self::supported()[0];
        match std::env::var("FLUKEID_ISA").ok().as_deref() {
            Some("avx2") if Self::supported().contains(&Isa::Avx2) => Isa::Avx2,
            Some("portable") => Isa::Portable,
            _ => best,
        }
    }

    /// Every variant this CPU runs, best first.
    pub fn supported() -> Vec<Isa> {
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                found.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                found.push(Isa::Avx2);
            }
        }
        found.push(Isa::Portable);
        found
    }

    /// Lower-case name, as `FLUKEID_ISA` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// ReLU6.
#[inline(always)]
fn relu6(v: f32) -> f32 {
    v.clamp(0.0, 6.0)
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

    #[test]
    fn portable_is_always_supported_and_listed_last() {
        let all = Isa::supported();
        assert_eq!(all.last(), Some(&Isa::Portable));
        assert!(all.contains(&Isa::detect()));
    }
}
