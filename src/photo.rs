//! Turning uploaded bytes into the network's input: format sniffing, a pixel
//! limit checked before anything is decoded, EXIF orientation, conversion of
//! grayscale, 16-bit, alpha and CMYK images to 8-bit RGB, and the resize to
//! the model's input size.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::codecs::gif::GifDecoder;
use image::metadata::Orientation;
use image::{AnimationDecoder, DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

/// Limits applied before a photo is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width × height.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// 64 megapixels: larger than any camera photo in the Kaggle set, small
    /// enough that one decode cannot exhaust memory.
    fn default() -> Self {
        Self {
            max_pixels: 64_000_000,
        }
    }
}

/// Why a photo could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PhotoError {
    #[error("the file is empty")]
    Empty,
    #[error("not an image in a supported format (JPEG, PNG, WebP, GIF, TIFF, BMP)")]
    UnknownFormat,
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("animated image with more than one frame; send a single still photo")]
    Animated,
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
}

/// The network's input size in pixels. Both sides must be multiples of 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputSize {
    pub width: u32,
    pub height: u32,
}

impl Default for InputSize {
    /// Twice as wide as high, close to the shape of a fluke (median box
    /// aspect in the Kaggle set is 3.2) without starving the height.
    fn default() -> Self {
        Self {
            width: 448,
            height: 224,
        }
    }
}

impl std::fmt::Display for InputSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl std::str::FromStr for InputSize {
    type Err = String;

    /// Parses `WIDTHxHEIGHT`, e.g. `448x224`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (w, h) = s
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("expected WIDTHxHEIGHT, got {s:?}"))?;
        let parse = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
        let size = Self {
            width: parse(w)?,
            height: parse(h)?,
        };
        if size.width == 0
            || size.height == 0
            || !size.width.is_multiple_of(32)
            || !size.height.is_multiple_of(32)
        {
            return Err(format!("{s}: both sides must be positive multiples of 32"));
        }
        Ok(size)
    }
}

/// Decodes a photo to 8-bit RGB with its EXIF orientation applied.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, PhotoError> {
    decode_at_least(bytes, limits, None)
}

/// Decodes a photo and resizes it to the network's input (see [`to_chw`]).
/// A JPEG at least twice as large as twice the input on both sides is
/// decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT, which skips most
/// of the decoding work), never below twice the input: the same bound under
/// which [`to_chw`] shrinks a large photo before its final filter.
pub fn prepare(
    bytes: &[u8],
    limits: DecodeLimits,
    size: InputSize,
) -> Result<Vec<f32>, PhotoError> {
    let image = decode_at_least(bytes, limits, Some((2 * size.width, 2 * size.height)))?;
    Ok(to_chw(&image, size))
}

/// [`decode`], at a reduced JPEG scale when the photo is larger than
/// `least` (width, height, as displayed) by at least two on both sides.
fn decode_at_least(
    bytes: &[u8],
    limits: DecodeLimits,
    least: Option<(u32, u32)>,
) -> Result<RgbImage, PhotoError> {
    if bytes.is_empty() {
        return Err(PhotoError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PhotoError::Corrupt(e.to_string()))?;
    let format = reader.format().ok_or(PhotoError::UnknownFormat)?;
    if format == ImageFormat::Gif && gif_frames(bytes)? > 1 {
        return Err(PhotoError::Animated);
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a cut-off scan with grey and reports
        // success; a half photo would then be matched as if it were whole.
        return Err(PhotoError::Corrupt(
            "JPEG data ends before the image does (truncated file)".into(),
        ));
    }

    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(PhotoError::TooLarge {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    let orientation = decoder.orientation().map_err(corrupt)?;
    if let (ImageFormat::Jpeg, Some((least_w, least_h))) = (format, least) {
        // Stored sides, before the orientation turns the photo.
        let turned = matches!(
            orientation,
            Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH
        );
        let (least_w, least_h) = if turned {
            (least_h, least_w)
        } else {
            (least_w, least_h)
        };
        if width >= 2 * least_w && height >= 2 * least_h {
            if let Some(reduced) = decode_jpeg_reduced(bytes, least_w, least_h) {
                let mut image = DynamicImage::ImageRgb8(reduced);
                image.apply_orientation(orientation);
                return Ok(to_rgb8(image));
            }
        }
    }
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(to_rgb8(image))
}

/// A JPEG decoded at the smallest DCT scale (1/8, 1/4, 1/2 or 1) that
/// keeps it at least `least_w × least_h`; `None` for what this decoder
/// does not handle (CMYK, 16-bit, or data it rejects), which the full
/// decoder then takes.
fn decode_jpeg_reduced(bytes: &[u8], least_w: u32, least_h: u32) -> Option<RgbImage> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.read_info().ok()?;
    let (width, height) = decoder
        .scale(u16::try_from(least_w).ok()?, u16::try_from(least_h).ok()?)
        .ok()?;
    let (width, height) = (u32::from(width), u32::from(height));
    let pixels = decoder.decode().ok()?;
    let rgb = match decoder.info()?.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => return None,
    };
    let image = RgbImage::from_raw(width, height, rgb)?;
    (width >= least_w && height >= least_h).then_some(image)
}

/// The photo as 8-bit RGB. Grey photos are common in fluke catalogs, and
/// `image` converts them through floating-point colour management pixel
/// by pixel; copying the grey value to each channel gives the same bytes.
fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageLuma8(grey) => {
            let (width, height) = grey.dimensions();
            let rgb: Vec<u8> = grey.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
            RgbImage::from_raw(width, height, rgb).expect("three bytes per pixel")
        }
        other => other.into_rgb8(),
    }
}

