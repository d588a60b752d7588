//! Retrieval fine-tuning: sentence embeddings (a bi-encoder trained with in-batch negatives,
//! sentence-transformers' `MultipleNegativesRankingLoss`) and cross-encoder rerankers
//! (one logit per (query, passage) pair, `BinaryCrossEntropyLoss` as sentence-transformers'
//! `CrossEncoder` trains it).
//!
//! Shapes: `B` examples, `S` packed sequences, `N` tokens, `H` hidden.
use std::collections::HashMap;
use std::path::Path;

use berth_model::{Batch, Dropout, Model};
use berth_tasks::{metrics, Pooling};
use berth_text::{TextTokenizer, Truncation};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::data::{self, Column, Columns};
use crate::error::{Result, TrainError};
use crate::loss;
use crate::trainer::{Example, Prepared, TrainConfig};

/// Train and dev rows of `cols` (dev from `cfg.dev`, or a seeded split), with the dev path.
fn read_split(
    cfg: &TrainConfig,
    cols: &Columns,
) -> Result<(
    Vec<data::TextExample>,
    Vec<data::TextExample>,
    std::path::PathBuf,
    usize,
)> {
    let (train, mut skipped) = data::read_text_examples(&cfg.train, cols, cfg.skip_bad_rows)?;
    Ok(match &cfg.dev {
        Some(d) => {
            let (dev, s) = data::read_text_examples(d, cols, cfg.skip_bad_rows)?;
            skipped += s;
            (train, dev, d.clone(), skipped)
        }
        None => {
            let (t, d) = data::split(&train, cfg.dev_fraction, cfg.seed);
            (t, d, cfg.train.clone(), skipped)
        }
    })
}

/// Embedding data: `anchor`, `positive` and optionally a hard `negative` column (names from
/// `--text-column` / `--pair-column` / `--negative-column`).
pub(crate) fn prepare_embed(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let cols = Columns {
        text: Column::parse(&cfg.text_column),
        pair: Some(Column::parse(
            cfg.pair_column.as_deref().unwrap_or("positive"),
        )),
        label: None,
        extra: cfg.negative_column.as_deref().map(Column::parse),
    };
    let (train, dev, _, skipped) = read_split(cfg, &cols)?;
    let encode = |items: &[data::TextExample]| -> Result<Vec<Example>> {
        items
            .par_iter()
            .map(|e| {
                let one =
                    |t: &str| tok.encode(t, None, cfg.max_length, Truncation::Truncate, e.line);
                let mut ex = Example::new(one(&e.text)?);
                ex.pair_enc = Some(one(e.pair.as_deref().unwrap_or_default())?);
                ex.neg_enc = e.extra.as_deref().map(one).transpose()?;
                Ok(ex)
            })
            .collect()
    };
    Ok(Prepared {
        train: encode(&train)?.into(),
        dev: encode(&dev)?,
        labels: Vec::new(),
        skipped,
        qa_dev: Vec::new(),
    })
}

/// Reranker data: `query`, `passage` and a relevance `label` in [0, 1] (1 relevant, 0 not;
/// fractions are soft targets, as BCE allows).
pub(crate) fn prepare_rerank(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let cols = Columns {
        text: Column::parse(&cfg.text_column),
        pair: Some(Column::parse(
            cfg.pair_column.as_deref().unwrap_or("passage"),
        )),
        label: Some(Column::parse(&cfg.label_column)),
        extra: None,
    };
    let (train, dev, dev_path, skipped) = read_split(cfg, &cols)?;
    let encode = |items: &[data::TextExample], path: &Path| -> Result<Vec<Example>> {
        // Dev rankings group the rows of each query (by its text, in order of appearance).
        let mut groups: HashMap<&str, usize> = HashMap::new();
        let group: Vec<usize> = items
            .iter()
            .map(|e| {
                let next = groups.len();
                *groups.entry(e.text.as_str()).or_insert(next)
            })
            .collect();
        items
            .par_iter()
            .zip(group)
            .map(|(e, g)| {
                let value: f32 = e
                    .label
                    .parse()
                    .ok()
                    .filter(|v| (0.0..=1.0).contains(v))
                    .ok_or_else(|| TrainError::Data {
                        path: path.into(),
                        line: e.line,
                        message: format!("relevance label {:?} is not a number in [0, 1]", e.label),
                    })?;
                let mut ex = Example::new(tok.encode(
                    &e.text,
                    e.pair.as_deref(),
                    cfg.max_length,
                    Truncation::Truncate,
                    e.line,
                )?);
                ex.value = value;
                ex.group = g;
                Ok(ex)
            })
            .collect()
    };
    Ok(Prepared {
        train: encode(&train, &cfg.train)?.into(),
        dev: encode(&dev, &dev_path)?,
        labels: Vec::new(),
        skipped,
        qa_dev: Vec::new(),
    })
}

