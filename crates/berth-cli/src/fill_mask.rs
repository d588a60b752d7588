//! `berth fill-mask`.
use std::io::Write;

use berth_tasks::{fill_mask, EncodeOptions, Pipeline};
use berth_text::Truncation;
use clap::Args;

use crate::embed::{report_load, warn_truncated};
use crate::{input, resolve};

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Predictions<'a> {
    One(&'a [berth_tasks::Prediction]),
    PerMask(&'a [Vec<berth_tasks::Prediction>]),
}

#[derive(serde::Serialize)]
struct Line<'a> {
    index: usize,
    predictions: Predictions<'a>,
}

/// Arguments of `berth fill-mask`.
#[derive(Args)]
pub struct FillMaskArgs {
    /// Model directory with a masked-LM head (BertForMaskedLM, RobertaForMaskedLM, ...).
    #[arg(long)]
    model: Option<String>,
    /// Predictions per mask.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Token limit per text (default: the model's).
    #[arg(long)]
    max_length: Option<usize>,
    /// Refuse over-long texts instead of truncating them.
    #[arg(long)]
    no_truncate: bool,
    /// Read texts one per line from FILE (`-` = stdin).
    #[arg(long)]
    input: Option<String>,
    /// Texts containing the mask token ([MASK] or <mask>).
    texts: Vec<String>,
}

pub fn run(a: FillMaskArgs) -> anyhow::Result<()> {
    let dir = resolve::model_dir(a.model.as_deref())?;
    let truncation = if a.no_truncate { Truncation::Error } else { Truncation::Truncate };
    let (p, report) = Pipeline::load(&dir, EncodeOptions { max_length: a.max_length, truncation }, None)?;
    report_load(&report);
    let (texts, _) = input::read_texts(a.input.as_deref(), &a.texts)?;
    if let Ok(encs) = p.encode(&texts, 0) {
        warn_truncated(&encs, 0, p.max_length);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (c, chunk) in texts.chunks(256).enumerate() {
        for (i, preds) in fill_mask(&p, chunk, a.top_k, c * 256)?.into_iter().enumerate() {
            // One list per mask when a text has several, as transformers returns them.
            let predictions = if preds.len() == 1 { Predictions::One(&preds[0]) } else { Predictions::PerMask(&preds) };
            writeln!(out, "{}", serde_json::to_string(&Line { index: c * 256 + i, predictions })?)?;
        }
    }
    out.flush()?;
    Ok(())
}