fn corrupt(e: image::ImageError) -> PhotoError {
    match e {
        image::ImageError::Unsupported(_) => PhotoError::UnknownFormat,
        other => PhotoError::Corrupt(other.to_string()),
    }
}

/// True when an end-of-image marker follows the last start-of-scan marker.
/// Entropy-coded data escapes 0xFF bytes, so neither marker can appear
/// inside a scan; an EXIF thumbnail's markers all come before the main
/// image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(scan), Some(end)) => end > scan,
        _ => false,
    }
}

/// Counts a GIF's frames, stopping at two.
fn gif_frames(bytes: &[u8]) -> Result<usize, PhotoError> {
    let decoder = GifDecoder::new(Cursor::new(bytes)).map_err(corrupt)?;
    let mut count = 0;
    for frame in decoder.into_frames().take(2) {
        frame.map_err(corrupt)?;
        count += 1;
    }
    Ok(count)
}

/// Resizes to the input size (the aspect ratio is not kept: a fluke crop is
/// stretched to fill the frame, as in the Kaggle solutions) and scales each
/// value `v` to `(v − 127) / 128`, the TF Lite convention these weights were
/// trained with. Returns `[3, height, width]` values in CHW order.
pub fn to_chw(image: &RgbImage, size: InputSize) -> Vec<f32> {
    let (w, h) = (size.width, size.height);
    // A box-filter pre-shrink keeps big camera frames cheap; the final
    // triangle filter then only sees about twice the target size.
    let resized = if image.width() > 4 * w && image.height() > 4 * h {
        let coarse = image::imageops::thumbnail(image, 2 * w, 2 * h);
        resize_triangle(&coarse, w, h)
    } else {
        resize_triangle(image, w, h)
    };
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, pixel) in resized.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(pixel[c]) - 127.0) / 128.0;
        }
    }
    out
}

/// Taps of a triangle (bilinear) filter resampling `from` values to `to`:
/// for each output position, input positions and their normalised
/// weights (non-zero ones only). The filter widens with the shrink factor, so a shrink averages
/// every input under the output pixel. This is the rule and arithmetic of
/// `image::imageops::resize` with `FilterType::Triangle`, so the output is
/// the same; it is reimplemented because that function reads pixel by pixel
/// and walks columns, and took several milliseconds per photo.
fn triangle_taps(from: u32, to: u32) -> Vec<Vec<(usize, f32)>> {
    let ratio = from as f32 / to as f32;
    let scale = ratio.max(1.0);
    let support = scale;
    (0..to)
        .map(|out| {
            let centre = (out as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, i64::from(from) - 1);
            let right = ((centre + support).ceil() as i64).clamp(left + 1, i64::from(from));
            let centre = centre - 0.5;
            let weights: Vec<f32> = (left..right)
                .map(|i| (1.0 - ((i as f32 - centre) / scale).abs()).max(0.0))
                .collect();
            let sum: f32 = weights.iter().sum();
            // Zero weights add nothing; leaving them out changes no sum.
            (left as usize..)
                .zip(weights)
                .filter(|&(_, w)| w != 0.0)
                .map(|(i, w)| (i, w / sum))
                .collect()
        })
        .collect()
}

/// Rounds a value in [0, 255] to the nearest integer, halves away from
/// zero (as `f32::round`, which is a library call on the baseline target).
fn round_u8(v: f32) -> u8 {
    let v = v.clamp(0.0, 255.0);
    let whole = v as u8;
    if v - f32::from(whole) >= 0.5 {
        whole + 1
    } else {
        whole
    }
}

