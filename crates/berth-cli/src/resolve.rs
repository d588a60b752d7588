//! Where a `--model` argument points: a directory, a model in berth's cache, or (with the
//! `hub` feature) a Hugging Face hub id.
use std::path::{Path, PathBuf};

use anyhow::bail;

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

/// Resolves `--model` to a local model directory.
pub fn model_dir(model: Option<&str>) -> anyhow::Result<PathBuf> {
    let name = model.unwrap_or(DEFAULT_MODEL);
    let as_path = Path::new(name);
    if as_path.is_dir() {
        return Ok(as_path.into());
    }
    let cached = cache_dir().join("models").join(name);
    if cached.join("config.json").is_file() {
        return Ok(cached);
    }
    if model.is_none() {
        bail!(
            "the default model {DEFAULT_MODEL} is not in {}: run scripts/fetch-assets to install it, or pass --model DIR",
            cached.display()
        );
    }
    if as_path.exists() {
        bail!("{name}: not a model directory");
    }
    from_hub(name)
}

#[cfg(feature = "hub")]
fn from_hub(id: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let api =
        hf_hub::api::sync::Api::new().context("could not set up the Hugging Face hub client")?;
    let repo = api.model(id.to_string());
    let fetch = |f: &str| repo.get(f);
    let config = fetch("config.json").with_context(|| {
        format!("could not fetch {id} from the Hugging Face hub: check the network, or download the model directory and pass it with --model DIR")
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
        fetch("pytorch_model.bin").with_context(|| {
            format!("{id}: no model.safetensors or pytorch_model.bin on the hub")
        })?;
    }
    Ok(config
        .parent()
        .context("hub cache path has no parent")?
        .to_path_buf())
}

#[cfg(not(feature = "hub"))]
fn from_hub(id: &str) -> anyhow::Result<PathBuf> {
    bail!(
        "{id}: not a local directory nor a model in {}; this berth was built without Hugging Face hub \
         support: download the model directory (config.json, model.safetensors, tokenizer.json) and pass \
         its path with --model, or rebuild with `cargo build --release --features hub`",
        cache_dir().join("models").display()
    )
}
