//! `berth serve`.
use berth_model::Precision;
use berth_serve::{ModelSpec, ServeConfig, Task};
use clap::Args;

use crate::resolve;

/// Arguments of `berth serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve, `[NAME=]DIR` (a directory, cached name or run directory); repeat for
    /// several. Requests pick one with `"model": NAME` (default: the first). NAME defaults
    /// to the directory's name. Default: all-MiniLM-L6-v2.
    #[arg(long = "model", value_name = "[NAME=]DIR")]
    models: Vec<String>,
    /// A model's task when its head is not the one to serve, `[NAME=]TASK` (embed, classify,
    /// ner, qa, fill-mask); NAME defaults to the first model. Default: from the head
    /// (sequence classification → classify, token classification → ner, QA → qa,
    /// masked LM → fill-mask, none → embed). Every model also serves the embedding routes.
    #[arg(long = "task", value_name = "[NAME=]TASK")]
    tasks: Vec<String>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port; 0 picks a free one (the log line `listening on http://ADDR` names it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Number format of the matrix products (bf16: AMX or AVX-512; int8: AMX or
    /// AVX-512 VNNI for speed).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Real tokens per forward pass; the batches of concurrent requests are merged up to it.
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Requests in flight beyond this are answered 429 at once.
    #[arg(long, default_value_t = 512)]
    max_concurrent_requests: usize,
    /// Inputs per request beyond this are answered 413.
    #[arg(long, default_value_t = 32)]
    max_client_batch_size: usize,
    /// Token limit per input (special tokens included); default: each model's own.
    #[arg(long, value_name = "N")]
    max_input_length: Option<usize>,
    /// Truncate over-long inputs even when a request does not send "truncate": true
    /// (otherwise they are answered 413).
    #[arg(long)]
    auto_truncate: bool,
    /// Request bodies over this many bytes are answered 413.
    #[arg(long, default_value_t = 2_000_000)]
    payload_limit: usize,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let specs = if a.models.is_empty() {
        vec![None]
    } else {
        a.models.iter().map(Some).collect()
    };
    let mut models = Vec::new();
    for spec in specs {
        let (name, dir) = match spec.and_then(|s| s.split_once('=')) {
            Some((n, d)) => (Some(n.to_string()), d),
            None => (None, spec.map_or("", |s| s.as_str())),
        };
        let dir = resolve::model_dir((!dir.is_empty()).then_some(dir))?;
        let name = name.unwrap_or_else(|| {
            dir.file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        models.push(ModelSpec {
            name,
            dir,
            task: None,
        });
    }
    for t in &a.tasks {
        let (name, task) = match t.split_once('=') {
            Some((n, t)) => (n.to_string(), t),
            None => (models[0].name.clone(), t.as_str()),
        };
        let task: Task = task.parse().map_err(anyhow::Error::msg)?;
        let m = models
            .iter_mut()
            .find(|m| m.name == name)
            .ok_or_else(|| anyhow::anyhow!("--task {t}: no model named {name:?}"))?;
        m.task = Some(task);
    }
    let config = ServeConfig {
        models,
        precision: a.dtype,
        max_batch_tokens: a.max_batch_tokens,
        max_concurrent_requests: a.max_concurrent_requests,
        max_client_batch_size: a.max_client_batch_size,
        max_input_length: a.max_input_length,
        auto_truncate: a.auto_truncate,
        payload_limit: a.payload_limit,
    };
    berth_serve::run(config, &a.host, a.port)
}
