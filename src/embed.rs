//! From a decoded photo to a unit-length embedding: resize, backbone,
//! generalised-mean pooling, the trained embedding head when one exists, and
//! L2 normalisation.

use std::path::{Path, PathBuf};

use candle_core::{Device, Module, Tensor, D};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, BackboneError, FEATURE_DIM};
use crate::photo::{self, InputSize};
use crate::weights::{self, WeightsError};

/// File name of the optional trained embedding head inside the models folder.
pub const HEAD_FILE: &str = "embedding-head.safetensors";

/// Exponent of generalised-mean pooling. p = 3 is the usual choice for
/// retrieval: it sits between average pooling (p = 1) and max pooling, so a
/// few strongly marked spots of the fluke weigh more than open water.
pub const GEM_P: f64 = 3.0;

/// Everything that decides which vector a photo gets. Two embeddings are only
/// comparable when their fingerprints are equal, so a catalog stores it and
/// refuses queries from a differently configured embedder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub backbone_sha256: String,
    pub head_sha256: Option<String>,
    pub input: InputSize,
    pub pooling: String,
    pub dim: usize,
}

/// Why an embedding could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("embedding head {path}: {reason}")]
    Head { path: PathBuf, reason: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A linear projection learned on fluke pairs, applied to the pooled
/// feature.
#[derive(Debug, Clone)]
struct Head {
    linear: candle_nn::Linear,
    sha256: String,
    dim: usize,
}

impl Head {
    fn load(path: &Path, device: &Device) -> Result<Self, EmbedError> {
        let err = |reason: String| EmbedError::Head {
            path: path.to_owned(),
            reason,
        };
        let sha256 = weights::sha256_file(path)?;
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| err(e.to_string()))?;
        let weight = tensors
            .get("weight")
            .ok_or_else(|| err("tensor `weight` is missing".into()))?
            .clone();
        let (dim, inp) = weight.dims2().map_err(|e| err(e.to_string()))?;
        if inp != FEATURE_DIM {
            return Err(err(format!(
                "`weight` takes {inp} inputs, the backbone gives {FEATURE_DIM}"
            )));
        }
        let bias = tensors.get("bias").cloned();
        Ok(Self {
            linear: candle_nn::Linear::new(weight, bias),
            sha256,
            dim,
        })
    }
}

/// The photo-to-vector part of flukeid.
#[derive(Debug, Clone)]
pub struct Embedder {
    backbone: Backbone,
    head: Option<Head>,
    input: InputSize,
}

impl Embedder {
    /// Loads the backbone from `models/efficientnet-lite0.safetensors` and,
    /// when `models/embedding-head.safetensors` exists, the trained head.
    pub fn load(models: &Path, input: InputSize, device: &Device) -> Result<Self, EmbedError> {
        let backbone = Backbone::load(&models.join(weights::BACKBONE_FILE), device)?;
        let head_path = models.join(HEAD_FILE);
        let head = if head_path.exists() {
            Some(Head::load(&head_path, device)?)
        } else {
            None
        };
        Ok(Self::new(backbone, head, input))
    }

    fn new(backbone: Backbone, head: Option<Head>, input: InputSize) -> Self {
        Self {
            backbone,
            head,
            input,
        }
    }

    /// Input size the photos are resized to.
    pub fn input(&self) -> InputSize {
        self.input
    }

    /// Length of the vectors this embedder produces.
    pub fn dim(&self) -> usize {
        self.head.as_ref().map_or(FEATURE_DIM, |h| h.dim)
    }

    /// What a catalog records so that later queries use the same embedder.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            backbone_sha256: self.backbone.weights_sha256().to_owned(),
            head_sha256: self.head.as_ref().map(|h| h.sha256.clone()),
            input: self.input,
            pooling: format!("gem-p{GEM_P}"),
            dim: self.dim(),
        }
    }

    /// The backbone, for classification and golden tests.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Prepares a decoded photo for [`Embedder::embed_inputs`].
    pub fn prepare(&self, image: &RgbImage) -> Vec<f32> {
        photo::to_chw(image, self.input)
    }

    /// Embeds a batch of prepared inputs; one unit vector each.
    pub fn embed_inputs(&self, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pooled = if self.backbone.device().is_cpu() {
            // Pooled straight from the channel-last map the CPU kernels
            // leave, with no input tensor or feature tensor in between.
            let images: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let (height, width) = (self.input.height as usize, self.input.width as usize);
            let pooled = self.backbone.features_channel_last(
                &images,
                height,
                width,
                |map, (h, w, channels)| gem_channel_last(map, h * w, channels, GEM_P),
            )?;
            Tensor::from_vec(pooled, (inputs.len(), FEATURE_DIM), &Device::Cpu)?
        } else {
            let x = photo::batch_tensor(inputs, self.input, self.backbone.device())?;
            gem(&self.backbone.features(&x)?, GEM_P)?
        };
        if let Some(head) = &self.head {
            pooled = head.linear.forward(&pooled)?;
        }
        let unit = l2_normalise(&pooled)?;
        Ok(unit.to_device(&Device::Cpu)?.to_vec2()?)
    }

    /// Embeds decoded photos.
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let inputs: Vec<Vec<f32>> = images.iter().map(|i| self.prepare(i)).collect();
        self.embed_inputs(&inputs)
    }
}

