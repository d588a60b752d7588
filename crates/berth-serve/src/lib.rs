//! `berth serve`: an HTTP inference server on top of berth-tasks' pipelines. TEI's routes
//! (`/embed`, `/embed_all`, `/predict`, `/rerank`, `/similarity`, `/tokenize`, `/decode`,
//! `/info`, `/health`, `/metrics`), OpenAI's `/v1/embeddings`, and what TEI leaves out:
//! `/ner`, `/qa`, `/fill-mask`. Requests of every route are tokenized off the async runtime
//! and their packed batches merged across requests by one worker per model
//! ([`scheduler`]); the answers are the CLI's (same pipelines, same kernels).
#![deny(missing_docs)]

mod api;
mod error;
pub mod metrics;
mod openapi;
pub mod scheduler;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use berth_model::{HeadKind, Precision};
use berth_tasks::{Pipeline, PipelineOptions, Pooling};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use error::ApiError;
use metrics::Metrics;
use scheduler::Scheduler;

/// What a served model does; it decides which routes serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Sentence embeddings only (`/embed`, `/v1/embeddings`, `/similarity`, ...).
    Embed,
    /// Sequence classification: `/predict`, and `/rerank` for one-output cross-encoders.
    Classify,
    /// Token classification: `/ner`.
    Ner,
    /// Extractive question answering: `/qa`.
    Qa,
    /// Masked-token prediction: `/fill-mask`.
    FillMask,
}

impl Task {
    /// Every task.
    const ALL: [Task; 5] = [
        Task::Embed,
        Task::Classify,
        Task::Ner,
        Task::Qa,
        Task::FillMask,
    ];

    /// The task of a model's head: a bare encoder embeds.
    pub fn from_model(model: &berth_model::Model) -> Self {
        [
            (HeadKind::SequenceClassification, Task::Classify),
            (HeadKind::TokenClassification, Task::Ner),
            (HeadKind::QuestionAnswering, Task::Qa),
            (HeadKind::MaskedLm, Task::FillMask),
        ]
        .into_iter()
        .find(|(h, _)| model.has_head(*h))
        .map_or(Task::Embed, |(_, t)| t)
    }

    /// The head the task needs.
    fn head(self) -> Option<HeadKind> {
        match self {
            Task::Embed => None,
            Task::Classify => Some(HeadKind::SequenceClassification),
            Task::Ner => Some(HeadKind::TokenClassification),
            Task::Qa => Some(HeadKind::QuestionAnswering),
            Task::FillMask => Some(HeadKind::MaskedLm),
        }
    }

    /// The name used on the command line and in `/info`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::Classify => "classify",
            Task::Ner => "ner",
            Task::Qa => "qa",
            Task::FillMask => "fill-mask",
        }
    }

    /// The routes that serve a model of this task (every model also embeds and tokenizes).
    fn routes(self) -> Vec<&'static str> {
        let mut r = vec![
            "/embed",
            "/embed_all",
            "/v1/embeddings",
            "/similarity",
            "/tokenize",
            "/decode",
        ];
        r.extend(match self {
            Task::Embed => &[][..],
            Task::Classify => &["/predict", "/rerank"][..],
            Task::Ner => &["/ner"][..],
            Task::Qa => &["/qa"][..],
            Task::FillMask => &["/fill-mask"][..],
        });
        r
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown task {s:?} (embed, classify, ner, qa, fill-mask)"))
    }
}

/// One model to serve.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name requests use (`"model": NAME`).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its task; `None`: from its head.
    pub task: Option<Task>,
}

/// Server settings (the `berth serve` flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Models; the first is the default.
    pub models: Vec<ModelSpec>,
    /// Number format of the encoders' matrix products.
    pub precision: Precision,
    /// Real tokens per forward pass (the batches of several requests merged).
    pub max_batch_tokens: usize,
    /// Requests in flight beyond this get 429.
    pub max_concurrent_requests: usize,
    /// Inputs per request beyond this get 413.
    pub max_client_batch_size: usize,
    /// Token limit per input; `None`: each model's own.
    pub max_input_length: Option<usize>,
    /// Truncate over-long inputs even when a request does not ask to.
    pub auto_truncate: bool,
    /// Request bodies larger than this get 413.
    pub payload_limit: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            models: Vec::new(),
            precision: Precision::F32,
            max_batch_tokens: 16384,
            max_concurrent_requests: 512,
            max_client_batch_size: 32,
            max_input_length: None,
            auto_truncate: false,
            payload_limit: 2_000_000,
        }
    }
}

/// A loaded model with its queue.
pub(crate) struct Served {
    name: String,
    dir: PathBuf,
    task: Task,
    pipeline: Pipeline,
    scheduler: Arc<Scheduler>,
}

impl Served {
    /// The model's pooling for sentence embeddings (its sentence-transformers config, else
    /// CLS), and whether that config normalises.
    fn pooling(&self) -> (Pooling, bool) {
        self.pipeline.embedding(None, false)
    }
}

