//! Decoding uploaded photos: every odd or broken input the field produces
//! either becomes an RGB image or a clear error, never a crash.

mod common;

use flukeid::photo::{decode, prepare, to_chw, DecodeLimits, InputSize, PhotoError};
use image::{DynamicImage, ImageBuffer, Luma, Rgb, RgbImage};

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, 90]))
}

#[test]
fn zero_byte_file_is_empty_error() {
    assert!(matches!(decode(&[], limits()), Err(PhotoError::Empty)));
}

#[test]
fn text_file_named_jpg_is_unknown_format() {
    let text = b"Image,Id\nthis is not a photo\n";
    assert!(matches!(
        decode(text, limits()),
        Err(PhotoError::UnknownFormat)
    ));
}

#[test]
fn truncated_jpeg_is_corrupt() {
    let jpeg = common::jpeg_bytes(&gradient(200, 120));
    let half = &jpeg[..jpeg.len() / 2];
    match decode(half, limits()) {
        Err(PhotoError::Corrupt(message)) => assert!(!message.is_empty()),
        Err(other) => panic!("expected a decode error, got {other:?}"),
        Ok(_) => panic!("a truncated JPEG decoded without error"),
    }
}

#[test]
fn png_header_claiming_50000_by_50000_is_refused_before_decoding() {
    match decode(&common::huge_png_header(), limits()) {
        Err(PhotoError::TooLarge {
            width,
            height,
            pixels,
            limit,
        }) => {
            assert_eq!((width, height), (50_000, 50_000));
            assert_eq!(pixels, 2_500_000_000);
            assert_eq!(limit, 64_000_000);
        }
        Err(other) => panic!("expected TooLarge, got {other:?}"),
        Ok(_) => panic!("a 50,000×50,000 PNG was accepted"),
    }
}

#[test]
fn pixel_limit_is_configurable() {
    let png = common::png_bytes(&DynamicImage::ImageRgb8(gradient(100, 100)));
    assert!(decode(&png, DecodeLimits { max_pixels: 10_000 }).is_ok());
    assert!(matches!(
        decode(&png, DecodeLimits { max_pixels: 9_999 }),
        Err(PhotoError::TooLarge { .. })
    ));
}

#[test]
fn cmyk_jpeg_is_converted_to_rgb() {
    // Left half full cyan ink, right half no ink. The encoder stores it
    // inverted with an Adobe marker, as Photoshop does.
    let (w, h) = (64u16, 32u16);
    let mut cmyk = Vec::new();
    for _y in 0..h {
        for x in 0..w {
            let pixel: [u8; 4] = if x < w / 2 {
                [255, 0, 0, 0]
            } else {
                [0, 0, 0, 0]
            };
            cmyk.extend_from_slice(&pixel);
        }
    }
    let mut jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpeg, 95)
        .encode(&cmyk, w, h, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    let rgb = decode(&jpeg, limits()).expect("CMYK JPEG decodes");
    assert_eq!(rgb.dimensions(), (64, 32));
    let cyan = rgb.get_pixel(8, 16);
    let white = rgb.get_pixel(56, 16);
    assert!(
        cyan[0] < 80 && cyan[1] > 170 && cyan[2] > 170,
        "cyan came out as {cyan:?}"
    );
    assert!(
        white.0.iter().all(|&v| v > 230),
        "paper came out as {white:?}"
    );
}

#[test]
fn sixteen_bit_png_is_scaled_to_eight_bits() {
    let image: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(10, 6, |x, _| {
        if x < 5 {
            Rgb([65535, 32896, 0])
        } else {
            Rgb([0, 0, 65535])
        }
    });
    let rgb = decode(
        &common::png_bytes(&DynamicImage::ImageRgb16(image)),
        limits(),
    )
    .unwrap();
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 128, 0]);
    assert_eq!(rgb.get_pixel(9, 5).0, [0, 0, 255]);
}