/// [`gem`] on channel-last maps (`[batch][area][channels]`), to the same
/// values: each channel's sum runs over the pixels in the same order.
pub fn gem_channel_last(map: &[f32], area: usize, channels: usize, p: f64) -> Vec<f32> {
    const EPS: f32 = 1e-6;
    let cube = p == 3.0;
    let mut pooled = Vec::with_capacity(map.len() / (area * channels).max(1) * channels);
    let mut sums = vec![0f64; channels];
    for image in map.chunks_exact((area * channels).max(1)) {
        sums.fill(0.0);
        for pixel in image.chunks_exact(channels) {
            for (sum, &v) in sums.iter_mut().zip(pixel) {
                let v = v.max(EPS);
                *sum += if cube {
                    (v * v * v) as f64
                } else {
                    (v as f64).powf(p)
                };
            }
        }
        pooled.extend(
            sums.iter()
                .map(|&sum| (sum / area as f64).powf(1.0 / p) as f32),
        );
    }
    pooled
}

/// Generalised-mean pooling over height and width:
/// `(mean(max(x, ε)^p))^(1/p)`. On the CPU it is one pass over the map
/// (the cube for p = 3 as two multiplications); elsewhere candle's
/// operations.
pub fn gem(features: &Tensor, p: f64) -> candle_core::Result<Tensor> {
    const EPS: f32 = 1e-6;
    let (batch, channels, height, width) = features.dims4()?;
    if !features.device().is_cpu() {
        return features
            .clamp(EPS, f32::MAX)?
            .powf(p)?
            .mean(D::Minus1)?
            .mean(D::Minus1)?
            .powf(1.0 / p);
    }
    let values = features
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let area = height * width;
    let cube = p == 3.0;
    let pooled: Vec<f32> = values
        .chunks_exact(area.max(1))
        .map(|plane| {
            let sum: f64 = plane
                .iter()
                .map(|&v| {
                    let v = v.max(EPS);
                    if cube {
                        (v * v * v) as f64
                    } else {
                        (v as f64).powf(p)
                    }
                })
                .sum();
            (sum / area as f64).powf(1.0 / p) as f32
        })
        .collect();
    Tensor::from_vec(pooled, (batch, channels), &Device::Cpu)
}

/// Scales each row to unit length.
pub fn l2_normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    x.broadcast_div(&norm)
}

/// Dot product of two equal-length vectors; the cosine similarity of unit
/// vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gem_pools_each_channel_by_its_generalised_mean() {
        let features = Tensor::new(&[[[[1f32, 2.0]], [[0.0, -1.0]]]], &Device::Cpu).unwrap();
        let cube: Vec<f32> = gem(&features, 3.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // (mean(1³, 2³))^(1/3); negatives and zeros count as ε.
        assert!((cube[0] - 4.5f32.powf(1.0 / 3.0)).abs() < 1e-5, "{cube:?}");
        assert!((cube[1] - 1e-6).abs() < 1e-9, "{cube:?}");
        let square: Vec<f32> = gem(&features, 2.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((square[0] - 2.5f32.sqrt()).abs() < 1e-5, "{square:?}");
    }

    #[test]
    fn channel_last_gem_gives_the_same_bits_as_the_planar_one() {
        // Two images, 3×5 pixels, 7 channels, values around the ε clamp.
        let (batch, h, w, c) = (2, 3, 5, 7);
        let planar: Vec<f32> = (0..batch * c * h * w)
            .map(|i| ((i * 37) % 23) as f32 / 7.0 - 0.5)
            .collect();
        let features = Tensor::from_vec(planar, (batch, c, h, w), &Device::Cpu).unwrap();
        let channel_last: Vec<f32> = features
            .permute((0, 2, 3, 1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for p in [3.0, 2.0] {
            let expected: Vec<f32> = gem(&features, p)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                gem_channel_last(&channel_last, h * w, c, p),
                expected,
                "p = {p}"
            );
        }
    }
}
