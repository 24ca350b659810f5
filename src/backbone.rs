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
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, Module, Tensor, D};

use crate::kernels::team::{self, Member, Shared};
use crate::kernels::{same_padding, DepthwiseKernel, Isa, PointwiseKernel, StemKernel};
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
    #[error("input must have 3 colour channels, got {0}")]
    Colours(usize),
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

/// A 1×1 convolution: the CPU kernel, and the same weights as tensors for
/// other devices.
#[derive(Debug, Clone)]
struct Pointwise {
    kernel: PointwiseKernel,
    /// `[out, in]`
    weight: Tensor,
    /// `[out, 1]`, broadcast over positions.
    bias: Tensor,
    relu6: bool,
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
            kernel: PointwiseKernel::new(
                &cpu_values(&weight)?,
                &cpu_values(&bias)?,
                inp,
                out,
                relu6,
            ),
            weight: weight.reshape((out, inp))?,
            bias: bias.reshape((out, 1))?,
            relu6,
        })
    }

    /// The candle version, `[batch, in, h, w]` to `[batch, out, h, w]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let flat = x.reshape((batch, channels, height * width))?;
        let y = self
            .weight
            .broadcast_matmul(&flat)?
            .broadcast_add(&self.bias)?;
        let y = if self.relu6 { y.clamp(0f32, 6f32)? } else { y };
        y.reshape((batch, (), height, width))
    }
}

/// A depthwise k×k convolution with its BatchNorm and ReLU6.
#[derive(Debug, Clone)]
struct Depthwise {
    kernel: DepthwiseKernel,
    weight: Tensor,
    bias: Tensor,
    size: usize,
    stride: usize,
}

impl Depthwise {
    fn new(
        w: &Weights,
        conv: &str,
        bn: &str,
        channels: usize,
        size: usize,
        stride: usize,
    ) -> Result<Self, BackboneError> {
        let (weight, bias) = w.conv_bn(conv, bn, &[channels, 1, size, size])?;
        Ok(Self {
            kernel: DepthwiseKernel::new(
                &cpu_values(&weight)?,
                &cpu_values(&bias)?,
                channels,
                size,
                stride,
            ),
            weight,
            bias: bias.reshape((1, channels, 1, 1))?,
            size,
            stride,
        })
    }

    /// The candle version, on `[batch, channels, h, w]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let channels = self.kernel.channels();
        pad_same(x, self.size, self.stride)?
            .conv2d(&self.weight, 0, self.stride, 1, channels)?
            .broadcast_add(&self.bias)?
            .clamp(0f32, 6f32)
    }
}

/// The values of a tensor, flattened, on the CPU.
fn cpu_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
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
    kernel: StemKernel,
    weight: Tensor,
    bias: Tensor,
}

impl Stem {
    /// The candle version.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        pad_same(x, 3, 2)?
            .conv2d(&self.weight, 0, 2, 1, 1)?
            .broadcast_add(&self.bias)?
            .clamp(0f32, 6f32)
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
    /// The candle version.
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

/// Expanded maps larger than this (for the whole batch, 1.25 MiB) are not
/// written out whole: the block runs fused, band by band (see
/// [`Block::fused_band`]). Below it the map stays in the cores' caches
/// (2 MiB each on the project's machine) and the unfused layers, which
/// compute no row twice, measured faster.
const FUSE_BYTES: usize = 5 << 18;

impl Block {
    /// Whether the fused path pays off: the batch's expanded map would not
    /// stay in the cores' caches between the layers, and the bands are tall
    /// enough that the expanded rows computed twice at their edges add at
    /// most half again to the expansion.
    fn fuses(&self, batch: usize, height: usize, width: usize, threads: usize) -> bool {
        let hidden = self.depthwise.kernel.channels();
        if self.expand.is_none() || batch * height * width * hidden * size_of::<f32>() <= FUSE_BYTES
        {
            return false;
        }
        let (k, s) = (
            self.depthwise.kernel.kernel(),
            self.depthwise.kernel.stride(),
        );
        let band = self.band_rows(batch, height, width, threads);
        2 * (band * s + k.saturating_sub(s)) <= 3 * band * s
    }

