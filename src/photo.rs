//! Turning uploaded bytes into the network's input: format sniffing, a pixel
//! limit checked before anything is decoded, EXIF orientation, conversion of
//! grayscale, 16-bit, alpha and CMYK images to 8-bit RGB, and the resize to
//! the model's input size.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::codecs::gif::GifDecoder;
use image::metadata::Orientation;
use image::{
    AnimationDecoder, DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, RgbImage,
};

#[cfg(turbojpeg)]
mod turbojpeg;

/// The library that decodes JPEGs in this build: libjpeg-turbo when the
/// build found it on the system (`build.rs`), else `zune-jpeg` (and
/// `jpeg-decoder` for reduced scales).
pub const JPEG_DECODER: &str = if cfg!(turbojpeg) {
    "libjpeg-turbo"
} else {
    "zune-jpeg"
};

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
    Ok(decode_at_least(bytes, limits, None, Decoders::Fastest)?.into_rgb())
}

/// Decodes a photo and resizes it to the network's input (see [`to_chw`]).
/// A JPEG larger than the input is decoded at a reduced scale where that
/// saves work (scaling in the DCT skips most of the inverse transform and
/// colour conversion), never below twice the input, so the final filter
/// still averages several pixels into each input value:
///
/// - With libjpeg-turbo ([`JPEG_DECODER`]): the smallest of 1/2, 1/4, 1/8
///   that keeps twice the input. On flukes-dev this gives the same MAP@5
///   (0.8788) and leave-one-out score (0.8274) as the pure-Rust decoders;
///   the ids ranked 3rd to 5th differ in 7 of the 33 test rows.
///   Keeping only the input's size would also reduce the common 1050×500
///   photos (2.75–2.83 ms per flukes-dev photo prepared, against
///   3.35–3.43; EPYC VM) but moved two test photos (MAP@5 0.8697 against
///   0.8788), so it is not done.
/// - Without it: only photos at least eight times the input on both sides,
///   through `jpeg-decoder`. That decoder reads the entropy-coded data more
///   slowly than the full one (`zune-jpeg`, through `image`): at 1/2 it
///   lost (3008×2000: 48 ms against 31 ms decoded whole and resized), at
///   1/4 it wins (4272×2848: 39 against 63 ms).
pub fn prepare(
    bytes: &[u8],
    limits: DecodeLimits,
    size: InputSize,
) -> Result<Vec<f32>, PhotoError> {
    prepare_with(bytes, limits, size, Decoders::Fastest)
}

/// [`prepare`] with the pure-Rust decoders even where libjpeg-turbo is
/// built in: the other half of a comparison of the two (`decode_cost`).
pub fn prepare_pure_rust(
    bytes: &[u8],
    limits: DecodeLimits,
    size: InputSize,
) -> Result<Vec<f32>, PhotoError> {
    prepare_with(bytes, limits, size, Decoders::PureRust)
}

fn prepare_with(
    bytes: &[u8],
    limits: DecodeLimits,
    size: InputSize,
    decoders: Decoders,
) -> Result<Vec<f32>, PhotoError> {
    let least = Some((2 * size.width, 2 * size.height));
    let pixels = decode_at_least(bytes, limits, least, decoders)?;
    Ok(pixels_to_chw(&pixels, size))
}

/// Which JPEG decoders [`decode_at_least`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoders {
    /// libjpeg-turbo where built in, else the pure-Rust ones.
    Fastest,
    /// `zune-jpeg`, and `jpeg-decoder` for reduced scales.
    PureRust,
}

/// A decoded photo: grey photos, common in fluke catalogs, stay one channel
/// until the resize is done.
enum Pixels {
    Grey(GrayImage),
    Rgb(RgbImage),
}

impl Pixels {
    fn new(image: DynamicImage) -> Self {
        match image {
            DynamicImage::ImageLuma8(grey) => Self::Grey(grey),
            other => Self::Rgb(other.into_rgb8()),
        }
    }