/// The server's state: models, limits, admission, metrics.
pub struct App {
    models: Vec<Served>,
    config: ServeConfig,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl App {
    /// Loads every model (as sentence-transformers models when they are) and starts one
    /// batching worker per model.
    pub fn load(config: ServeConfig) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(!config.models.is_empty(), "no model to serve");
        anyhow::ensure!(
            config.max_batch_tokens > 0
                && config.max_concurrent_requests > 0
                && config.max_client_batch_size > 0,
            "--max-batch-tokens, --max-concurrent-requests and --max-client-batch-size must be at least 1"
        );
        let metrics = Arc::new(Metrics::default());
        let opts = PipelineOptions {
            precision: config.precision,
            max_length: config.max_input_length,
            batch_tokens: config.max_batch_tokens,
            ..Default::default()
        };
        let mut models: Vec<Served> = Vec::new();
        for spec in &config.models {
            anyhow::ensure!(
                models.iter().all(|m| m.name != spec.name),
                "two models are named {:?}; name them with --model NAME=DIR",
                spec.name
            );
            let (pipeline, report) = Pipeline::load_sentence(&spec.dir, &opts)?;
            if let Some((kind, key)) = &report.missing_head {
                tracing::warn!(
                    "{}: no {} head weights (first missing: {key}); only the encoder is usable",
                    spec.dir.display(),
                    kind.name()
                );
            }
            if !report.unused.is_empty() {
                tracing::warn!(
                    "{}: {} checkpoint weights were not used",
                    spec.dir.display(),
                    report.unused.len()
                );
            }
            let task = spec
                .task
                .unwrap_or_else(|| Task::from_model(&pipeline.model));
            if let Some(head) = task.head() {
                berth_tasks::require_head(&pipeline.model, head)?;
            }
            let scheduler = Scheduler::start(
                &spec.name,
                pipeline.model.clone(),
                config.max_batch_tokens,
                metrics.clone(),
            )?;
            tracing::info!(
                "model {:?}: {} ({}), task {}, max {} tokens per input",
                spec.name,
                spec.dir.display(),
                pipeline.model.config.model_type,
                task.name(),
                pipeline.max_length
            );
            models.push(Served {
                name: spec.name.clone(),
                dir: spec.dir.clone(),
                task,
                pipeline,
                scheduler,
            });
        }
        Ok(Arc::new(App {
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            models,
            config,
            metrics,
        }))
    }

    /// A slot for one request, or 429 when `--max-concurrent-requests` are in flight.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "Overloaded",
                format!(
                    "{} requests are in flight, the server's limit (--max-concurrent-requests); retry later",
                    self.config.max_concurrent_requests
                ),
            )
        })
    }

    /// The model a request names (the first when it names none), checked against the route.
    fn model(&self, name: Option<&str>, route: &str) -> Result<&Served, ApiError> {
        let m = match name {
            None => &self.models[0],
            Some(n) => self.models.iter().find(|m| m.name == n).ok_or_else(|| {
                let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
                ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "Validation",
                    format!("unknown model {n:?}; this server serves {names:?}"),
                )
            })?,
        };
        if !m.task.routes().contains(&route) {
            return Err(ApiError::validation(format!(
                "model {:?} is served for {} ({}); {route} needs a model served for {}",
                m.name,
                m.task.name(),
                m.task.routes().join(", "),
                Task::ALL
                    .iter()
                    .find(|t| t.routes().contains(&route))
                    .map_or("another task", |t| t.name())
            )));
        }
        Ok(m)
    }

    /// 422 for no inputs, 413 for more than `--max-client-batch-size`.
    fn check_count(&self, n: usize) -> Result<(), ApiError> {
        if n == 0 {
            return Err(ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "Empty",
                "no inputs",
            ));
        }
        let max = self.config.max_client_batch_size;
        if n > max {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "Validation",
                format!("{n} inputs; this server takes at most {max} per request (--max-client-batch-size)"),
            ));
        }
        Ok(())
    }

    /// Runs `f` on a blocking thread with the model's pipeline set up for this request
    /// (its truncation, the model's batching worker). The admission slot is held until `f`
    /// ends, even when the client has gone.
    async fn run<T: Send + 'static>(
        &self,
        permit: OwnedSemaphorePermit,
        m: &Served,
        truncate: Option<bool>,
        f: impl FnOnce(&Pipeline) -> berth_tasks::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let mut p = m.pipeline.clone();
        p.truncation = if self.config.auto_truncate || truncate == Some(true) {
            berth_text::Truncation::Truncate
        } else {
            berth_text::Truncation::Error
        };
        p.runner = Some(m.scheduler.runner());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&p)
        })
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "Backend",
                format!("the request's worker failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
    }

    /// Counts inputs the pipeline cut to the model's limit.
    fn count_truncated(&self, m: &Served, encs: &[berth_text::Encoded]) {
        let n = encs.iter().filter(|e| e.truncated).count() as u64;
        if n > 0 {
            self.metrics
                .truncated
                .get_or_create(&metrics::ModelLabels {
                    model: m.name.clone(),
                })
                .inc_by(n);
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting connections
/// and returns once the requests in flight are answered.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api::router(app))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `berth serve`: loads the models, listens on `host:port` (port 0: any free port; the
/// address is logged as `listening on http://ADDR`), and serves until SIGTERM or Ctrl-C.
pub fn run(config: ServeConfig, host: &str, port: u16) -> anyhow::Result<()> {
    init_logging();
    let blocking = config.max_concurrent_requests + 16;
    let app = App::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking)
        .thread_name("berth-serve")
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
        tracing::info!("listening on http://{}", listener.local_addr()?);
        serve(app, listener, shutdown_signal()).await?;
        tracing::info!("stopped: every request in flight was answered");
        anyhow::Ok(())
    })
}

/// Logs to stderr; `RUST_LOG` filters (default `info`; `berth_serve=debug` logs every
/// request).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; finishing the requests in flight");
}
