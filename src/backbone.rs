//! EfficientNet-Lite0, the ImageNet backbone that turns a photo into a
//! feature map.
//!
//! Lite0 is EfficientNet-B0 without squeeze-excitation and with ReLU6 in
//! place of swish. Layer names follow the checkpoint (`_blocks.3._expand_conv`
//! and so on) so the code can be read beside it. Every BatchNorm
//! (eps 1e-3) is folded into the convolution before it when the weights are
//! loaded; the folded network agrees with the reference to about 6e-6 in
//! the logits. Convolutions pad the TensorFlow "SAME" way, computed from
//! each input's size.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, D};

use crate::kernels::{same_padding, BiasActivation, DepthwiseKernel, Patches};
use crate::weights::{self, WeightsError};

/// The BatchNorm epsilon of the TensorFlow original (PyTorch's default,
/// 1e-5, moves the logits by up to 1.0).
const BN_EPS: f64 = 1e-3;

/// Channels of the last feature map.
pub const FEATURE_DIM: usize = 1280;

/// Number of ImageNet classes in the classifier.
pub const IMAGENET_CLASSES: usize = 1000;

/// One stage of mobile inverted bottleneck blocks: expansion ratio, kernel
/// size, stride of its first block, output channels and how many blocks.
struct Stage {
    expand: usize,
    kernel: usize,
    stride: usize,
    out: usize,
    repeats: usize,
}

const STAGES: [Stage; 7] = [
    Stage {
        expand: 1,
        kernel: 3,
        stride: 1,
        out: 16,
        repeats: 1,
    },
    Stage {
        expand: 6,
        kernel: 3,
        stride: 2,
        out: 24,
        repeats: 2,
    },
    Stage {
        expand: 6,
        kernel: 5,
        stride: 2,
        out: 40,
        repeats: 2,
    },
    Stage {
        expand: 6,
        kernel: 3,
        stride: 2,
        out: 80,
        repeats: 3,
    },
    Stage {
        expand: 6,
        kernel: 5,
        stride: 1,
        out: 112,
        repeats: 3,
    },
    Stage {
        expand: 6,
        kernel: 5,
        stride: 2,
        out: 192,
        repeats: 4,
    },
    Stage {
        expand: 6,
        kernel: 3,
        stride: 1,
        out: 320,
        repeats: 1,
    },
];

const STEM_CHANNELS: usize = 32;

