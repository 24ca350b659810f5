//! The ported EfficientNet-Lite0 reproduces the reference PyTorch model's
//! logits and pooled features on the golden images of
//! `shared/notes/backbone-golden` (copied to `tests/fixtures/golden`).

use std::path::Path;

use candle_core::{Device, Tensor};
use flukeid::backbone::Backbone;
use flukeid::weights;

/// Float32 implementations differ by about 6e-6 here; the smallest real bug
/// measured (a wrong BatchNorm epsilon) moves logits by 0.7.
const TOLERANCE: f32 = 1e-4;

fn backbone() -> Backbone {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(weights::BACKBONE_FILE);
    Backbone::load(&path, &Device::Cpu).expect("shipped backbone loads")
}

struct Golden {
    input: Tensor,
    logits: Vec<f32>,
    features: Vec<f32>,
    top5: Vec<usize>,
}

/// The PNG scaled as `(v − 127) / 128`, which equals the reference's input
/// bit for bit, and the reference outputs.
fn golden(name: &str) -> Golden {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden");
    let image = image::open(dir.join(format!("{name}.png")))
        .unwrap()
        .into_rgb8();
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut input = vec![0f32; 3 * plane];
    for (i, p) in image.pixels().enumerate() {
        for c in 0..3 {
            input[c * plane + i] = (f32::from(p[c]) - 127.0) / 128.0;
        }
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    Golden {
        input: Tensor::from_vec(input, (1, 3, h as usize, w as usize), &Device::Cpu).unwrap(),
        logits: floats("logits"),
        features: floats("pooled_features_1280"),
        top5: json["top5_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect(),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn top5(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(5);
    order
}

fn check(name: &str, model: &Backbone) -> Vec<f32> {
    let g = golden(name);
    let (features, logits) = model.classify(&g.input).unwrap();
    let logits: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
    let features: Vec<f32> = features.squeeze(0).unwrap().to_vec1().unwrap();
    let dl = max_abs_diff(&logits, &g.logits);
    let df = max_abs_diff(&features, &g.features);
    assert!(dl < TOLERANCE, "{name}: logits differ by {dl}");
    assert!(df < TOLERANCE, "{name}: pooled features differ by {df}");
    assert_eq!(g.top5.len(), 5);
    logits
}

#[test]
fn chelsea_logits_match_reference_and_top5_is_cats() {
    let model = backbone();
    let logits = check("chelsea_224x224", &model);
    // tiger cat, Egyptian cat, tabby, lynx, then 904; its smallest gap is
    // 0.06, far above the tolerance, so the order itself is checked.
    assert_eq!(top5(&logits), golden("chelsea_224x224").top5);
    assert_eq!(top5(&logits)[0], 282);
}

#[test]
fn synthetic_pattern_logits_match_reference() {
    check("pattern_224x224", &backbone());
}

#[test]
fn wide_input_logits_match_reference() {
    // 224×448 is the default embedding shape; dynamic SAME padding must
    // agree with the reference on it.
    check("wide_224x448", &backbone());
}

#[test]
fn batched_inputs_give_the_same_logits_as_single_ones() {
    let model = backbone();
    let a = golden("chelsea_224x224");
    let b = golden("pattern_224x224");
    let batch = Tensor::cat(&[&a.input, &b.input], 0).unwrap();
    let (_, logits) = model.classify(&batch).unwrap();
    let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    assert!(max_abs_diff(&logits[0], &a.logits) < TOLERANCE);
    assert!(max_abs_diff(&logits[1], &b.logits) < TOLERANCE);
}

#[test]
fn damaged_weight_file_is_refused_by_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(weights::BACKBONE_FILE);
    let mut bytes = std::fs::read(src).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let damaged = dir.path().join("damaged.safetensors");
    std::fs::write(&damaged, bytes).unwrap();
    let err = Backbone::load(&damaged, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
}

#[test]
fn channel_last_kernels_match_candle_for_any_team_size_and_batch() {
    // The CPU path splits layers by rows, bands, channel strips and output
    // panels depending on the batch and the number of threads; candle's
    // operations are the reference for each combination.
    let model = backbone();
    let g = golden("wide_224x448");
    let pattern = golden("pattern_224x224");
    let (mirrored, upside_down) = (g.input.flip(&[3]).unwrap(), g.input.flip(&[2]).unwrap());
    let x = Tensor::cat(&[&g.input, &mirrored, &upside_down], 0).unwrap();
    let square = pattern.input.clone();
    for (input, what) in [(&x, "3 wide images"), (&square, "1 square image")] {
        let reference: Vec<f32> = model
            .features_candle(input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let ours: Vec<f32> = pool
                .install(|| model.features(input))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let worst = max_abs_diff(&ours, &reference);
            assert!(
                worst < TOLERANCE,
                "{what}, {threads} threads: off by {worst}"
            );
        }
    }
}
