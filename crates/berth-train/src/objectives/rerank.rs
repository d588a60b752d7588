//! Cross-encoder reranking, as sentence-transformers' `CrossEncoder` with
//! `BinaryCrossEntropyLoss`: (query, passage, relevance in [0, 1]) rows, one logit per pair.
//! Dev: each query's passages ranked by logit, MRR@10 and nDCG@10 (labels as gains).
use std::collections::HashMap;
use std::path::Path;

use berth_model::{Dropout, HeadKind, Model};
use berth_tasks::metrics;
use berth_text::{Encoded, Truncation};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::common::{dev_batches, pack, split};
use crate::data::{self, Column, Columns};
use crate::error::{Result, TrainError};
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::objective::DataConfig;
use crate::objective::{
    batch_tokens, BatchLoss, DataSummary, Env, Example, Metrics, Networks, Objective, TrainSet,
};

/// Settings of a reranker run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RerankConfig {
    /// Query column.
    pub text_column: String,
    /// Passage column.
    pub pair_column: String,
    /// Relevance column (a number in [0, 1]).
    pub label_column: String,
}

impl Default for RerankConfig {
    fn default() -> Self {
        RerankConfig {
            text_column: "query".into(),
            pair_column: "passage".into(),
            label_column: "label".into(),
        }
    }
}

/// One (query, passage) pair with its relevance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RerankExample {
    /// Tokens of the pair.
    pub enc: Encoded,
    /// Relevance in [0, 1] (1 relevant, 0 not; fractions are soft targets).
    pub relevance: f32,
    /// The query it belongs to (dev rankings group by it).
    pub group: usize,
}

impl Example for RerankExample {
    fn tokens(&self) -> usize {
        self.enc.len()
    }

    fn ids(&self) -> &[u32] {
        &self.enc.ids
    }
}

/// The reranking objective.
pub struct Rerank {
    data: DataConfig,
    cfg: RerankConfig,
    train: Vec<RerankExample>,
    dev: Vec<RerankExample>,
}

impl Rerank {
    /// An objective for `cfg` on `data`.
    pub fn new(data: DataConfig, cfg: RerankConfig) -> Self {
        Rerank {
            data,
            cfg,
            train: Vec::new(),
            dev: Vec::new(),
        }
    }

    fn encode(
        &self,
        items: &[data::TextExample],
        path: &Path,
        env: &Env,
    ) -> Result<Vec<RerankExample>> {
        let tok = env.tokenizer()?;
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
                let relevance: f32 = e
                    .label
                    .parse()
                    .ok()
                    .filter(|v| (0.0..=1.0).contains(v))
                    .ok_or_else(|| TrainError::Data {
                        path: path.into(),
                        line: e.line,
                        message: format!("relevance label {:?} is not a number in [0, 1]", e.label),
                    })?;
                let enc = tok.encode(
                    &e.text,
                    e.pair.as_deref(),
                    self.data.max_length,
                    Truncation::Truncate,
                    e.line,
                )?;
                Ok(RerankExample {
                    enc,
                    relevance,
                    group: g,
                })
            })
            .collect()
    }
}

/// BCE with logits of the single logit `[S, 1]` against the relevance.
pub fn loss_from_logits(examples: &[&RerankExample], logits: &Tensor) -> Result<Option<Tensor>> {
    if logits.dim(1)? != 1 {
        return Err(TrainError::Config(format!(
            "a reranker has one output; this head has {}",
            logits.dim(1)?
        )));
    }
    let t = loss::targets(
        &examples
            .iter()
            .map(|e| vec![e.relevance])
            .collect::<Vec<_>>(),
    )?;
    Ok(Some(loss::bce_with_logits(logits, &t)?))
}

/// The training loss of a batch (under first-token pooling the last layer computes only
/// the first tokens).
pub fn loss(
    model: &Model,
    examples: &[&RerankExample],
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let batch = pack(examples.iter().map(|e| &e.enc))?;
    let first = model.forward_train_sequences(&batch, d)?;
    loss_from_logits(examples, &model.sequence_logits_first(&first, d)?)
}

impl Objective for Rerank {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        let cols = Columns {
            text: Column::parse(&self.cfg.text_column),
            pair: Some(Column::parse(&self.cfg.pair_column)),
            label: Some(Column::parse(&self.cfg.label_column)),
            extra: None,
        };
        let skip = self.data.skip_bad_rows;
        let s = split(&self.data, env.seed, |p| {
            data::read_text_examples(p, &cols, skip)
        })?;
        self.train =
            env.encode_shared(&s.train, |rows, _| self.encode(rows, &self.data.train, env))?;
        if env.evaluates() {
            self.dev = self.encode(&s.dev, &s.dev_path, env)?;
        }
        Ok(DataSummary {
            labels: Vec::new(),
            dev_examples: self.dev.len(),
            skipped: s.skipped,
        })
    }

    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        let head = TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: vec!["LABEL_0".into()],
            problem_type: None,
            sentence_order: false,
        };
        let (model, config) = load_for_task(from, &head, env.seed)?;
        Ok(Networks::single(model, config))
    }

    fn load_trained(&mut self, dir: &Path, _env: &Env) -> Result<Networks> {
        super::common::trained_networks(dir, Some(HeadKind::SequenceClassification))
    }

    fn max_length(&self) -> usize {
        self.data.max_length
    }

    fn train_set(&self) -> &dyn TrainSet {
        &self.train
    }

    fn loss(
        &self,
        nets: &Networks,
        batch: &[usize],
        _seed: u64,
        dropout: Option<&Dropout>,
    ) -> Result<BatchLoss> {
        let examples: Vec<&RerankExample> = batch.iter().map(|&i| &self.train[i]).collect();
        Ok(BatchLoss {
            loss: loss(&nets.main, &examples, dropout)?,
            tokens: batch_tokens(&examples),
            units: examples.len() as f64,
            second: None,
            ..Default::default()
        })
    }

    /// Each query's passages ranked by logit; MRR@10 (relevant: label > 0), nDCG@10 (gains:
    /// the labels), and the mean BCE loss.
    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let (model, dev) = (&nets.main, &self.dev);
        let mut scores = vec![0f64; dev.len()];
        let (mut loss_sum, mut loss_n) = (0.0, 0usize);
        let encs: Vec<&Encoded> = dev.iter().map(|e| &e.enc).collect();
        dev_batches(model, &encs, |r, batch, hidden| {
            let refs: Vec<&RerankExample> = dev[r.clone()].iter().collect();
            let logits = model.sequence_logits(hidden, batch)?;
            if let Some(l) = loss_from_logits(&refs, &logits)? {
                loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
                loss_n += refs.len();
            }
            for (k, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
                scores[r.start + k] = row[0] as f64;
            }
            Ok(())
        })?;
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
            let rel: Vec<f64> = rows.iter().map(|&i| dev[i].relevance as f64).collect();
            mrr += metrics::reciprocal_rank(&s, &rel, 10);
            ndcg += metrics::ndcg(&s, &rel, 10);
        }
        let q = groups.len().max(1) as f64;
        let mut out = Metrics::new();
        out.insert("loss".into(), (loss_sum / loss_n.max(1) as f64).into());
        out.insert("mrr@10".into(), (mrr / q).into());
        out.insert("ndcg@10".into(), (ndcg / q).into());
        Ok(out)
    }

    fn main_metric(&self) -> &'static str {
        "mrr@10"
    }
}
