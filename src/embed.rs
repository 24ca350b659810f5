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
        let x = photo::batch_tensor(inputs, self.input, self.backbone.device())?;
        let features = self.backbone.features(&x)?;
        let mut pooled = gem(&features, GEM_P)?;
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

/// Generalised-mean pooling over height and width:
/// `(mean(max(x, ε)^p))^(1/p)`.
pub fn gem(features: &Tensor, p: f64) -> candle_core::Result<Tensor> {
    features
        .clamp(1e-6f32, f32::MAX)?
        .powf(p)?
        .mean(D::Minus1)?
        .mean(D::Minus1)?
        .powf(1.0 / p)
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
