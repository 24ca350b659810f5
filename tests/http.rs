//! The HTTP service on a small catalog of synthetic whales: answers,
//! errors, and that nothing a request does changes the catalog.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use actix_web::App;
use flukeid::http::{self, ServeOptions, Service};
use flukeid::identify::Identifier;
use flukeid::ingest::{self, IngestOptions};
use image::{DynamicImage, ImageBuffer, Luma, Rgb};
use serde_json::Value;

const WHALES: u32 = 6;

/// One catalog for the whole file: 6 whales with 2 sightings each.
fn catalog() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let (photos, labels) = common::kaggle_folder(&root, WHALES, 2);
        let catalog = root.join("catalog");
        ingest::ingest_folder(
            &common::embedder(),
            &photos,
            &labels,
            &catalog,
            &IngestOptions::default(),
        )
        .unwrap();
        catalog
    })
}

fn ready_service(options: ServeOptions) -> Arc<Service> {
    let service = Service::new(options);
    service.set_ready(Identifier::open(catalog(), common::embedder(), None).unwrap());
    service
}

macro_rules! app {
    ($service:expr) => {
        test::init_service(App::new().configure(http::configure($service.clone()))).await
    };
}

/// A multipart body with the given (field name, file name, bytes) parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> TestRequest {
    let boundary = "XflukeidtestX";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                    .as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    TestRequest::post()
        .uri("/v1/identify")
        .insert_header((
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        ))
        .set_payload(body)
}

fn photo(bytes: &[u8]) -> TestRequest {
    multipart(&[("image", Some("fluke.jpg"), bytes)])
}

async fn json(response: ServiceResponse) -> (StatusCode, Value) {
    let status = response.status();
    let body = test::read_body(response).await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)));
    (status, value)
}