    /// Output rows per band of [`Block::fused_band`]: about two bands per
    /// thread, for balance.
    fn band_rows(&self, batch: usize, height: usize, width: usize, threads: usize) -> usize {
        let (out_h, _) = self.depthwise.kernel.output_size(height, width);
        (batch * out_h).div_ceil(threads * 2).clamp(1, out_h)
    }

    /// The work items of [`Block::fused_band`] for a batch: bands of output
    /// rows `(image, first row, rows)`.
    fn fused_bands(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        threads: usize,
    ) -> Vec<(usize, usize, usize)> {
        let (out_h, _) = self.depthwise.kernel.output_size(height, width);
        let band = self.band_rows(batch, height, width, threads);
        (0..batch)
            .flat_map(|image| {
                (0..out_h)
                    .step_by(band)
                    .map(move |first| (image, first, band.min(out_h - first)))
            })
            .collect()
    }

    /// Expand, depthwise and project for one band of output rows of one
    /// image, on the calling thread. Only the `kernel` expanded rows under
    /// the current output row (a ring) and one depthwise output row are
    /// kept, so the wide intermediate maps never leave the cache. Expanded
    /// rows at a band's top edge are computed by both bands that need them.
    #[allow(clippy::too_many_arguments)]
    fn fused_band(
        &self,
        isa: Isa,
        input: &[f32],
        height: usize,
        width: usize,
        (image, first_out, _): (usize, usize, usize),
        out: &mut [f32],
    ) {
        let expand = &self.expand.as_ref().expect("fused blocks expand").kernel;
        let depthwise = &self.depthwise.kernel;
        let project = &self.project.kernel;
        let (k, s) = (depthwise.kernel(), depthwise.stride());
        let (cin, hidden, cout) = (expand.inputs(), depthwise.channels(), project.outputs());
        let (_, top) = same_padding(height, k, s);
        let (out_w, left) = same_padding(width, k, s);
        let plane = height * width * cin;
        let image = &input[image * plane..(image + 1) * plane];
        let input_row = |y: usize| &image[y * width * cin..(y + 1) * width * cin];
        let row_len = width * hidden;
        let mut ring = vec![0f32; k * row_len];
        let mut filtered = vec![0f32; out_w * hidden];
        // The next input row to expand; input row y lives in slot y % k.
        let mut next = ((first_out * s) as isize - top as isize).max(0) as usize;
        for (i, out_row) in out.chunks_mut(out_w * cout).enumerate() {
            let oy = first_out + i;
            let first = (oy * s) as isize - top as isize;
            let end = ((first + k as isize) as usize).min(height);
            while next < end {
                let slot = next % k;
                let expanded = &mut ring[slot * row_len..(slot + 1) * row_len];
                expand.run_here(isa, input_row(next), None, expanded);
                next += 1;
            }
            let rows = depthwise.input_rows(first, height, |y| {
                &ring[(y % k) * row_len..(y % k + 1) * row_len]
            });
            depthwise.row(isa, &rows, width, left, &mut filtered);
            let residual = self.residual.then(|| input_row(oy));
            project.run_here(isa, &filtered, residual, out_row);
        }
    }
}

impl Backbone {
    /// Whether the stem runs fused with the first block (when that block
    /// has no expansion and the stem's map would not stay in cache): the
    /// stem's rows then only ever live in a ring of `kernel` rows.
    fn stem_fuses(&self, height: usize, width: usize) -> bool {
        let (stem_h, stem_w) = self.stem.kernel.output_size(height, width);
        let bytes = stem_h * stem_w * self.stem.kernel.outputs() * size_of::<f32>();
        self.blocks.first().is_some_and(|b| b.expand.is_none()) && bytes > FUSE_BYTES
    }

