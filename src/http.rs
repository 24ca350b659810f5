//! The HTTP service.
//!
//! Handlers only unpack the request, call the layer below and shape the
//! answer; every failure becomes an [`ApiError`], which is the one place
//! that picks the status code and writes the JSON body
//! `{"error": ..., "code": ...}`.
//!
//! The model runs on its own thread, fed through a channel: an HTTP worker
//! never blocks on inference, and concurrent requests are embedded together
//! in batches of up to [`MAX_BATCH`]. At most `queue` identify requests are
//! in progress at once; the next one is answered 503 with `Retry-After`
//! before its body is read, instead of queueing without bound.
//!
//! The model thread also decodes and resizes the batch's photos (on rayon's
//! pool), before the forward pass rather than beside it. A forward pass
//! keeps every core busy on two threads that wait for each other at every
//! layer; a decode running meanwhile takes a core from one of them for a
//! time slice and stalls both, which was where the slowest requests' time
//! went. Taking turns costs no throughput on two cores (the network leaves
//! no idle core to decode on) and keeps a request's latency to the batch
//! it waits for and its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use actix_multipart::Multipart;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::oneshot;
use utoipa::{OpenApi, ToSchema};

use crate::catalog::Sighting;
use crate::identify::{Identifier, Prediction};
use crate::photo::{self, DecodeLimits, PhotoError};

/// Largest number of queued photos embedded in one forward pass.
pub const MAX_BATCH: usize = 8;

/// Limits and sizes of the service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    pub decode: DecodeLimits,
    /// Identify requests in progress (reading, decoding, waiting for or
    /// running the model) before new ones are refused with 503.
    pub queue: usize,
    /// HTTP worker threads.
    pub workers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            body_limit: 20 * 1024 * 1024,
            decode: DecodeLimits::default(),
            queue: 32,
            workers: 2,
        }
    }
}

/// Every way a request can fail, each with its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("multipart field `image` is missing")]
    MissingImage,
    #[error("send exactly one file, in field `image`; this request has {0} files")]
    TooManyFiles(usize),
    #[error("request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Photo(#[from] PhotoError),
    #[error("no whale with id {0:?} in the catalog")]
    UnknownWhale(String),
    #[error("no such route: {0}")]
    NoRoute(String),
    #[error("method not allowed: {route}; use {allow}")]
    MethodNotAllowed { route: String, allow: &'static str },
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("the model is busy; retry shortly")]
    Busy,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// A stable machine-readable code.
    pub code: String,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::MissingImage => "missing_image",
            Self::TooManyFiles(_) => "too_many_files",
            Self::TooLarge { .. } => "body_too_large",
            Self::Photo(PhotoError::UnknownFormat) => "unsupported_media_type",
            Self::Photo(PhotoError::Empty) => "empty_image",
            Self::Photo(PhotoError::TooLarge { .. }) => "image_too_large",
            Self::Photo(PhotoError::Animated) => "animated_image",
            Self::Photo(PhotoError::Corrupt(_)) => "undecodable_image",
            Self::UnknownWhale(_) => "unknown_whale",
            Self::NoRoute(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NotReady(_) => "not_ready",
            Self::Busy => "busy",
            Self::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::MissingImage | Self::TooManyFiles(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Photo(PhotoError::UnknownFormat) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Photo(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnknownWhale(_) | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotReady(_) | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, Self::Busy | Self::NotReady(_)) {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        if let Self::MethodNotAllowed { allow, .. } = self {
            response.insert_header((header::ALLOW, *allow));
        }
        response.json(ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
        })
    }
}

/// One photo waiting for the model, as uploaded.
struct Job {
    bytes: Vec<u8>,
    queued: Instant,
    reply: oneshot::Sender<Result<Inference, JobError>>,
}

/// What the model thread answers for one photo.
struct Inference {
    predictions: Vec<Prediction>,
    queue_ms: f64,
    decode_ms: f64,
    inference_ms: f64,
    batch: usize,
}

/// Why the model thread could not identify a photo.
enum JobError {
    Photo(PhotoError),
    Internal(String),
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Photo(e) => Self::Photo(e),
            JobError::Internal(e) => Self::Internal(e),
        }
    }
}

/// The state the handlers share.
pub struct Service {
    identifier: OnceLock<Arc<Identifier>>,
    load_error: RwLock<Option<String>>,
    jobs: SyncSender<Job>,
    /// Identify requests admitted and not yet answered.
    admitted: AtomicUsize,
    options: ServeOptions,
}

