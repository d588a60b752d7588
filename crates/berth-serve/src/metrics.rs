//! Prometheus metrics (`GET /metrics`, OpenMetrics text): requests by route and status, queue
//! depth, batch sizes, and the time spent tokenizing, queued and in the encoder.
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's path (`unmatched` for unknown paths).
    pub route: String,
    /// The response's status code.
    pub status: u16,
}

/// Labels of per-model series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The served model's name.
    pub model: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 0.1 ms .. ~3.3 s
    Histogram::new(exponential_buckets(1e-4, 2.0, 16))
}

fn tokens() -> Histogram {
    // 8 .. 131072 tokens
    Histogram::new(exponential_buckets(8.0, 2.0, 15))
}

fn inputs() -> Histogram {
    // 1 .. 4096 inputs
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    /// Responses by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request duration by route.
    pub request_seconds: HistogramFamily<RequestLabels>,
    /// Batch submissions waiting for a model's worker.
    pub queue_depth: Family<ModelLabels, Gauge>,
    /// Real tokens per forward pass.
    pub batch_tokens: HistogramFamily<ModelLabels>,
    /// Sequences per forward pass.
    pub batch_inputs: HistogramFamily<ModelLabels>,
    /// From the start of a request's pipeline call to its first batch (tokenization, packing).
    pub tokenization_seconds: HistogramFamily<ModelLabels>,
    /// From a batch's submission to its worker taking it.
    pub queue_seconds: HistogramFamily<ModelLabels>,
    /// Encoder time per forward pass.
    pub inference_seconds: HistogramFamily<ModelLabels>,
    /// Inputs cut to the model's limit.
    pub truncated: Family<ModelLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let m = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(seconds),
            queue_depth: Family::default(),
            batch_tokens: Family::new_with_constructor(tokens),
            batch_inputs: Family::new_with_constructor(inputs),
            tokenization_seconds: Family::new_with_constructor(seconds),
            queue_seconds: Family::new_with_constructor(seconds),
            inference_seconds: Family::new_with_constructor(seconds),
            truncated: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "HTTP responses by route and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request duration by route and status",
            m.request_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Batches waiting for the model's worker",
            m.queue_depth.clone(),
        );
        registry.register(
            "batch_tokens",
            "Real tokens per forward pass (packed, no padding)",
            m.batch_tokens.clone(),
        );
        registry.register(
            "batch_inputs",
            "Sequences per forward pass",
            m.batch_inputs.clone(),
        );
        registry.register(
            "tokenization_duration_seconds",
            "Tokenization and packing time per request",
            m.tokenization_seconds.clone(),
        );
        registry.register(
            "queue_duration_seconds",
            "Time a batch waits for the model's worker",
            m.queue_seconds.clone(),
        );
        registry.register(
            "inference_duration_seconds",
            "Encoder time per forward pass",
            m.inference_seconds.clone(),
        );
        registry.register(
            "inputs_truncated",
            "Inputs cut to the model's token limit",
            m.truncated.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Seconds of `d` for a histogram.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