/// Pools `hidden [N, H]` per sequence of `batch` into `[S, H]`, differentiably: mean pooling
/// is one product with a `[S, N]` averaging matrix; CLS takes first tokens.
pub fn pool_train(hidden: &Tensor, batch: &Batch, pooling: Pooling) -> Result<Tensor> {
    match pooling {
        Pooling::Mean => {
            let (s, n) = (batch.num_sequences(), batch.num_tokens());
            let mut w = vec![0f32; s * n];
            for k in 0..s {
                let r = batch.range(k);
                let v = 1.0 / r.len() as f32;
                w[k * n + r.start..k * n + r.end].fill(v);
            }
            Ok(Tensor::from_vec(w, (s, n), &Device::Cpu)?.matmul(hidden)?)
        }
        Pooling::Cls => Ok(Model::first_tokens(hidden, batch)?),
        other => Err(TrainError::Config(format!(
            "{other:?} pooling cannot be trained (mean or cls)"
        ))),
    }
}

/// Rows of `x` scaled to unit L2 norm (torch's `F.normalize`, eps 1e-12).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Multiple-negatives ranking loss of one batch: anchors, positives and (optional) hard
/// negatives run in one packed forward; `scale · cos(anchor_i, candidate_j)` is scored
/// against every positive and negative of the batch, with the own positive as the target
/// class. The sequences of an example must all exist, so `B` anchors give `B` positives.
pub(crate) fn mnrl_loss(
    model: &Model,
    examples: &[&Example],
    pooling: Pooling,
    scale: f64,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let b = examples.len();
    if b == 0 {
        return Ok(None);
    }
    let seqs: Vec<&berth_text::Encoded> = examples
        .iter()
        .map(|e| &e.enc)
        .chain(examples.iter().map(|e| {
            e.pair_enc
                .as_ref()
                .expect("embed examples carry a positive")
        }))
        .chain(examples.iter().filter_map(|e| e.neg_enc.as_ref()))
        .collect();
    let batch = Batch::from_sequences(
        seqs.iter()
            .map(|e| (e.ids.as_slice(), e.type_ids.as_slice())),
    )?;
    let hidden = model.forward_train(&batch, d)?;
    let emb = l2_normalize(&pool_train(&hidden, &batch, pooling)?)?;
    let anchors = emb.narrow(0, 0, b)?;
    let candidates = emb.narrow(0, b, seqs.len() - b)?;
    let scores = (anchors.matmul(&candidates.t()?)? * scale)?;
    let labels: Vec<Option<u32>> = (0..b as u32).map(Some).collect();
    loss::cross_entropy(&scores, &labels)
}

/// Rows per batch of the dev MNRL loss.
pub const DEV_LOSS_BATCH: usize = 32;

/// Unit-length embeddings of `encs` (inference, in packed chunks).
fn embed(model: &Model, encs: &[&berth_text::Encoded], pooling: Pooling) -> Result<Vec<Vec<f32>>> {
    let h = model.config.hidden_size;
    let mut out = Vec::with_capacity(encs.len());
    for chunk in encs.chunks(64) {
        let batch = Batch::from_sequences(
            chunk
                .iter()
                .map(|e| (e.ids.as_slice(), e.type_ids.as_slice())),
        )?;
        let hidden = model.forward(&batch)?.flatten_all()?.to_vec1::<f32>()?;
        for mut v in berth_tasks::pool(&hidden, h, &batch, pooling) {
            berth_tasks::normalize(&mut v);
            out.push(v);
        }
    }
    Ok(out)
}