/// One admitted identify request; dropping it frees its place.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Service {
    /// Starts the model thread. The service answers 503 until
    /// [`Service::set_ready`] hands it an identifier.
    pub fn new(options: ServeOptions) -> Arc<Self> {
        let (jobs, queue) = mpsc::sync_channel(options.queue.max(1));
        let service = Arc::new(Self {
            identifier: OnceLock::new(),
            load_error: RwLock::new(None),
            jobs,
            admitted: AtomicUsize::new(0),
            options,
        });
        let worker = Arc::downgrade(&service);
        std::thread::Builder::new()
            .name("flukeid-model".into())
            .spawn(move || run_model(worker, queue))
            .expect("model thread starts");
        service
    }

    /// Makes the service ready with a loaded catalog and model, after one
    /// forward pass of a full batch: the pass's buffers grow to the largest
    /// batch they will hold, and first touching ~200 MiB of fresh pages took
    /// 0.7–1.2 s on the project's VM, which the first busy moment's requests
    /// would otherwise wait for.
    pub fn set_ready(&self, identifier: Identifier) {
        let started = Instant::now();
        let input = identifier.embedder().input();
        let blank = vec![0f32; 3 * (input.width * input.height) as usize];
        if let Err(e) = identifier.embedder().embed_inputs(&vec![blank; MAX_BATCH]) {
            tracing::warn!(error = %e, "warm-up pass failed");
        }
        tracing::info!(batch = MAX_BATCH, ms = ms(started), "warmed up");
        tracing::info!(
            sightings = identifier.sightings(),
            whales = identifier.whales(),
            threshold = format!("{:.2}", identifier.threshold()),
            backbone_sha256 = %identifier.embedder().fingerprint().backbone_sha256,
            jpeg_decoder = photo::JPEG_DECODER,
            "ready"
        );
        let _ = self.identifier.set(Arc::new(identifier));
    }

    /// Records why loading failed; `/readyz` reports it.
    pub fn set_failed(&self, reason: String) {
        tracing::error!(%reason, "model or catalog failed to load");
        *self.load_error.write().expect("lock") = Some(reason);
    }

    /// Admits an identify request when fewer than `queue` are in progress
    /// (reading, decoding, waiting or running), else refuses it at once, so
    /// that turning work away costs almost nothing under overload: the
    /// body of a refused request is never read or decoded.
    fn admit(&self) -> Result<Admission<'_>, ApiError> {
        let limit = self.options.queue.max(1);
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| ApiError::Busy)?;
        Ok(Admission(&self.admitted))
    }

    fn identifier(&self) -> Result<&Arc<Identifier>, ApiError> {
        self.identifier.get().ok_or_else(|| {
            let reason = self.load_error.read().expect("lock").clone();
            ApiError::NotReady(reason.unwrap_or_else(|| "model and catalog are loading".into()))
        })
    }
}

/// The model thread: takes the first waiting photo and any others already
/// queued, up to [`MAX_BATCH`], decodes them, and embeds those that decoded
/// in one pass.
fn run_model(service: std::sync::Weak<Service>, queue: Receiver<Job>) {
    use rayon::prelude::*;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(service) = service.upgrade() else {
            return;
        };
        let Some(identifier) = service.identifier.get().cloned() else {
            for job in batch {
                let _ = job.reply.send(Err(JobError::Internal("not ready".into())));
            }
            continue;
        };
        let limits = service.options.decode;
        drop(service);

        let decode_started = Instant::now();
        let size = identifier.embedder().input();
        let decoded: Vec<(Result<Vec<f32>, PhotoError>, f64)> = batch
            .par_iter()
            .map(|job| {
                let started = Instant::now();
                (photo::prepare(&job.bytes, limits, size), ms(started))
            })
            .collect();
        let mut inputs = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for (job, (input, decode_ms)) in batch.into_iter().zip(decoded) {
            let queue_ms = round_ms((decode_started - job.queued).as_secs_f64() * 1e3);
            match input {
                Ok(input) => {
                    inputs.push(input);
                    waiting.push((job.reply, queue_ms, decode_ms));
                }
                Err(e) => {
                    let _ = job.reply.send(Err(JobError::Photo(e)));
                }
            }
        }
        if inputs.is_empty() {
            continue;
        }

        let started = Instant::now();
        let result = identifier.identify_inputs(&inputs);
        let inference_ms = ms(started);
        match result {
            Ok(all) => {
                for (predictions, (reply, queue_ms, decode_ms)) in all.into_iter().zip(waiting) {
                    let _ = reply.send(Ok(Inference {
                        predictions,
                        queue_ms,
                        decode_ms,
                        inference_ms,
                        batch: inputs.len(),
                    }));
                }
            }
            Err(e) => {
                for (reply, ..) in waiting {
                    let _ = reply.send(Err(JobError::Internal(e.to_string())));
                }
            }
        }
    }
}

/// Milliseconds since `since`, to 0.01 ms.
fn ms(since: Instant) -> f64 {
    round_ms(since.elapsed().as_secs_f64() * 1e3)
}