/// Resizes to `width × height` with a triangle filter, rows first, then
/// columns; returns interleaved RGB.
fn resize_triangle(image: &RgbImage, width: u32, height: u32) -> Vec<u8> {
    let (from_w, from_h) = image.dimensions();
    if (from_w, from_h) == (width, height) {
        return image.as_raw().clone();
    }
    let src = image.as_raw();
    let row = 3 * from_w as usize;
    // Vertical pass, whole rows at a time: `[height][from_w·3]` floats.
    let mut tall = vec![0f32; height as usize * row];
    for (out, taps) in tall
        .chunks_exact_mut(row)
        .zip(triangle_taps(from_h, height))
    {
        for (y, weight) in taps {
            let line = &src[y * row..(y + 1) * row];
            for (o, &v) in out.iter_mut().zip(line) {
                *o += f32::from(v) * weight;
            }
        }
    }
    // Horizontal pass, rounding to the nearest 8-bit value. A pixel's three
    // channels are summed as lanes of one 4-lane vector (the fourth lane
    // reads the next value and is dropped); each lane adds the same
    // products in the same order as a scalar loop, so the bytes do not
    // change. One spare float after the last row keeps that read in bounds.
    tall.push(0.0);
    let taps = triangle_taps(from_w, width);
    let mut out = vec![0u8; (width * height * 3) as usize];
    for (y, out) in out.chunks_exact_mut(3 * width as usize).enumerate() {
        let line = &tall[y * row..(y + 1) * row + 1];
        for (taps, pixel) in taps.iter().zip(out.chunks_exact_mut(3)) {
            let sum = weighted_pixel(line, taps);
            for c in 0..3 {
                pixel[c] = round_u8(sum[c]);
            }
        }
    }
    out
}

/// `Σ weight · line[3x..3x + 3]` over `taps`, in order, from zero; `line`
/// must hold one value past the last tapped pixel.
#[inline]
fn weighted_pixel(line: &[f32], taps: &[(usize, f32)]) -> [f32; 3] {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let last = taps.last().map_or(0, |&(x, _)| x);
        assert!(3 * last + 4 <= line.len(), "resize row");
        // SAFETY: SSE2 is part of x86_64; every load reads four values
        // starting at `3x` with `3x + 4 <= line.len()` (checked above for
        // the largest `x`).
        unsafe {
            let mut sum = _mm_setzero_ps();
            for &(x, weight) in taps {
                let value = _mm_loadu_ps(line.as_ptr().add(3 * x));
                sum = _mm_add_ps(sum, _mm_mul_ps(value, _mm_set1_ps(weight)));
            }
            let mut lanes = [0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), sum);
            [lanes[0], lanes[1], lanes[2]]
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut sum = [0f32; 3];
        for &(x, weight) in taps {
            for c in 0..3 {
                sum[c] += line[3 * x + c] * weight;
            }
        }
        sum
    }
}

/// Stacks CHW inputs into one `[batch, 3, height, width]` tensor.
pub fn batch_tensor(
    inputs: &[Vec<f32>],
    size: InputSize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut flat = Vec::with_capacity(inputs.iter().map(Vec::len).sum());
    for input in inputs {
        flat.extend_from_slice(input);
    }
    Tensor::from_vec(
        flat,
        (inputs.len(), 3, size.height as usize, size.width as usize),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_photos_become_the_same_rgb_as_the_image_crate_makes() {
        let grey = image::GrayImage::from_fn(37, 11, |x, y| image::Luma([(x * 7 + y * 13) as u8]));
        let ours = to_rgb8(DynamicImage::ImageLuma8(grey.clone()));
        assert_eq!(ours, DynamicImage::ImageLuma8(grey).into_rgb8());
        assert_eq!(ours.get_pixel(36, 10).0, [(36 * 7 + 10 * 13) as u8; 3]);
    }

    #[test]
    fn triangle_resize_matches_the_image_crate_exactly() {
        let mut state = 7u32;
        let image = RgbImage::from_fn(301, 157, |_, _| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        // Shrinking both ways, stretching both ways, and one of each.
        for (w, h) in [(96, 64), (448, 224), (150, 300), (301, 80)] {
            let ours = resize_triangle(&image, w, h);
            let reference =
                image::imageops::resize(&image, w, h, image::imageops::FilterType::Triangle);
            assert_eq!(ours, reference.into_raw(), "{w}x{h}");
        }
    }
}
