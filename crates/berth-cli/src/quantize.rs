//! `berth quantize`.
use std::path::PathBuf;

use berth_model::Precision;
use clap::Args;

use crate::resolve;

/// Arguments of `berth quantize`.
#[derive(Args)]
pub struct QuantizeArgs {
    /// Model directory, training run (its best checkpoint), cached model name or hub id.
    model: String,
    /// The new model folder (must not exist).
    output: PathBuf,
    /// int8: encoder matrices as int8 with per-channel scales (berth-specific; run it with
    /// `--dtype int8`). bf16: encoder matrices as bf16 (transformers loads it too).
    #[arg(long, value_enum)]
    dtype: Precision,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let dir = resolve::model_dir(Some(&a.model))?;
    // The copy must be a model berth runs: a missing or broken tokenizer is refused now,
    // not copied along.
    berth_text::TextTokenizer::from_dir(&dir)?;
    let r = berth_train::quantize::quantize_checkpoint(&dir, &a.output, a.dtype)?;
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "wrote {} ({} encoder matrices in {}; weights {:.1} MB -> {:.1} MB)",
        a.output.display(),
        r.matrices,
        format!("{:?}", a.dtype).to_lowercase(),
        mb(r.bytes_before),
        mb(r.bytes_after)
    );
    Ok(())
}