fn round_ms(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

/// Where the time of one identification went.
#[derive(Debug, Serialize, ToSchema)]
pub struct Timings {
    /// Reading the upload.
    pub upload_ms: f64,
    /// Waiting for the model thread.
    pub queue_ms: f64,
    /// Decoding, checking and resizing the photo (on the model thread,
    /// beside the batch's other photos).
    pub decode_ms: f64,
    /// Embedding the batch this photo was in, and the index search.
    pub inference_ms: f64,
    pub total_ms: f64,
    /// Photos in the batch this one was embedded with.
    pub batch: usize,
}

/// The catalog the answer came from.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogSummary {
    pub sightings: usize,
    pub whales: usize,
}

/// The answer to an identification.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentifyResponse {
    /// Five answers, most likely first (fewer only when the catalog holds
    /// fewer than four whales).
    pub predictions: Vec<Prediction>,
    /// The similarity under which `new_whale` is ranked above a whale.
    pub threshold: f32,
    pub catalog: CatalogSummary,
    pub timings: Timings,
}

/// The multipart form of an identification request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct IdentifyForm {
    /// One photo of a fluke: JPEG, PNG, WebP, GIF (single frame), TIFF or BMP.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// A whale's catalogued sightings.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhaleResponse {
    pub whale_id: String,
    pub sightings: Vec<Sighting>,
}

/// Liveness and readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sightings: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub whales: Option<usize>,
}

/// Identify the whale in a fluke photo.
#[utoipa::path(
    post,
    path = "/v1/identify",
    request_body(content = IdentifyForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Five most likely whale ids", body = IdentifyResponse),
        (status = 400, description = "Malformed request, missing or repeated `image` field", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Not an image format flukeid reads", body = ErrorBody),
        (status = 422, description = "Undecodable, animated, or over the pixel limit", body = ErrorBody),
        (status = 503, description = "Not ready, or the model queue is full (see Retry-After)", body = ErrorBody),
    )
)]
async fn identify(
    service: web::Data<Service>,
    request: HttpRequest,
    payload: Multipart,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let identifier = service.identifier()?.clone();
    let _admission = service.admit()?;
    let limit = service.options.body_limit;
    if let Some(length) = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if length > limit {
            return Err(ApiError::TooLarge { limit });
        }
    }
    let bytes = read_image_field(payload, limit).await?;
    let upload_ms = ms(started);

    let (reply, answer) = oneshot::channel();
    let job = Job {
        bytes,
        queued: Instant::now(),
        reply,
    };
    match service.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => return Err(ApiError::Busy),
        Err(TrySendError::Disconnected(_)) => {
            return Err(ApiError::Internal("model thread stopped".into()))
        }
    }
    let inference = answer
        .await
        .map_err(|_| ApiError::Internal("model thread dropped the request".into()))??;

    Ok(HttpResponse::Ok().json(IdentifyResponse {
        predictions: inference.predictions,
        threshold: identifier.threshold(),
        catalog: CatalogSummary {
            sightings: identifier.sightings(),
            whales: identifier.whales(),
        },
        timings: Timings {
            upload_ms,
            decode_ms: inference.decode_ms,
            queue_ms: inference.queue_ms,
            inference_ms: inference.inference_ms,
            total_ms: ms(started),
            batch: inference.batch,
        },
    }))
}

/// Reads the one file of field `image`, counting every byte of the body
/// against `limit`. Other non-file fields are ignored.
async fn read_image_field(mut payload: Multipart, limit: usize) -> Result<Vec<u8>, ApiError> {
    fn malformed(e: actix_multipart::MultipartError) -> ApiError {
        use actix_multipart::MultipartError as E;
        let why = match e {
            E::ContentTypeMissing => "the request has no Content-Type header".to_string(),
            E::ContentTypeIncompatible => "its Content-Type is not multipart/form-data".to_string(),
            E::BoundaryMissing => "its Content-Type names no multipart boundary".to_string(),
            other => format!("this body could not be read as one: {other}"),
        };
        ApiError::BadRequest(format!(
            "expected a multipart/form-data body with the photo in a file field named `image` \
             (curl -F image=@photo.jpg); {why}"
        ))
    }
    let mut image: Option<Vec<u8>> = None;
    let mut files = 0;
    let mut total = 0usize;
    while let Some(field) = payload.next().await {
        let mut field = field.map_err(malformed)?;
        let name = field
            .content_disposition()
            .and_then(|d| d.get_name())
            .unwrap_or_default()
            .to_owned();
        let is_file = field
            .content_disposition()
            .is_some_and(|d| d.get_filename().is_some());
        if name == "image" || is_file {
            files += 1;
        }
        let mut data = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(malformed)?;
            total += chunk.len();
            if total > limit {
                return Err(ApiError::TooLarge { limit });
            }
            data.extend_from_slice(&chunk);
        }
        if name == "image" && image.is_none() {
            image = Some(data);
        }
    }
    if files > 1 {
        return Err(ApiError::TooManyFiles(files));
    }
    image.ok_or(ApiError::MissingImage)
}