async fn expect_error(response: ServiceResponse, status: StatusCode, code: &str) {
    let (got, body) = json(response).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

#[actix_web::test]
async fn identify_returns_the_resighted_whale_first() {
    let service = ready_service(ServeOptions::default());
    let app = app!(service);
    let jpeg = common::jpeg_bytes(&common::resighting(3));
    let (status, body) = json(test::call_service(&app, photo(&jpeg).to_request()).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 5);
    assert_eq!(predictions[0]["whale_id"], "w_3", "{body}");
    assert!(predictions[0]["sighting"]["image"]
        .as_str()
        .unwrap()
        .starts_with("w3_"));
    let mut ids: Vec<&str> = predictions
        .iter()
        .map(|p| p["whale_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "duplicate ids in {body}");
    assert_eq!(body["catalog"]["sightings"], 2 * WHALES);
    assert_eq!(body["catalog"]["whales"], WHALES);
    assert!(body["timings"]["total_ms"].as_f64().unwrap() > 0.0);
}

#[actix_web::test]
async fn a_bad_photo_queued_beside_good_ones_fails_alone() {
    // The model thread decodes the photos it batches together; one that
    // does not decode is answered with its error, the others identified.
    let service = ready_service(ServeOptions::default());
    let app = app!(service);
    let (one, three) = (
        common::jpeg_bytes(&common::resighting(1)),
        common::jpeg_bytes(&common::resighting(3)),
    );
    let truncated = one[..one.len() / 2].to_vec();
    let (a, b, c) = futures_util::future::join3(
        test::call_service(&app, photo(&one).to_request()),
        test::call_service(&app, photo(&truncated).to_request()),
        test::call_service(&app, photo(&three).to_request()),
    )
    .await;
    for (response, whale) in [(a, "w_1"), (c, "w_3")] {
        let (status, body) = json(response).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["predictions"][0]["whale_id"], whale, "{body}");
        let timings = &body["timings"];
        assert!(timings["decode_ms"].as_f64().unwrap() > 0.0, "{body}");
        assert!(
            timings["batch"]
                .as_u64()
                .is_some_and(|n| (1..=2).contains(&n)),
            "{body}"
        );
    }
    expect_error(b, StatusCode::UNPROCESSABLE_ENTITY, "undecodable_image").await;
}

#[actix_web::test]
async fn new_whale_sits_where_scores_cross_the_threshold() {
    let service = ready_service(ServeOptions::default());
    let app = app!(service);
    let jpeg = common::jpeg_bytes(&flukeid::bench::synthetic_fluke(999, 640, 320));
    let (status, body) = json(test::call_service(&app, photo(&jpeg).to_request()).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let threshold = body["threshold"].as_f64().unwrap();
    let predictions = body["predictions"].as_array().unwrap();
    let at = predictions
        .iter()
        .position(|p| p["whale_id"] == "new_whale");
    for (rank, p) in predictions.iter().enumerate() {
        let score = p["score"].as_f64().unwrap();
        match at {
            Some(at) if rank == at => {
                assert_eq!(score, threshold);
                assert!(p.get("sighting").is_none());
            }
            Some(at) if rank > at => assert!(score < threshold, "{body}"),
            _ => assert!(score >= threshold, "{body}"),
        }
    }
}

#[actix_web::test]
async fn bad_uploads_get_json_errors_and_leave_the_catalog_unchanged() {
    let before = common::snapshot(catalog());
    let service = ready_service(ServeOptions {
        body_limit: 200_000,
        ..Default::default()
    });
    let app = app!(service);
    let good = common::jpeg_bytes(&common::resighting(1));

    let huge_png = common::huge_png_header();
    let truncated = good[..good.len() / 2].to_vec();
    let animated = {
        use image::codecs::gif::GifEncoder;
        use image::{Delay, Frame, RgbaImage};
        let frame = |v| {
            Frame::from_parts(
                RgbaImage::from_pixel(8, 8, image::Rgba([v, v, v, 255])),
                0,
                0,
                Delay::from_numer_denom_ms(50, 1),
            )
        };
        let mut out = Vec::new();
        GifEncoder::new(&mut out)
            .encode_frames(vec![frame(0), frame(255)])
            .unwrap();
        out
    };

    let cases: Vec<(TestRequest, StatusCode, &str)> = vec![
        (photo(&[]), StatusCode::UNPROCESSABLE_ENTITY, "empty_image"),
        (
            photo(b"not a photo at all\n"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            photo(&truncated),
            StatusCode::UNPROCESSABLE_ENTITY,
            "undecodable_image",
        ),
        (
            photo(&huge_png),
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_too_large",
        ),
        (
            photo(&animated),
            StatusCode::UNPROCESSABLE_ENTITY,
            "animated_image",
        ),
        (
            multipart(&[("photo", Some("a.jpg"), &good)]),
            StatusCode::BAD_REQUEST,
            "missing_image",
        ),
        (
            multipart(&[("comment", None, b"hello")]),
            StatusCode::BAD_REQUEST,
            "missing_image",
        ),
        (
            multipart(&[
                ("image", Some("a.jpg"), &good),
                ("image", Some("b.jpg"), &good),
            ]),
            StatusCode::BAD_REQUEST,
            "too_many_files",
        ),
        (
            photo(&vec![0u8; 300_000]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            TestRequest::post()
                .uri("/v1/identify")
                .insert_header(("content-type", "application/json"))
                .set_payload("{}"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            TestRequest::get().uri("/v1/identify"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            TestRequest::get().uri("/v1/nothing"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            TestRequest::get().uri("/v1/whales/w_404"),
            StatusCode::NOT_FOUND,
            "unknown_whale",
        ),
    ];
    for (request, status, code) in cases {
        expect_error(
            test::call_service(&app, request.to_request()).await,
            status,
            code,
        )
        .await;
    }

    let response = test::call_service(
        &app,
        TestRequest::delete().uri("/v1/whales/w_1").to_request(),
    )
    .await;
    assert_eq!(response.headers().get("allow").unwrap(), "GET");
    expect_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;

    // A body that is not multipart says what is wrong with it in words.
    for (content_type, why) in [
        (
            Some("application/json"),
            "Content-Type is not multipart/form-data",
        ),
        (None, "no Content-Type header"),
    ] {
        let mut request = TestRequest::post().uri("/v1/identify").set_payload("{}");
        if let Some(content_type) = content_type {
            request = request.insert_header(("content-type", content_type));
        }
        let (status, body) = json(test::call_service(&app, request.to_request()).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(why) && error.contains("curl -F image=@"),
            "{body}"
        );
    }

    // Still serving after every error.
    let (status, body) = json(test::call_service(&app, photo(&good).to_request()).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"][0]["whale_id"], "w_1");
    assert_eq!(
        common::snapshot(catalog()),
        before,
        "a request changed the catalog"
    );
}

#[actix_web::test]
async fn odd_but_valid_photos_are_identified() {
    let service = ready_service(ServeOptions::default());
    let app = app!(service);
    let base = common::resighting(4);

    let gray: ImageBuffer<Luma<u8>, Vec<u8>> = DynamicImage::ImageRgb8(base.clone()).into_luma8();
    let sixteen: ImageBuffer<Rgb<u16>, Vec<u16>> =
        DynamicImage::ImageRgb8(base.clone()).into_rgb16();
    let mut cmyk = Vec::new();
    for p in base.pixels() {
        let k = 255 - p.0.iter().max().unwrap();
        let ink = |c: u8| {
            if k == 255 {
                0
            } else {
                ((255 - c - k) as u32 * 255 / (255 - k) as u32) as u8
            }
        };
        cmyk.extend_from_slice(&[ink(p[0]), ink(p[1]), ink(p[2]), k]);
    }
    let mut cmyk_jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut cmyk_jpeg, 92)
        .encode(
            &cmyk,
            base.width() as u16,
            base.height() as u16,
            jpeg_encoder::ColorType::Cmyk,
        )
        .unwrap();

    for (what, bytes) in [
        (
            "grayscale PNG",
            common::png_bytes(&DynamicImage::ImageLuma8(gray)),
        ),
        (
            "16-bit PNG",
            common::png_bytes(&DynamicImage::ImageRgb16(sixteen)),
        ),
        ("CMYK JPEG", cmyk_jpeg),
    ] {
        let (status, body) = json(test::call_service(&app, photo(&bytes).to_request()).await).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        assert_eq!(body["predictions"].as_array().unwrap().len(), 5, "{what}");
        if what != "grayscale PNG" {
            assert_eq!(body["predictions"][0]["whale_id"], "w_4", "{what}: {body}");
        }
    }
}

#[actix_web::test]
async fn whale_endpoint_lists_sightings() {
    let service = ready_service(ServeOptions::default());
    let app = app!(service);
    let (status, body) =
        json(test::call_service(&app, TestRequest::get().uri("/v1/whales/w_2").to_request()).await)
            .await;
    assert_eq!(status, StatusCode::OK);
    let sightings = body["sightings"].as_array().unwrap();
    assert_eq!(sightings.len(), 2);
    assert_eq!(sightings[0]["image"], "w2_0.png");
    assert_eq!(sightings[1]["image"], "w2_1.png");
    assert!(sightings
        .iter()
        .all(|s| s["whale_id"] == "w_2" && s["added_at"].as_str().unwrap().ends_with('Z')));
}

#[actix_web::test]
async fn not_ready_until_the_catalog_is_loaded() {
    let service = Service::new(ServeOptions::default());
    let app = app!(service);
    let health = test::call_service(&app, TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(health.status(), StatusCode::OK);

    let response = test::call_service(&app, TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(response.headers().get("retry-after").unwrap(), "1");
    expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
    let response = test::call_service(&app, photo(b"x").to_request()).await;
    expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;

    service.set_ready(Identifier::open(catalog(), common::embedder(), None).unwrap());
    let (status, body) =
        json(test::call_service(&app, TestRequest::get().uri("/readyz").to_request()).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sightings"], 2 * WHALES);
}

#[actix_web::test]
async fn served_openapi_matches_the_committed_file() {
    let service = Service::new(ServeOptions::default());
    let app = app!(service);
    let body = test::call_and_read_body(
        &app,
        TestRequest::get().uri("/v1/openapi.json").to_request(),
    )
    .await;
    let committed =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("api-spec/openapi.json")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&committed),
        "api-spec/openapi.json is out of date: run `cargo run --release -- openapi > api-spec/openapi.json`"
    );
}
