//! `berth fill-mask`.
use std::io::Write;

use anyhow::Context;
use berth_tasks::{fill_mask, Pipeline};
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
    #[command(flatten)]
    text: input::TextArgs,
    /// Texts containing the mask token ([MASK] or <mask>).
    texts: Vec<String>,
}

pub fn run(a: FillMaskArgs) -> anyhow::Result<()> {
    let dir = resolve::model_dir(a.model.as_deref())?;
    let (p, report) = Pipeline::load_sentence(&dir, &a.text.pipeline_options())?;
    report_load(&report);
    let (texts, _) = a.text.texts(&a.texts)?;
    let mut out = crate::output::stdout();
    for (c, chunk) in texts.chunks(256).enumerate() {
        let encs = p
            .encode(chunk, c * 256)
            .with_context(|| a.text.source().to_string())?;
        warn_truncated(&encs, c * 256, p.max_length);
        for (i, preds) in fill_mask(&p, &encs, a.top_k, c * 256)
            .with_context(|| a.text.source().to_string())?
            .into_iter()
            .enumerate()
        {
            // One list per mask when a text has several, as transformers returns them.
            let predictions = if preds.len() == 1 {
                Predictions::One(&preds[0])
            } else {
                Predictions::PerMask(&preds)
            };
            writeln!(
                out,
                "{}",
                serde_json::to_string(&Line {
                    index: c * 256 + i,
                    predictions
                })?
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