/// The catalogued sightings of one whale.
#[utoipa::path(
    get,
    path = "/v1/whales/{whale_id}",
    params(("whale_id" = String, Path, description = "A catalogued whale id")),
    responses(
        (status = 200, description = "The whale's sightings, oldest first", body = WhaleResponse),
        (status = 404, description = "No such whale", body = ErrorBody),
        (status = 503, description = "Not ready", body = ErrorBody),
    )
)]
async fn whale(
    service: web::Data<Service>,
    whale_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let identifier = service.identifier()?;
    let whale_id = whale_id.into_inner();
    let sightings = identifier.whale_sightings(&whale_id);
    if sightings.is_empty() {
        return Err(ApiError::UnknownWhale(whale_id));
    }
    Ok(HttpResponse::Ok().json(WhaleResponse {
        whale_id,
        sightings,
    }))
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "alive".into(),
        sightings: None,
        whales: None,
    })
}

/// Ready: the model and the catalog are loaded.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "Still loading, or loading failed", body = ErrorBody),
    )
)]
async fn readyz(service: web::Data<Service>) -> Result<HttpResponse, ApiError> {
    let identifier = service.identifier()?;
    Ok(HttpResponse::Ok().json(Health {
        status: "ready".into(),
        sightings: Some(identifier.sightings()),
        whales: Some(identifier.whales()),
    }))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "The OpenAPI document")))]
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(openapi_document())
}

async fn no_route(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoRoute(format!(
        "{} {}",
        request.method(),
        request.path()
    )))
}

/// The handler for a known route called with the wrong method.
fn wrong_method(allow: &'static str) -> actix_web::Route {
    web::to(move |request: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
            route: format!("{} {}", request.method(), request.path()),
            allow,
        })
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flukeid",
        description = "Identify individual humpback whales from photos of their tail flukes."
    ),
    paths(identify, whale, healthz, readyz, openapi_json),
    components(schemas(
        IdentifyResponse,
        Prediction,
        Sighting,
        Timings,
        CatalogSummary,
        WhaleResponse,
        Health,
        ErrorBody,
        IdentifyForm
    ))
)]
struct ApiDoc;

/// The OpenAPI document, as committed in `api-spec/openapi.json`.
pub fn openapi_document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut json = doc.to_pretty_json().expect("OpenAPI document serialises");
    json.push('\n');
    json
}

/// Logs one line per request with its status and duration.
async fn log_request(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.path().to_owned();
    let response = next.call(request).await?;
    tracing::info!(%method, %path, status = response.status().as_u16(), ms = format!("{:.1}", ms(started)), "request");
    Ok(response)
}

/// Registers the routes on an actix app.
pub fn configure(service: Arc<Service>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(web::Data::from(service))
            .service(
                web::resource("/v1/identify")
                    .route(web::post().to(identify))
                    .default_service(wrong_method("POST")),
            )
            .service(
                web::resource("/v1/whales/{whale_id}")
                    .route(web::get().to(whale))
                    .default_service(wrong_method("GET")),
            )
            .service(
                web::resource("/v1/openapi.json")
                    .route(web::get().to(openapi_json))
                    .default_service(wrong_method("GET")),
            )
            .service(
                web::resource("/healthz")
                    .route(web::get().to(healthz))
                    .default_service(wrong_method("GET")),
            )
            .service(
                web::resource("/readyz")
                    .route(web::get().to(readyz))
                    .default_service(wrong_method("GET")),
            )
            .default_service(web::to(no_route));
    }
}

/// Runs the server until it is stopped.
pub async fn serve(service: Arc<Service>, bind: &str) -> std::io::Result<()> {
    let workers = service.options.workers;
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(log_request))
            .configure(configure(service.clone()))
    })
    .workers(workers)
    .bind(bind)
    .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {bind}: {e}")))?;
    for address in server.addrs() {
        tracing::info!(%address, "listening");
    }
    server.run().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refuses_past_the_queue_and_frees_on_drop() {
        let service = Service::new(ServeOptions {
            queue: 2,
            ..Default::default()
        });
        let first = service.admit().unwrap();
        let _second = service.admit().unwrap();
        assert!(matches!(service.admit(), Err(ApiError::Busy)));
        drop(first);
        assert!(service.admit().is_ok());
        assert_eq!(
            ApiError::Busy.status_code(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let response = ApiError::Busy.error_response();
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
    }
}