    /// The stem and the first block's depthwise and projection for one band
    /// of that block's output rows of one image, on the calling thread, as
    /// [`Block::fused_band`] does with an expansion.
    fn stem_band(
        &self,
        isa: Isa,
        images: &[&[f32]],
        height: usize,
        width: usize,
        (image, first_out, _): (usize, usize, usize),
        out: &mut [f32],
    ) {
        let block = &self.blocks[0];
        let (depthwise, project) = (&block.depthwise.kernel, &block.project.kernel);
        let (stem_h, stem_w) = self.stem.kernel.output_size(height, width);
        let (k, s) = (depthwise.kernel(), depthwise.stride());
        let (hidden, cout) = (depthwise.channels(), project.outputs());
        let (_, top) = same_padding(stem_h, k, s);
        let (out_w, left) = same_padding(stem_w, k, s);
        let row_len = stem_w * hidden;
        let mut ring = vec![0f32; k * row_len];
        let mut filtered = vec![0f32; out_w * hidden];
        // The next stem row to compute; stem row y lives in slot y % k.
        let mut next = ((first_out * s) as isize - top as isize).max(0) as usize;
        for (i, out_row) in out.chunks_mut(out_w * cout).enumerate() {
            let first = ((first_out + i) * s) as isize - top as isize;
            let end = ((first + k as isize) as usize).min(stem_h);
            while next < end {
                let slot = &mut ring[(next % k) * row_len..(next % k + 1) * row_len];
                let stem = &self.stem.kernel;
                stem.run_row(isa, images[image], height, width, next, slot);
                next += 1;
            }
            let rows = depthwise.input_rows(first, stem_h, |y| {
                &ring[(y % k) * row_len..(y % k + 1) * row_len]
            });
            depthwise.row(isa, &rows, stem_w, left, &mut filtered);
            project.run_here(isa, &filtered, None, out_row);
        }
    }
}

/// Activation buffers of the CPU forward pass, kept between passes so a
/// pass neither allocates nor faults in fresh pages.
#[derive(Debug, Default)]
struct Buffers {
    /// The block input (and the stem and head outputs).
    current: Vec<f32>,
    /// The expanded map, then the block output.
    wide: Vec<f32>,
    /// The depthwise output.
    filtered: Vec<f32>,
}

/// One 1×1 convolution as a team phase: `input` (`[pixels][in]`) into the
/// start of `out`, in chunks of whole register tiles.
/// Whether [`pointwise_phase`] gives each thread a group of output
/// channels over all pixels (rather than a band of pixels).
fn splits_by_panels(kernel: &PointwiseKernel, pixels: usize, threads: usize) -> bool {
    kernel.outputs() > pixels && kernel.panels() >= threads
}

fn pointwise_phase(
    member: &mut Member,
    kernel: &PointwiseKernel,
    isa: Isa,
    threads: usize,
    input: &[f32],
    residual: Option<&[f32]>,
    out: &Shared,
) {
    let (k, n) = (kernel.inputs(), kernel.outputs());
    let pixels = input.len() / k;
    let chunk = kernel.chunk_rows(isa, pixels, threads);
    let chunks = pixels.div_ceil(chunk);
    // Where the weights outweigh the map (late layers at small batches),
    // each thread takes a group of output panels over all rows, so it
    // streams only its part of the weights; otherwise each takes rows, and
    // a map with too few row chunks to keep every thread busy to the end
    // is split into groups of panels as well.
    let by_panels = splits_by_panels(kernel, pixels, threads);
    let groups = if by_panels {
        threads * (4 * threads).div_ceil(chunks * threads)
    } else {
        (1..=kernel.panels())
            .find(|g| chunks * g >= 4 * threads && (chunks * g).is_multiple_of(threads))
            .unwrap_or(1)
    };
    let per_group = kernel.panels().div_ceil(groups.min(kernel.panels()));
    let groups = kernel.panels().div_ceil(per_group);
    member.share(chunks * groups, |item| {
        // Consecutive items share a group of panels when splitting by
        // panels, a chunk of rows otherwise: members start on consecutive
        // items (see `Member::share`).
        let (c, g) = if by_panels {
            (item % chunks, item / chunks)
        } else {
            (item / groups, item % groups)
        };
        let rows = c * chunk..((c + 1) * chunk).min(pixels);
        let panels = g * per_group..((g + 1) * per_group).min(kernel.panels());
        let residual = residual.map(|r| &r[rows.start * n..rows.end * n]);
        // SAFETY: items write disjoint (rows, panels) parts of `out`, which
        // is not read in this phase (the caller passes a buffer other than
        // input's and residual's).
        unsafe {
            let at = out.write_ptr(rows.start * n, rows.len() * n);
            kernel.run_panels(
                isa,
                &input[rows.start * k..rows.end * k],
                residual,
                at,
                panels,
            );
        }
    });
}

/// Per-kind layer times, taken by one team member after each phase.
struct Laps {
    clock: Instant,
    times: Option<LayerTimes>,
}

impl Laps {
    fn new(enabled: bool) -> Self {
        Self {
            clock: Instant::now(),
            times: enabled.then(LayerTimes::default),
        }
    }