#[test]
fn grayscale_image_becomes_equal_rgb_channels() {
    let gray: ImageBuffer<Luma<u8>, Vec<u8>> =
        ImageBuffer::from_fn(12, 8, |x, _| Luma([(x * 20) as u8]));
    let rgb = decode(
        &common::png_bytes(&DynamicImage::ImageLuma8(gray)),
        limits(),
    )
    .unwrap();
    assert_eq!(rgb.get_pixel(3, 2).0, [60, 60, 60]);
}

#[test]
fn animated_gif_is_refused_and_still_gif_accepted() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, RgbaImage};
    let frame = |v: u8| {
        Frame::from_parts(
            RgbaImage::from_pixel(16, 16, image::Rgba([v, v, v, 255])),
            0,
            0,
            Delay::from_numer_denom_ms(100, 1),
        )
    };
    let mut animated = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut animated);
        encoder.encode_frames(vec![frame(10), frame(200)]).unwrap();
    }
    assert!(matches!(
        decode(&animated, limits()),
        Err(PhotoError::Animated)
    ));

    let mut still = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut still);
        encoder.encode_frame(frame(200)).unwrap();
    }
    let rgb = decode(&still, limits()).unwrap();
    assert_eq!(rgb.dimensions(), (16, 16));
}

/// `jpeg` with an EXIF block giving `orientation` (6: rotate 90°
/// clockwise to view).
fn with_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&[orientation, 0, 0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut with_exif = jpeg[..2].to_vec();
    with_exif.extend_from_slice(&[0xFF, 0xE1]);
    with_exif.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    with_exif.extend_from_slice(&app1);
    with_exif.extend_from_slice(&jpeg[2..]);
    with_exif
}

#[test]
fn exif_orientation_is_applied() {
    // A 40×20 JPEG whose EXIF says "rotate 90° clockwise to view".
    let jpeg = common::jpeg_bytes(&gradient(40, 20));
    let with_exif = with_orientation(&jpeg, 6);
    assert_eq!(decode(&jpeg, limits()).unwrap().dimensions(), (40, 20));
    assert_eq!(decode(&with_exif, limits()).unwrap().dimensions(), (20, 40));
}

#[test]
fn large_jpegs_decoded_at_a_reduced_scale_give_nearly_the_same_input() {
    // Smooth colour ramps survive the DCT's down-scaling; a photo more than
    // eight times the input on both sides takes the reduced path.
    let size = InputSize::default();
    let (w, h) = (8 * size.width + 200, 8 * size.height + 100);
    let ramp = |x: u32, y: u32| Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 60]);
    let upright = common::jpeg_bytes(&RgbImage::from_fn(w, h, ramp));
    // The same photo stored on its side, with EXIF saying to turn it back.
    let stored = RgbImage::from_fn(h, w, |x, y| ramp(y, h - 1 - x));
    let turned = with_orientation(&common::jpeg_bytes(&stored), 6);
    for (what, bytes) in [("upright", upright), ("turned", turned)] {
        let full = to_chw(&decode(&bytes, limits()).unwrap(), size);
        let reduced = prepare(&bytes, limits(), size).unwrap();
        assert_eq!(reduced.len(), full.len());
        let diffs: Vec<f32> = full
            .iter()
            .zip(&reduced)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        // Inputs run from -1 to 1; one grey level is 1/128.
        assert!(mean < 2.0 / 128.0, "{what}: mean difference {mean}");
    }
}

#[test]
fn webp_is_decoded() {
    let mut webp = Vec::new();
    DynamicImage::ImageRgb8(gradient(30, 10))
        .write_to(
            &mut std::io::Cursor::new(&mut webp),
            image::ImageFormat::WebP,
        )
        .unwrap();
    let rgb = decode(&webp, limits()).unwrap();
    assert_eq!(rgb.get_pixel(2, 1).0, [14, 5, 90]);
}

#[test]
fn input_size_parses_and_rejects_sizes_off_the_32_grid() {
    assert_eq!(
        "448x224".parse::<InputSize>().unwrap(),
        InputSize {
            width: 448,
            height: 224
        }
    );
    assert!("450x224".parse::<InputSize>().is_err());
    assert!("0x224".parse::<InputSize>().is_err());
    assert!("448".parse::<InputSize>().is_err());
}
