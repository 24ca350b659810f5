//! JPEG decoding through the system's libjpeg-turbo (its TurboJPEG API),
//! compiled in when the build finds the library (see `build.rs`).
//!
//! It decodes faster than `zune-jpeg`, and it can scale in the DCT by 1/2,
//! 1/4 or 1/8, which skips most of the inverse transform, upsampling and
//! colour conversion of a photo larger than the network's input: a
//! flukes-dev photo is prepared in 0.85–0.88 of the time (`decode_cost`,
//! docs/benchmarks.md). Anything it declines, fails on or
//! warns about (CMYK, damaged data, a size it cannot hold) goes to the
//! pure-Rust decoders, which then decode it or word the error; a file
//! libjpeg-turbo decodes without a warning is accepted even where
//! `zune-jpeg` would have refused it.

use std::os::raw::{c_char, c_int, c_ulong, c_void};

type Handle = *mut c_void;

// The TurboJPEG 2 API, which libjpeg-turbo 2.0 to 3.x all export.
extern "C" {
    fn tjInitDecompress() -> Handle;
    fn tjDecompressHeader3(
        handle: Handle,
        jpeg: *const u8,
        size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        subsampling: *mut c_int,
        colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: Handle,
        jpeg: *const u8,
        size: c_ulong,
        out: *mut u8,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjGetErrorStr2(handle: Handle) -> *mut c_char;
    fn tjDestroy(handle: Handle) -> c_int;
}

const PIXEL_RGB: c_int = 0;
const PIXEL_GRAY: c_int = 6;
const COLORSPACE_RGB: c_int = 0;
const COLORSPACE_YCBCR: c_int = 1;
const COLORSPACE_GRAY: c_int = 2;

/// A decoded JPEG: interleaved 8-bit pixels, one byte each when grey,
/// three (RGB) otherwise.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    pub grey: bool,
    pub pixels: Vec<u8>,
}

/// One decompressor, destroyed when dropped.
struct Decompressor(Handle);

impl Decompressor {
    fn new() -> Option<Self> {
        // SAFETY: no arguments; a null handle means it failed.
        let handle = unsafe { tjInitDecompress() };
        (!handle.is_null()).then_some(Self(handle))
    }

    fn error(&self) -> String {
        // SAFETY: the handle is live; the string is the library's own,
        // NUL-terminated, and copied before the next call.
        unsafe {
            let text = tjGetErrorStr2(self.0);
            if text.is_null() {
                return String::new();
            }
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is dropped once.
        unsafe { tjDestroy(self.0) };
    }
}

/// The stored (width, height) of a JPEG decoded at 1/`denominator`, as
/// the library rounds it (up).
fn scaled(width: u32, height: u32, denominator: u32) -> (u32, u32) {
    (width.div_ceil(denominator), height.div_ceil(denominator))
}

/// The largest DCT reduction (8, 4, 2 or 1) that keeps a `width × height`
/// photo at least `least` (stored sides).
pub(crate) fn reduction(width: u32, height: u32, least: Option<(u32, u32)>) -> u32 {
    let Some((least_w, least_h)) = least else {
        return 1;
    };
    [8, 4, 2]
        .into_iter()
        .find(|&d| {
            let (w, h) = scaled(width, height, d);
            w >= least_w && h >= least_h
        })
        .unwrap_or(1)
}

/// Decodes `jpeg`, whose stored sides the caller read as `stored` (and
/// checked against the pixel limit), at the smallest power-of-two scale
/// that keeps it at least `least` (stored sides), or whole without `least`.
/// `None` when the library declines or reports anything, warnings included,
/// or reads other sides than `stored`.
pub(crate) fn decode(
    jpeg: &[u8],
    stored: (u32, u32),
    least: Option<(u32, u32)>,
) -> Option<Decoded> {
    let size = c_ulong::try_from(jpeg.len()).ok()?;
    let decompressor = Decompressor::new()?;
    let (mut width, mut height, mut subsampling, mut colorspace) = (0, 0, 0, 0);
    // SAFETY: the pointer and length describe `jpeg`; the outputs are
    // plain integers.
    let header = unsafe {
        tjDecompressHeader3(
            decompressor.0,
            jpeg.as_ptr(),
            size,
            &mut width,
            &mut height,
            &mut subsampling,
            &mut colorspace,
        )
    };
    if header != 0 {
        tracing::debug!(error = %decompressor.error(), "libjpeg-turbo declined the header");
        return None;
    }
    let (grey, format) = match colorspace {
        COLORSPACE_GRAY => (true, PIXEL_GRAY),
        COLORSPACE_YCBCR | COLORSPACE_RGB => (false, PIXEL_RGB),
        _ => return None,
    };
    let (width, height) = (u32::try_from(width).ok()?, u32::try_from(height).ok()?);
    if (width, height) != stored {
        return None;
    }
    let (out_w, out_h) = scaled(width, height, reduction(width, height, least));
    let channels = if grey { 1 } else { 3 };
    let len = usize::try_from(u64::from(out_w) * u64::from(out_h) * channels).ok()?;
    let mut pixels = vec![0u8; len];
    // SAFETY: `pixels` holds out_h rows of out_w pixels of the requested
    // format, tightly packed (pitch 0 = width × pixel size); the library
    // writes no more than that, since out_w × out_h is exactly the size of
    // one of its scaling factors.
    let status = unsafe {
        tjDecompress2(
            decompressor.0,
            jpeg.as_ptr(),
            size,
            pixels.as_mut_ptr(),
            c_int::try_from(out_w).ok()?,
            0,
            c_int::try_from(out_h).ok()?,
            format,
            0,
        )
    };
    if status != 0 {
        tracing::debug!(error = %decompressor.error(), "libjpeg-turbo declined the photo");
        return None;
    }
    Some(Decoded {
        width: out_w,
        height: out_h,
        grey,
        pixels,
    })
}

impl Decoded {
    pub(crate) fn into_image(self) -> image::DynamicImage {
        let Self {
            width,
            height,
            grey,
            pixels,
        } = self;
        if grey {
            let grey = image::GrayImage::from_raw(width, height, pixels);
            image::DynamicImage::ImageLuma8(grey.expect("one byte per pixel"))
        } else {
            let rgb = image::RgbImage::from_raw(width, height, pixels);
            image::DynamicImage::ImageRgb8(rgb.expect("three bytes per pixel"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reduction_is_the_largest_that_keeps_both_sides() {
        assert_eq!(reduction(4272, 2848, Some((448, 224))), 8);
        assert_eq!(reduction(3008, 2000, Some((448, 224))), 4);
        assert_eq!(reduction(1050, 700, Some((448, 224))), 2);
        // 1/2 of 1050×447 is 525×224 (rounded up): still enough.
        assert_eq!(reduction(1050, 447, Some((448, 224))), 2);
        assert_eq!(reduction(1050, 446, Some((448, 224))), 1);
        assert_eq!(reduction(4272, 2848, None), 1);
        assert_eq!(scaled(1050, 447, 2), (525, 224));
    }

    #[test]
    fn a_cmyk_or_unreadable_jpeg_is_declined_not_decoded() {
        assert!(decode(b"not a jpeg", (1, 1), None).is_none());
    }
}
