//! Cross-encoder reranking: (query, passage) pairs scored by a sequence-classification model
//! with one output, as sentence-transformers' `CrossEncoder.rank`.
use serde::Serialize;

use crate::classify::{encode_inputs, require_head, sequence_logits, ClassFunction, TextPair};
use crate::error::{Result, TaskError};
use crate::pipeline::Pipeline;

/// One passage's score.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ranked {
    /// Position of the passage in the input.
    pub corpus_id: usize,
    /// Relevance: sigmoid of the logit (or the activation the model's config names).
    pub score: f32,
}

/// The activation sentence-transformers applies: `sentence_transformers.activation_fn` in
/// config.json when set (Sigmoid or Identity), else sigmoid for one output.
fn activation(p: &Pipeline) -> Result<ClassFunction> {
    let path = &p.model.config.path;
    let text =
        berth_text::limits::read_text(path, berth_text::limits::MAX_JSON_BYTES).map_err(|e| {
            TaskError::Config {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TaskError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let name = v["sentence_transformers"]["activation_fn"]
        .as_str()
        .or(v["sbert_ce_default_activation_function"].as_str());
    match name {
        None => Ok(ClassFunction::Sigmoid),
        Some(n) if n.ends_with("Sigmoid") => Ok(ClassFunction::Sigmoid),
        Some(n) if n.ends_with("Identity") => Ok(ClassFunction::Identity),
        Some(n) => Err(TaskError::Config {
            path: path.clone(),
            message: format!("unsupported cross-encoder activation {n:?}"),
        }),
    }
}

/// Cross-encoder scores of sentence pairs, in input order, as sentence-transformers'
/// `CrossEncoder.predict`: the model's activation applied to its one output, or the logit
/// itself with `raw_scores`. Input `i` is named `first_index + i` in errors.
pub fn cross_encode(
    p: &Pipeline,
    pairs: &[TextPair],
    raw_scores: bool,
    first_index: usize,
) -> Result<Vec<f32>> {
    require_head(&p.model, berth_model::HeadKind::SequenceClassification)?;
    let f = if raw_scores {
        ClassFunction::Identity
    } else {
        activation(p)?
    };
    let (encs, _) = encode_inputs(p, pairs, None, first_index)?;
    let logits = sequence_logits(p, &encs)?;
    if let Some(row) = logits.first().filter(|r| r.len() != 1) {
        return Err(TaskError::Config {
            path: p.model.config.path.clone(),
            message: format!(
                "a reranker needs a head with one output (a cross-encoder); this one has {}",
                row.len()
            ),
        });
    }
    Ok(logits.iter().map(|row| f.apply(row)[0]).collect())
}

/// Scores every passage against `query`; returns them sorted best first (ties in input order).
/// `raw_scores`: the logits themselves, without the model's activation (TEI's `raw_scores`).
pub fn rerank(
    p: &Pipeline,
    query: &str,
    passages: &[String],
    raw_scores: bool,
) -> Result<Vec<Ranked>> {
    if query.trim().is_empty() {
        return Err(TaskError::Options("empty query".into()));
    }
    let pairs: Vec<TextPair> = passages
        .iter()
        .map(|d| (query.to_string(), Some(d.clone())))
        .collect();
    let mut out: Vec<Ranked> = cross_encode(p, &pairs, raw_scores, 0)?
        .into_iter()
        .enumerate()
        .map(|(corpus_id, score)| Ranked { corpus_id, score })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(out)
}