/// Dev metrics of a bi-encoder: every dev anchor retrieves among all distinct dev positives
/// and negatives by cosine; its own positive is the relevant one. MRR@10, nDCG@10,
/// accuracy@1, and the mean MNRL loss over dev batches of [`DEV_LOSS_BATCH`] rows (fixed, so
/// the number does not depend on the training batch size).
pub(crate) fn evaluate_embed(
    model: &Model,
    dev: &[Example],
    pooling: Pooling,
    scale: f64,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    if dev.is_empty() {
        return Ok(out);
    }
    let (mut loss_sum, mut loss_n) = (0.0, 0usize);
    for chunk in dev.chunks(DEV_LOSS_BATCH) {
        let refs: Vec<&Example> = chunk.iter().collect();
        if let Some(l) = mnrl_loss(model, &refs, pooling, scale, None)? {
            loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
            loss_n += refs.len();
        }
    }
    // Candidates: distinct positive / negative texts (by token ids).
    let mut index: HashMap<&[u32], usize> = HashMap::new();
    let mut cands: Vec<&berth_text::Encoded> = Vec::new();
    let mut positive_of = Vec::with_capacity(dev.len());
    for e in dev {
        for (k, c) in [e.pair_enc.as_ref(), e.neg_enc.as_ref()]
            .into_iter()
            .flatten()
            .enumerate()
        {
            let i = *index.entry(c.ids.as_slice()).or_insert_with(|| {
                cands.push(c);
                cands.len() - 1
            });
            if k == 0 {
                positive_of.push(i);
            }
        }
    }
    let anchors: Vec<&berth_text::Encoded> = dev.iter().map(|e| &e.enc).collect();
    let (a, c) = (
        embed(model, &anchors, pooling)?,
        embed(model, &cands, pooling)?,
    );
    let (mut mrr, mut ndcg, mut top1) = (0.0, 0.0, 0.0);
    for (q, &pos) in a.iter().zip(&positive_of) {
        let scores: Vec<f64> = c.iter().map(|v| berth_tasks::cosine(q, v) as f64).collect();
        let mut rel = vec![0.0; c.len()];
        rel[pos] = 1.0;
        let rr = metrics::reciprocal_rank(&scores, &rel, 10);
        mrr += rr;
        top1 += (rr == 1.0) as u8 as f64;
        ndcg += metrics::ndcg(&scores, &rel, 10);
    }
    let n = dev.len() as f64;
    out.insert("loss".into(), (loss_sum / loss_n.max(1) as f64).into());
    out.insert("mrr@10".into(), (mrr / n).into());
    out.insert("ndcg@10".into(), (ndcg / n).into());
    out.insert("accuracy@1".into(), (top1 / n).into());
    Ok(out)
}

/// Reranker loss: BCE with logits of the single logit against the relevance.
pub(crate) fn rerank_loss(examples: &[&Example], logits: &Tensor) -> Result<Option<Tensor>> {
    if logits.dim(1)? != 1 {
        return Err(TrainError::Config(format!(
            "a reranker has one output; this head has {}",
            logits.dim(1)?
        )));
    }
    let t = loss::targets(&examples.iter().map(|e| vec![e.value]).collect::<Vec<_>>())?;
    Ok(Some(loss::bce_with_logits(logits, &t)?))
}

/// Reranker dev metrics: each query's passages ranked by logit; MRR@10 (relevant: label
/// > 0), nDCG@10 (gains: the labels), and the mean BCE loss.
pub(crate) fn evaluate_rerank(
    model: &Model,
    dev: &[Example],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    let mut scores = vec![0f64; dev.len()];
    let (mut loss_sum, mut loss_n) = (0.0, 0usize);
    for (c, chunk) in dev.chunks(64).enumerate() {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::from_sequences(
            refs.iter()
                .map(|e| (e.enc.ids.as_slice(), e.enc.type_ids.as_slice())),
        )?;
        let hidden = model.forward(&batch)?;
        if let Some(l) = rerank_loss(&refs, &model.sequence_logits(&hidden, &batch)?)? {
            loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
            loss_n += refs.len();
        }
        let logits = model.sequence_logits(&hidden, &batch)?.to_vec2::<f32>()?;
        for (k, row) in logits.iter().enumerate() {
            scores[c * 64 + k] = row[0] as f64;
        }
    }
    // Rows of each query, in one pass.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, e) in dev.iter().enumerate() {
        if groups.len() <= e.group {
            groups.resize(e.group + 1, Vec::new());
        }
        groups[e.group].push(i);
    }
    let (mut mrr, mut ndcg) = (0.0, 0.0);
    for rows in &groups {
        let s: Vec<f64> = rows.iter().map(|&i| scores[i]).collect();
        let rel: Vec<f64> = rows.iter().map(|&i| dev[i].value as f64).collect();
        mrr += metrics::reciprocal_rank(&s, &rel, 10);
        ndcg += metrics::ndcg(&s, &rel, 10);
    }
    let q = groups.len().max(1) as f64;
    out.insert("loss".into(), (loss_sum / loss_n.max(1) as f64).into());
    out.insert("mrr@10".into(), (mrr / q).into());
    out.insert("ndcg@10".into(), (ndcg / q).into());
    Ok(out)
}

/// The pooling a sentence-embedding run trains with: the base model's sentence-transformers
/// pooling, or mean pooling when it has none.
pub fn training_pooling(model_dir: &Path) -> Result<Pooling> {
    Ok(berth_tasks::SentenceConfig::from_dir(model_dir)
        .map_err(|e| TrainError::Config(e.to_string()))?
        .map_or(Pooling::Mean, |c| c.pooling))
}