    /// The photo as 8-bit RGB. `image` converts grey photos through
    /// floating-point colour management pixel by pixel; copying the grey
    /// value to each channel gives the same bytes.
    fn into_rgb(self) -> RgbImage {
        match self {
            Self::Grey(grey) => {
                let (width, height) = grey.dimensions();
                let rgb: Vec<u8> = grey.as_raw().iter().flat_map(|&v| [v, v, v]).collect();
                RgbImage::from_raw(width, height, rgb).expect("three bytes per pixel")
            }
            Self::Rgb(rgb) => rgb,
        }
    }
}

/// [`decode`], at a reduced JPEG scale (see [`prepare`]) that keeps the
/// photo at least `least` (width, height, as displayed).
fn decode_at_least(
    bytes: &[u8],
    limits: DecodeLimits,
    least: Option<(u32, u32)>,
    decoders: Decoders,
) -> Result<Pixels, PhotoError> {
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
    // Stored sides, before the orientation turns the photo.
    let turned = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let least = least.map(|(w, h)| if turned { (h, w) } else { (w, h) });
    #[cfg(not(turbojpeg))]
    let _ = decoders;
    #[cfg(turbojpeg)]
    if format == ImageFormat::Jpeg && decoders == Decoders::Fastest {
        if let Some(decoded) = turbojpeg::decode(bytes, (width, height), least) {
            let mut image = decoded.into_image();
            image.apply_orientation(orientation);
            return Ok(Pixels::new(image));
        }
    }
    if let (ImageFormat::Jpeg, Some((least_w, least_h))) = (format, least) {
        // Four times what must be kept, eight times the input: see `prepare`.
        if width >= 4 * least_w && height >= 4 * least_h {
            if let Some(mut reduced) = decode_jpeg_reduced(bytes, least_w, least_h) {
                reduced.apply_orientation(orientation);
                return Ok(Pixels::new(reduced));
            }
        }
    }
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(Pixels::new(image))
}

/// A JPEG decoded at the smallest DCT scale (1/8, 1/4, 1/2 or 1) that
/// keeps it at least `least_w × least_h`; `None` for what this decoder
/// does not handle (CMYK, 16-bit, or data it rejects), which the full
/// decoder then takes.
fn decode_jpeg_reduced(bytes: &[u8], least_w: u32, least_h: u32) -> Option<DynamicImage> {
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.read_info().ok()?;
    let (width, height) = decoder
        .scale(u16::try_from(least_w).ok()?, u16::try_from(least_h).ok()?)
        .ok()?;
    let (width, height) = (u32::from(width), u32::from(height));
    let pixels = decoder.decode().ok()?;
    let image = match decoder.info()?.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => {
            DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, pixels)?)
        }
        jpeg_decoder::PixelFormat::L8 => {
            DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, pixels)?)
        }
        _ => return None,
    };
    (width >= least_w && height >= least_h).then_some(image)
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
    // Marker bytes are rare in compressed data (one 0xFF in 256, each
    // stuffed with a 0x00), so a vectorised search for them from the end
    // reads the file at memory speed.
    let mut end_seen = false;
    for at in memchr::memrchr_iter(0xFF, bytes) {
        match bytes.get(at + 1) {
            Some(0xD9) => end_seen = true,
            Some(0xDA) => return end_seen,
            _ => {}
        }
    }
    false
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
    let (width, height) = image.dimensions();
    chw(&resize(image.as_raw(), width, height, 3, size), 3, size)
}

/// [`to_chw`] for a photo as the decoder left it: a grey photo is resized
/// as one channel, a third of the work, and copied to all three.
fn pixels_to_chw(pixels: &Pixels, size: InputSize) -> Vec<f32> {
    match pixels {
        Pixels::Grey(grey) => {
            let (width, height) = grey.dimensions();
            chw(&resize(grey.as_raw(), width, height, 1, size), 1, size)
        }
        Pixels::Rgb(rgb) => to_chw(rgb, size),
    }
}

