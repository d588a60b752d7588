//! Sequence classification (single-label, multi-label, regression; texts or pairs), as
//! transformers' TextClassificationPipeline, and long documents classified in windows.
use berth_model::{EncoderConfig, Model};
use berth_text::Encoded;
use serde::Serialize;

use crate::error::{Result, TaskError};
use crate::pipeline::Pipeline;

/// What turns logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ClassFunction {
    /// Softmax over classes (single-label).
    Softmax,
    /// Independent sigmoids (multi-label, or one output).
    Sigmoid,
    /// The logits themselves (regression).
    #[cfg_attr(feature = "clap", value(name = "none"))]
    Identity,
}

impl ClassFunction {
    /// transformers' default: regression → identity; multi-label or one output → sigmoid;
    /// otherwise softmax.
    pub fn default_for(cfg: &EncoderConfig, classes: usize) -> Self {
        match cfg.problem_type.as_deref() {
            Some("regression") => Self::Identity,
            Some("multi_label_classification") => Self::Sigmoid,
            _ if classes == 1 => Self::Sigmoid,
            _ => Self::Softmax,
        }
    }

    /// Scores of one row of logits.
    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Self::Identity => logits.to_vec(),
            Self::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            Self::Softmax => {
                let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = logits.iter().map(|&x| (x - m).exp()).collect();
                let sum: f32 = e.iter().sum();
                e.into_iter().map(|x| x / sum).collect()
            }
        }
    }
}

/// How the outputs of a long document's windows are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum WindowPool {
    /// Element-wise mean over windows (the default).
    Mean,
    /// Element-wise maximum over windows.
    Max,
    /// The first window only (what truncation gives).
    First,
}

impl WindowPool {
    /// Combines equal-length rows.
    pub fn combine(self, rows: &[Vec<f32>]) -> Vec<f32> {
        let mut out = rows[0].clone();
        match self {
            Self::First => {}
            Self::Max => {
                for r in &rows[1..] {
                    out.iter_mut().zip(r).for_each(|(o, &x)| *o = o.max(x));
                }
            }
            Self::Mean => {
                for r in &rows[1..] {
                    out.iter_mut().zip(r).for_each(|(o, &x)| *o += x);
                }
                out.iter_mut().for_each(|o| *o /= rows.len() as f32);
            }
        }
        out
    }
}

/// Long documents: overlapping windows of the pipeline's max length.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Tokens shared by consecutive windows.
    pub stride: usize,
    /// How window outputs are combined.
    pub pool: WindowPool,
}

/// Options of [`classify`].
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    /// Labels to return, best first; `None` = all.
    pub top_k: Option<usize>,
    /// Score function; `None` = the model's default ([`ClassFunction::default_for`]).
    pub function: Option<ClassFunction>,
    /// Classify long texts in windows (their logits pooled) instead of truncating.
    pub windows: Option<Windows>,
}

/// A label and its score.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelScore {
    /// Label name from `id2label`.
    pub label: String,
    /// Probability (softmax / sigmoid) or raw value (regression).
    pub score: f32,
}

/// An input: a text, or a sentence pair.
pub type TextPair = (String, Option<String>);

/// Encodes each input (in windows when asked), returning the encodings and, per input, the
/// range of encodings that belong to it.
pub(crate) fn encode_inputs(
    p: &Pipeline,
    inputs: &[TextPair],
    windows: Option<usize>,
    first_index: usize,
) -> Result<(Vec<Encoded>, Vec<std::ops::Range<usize>>)> {
    use rayon::prelude::*;
    let per: Vec<Vec<Encoded>> = inputs
        .par_iter()
        .enumerate()
        .map(|(i, (text, pair))| {
            let index = first_index + i;
            Ok(match windows {
                Some(stride) => p.tokenizer.encode_windows(
                    text,
                    pair.as_deref(),
                    p.max_length,
                    stride,
                    index,
                )?,
                None => vec![p.tokenizer.encode(
                    text,
                    pair.as_deref(),
                    p.max_length,
                    p.truncation,
                    index,
                )?],
            })
        })
        .collect::<Result<_>>()?;
    let mut ranges = Vec::with_capacity(per.len());
    let mut all = Vec::new();
    for encs in per {
        ranges.push(all.len()..all.len() + encs.len());
        all.extend(encs);
    }
    Ok((all, ranges))
}

/// Sequence-classification logits `[encodings][classes]`, in token-budget batches.
pub(crate) fn sequence_logits(p: &Pipeline, encs: &[Encoded]) -> Result<Vec<Vec<f32>>> {
    let mut rows = Vec::with_capacity(encs.len());
    p.for_each_batch(encs, |_, batch, hidden| {
        rows.extend(p.model.sequence_logits(hidden, batch)?.to_vec2::<f32>()?);
        Ok(())
    })?;
    Ok(rows)
}

/// Classifies each input; returns, per input, labels with scores sorted best first (ties in
/// label order, as Python's stable sort), cut to `top_k`. Input `i` is named
/// `first_index + i` in errors. Also returns the encodings for truncation warnings.
pub fn classify(
    p: &Pipeline,
    inputs: &[TextPair],
    opts: &ClassifyOptions,
    first_index: usize,
) -> Result<(Vec<Vec<LabelScore>>, Vec<Encoded>)> {
    require_head(&p.model, berth_model::HeadKind::SequenceClassification)?;
    let (encs, ranges) = encode_inputs(p, inputs, opts.windows.map(|w| w.stride), first_index)?;
    let logits = sequence_logits(p, &encs)?;
    let classes = logits.first().map_or(0, |r| r.len());
    let labels = p.labels(classes)?;
    let function = opts
        .function
        .unwrap_or_else(|| ClassFunction::default_for(&p.model.config, classes));
    let pool = opts.windows.map_or(WindowPool::First, |w| w.pool);
    let out = ranges
        .into_iter()
        .map(|r| {
            let scores = function.apply(&pool.combine(&logits[r]));
            let mut ls: Vec<LabelScore> = scores
                .into_iter()
                .zip(&labels)
                .map(|(score, label)| LabelScore {
                    label: label.clone(),
                    score,
                })
                .collect();
            ls.sort_by(|a, b| b.score.total_cmp(&a.score));
            ls.truncate(opts.top_k.unwrap_or(usize::MAX));
            ls
        })
        .collect();
    Ok((out, encs))
}

/// Checks that a model has the head a task needs, before any text is read.
pub fn require_head(model: &Model, head: berth_model::HeadKind) -> Result<()> {
    if model.has_head(head) {
        Ok(())
    } else {
        Err(TaskError::Model(model.missing_head(head)))
    }
}
