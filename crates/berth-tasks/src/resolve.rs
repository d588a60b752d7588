//! Where a model name points: a directory, a training run, a model in berth's cache or the
//! Hugging Face cache, or (with the `hub` feature) a Hugging Face hub id. The CLI, the server
//! and the Python package resolve names here.
use std::path::{Path, PathBuf};

use crate::error::{Result, TaskError};

/// The model used when `--model` is not given (fetched by scripts/fetch-assets).
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";

/// berth's cache: `$BERTH_HOME`, else `$XDG_CACHE_HOME/berth`, else `~/.cache/berth`.
pub fn cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("BERTH_HOME") {
        return h.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("berth")
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (where transformers and sentence-transformers download to).
fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HF_HUB_CACHE") {
        return Some(h.into());
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        return Some(Path::new(&h).join("hub"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub"))
}

/// The downloaded snapshot of hub id `id` (`ORG/NAME`) in the Hugging Face cache: the
/// revision `refs/main` names, else the newest snapshot holding a config.json.
fn hf_cached(id: &str) -> Option<PathBuf> {
    let repo = hf_cache_dir()?.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let snap = snapshots.join(rev.trim());
        if snap.join("config.json").is_file() {
            return Some(snap);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// A training run's best checkpoint (trainer_state.json's best step, else the newest), when
/// `dir` is a run directory rather than a model.
fn best_checkpoint(dir: &Path) -> Option<PathBuf> {
    let root = dir.join("checkpoints");
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("config.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    steps.sort();
    let (_, newest) = steps.last()?.clone();
    let best = berth_text::limits::read_text(
        &newest.join("trainer_state.json"),
        berth_text::limits::MAX_JSON_BYTES,
    )
    .ok()
    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    .and_then(|v| v["best"][1].as_u64())
    .and_then(|b| steps.iter().find(|(s, _)| *s == b).map(|(_, p)| p.clone()));
    Some(best.unwrap_or(newest))
}

/// Resolves `--model` to a local model directory: a model directory; a training run
/// directory (its best checkpoint); a name in berth's cache (`models/NAME`, also the last
/// part of `ORG/NAME`); a hub id already in the Hugging Face cache; else (with the `hub`
/// feature) a download.
pub fn model_dir(model: Option<&str>) -> Result<PathBuf> {
    let name = model.unwrap_or(DEFAULT_MODEL);
    let as_path = Path::new(name);
    if as_path.is_dir() {
        // A run directory: checkpoints/ beside a run config ({"loop", "task"}), not a model.
        let run_config = berth_text::limits::read_text(
            &as_path.join("config.json"),
            berth_text::limits::MAX_JSON_BYTES,
        )
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_none_or(|v| v.get("loop").is_some());
        if run_config && as_path.join("checkpoints").is_dir() {
            if let Some(best) = best_checkpoint(as_path) {
                eprintln!(
                    "note: {name} is a training run: using its best checkpoint {}",
                    best.display()
                );
                return Ok(best);
            }
        }
        return Ok(as_path.into());
    }
    let models = cache_dir().join("models");
    let short = name.rsplit('/').next().unwrap_or(name);
    for cached in [models.join(name), models.join(short)] {
        if cached.join("config.json").is_file() {
            return Ok(cached);
        }
    }
    if let Some(snap) = name.contains('/').then(|| hf_cached(name)).flatten() {
        return Ok(snap);
    }
    let cached = models.join(name);
    if model.is_none() {
        return Err(TaskError::NotFound(format!(
            "the default model {DEFAULT_MODEL} is not in {}: run scripts/fetch-assets to install it, or pass --model DIR",
            cached.display()
        )));
    }
    if as_path.exists() {
        return Err(TaskError::NotFound(format!(
            "{name}: not a model directory"
        )));
    }
    from_hub(name)
}

#[cfg(feature = "hub")]
fn from_hub(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new().map_err(|e| {
        TaskError::NotFound(format!("could not set up the Hugging Face hub client: {e}"))
    })?;
    let repo = api.model(id.to_string());
    let fetch = |f: &str| repo.get(f);
    let config = fetch("config.json").map_err(|e| {
        TaskError::NotFound(format!("could not fetch {id} from the Hugging Face hub ({e}): check the network, or download the model directory and pass it with --model DIR"))
    })?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        let _ = fetch(f); // optional files; the loaders report what is really missing
    }
    if fetch("model.safetensors").is_err() {
        fetch("pytorch_model.bin").map_err(|_| {
            TaskError::NotFound(format!(
                "{id}: no model.safetensors or pytorch_model.bin on the hub"
            ))
        })?;
    }
    Ok(config
        .parent()
        .ok_or_else(|| TaskError::NotFound("hub cache path has no parent".into()))?
        .to_path_buf())
}

#[cfg(not(feature = "hub"))]
fn from_hub(id: &str) -> Result<PathBuf> {
    Err(TaskError::NotFound(format!(
        "{id}: not a local directory nor a model in {}; this berth was built without Hugging Face hub \
         support: download the model directory (config.json, model.safetensors, tokenizer.json) and pass \
         its path with --model, or rebuild with `cargo build --release --features hub`",
        cache_dir().join("models").display()
    )))
}