    fn lap(&mut self, field: fn(&mut LayerTimes) -> &mut f64) {
        if let Some(times) = &mut self.times {
            *field(times) += ms(self.clock);
            self.clock = Instant::now();
        }
    }
}

/// The first `len` values of `buffer`, growing it if needed.
fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Most floats of scratch a depthwise layer may take per strip to run plane
/// by plane ([`DepthwiseKernel::run_plane_strip`]); larger maps go row by
/// row.
const PLANE_SCRATCH: usize = 64 * 1024;

/// Whether a depthwise layer runs plane by plane rather than row by row:
/// measured faster with stride 1 and vector kernels, while the strip's
/// padded input stays small (`examples/depthwise_rate.rs`).
fn plane_pays(kernel: &DepthwiseKernel, isa: Isa, height: usize, width: usize) -> bool {
    kernel.stride() == 1
        && isa != Isa::Portable
        && kernel.plane_scratch(height, width) <= PLANE_SCRATCH
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
    /// Blocks run fused (expand, depthwise and project together), on the
    /// CPU where the expanded map is large.
    pub fused: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Refuses inputs the network cannot take.
fn check_input(x: &Tensor) -> Result<(), BackboneError> {
    let (_, colours, height, width) = x.dims4()?;
    if height % 32 != 0 || width % 32 != 0 || height == 0 || width == 0 {
        return Err(BackboneError::InputSize { height, width });
    }
    if colours != 3 {
        return Err(BackboneError::Colours(colours));
    }
    Ok(())
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
    /// The kernel variant the CPU path runs.
    isa: Isa,
    buffers: Arc<Mutex<Option<Buffers>>>,
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
            kernel: StemKernel::new(
                &cpu_values(&stem_weight)?,
                &cpu_values(&stem_bias)?,
                STEM_CHANNELS,
                3,
                2,
            ),
            weight: stem_weight,
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
            isa: Isa::detect(),
            buffers: Arc::default(),
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

    /// The kernel variant the CPU path runs (see [`Isa::detect`]).
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The last feature map, `[batch, 1280, H/32, W/32]`, for an input
    /// `[batch, 3, H, W]` scaled as `(v − 127) / 128`. H and W must be
    /// multiples of 32, where dynamic and precomputed SAME padding agree.
    /// On the CPU this runs the channel-last kernels of [`crate::kernels`];
    /// elsewhere candle's operations.
    pub fn features(&self, x: &Tensor) -> Result<Tensor, BackboneError> {
        check_input(x)?;
        if self.device.is_cpu() && x.device().is_cpu() {
            self.features_cpu(x, None)
        } else {
            self.features_candle(x)
        }
    }

    /// [`Backbone::features`] through candle's operations on any device:
    /// the reference the CPU kernels are tested against.
    pub fn features_candle(&self, x: &Tensor) -> Result<Tensor, BackboneError> {
        check_input(x)?;
        let mut h = self.stem.forward(x)?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        Ok(self.head.forward(&h)?)
    }

    /// Runs the CPU forward pass once, timing each kind of layer, for the
    /// benchmark.
    pub fn layer_times(&self, x: &Tensor) -> Result<LayerTimes, BackboneError> {
        check_input(x)?;
        let mut times = LayerTimes::default();
        self.features_cpu(x, Some(&mut times))?;
        Ok(times)
    }

    /// [`Backbone::features`] on the CPU, from a tensor.
    fn features_cpu(
        &self,
        x: &Tensor,
        times: Option<&mut LayerTimes>,
    ) -> Result<Tensor, BackboneError> {
        let (batch, _, height, width) = x.dims4()?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let input = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => {
                &values[start..end]
            }
            _ => {
                let reason = "backbone input must be f32 on the CPU".to_owned();
                return Err(candle_core::Error::Msg(reason).into());
            }
        };
        let images: Vec<&[f32]> = input.chunks_exact(3 * height * width).collect();
        debug_assert_eq!(images.len(), batch);
        let features =
            self.run_cpu(&images, height, width, times, |map, (h, w, channels)| {
                Tensor::from_slice(map, (batch, h, w, channels), &Device::Cpu)?
                    .permute((0, 3, 1, 2))?
                    .contiguous()
            })??;
        Ok(features)
    }

    /// The last feature map of each image (each `[3][height][width]`,
    /// scaled as for [`Backbone::features`]) on the CPU, channel-last:
    /// `finish` gets `[batch][h][w][1280]` values and `(h, w, 1280)`, with
    /// no tensor made, and its result is returned. For callers that pool
    /// the map at once.
    pub fn features_channel_last<R>(
        &self,
        images: &[&[f32]],
        height: usize,
        width: usize,
        finish: impl FnOnce(&[f32], (usize, usize, usize)) -> R,
    ) -> Result<R, BackboneError> {
        if !height.is_multiple_of(32) || !width.is_multiple_of(32) || height == 0 || width == 0 {
            return Err(BackboneError::InputSize { height, width });
        }
        if let Some(image) = images.iter().find(|i| i.len() != 3 * height * width) {
            let reason = format!(
                "an image of {} values where {height}x{width} RGB takes {}",
                image.len(),
                3 * height * width
            );
            return Err(candle_core::Error::Msg(reason).into());
        }
        self.run_cpu(images, height, width, None, finish)
    }

    /// The CPU forward pass: channel-last kernels run by a [`team`] of
    /// threads, one phase per layer (one per block where it runs fused).
    fn run_cpu<R>(
        &self,
        images: &[&[f32]],
        height: usize,
        width: usize,
        times: Option<&mut LayerTimes>,
        finish: impl FnOnce(&[f32], (usize, usize, usize)) -> R,
    ) -> Result<R, BackboneError> {
        let isa = self.isa;
        let threads = rayon::current_num_threads();
        let batch = images.len();

        // Sizes: `current` and `wide` take turns holding block inputs and
        // outputs (and unfused expansions); `filtered` takes depthwise
        // outputs and, last, the head's.
        let (stem_h, stem_w) = self.stem.kernel.output_size(height, width);
        let stem_channels = self.stem.kernel.outputs();
        let mut largest = batch * stem_h * stem_w * stem_channels;
        let mut largest_filtered = 0;
        let (mut h, mut w) = (stem_h, stem_w);
        for block in &self.blocks {
            let hidden = block.depthwise.kernel.channels();
            let (out_h, out_w) = block.depthwise.kernel.output_size(h, w);
            if !block.fuses(batch, h, w, threads) {
                largest = largest.max(batch * h * w * hidden);
                largest_filtered = largest_filtered.max(batch * out_h * out_w * hidden);
            }
            largest = largest.max(batch * out_h * out_w * block.project.kernel.outputs());
            (h, w) = (out_h, out_w);
        }
        let features_len = batch * h * w * FEATURE_DIM;
        largest_filtered = largest_filtered.max(features_len);

        let taken = self.buffers.lock().map(|mut b| b.take()).unwrap_or(None);
        let mut buffers = taken.unwrap_or_default();
        let timing = times.is_some();
        let measured = Mutex::new(LayerTimes::default());
        {
            let first = Shared::new(sized(&mut buffers.current, largest));
            let second = Shared::new(sized(&mut buffers.wide, largest));
            let filtered = Shared::new(sized(&mut buffers.filtered, largest_filtered));
            let phases = 2 + 3 * self.blocks.len();
            let stem_fused = self.stem_fuses(height, width);
            let stem_bands = match self.blocks.first() {
                Some(first) if stem_fused => first.fused_bands(batch, stem_h, stem_w, threads),
                _ => Vec::new(),
            };
            team::run(threads, phases, |member| {
                let mut laps = Laps::new(timing && member.index() == 0);
                let mut scratch = Vec::new();
                let (mut current, mut wide) = (&first, &second);

                let (mut h, mut w, mut channels) = (stem_h, stem_w, stem_channels);
                let mut blocks = self.blocks.iter();
                if stem_fused {
                    let first = blocks.next().expect("a first block");
                    let (out_h, out_w) = first.depthwise.kernel.output_size(h, w);
                    let outputs = first.project.kernel.outputs();
                    let row = out_w * outputs;
                    member.share(stem_bands.len(), |b| {
                        let (image, first, rows) = stem_bands[b];
                        let start = (image * out_h + first) * row;
                        // SAFETY: bands do not overlap; the buffer is not
                        // read in this phase.
                        let out = unsafe { current.write(start..start + rows * row) };
                        self.stem_band(isa, images, height, width, stem_bands[b], out);
                    });
                    (h, w, channels) = (out_h, out_w, outputs);
                } else {
                    let row = stem_w * stem_channels;
                    member.share(batch * stem_h, |r| {
                        // SAFETY: each output row is written by one item; the
                        // buffer is not read in this phase.
                        let out = unsafe { current.write(r * row..(r + 1) * row) };
                        let (image, oy) = (r / stem_h, r % stem_h);
                        self.stem
                            .kernel
                            .run_row(isa, images[image], height, width, oy, out);
                    });
                }
                laps.lap(|t| &mut t.stem);

                for block in blocks {
                    let (out_h, out_w) = block.depthwise.kernel.output_size(h, w);
                    let outputs = block.project.kernel.outputs();
                    // SAFETY (all reads below): the buffer read is not
                    // written in the same phase.
                    let source = unsafe { current.read(0..batch * h * w * channels) };
                    if block.fuses(batch, h, w, threads) {
                        let bands = block.fused_bands(batch, h, w, threads);
                        let row = out_w * outputs;
                        member.share(bands.len(), |b| {
                            let (image, first, rows) = bands[b];
                            let start = (image * out_h + first) * row;
                            // SAFETY: bands do not overlap; `wide` is not
                            // read in this phase.
                            let out = unsafe { wide.write(start..start + rows * row) };
                            block.fused_band(isa, source, h, w, bands[b], out);
                        });
                        laps.lap(|t| &mut t.fused);
                    } else {
                        let hidden = block.depthwise.kernel.channels();
                        let pixels = batch * h * w;
                        let expanded: &[f32] = match &block.expand {
                            Some(expand) => {
                                let kernel = &expand.kernel;
                                pointwise_phase(member, kernel, isa, threads, source, None, wide);
                                // SAFETY: written in the phase just ended.
                                unsafe { wide.read(0..pixels * hidden) }
                            }
                            None => source,
                        };
                        laps.lap(|t| &mut t.expand);

                        let kernel = &block.depthwise.kernel;
                        match kernel.plane_strips() {
                            Some(strips) if plane_pays(kernel, isa, h, w) => {
                                let (image_in, image_out) =
                                    (h * w * hidden, out_h * out_w * hidden);
                                // Each thread should mostly read what it
                                // expanded itself: the same channels when
                                // the expansion was split by channels, else
                                // the same rows (with fewer images than
                                // threads, bands of each image's rows).
                                let by_channels = block.expand.as_ref().is_some_and(|e| {
                                    splits_by_panels(&e.kernel, batch * h * w, threads)
                                });
                                let bands = if batch < threads && !by_channels {
                                    threads.min(out_h)
                                } else {
                                    1
                                };
                                member.share(batch * bands * strips, |i| {
                                    let (image, band, strip) =
                                        (i / (bands * strips), i / strips % bands, i % strips);
                                    let rows = band * out_h / bands..(band + 1) * out_h / bands;
                                    let input = &expanded[image * image_in..][..image_in];
                                    // SAFETY: one item per image, band and
                                    // strip of channels; `filtered` is not
                                    // read in this phase.
                                    unsafe {
                                        let out = filtered.write_ptr(image * image_out, image_out);
                                        kernel.run_plane_strip(
                                            isa,
                                            input,
                                            h,
                                            w,
                                            strip,
                                            rows,
                                            out,
                                            &mut scratch,
                                        );
                                    }
                                });
                            }
                            _ => {
                                let row = out_w * hidden;
                                member.share(batch * out_h, |r| {
                                    // SAFETY: one item per output row.
                                    let out = unsafe { filtered.write(r * row..(r + 1) * row) };
                                    kernel.run_row(isa, expanded, h, w, r, out);
                                });
                            }
                        }
                        laps.lap(|t| &mut t.depthwise);

                        let pixels = batch * out_h * out_w;
                        // SAFETY: written in the phase just ended.
                        let filtered = unsafe { filtered.read(0..pixels * hidden) };
                        let residual = block.residual.then_some(source);
                        let kernel = &block.project.kernel;
                        pointwise_phase(member, kernel, isa, threads, filtered, residual, wide);
                        laps.lap(|t| &mut t.project);
                    }
                    std::mem::swap(&mut current, &mut wide);
                    (h, w, channels) = (out_h, out_w, outputs);
                }

                // SAFETY: `current` is not written in this phase.
                let source = unsafe { current.read(0..batch * h * w * channels) };
                pointwise_phase(
                    member,
                    &self.head.kernel,
                    isa,
                    threads,
                    source,
                    None,
                    &filtered,
                );
                laps.lap(|t| &mut t.head);
                if let Some(own) = laps.times {
                    if let Ok(mut shared) = measured.lock() {
                        *shared = own;
                    }
                }
            });
        }
        let result = finish(&buffers.filtered[..features_len], (h, w, FEATURE_DIM));
        if let Ok(mut slot) = self.buffers.lock() {
            *slot = Some(buffers);
        }
        if let Some(times) = times {
            *times = measured.into_inner().unwrap_or_default();
        }
        Ok(result)
    }

    /// The 1280-d average-pooled feature and the ImageNet logits, as the
    /// reference model computes them.
    pub fn classify(&self, x: &Tensor) -> Result<(Tensor, Tensor), BackboneError> {
        let pooled = self.features(x)?.mean(D::Minus1)?.mean(D::Minus1)?;
        let logits = self.classifier.forward(&pooled)?;
        Ok((pooled, logits))
    }
}