/// Interleaved pixels of `channels` (1 or 3) bytes in CHW order, scaled;
/// a single channel fills all three planes.
fn chw(resized: &[u8], channels: usize, size: InputSize) -> Vec<f32> {
    let plane = (size.width * size.height) as usize;
    let scale = |v: u8| (f32::from(v) - 127.0) / 128.0;
    let mut out = Vec::with_capacity(3 * plane);
    // One plane at a time, so each loop writes consecutive values.
    for c in 0..3 {
        let channel = if channels == 1 { 0 } else { c };
        out.extend(
            resized[channel..]
                .iter()
                .step_by(channels)
                .map(|&v| scale(v)),
        );
    }
    debug_assert_eq!(out.len(), 3 * plane);
    out
}

thread_local! {
    /// The resizer keeps its work buffers between photos.
    static RESIZER: std::cell::RefCell<fast_image_resize::Resizer> =
        std::cell::RefCell::new(fast_image_resize::Resizer::new());
}

/// Resizes interleaved 8-bit pixels of `channels` (1 or 3) bytes to the
/// input size with a triangle (bilinear) filter that widens with the
/// shrink factor, so a shrink averages every input under the output pixel
/// (the rule of `image`'s `FilterType::Triangle`). `fast_image_resize` does
/// it in fixed point with SIMD: about a tenth of the time of the
/// floating-point filter this replaced, within one grey level of its
/// output.
fn resize(pixels: &[u8], width: u32, height: u32, channels: usize, size: InputSize) -> Vec<u8> {
    use fast_image_resize::{images::Image, images::ImageRef, FilterType, PixelType};
    use fast_image_resize::{ResizeAlg, ResizeOptions};
    if (width, height) == (size.width, size.height) {
        return pixels.to_vec();
    }
    let kind = if channels == 1 {
        PixelType::U8
    } else {
        PixelType::U8x3
    };
    let source = ImageRef::new(width, height, pixels, kind).expect("pixels fill the image");
    let mut resized = Image::new(size.width, size.height, kind);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with_borrow_mut(|resizer| resizer.resize(&source, &mut resized, &options))
        .expect("same pixel type on both sides, neither image empty");
    resized.into_vec()
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

    /// Pseudo-random bytes, so that no filter's rounding hides in a flat image.
    fn noise(len: usize) -> Vec<u8> {
        let mut state = 7u32;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as u8
            })
            .collect()
    }

    #[test]
    fn grey_photos_become_the_same_rgb_as_the_image_crate_makes() {
        let grey = image::GrayImage::from_fn(37, 11, |x, y| image::Luma([(x * 7 + y * 13) as u8]));
        let ours = Pixels::new(DynamicImage::ImageLuma8(grey.clone())).into_rgb();
        assert_eq!(ours, DynamicImage::ImageLuma8(grey).into_rgb8());
        assert_eq!(ours.get_pixel(36, 10).0, [(36 * 7 + 10 * 13) as u8; 3]);
    }

    #[test]
    fn a_grey_photo_resized_as_one_channel_gives_the_input_of_its_rgb_copy() {
        let grey = GrayImage::from_raw(700, 301, noise(700 * 301)).unwrap();
        let size = InputSize::default();
        let rgb = Pixels::Grey(grey.clone()).into_rgb();
        let as_grey = pixels_to_chw(&Pixels::Grey(grey), size);
        assert_eq!(as_grey, to_chw(&rgb, size));
        let plane = (size.width * size.height) as usize;
        assert_eq!(as_grey[..plane], as_grey[2 * plane..]);
    }

    /// A JPEG of smooth shapes with a little noise, like a photo.
    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let grain = noise((width * height) as usize);
        let image = RgbImage::from_fn(width, height, |x, y| {
            let g = grain[(y * width + x) as usize] / 16;
            image::Rgb([
                (x / 7) as u8 ^ g,
                (y / 5) as u8,
                90 + ((x + y) / 13 % 60) as u8,
            ])
        });
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(image)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Jpeg)
            .unwrap();
        bytes
    }

    fn rgb(pixels: Pixels) -> RgbImage {
        match pixels {
            Pixels::Rgb(rgb) => rgb,
            Pixels::Grey(_) => panic!("a colour JPEG decodes to RGB"),
        }
    }

    #[test]
    fn without_libjpeg_turbo_only_jpegs_eight_times_the_input_are_decoded_reduced() {
        let size = InputSize::default();
        let least = Some((2 * size.width, 2 * size.height));
        let limits = DecodeLimits::default();
        // 8·448 + 200 wide: 1/4 is the smallest scale that keeps 896×448.
        let large = jpeg(8 * size.width + 200, 8 * size.height + 100);
        let reduced = decode_jpeg_reduced(&large, 2 * size.width, 2 * size.height).unwrap();
        assert_eq!((reduced.width(), reduced.height()), (946, 473));
        let decoded = decode_at_least(&large, limits, least, Decoders::PureRust).unwrap();
        assert_eq!(rgb(decoded).dimensions(), (946, 473));
        // Under eight times on one side: decoded whole.
        let (w, h) = (4 * size.width, 8 * size.height);
        let whole = decode_at_least(&jpeg(w, h), limits, least, Decoders::PureRust).unwrap();
        assert_eq!(rgb(whole).dimensions(), (w, h));
    }

    #[test]
    fn a_jpeg_is_complete_only_with_an_end_marker_after_its_last_scan() {
        let whole = jpeg(300, 200);
        assert!(jpeg_is_complete(&whole));
        assert!(!jpeg_is_complete(&whole[..whole.len() / 2]));
        assert!(!jpeg_is_complete(&whole[..whole.len() - 2]));
        // An end marker, then another scan that is cut off (as a
        // progressive file's last scan can be).
        let mut cut = whole.clone();
        cut.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x02]);
        assert!(!jpeg_is_complete(&cut));
        assert!(
            !jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xD9]),
            "no scan at all"
        );
    }

    #[test]
    fn chw_scales_each_channel_into_its_own_plane() {
        let size = InputSize {
            width: 32,
            height: 32,
        };
        let plane = 32 * 32;
        let rgb: Vec<u8> = (0..plane).flat_map(|i| [i as u8, 255, 127]).collect();
        let out = chw(&rgb, 3, size);
        assert_eq!(out.len(), 3 * plane);
        assert_eq!(out[5], (5.0 - 127.0) / 128.0);
        assert_eq!(out[plane + 5], 1.0);
        assert_eq!(out[2 * plane + 5], 0.0);
        let grey: Vec<u8> = (0..plane).map(|i| i as u8).collect();
        let out = chw(&grey, 1, size);
        assert_eq!(out[7], out[plane + 7]);
        assert_eq!(
            out[2 * plane + 300],
            (f32::from(300u16 as u8) - 127.0) / 128.0
        );
    }

    #[cfg(turbojpeg)]
    mod with_libjpeg_turbo {
        use super::*;

        fn decode(bytes: &[u8], least: Option<(u32, u32)>, decoders: Decoders) -> RgbImage {
            rgb(decode_at_least(bytes, DecodeLimits::default(), least, decoders).unwrap())
        }

        #[test]
        fn jpegs_decode_at_the_smallest_power_of_two_that_keeps_twice_the_input() {
            let size = InputSize::default();
            let least = Some((2 * size.width, 2 * size.height));
            for ((w, h), scaled) in [
                // 1/4 keeps 946×473; 1/8 would be 237 high.
                ((3784, 1892), (946, 473)),
                // 1/2 keeps 901×451.
                ((1802, 901), (901, 451)),
                // Under four times the input on one side: whole.
                ((1050, 700), (1050, 700)),
                ((300, 200), (300, 200)),
            ] {
                assert_eq!(
                    decode(&jpeg(w, h), least, Decoders::Fastest).dimensions(),
                    scaled
                );
            }
            // Without a size to keep (`decode`): whole.
            let whole = decode(&jpeg(3784, 1892), None, Decoders::Fastest);
            assert_eq!(whole.dimensions(), (3784, 1892));
        }

        #[test]
        fn libjpeg_turbo_and_zune_decode_the_same_pixels_within_a_tenth_of_a_level_on_average() {
            let bytes = jpeg(901, 433);
            let turbo = decode(&bytes, None, Decoders::Fastest);
            let zune = decode(&bytes, None, Decoders::PureRust);
            assert_eq!(turbo.dimensions(), zune.dimensions());
            let diffs: Vec<u8> = turbo
                .as_raw()
                .iter()
                .zip(zune.as_raw())
                .map(|(&a, &b)| a.abs_diff(b))
                .collect();
            let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
            assert!(mean < 0.1, "mean difference {mean}");
            assert!(
                diffs.iter().all(|&d| d <= 8),
                "a pixel differs by more than 8"
            );
        }

        #[test]
        fn inputs_prepared_at_a_reduced_scale_stay_close_to_the_whole_decode() {
            let size = InputSize::default();
            let limits = DecodeLimits::default();
            for (w, h) in [(1802, 901), (3784, 1892)] {
                let bytes = jpeg(w, h);
                let fast = prepare(&bytes, limits, size).unwrap();
                let rust = prepare_pure_rust(&bytes, limits, size).unwrap();
                assert_eq!(fast.len(), rust.len());
                // In grey levels: inputs are (v − 127) / 128.
                let mean = fast
                    .iter()
                    .zip(&rust)
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .sum::<f64>()
                    / fast.len() as f64
                    * 128.0;
                assert!(mean < 1.5, "{w}x{h}: mean difference {mean} levels");
            }
        }

        #[test]
        fn grey_jpegs_stay_one_channel() {
            let grey = GrayImage::from_fn(1000, 500, |x, y| image::Luma([((x + y) / 6) as u8]));
            let mut bytes = Vec::new();
            DynamicImage::ImageLuma8(grey)
                .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Jpeg)
                .unwrap();
            let least = Some((448, 224));
            let decoded =
                decode_at_least(&bytes, DecodeLimits::default(), least, Decoders::Fastest);
            let Ok(Pixels::Grey(grey)) = decoded else {
                panic!("a grey JPEG decodes to one channel");
            };
            assert_eq!(grey.dimensions(), (500, 250));
        }

        #[test]
        fn a_photo_libjpeg_turbo_warns_about_is_left_to_the_pure_rust_decoders() {
            let mut bytes = jpeg(640, 480);
            let scan = bytes.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
            // A restart marker in a file that declares no restart interval:
            // libjpeg-turbo warns ("Corrupt JPEG data"), zune-jpeg decodes.
            bytes.splice(scan + 800..scan + 800, [0xFF, 0xD3]);
            assert!(turbojpeg::decode(&bytes, (640, 480), None).is_none());
            let limits = DecodeLimits::default();
            let size = InputSize::default();
            let fast = prepare(&bytes, limits, size).unwrap();
            assert_eq!(fast, prepare_pure_rust(&bytes, limits, size).unwrap());
            // The same file undamaged goes through libjpeg-turbo.
            assert!(turbojpeg::decode(&jpeg(640, 480), (640, 480), None).is_some());
        }
    }

    #[test]
    fn resize_is_within_one_grey_level_of_the_image_crates_triangle_filter() {
        let image = RgbImage::from_raw(301, 157, noise(301 * 157 * 3)).unwrap();
        // Shrinking both ways, stretching both ways, and one of each.
        for (w, h) in [(96, 64), (448, 224), (150, 300), (301, 80)] {
            let size = InputSize {
                width: w,
                height: h,
            };
            let ours = resize(image.as_raw(), 301, 157, 3, size);
            let reference =
                image::imageops::resize(&image, w, h, image::imageops::FilterType::Triangle);
            let worst = ours
                .iter()
                .zip(reference.as_raw())
                .map(|(&a, &b)| a.abs_diff(b))
                .max();
            assert_eq!(ours.len(), reference.as_raw().len());
            assert!(worst <= Some(1), "{w}x{h}: off by {worst:?}");
        }
        // Same size: the pixels unchanged.
        let same = InputSize {
            width: 301,
            height: 157,
        };
        assert_eq!(resize(image.as_raw(), 301, 157, 3, same), *image.as_raw());
    }
}