/// Why the backbone could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("weights: tensor {0} is missing")]
    Missing(String),
    #[error("weights: tensor {name} has shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("input height and width must be multiples of 32, got {height}x{width}")]
    InputSize { height: usize, width: usize },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Reads tensors out of the checkpoint map by name, checking shapes.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    device: &'a Device,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, BackboneError> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| BackboneError::Missing(name.to_owned()))?;
        if tensor.dims() != shape {
            return Err(BackboneError::Shape {
                name: name.to_owned(),
                actual: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(tensor.to_dtype(DType::F32)?)
    }

    /// A bias-free convolution `conv` followed by BatchNorm `bn`, folded into
    /// one weight and one bias: `w·γ/√(σ²+ε)` and `β − μ·γ/√(σ²+ε)`.
    fn conv_bn(
        &self,
        conv: &str,
        bn: &str,
        shape: &[usize],
    ) -> Result<(Tensor, Tensor), BackboneError> {
        let out = shape[0];
        let weight = self.get(&format!("{conv}.weight"), shape)?;
        let gamma = self.get(&format!("{bn}.weight"), &[out])?;
        let beta = self.get(&format!("{bn}.bias"), &[out])?;
        let mean = self.get(&format!("{bn}.running_mean"), &[out])?;
        let var = self.get(&format!("{bn}.running_var"), &[out])?;

        let scale = gamma.div(&(var + BN_EPS)?.sqrt()?)?;
        let bias = beta.sub(&mean.mul(&scale)?)?;
        let mut scale_shape = vec![out];
        scale_shape.extend(std::iter::repeat_n(1, shape.len() - 1));
        let weight = weight.broadcast_mul(&scale.reshape(scale_shape)?)?;
        Ok((weight.to_device(self.device)?, bias.to_device(self.device)?))
    }
}

/// A 1×1 convolution as a matrix product over the flattened feature map.
#[derive(Debug, Clone)]
struct Pointwise {
    /// `[out, in]`
    weight: Tensor,
    /// `[out, 1]`, broadcast over positions.
    bias: Tensor,
    relu6: bool,
    /// The bias (and ReLU6) as one in-place pass, for the CPU.
    epilogue: BiasActivation,
}

impl Pointwise {
    fn new(
        w: &Weights,
        conv: &str,
        bn: &str,
        inp: usize,
        out: usize,
        relu6: bool,
    ) -> Result<Self, BackboneError> {
        let (weight, bias) = w.conv_bn(conv, bn, &[out, inp, 1, 1])?;
        Ok(Self {
            weight: weight.reshape((out, inp))?,
            epilogue: BiasActivation {
                bias: bias.to_device(&Device::Cpu)?.to_vec1()?,
                relu6,
            },
            bias: bias.reshape((out, 1))?,
            relu6,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let flat = x.reshape((batch, channels, height * width))?;
        let y = self.weight.broadcast_matmul(&flat)?;
        let y = if y.device().is_cpu() && y.is_contiguous() {
            // The product is a fresh tensor nobody else holds.
            y.inplace_op1(&self.epilogue)?;
            y
        } else {
            let y = y.broadcast_add(&self.bias)?;
            if self.relu6 {
                y.clamp(0f32, 6f32)?
            } else {
                y
            }
        };
        y.reshape((batch, (), height, width))
    }
}

/// A depthwise k×k convolution with its BatchNorm and ReLU6.
#[derive(Debug, Clone)]
struct Depthwise {
    kernel: Arc<DepthwiseKernel>,
    /// The same weights as tensors, for devices without the fused CPU op.
    weight: Tensor,
    bias: Tensor,
}

impl Depthwise {
    fn new(
        w: &Weights,
        conv: &str,
        bn: &str,
        channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self, BackboneError> {
        let (weight, bias) = w.conv_bn(conv, bn, &[channels, 1, kernel, kernel])?;
        let fused = DepthwiseKernel {
            weight: weight.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?,
            bias: bias.to_device(&Device::Cpu)?.to_vec1()?,
            channels,
            kernel,
            stride,
        };
        Ok(Self {
            kernel: Arc::new(fused),
            weight,
            bias: bias.reshape((1, channels, 1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            return x.contiguous()?.apply_op1_no_bwd(self.kernel.as_ref());
        }
        let k = self.kernel.kernel;
        let s = self.kernel.stride;
        let x = pad_same(x, k, s)?;
        x.conv2d(&self.weight, 0, s, 1, self.kernel.channels)?
            .broadcast_add(&self.bias)?
            .clamp(0f32, 6f32)
    }
}

/// Zero-pads height and width the TensorFlow "SAME" way for a k×k kernel.
fn pad_same(x: &Tensor, kernel: usize, stride: usize) -> candle_core::Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let (out_h, top) = same_padding(height, kernel, stride);
    let (out_w, left) = same_padding(width, kernel, stride);
    let total_h = ((out_h - 1) * stride + kernel).saturating_sub(height);
    let total_w = ((out_w - 1) * stride + kernel).saturating_sub(width);
    x.pad_with_zeros(2, top, total_h - top)?
        .pad_with_zeros(3, left, total_w - left)
}

/// The stem: a 3×3 stride-2 convolution from RGB to 32 channels.
#[derive(Debug, Clone)]
struct Stem {
    weight: Tensor,
    bias: Tensor,
    epilogue: BiasActivation,
}

impl Stem {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.device().is_cpu() {
            return pad_same(x, 3, 2)?
                .conv2d(&self.weight, 0, 2, 1, 1)?
                .broadcast_add(&self.bias)?
                .clamp(0f32, 6f32);
        }
        let (batch, _, height, width) = x.dims4()?;
        let (out_h, _) = same_padding(height, 3, 2);
        let (out_w, _) = same_padding(width, 3, 2);
        let patches = x.contiguous()?.apply_op1_no_bwd(&Patches {
            kernel: 3,
            stride: 2,
        })?;
        let y = self
            .weight
            .reshape((STEM_CHANNELS, ()))?
            .broadcast_matmul(&patches)?;
        y.inplace_op1(&self.epilogue)?;
        y.reshape((batch, STEM_CHANNELS, out_h, out_w))
    }
}

/// A mobile inverted bottleneck: expand (1×1), depthwise, project (1×1),
/// and a residual connection when the shape is unchanged.
#[derive(Debug, Clone)]
struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = match &self.expand {
            Some(expand) => expand.forward(x)?,
            None => x.clone(),
        };
        h = self.depthwise.forward(&h)?;
        h = self.project.forward(&h)?;
        if self.residual {
            h = (h + x)?;
        }
        Ok(h)
    }
}

/// Milliseconds spent in each kind of layer during one forward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerTimes {
    pub stem: f64,
    /// Expansion 1×1 convolutions.
    pub expand: f64,
    /// Depthwise convolutions.
    pub depthwise: f64,
    /// Projection 1×1 convolutions and residual additions.
    pub project: f64,
    /// The 1×1 head convolution.
    pub head: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// EfficientNet-Lite0 with its ImageNet classifier.
#[derive(Debug, Clone)]
pub struct Backbone {
    stem: Stem,
    blocks: Vec<Block>,
    head: Pointwise,
    classifier: candle_nn::Linear,
    device: Device,
    weights_sha256: String,
}

impl Backbone {
    /// Loads the converted weights from `path`, refusing a file whose SHA-256
    /// is not the shipped one.
    pub fn load(path: &Path, device: &Device) -> Result<Self, BackboneError> {
        weights::verify_sha256(path, weights::BACKBONE_SHA256)?;
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| {
            WeightsError::Tensor {
                path: path.to_owned(),
                source,
            }
        })?;
        let mut backbone = Self::from_tensors(&tensors, device)?;
        backbone.weights_sha256 = weights::BACKBONE_SHA256.to_owned();
        Ok(backbone)
    }

    /// Builds the network from a state dict with the checkpoint's names.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, BackboneError> {
        let w = Weights { tensors, device };
        let (stem_weight, stem_bias) =
            w.conv_bn("_conv_stem", "_bn0", &[STEM_CHANNELS, 3, 3, 3])?;
        let stem = Stem {
            weight: stem_weight,
            epilogue: BiasActivation {
                bias: stem_bias.to_device(&Device::Cpu)?.to_vec1()?,
                relu6: true,
            },
            bias: stem_bias.reshape((1, STEM_CHANNELS, 1, 1))?,
        };

        let mut blocks = Vec::new();
        let mut inp = STEM_CHANNELS;
        for stage in &STAGES {
            for repeat in 0..stage.repeats {
                let index = blocks.len();
                let prefix = format!("_blocks.{index}");
                let stride = if repeat == 0 { stage.stride } else { 1 };
                let hidden = inp * stage.expand;
                let expand = if stage.expand != 1 {
                    Some(Pointwise::new(
                        &w,
                        &format!("{prefix}._expand_conv"),
                        &format!("{prefix}._bn0"),
                        inp,
                        hidden,
                        true,
                    )?)
                } else {
                    None
                };
                let depthwise = Depthwise::new(
                    &w,
                    &format!("{prefix}._depthwise_conv"),
                    &format!("{prefix}._bn1"),
                    hidden,
                    stage.kernel,
                    stride,
                )?;
                let project = Pointwise::new(
                    &w,
                    &format!("{prefix}._project_conv"),
                    &format!("{prefix}._bn2"),
                    hidden,
                    stage.out,
                    false,
                )?;
                blocks.push(Block {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && inp == stage.out,
                });
                inp = stage.out;
            }
        }

        let head = Pointwise::new(&w, "_conv_head", "_bn1", inp, FEATURE_DIM, true)?;
        let fc_weight = w
            .get("_fc.weight", &[IMAGENET_CLASSES, FEATURE_DIM])?
            .to_device(device)?;
        let fc_bias = w.get("_fc.bias", &[IMAGENET_CLASSES])?.to_device(device)?;
        Ok(Self {
            stem,
            blocks,
            head,
            classifier: candle_nn::Linear::new(fc_weight, Some(fc_bias)),
            device: device.clone(),
            weights_sha256: String::new(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// SHA-256 of the weight file this network was loaded from (empty when it
    /// was built from tensors in memory).
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// The last feature map, `[batch, 1280, H/32, W/32]`, for an input
    /// `[batch, 3, H, W]` scaled as `(v − 127) / 128`. H and W must be
    /// multiples of 32, where dynamic and precomputed SAME padding agree.
    pub fn features(&self, x: &Tensor) -> Result<Tensor, BackboneError> {
        let (_, _, height, width) = x.dims4()?;
        if height % 32 != 0 || width % 32 != 0 || height == 0 || width == 0 {
            return Err(BackboneError::InputSize { height, width });
        }
        let mut h = self.stem.forward(x)?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        Ok(self.head.forward(&h)?)
    }

    /// Runs [`Backbone::features`] once, timing each kind of layer, for the
    /// benchmark.
    pub fn layer_times(&self, x: &Tensor) -> Result<LayerTimes, BackboneError> {
        let mut times = LayerTimes::default();
        let clock = Instant::now();
        let mut h = self.stem.forward(x)?;
        times.stem = ms(clock);
        for block in &self.blocks {
            let clock = Instant::now();
            let expanded = match &block.expand {
                Some(expand) => expand.forward(&h)?,
                None => h.clone(),
            };
            times.expand += ms(clock);

            let clock = Instant::now();
            let filtered = block.depthwise.forward(&expanded)?;
            times.depthwise += ms(clock);

            let clock = Instant::now();
            let mut projected = block.project.forward(&filtered)?;
            if block.residual {
                projected = (projected + &h)?;
            }
            times.project += ms(clock);
            h = projected;
        }
        let clock = Instant::now();
        self.head.forward(&h)?;
        times.head = ms(clock);
        Ok(times)
    }

    /// The 1280-d average-pooled feature and the ImageNet logits, as the
    /// reference model computes them.
    pub fn classify(&self, x: &Tensor) -> Result<(Tensor, Tensor), BackboneError> {
        let pooled = self.features(x)?.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits = self.classifier.forward(&pooled)?;
        Ok((pooled, logits))
    }
}
