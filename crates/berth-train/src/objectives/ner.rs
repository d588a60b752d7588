//! Token classification (NER) from CoNLL column files. Each word's first sub-token is
//! labelled (`label_all_tokens`: every sub-token); only labelled tokens go through the
//! classifier. Dev: conlleval precision / recall / F1 on each word's first sub-token.
use std::path::Path;

use berth_model::{Dropout, HeadKind, Model};
use berth_tasks::metrics;
use berth_text::Encoded;
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::common::{dev_batches, pack, split, unseen};
use crate::data;
use crate::distill::DistillConfig;
use crate::error::{Result, TrainError};
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::objective::DataConfig;
use crate::objective::{
    batch_tokens, BatchLoss, DataSummary, Env, Example, Metrics, Networks, Objective, TrainSet,
};
use berth_tasks::argmax;

/// Settings of an NER run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NerConfig {
    /// Tag column (0-based; default: the last).
    pub tag_column: Option<usize>,
    /// Label every sub-token of a word, not only the first.
    pub label_all_tokens: bool,
    /// Learn from a teacher's softened tag distributions too (at the labelled tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

/// One encoded sentence with its token labels and its words' gold tags.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NerExample {
    /// Tokens.
    pub enc: Encoded,
    /// Class per token (`None` = ignored, transformers' -100).
    pub token_labels: Vec<Option<u32>>,
    /// (word, gold tag) per word, for conlleval.
    pub words: Vec<(String, String)>,
}

impl Example for NerExample {
    fn tokens(&self) -> usize {
        self.enc.len()
    }

    fn ids(&self) -> &[u32] {
        &self.enc.ids
    }
}

/// The NER objective.
pub struct Ner {
    data: DataConfig,
    cfg: NerConfig,
    labels: Option<Vec<String>>,
    train: Vec<NerExample>,
    dev: Vec<NerExample>,
}

impl Ner {
    /// An objective for `cfg` on `data`.
    pub fn new(data: DataConfig, cfg: NerConfig) -> Self {
        Ner {
            data,
            cfg,
            labels: None,
            train: Vec::new(),
            dev: Vec::new(),
        }
    }

    fn encode(&self, items: &[data::TaggedSentence], env: &Env) -> Result<Vec<NerExample>> {
        let labels = self.labels.as_deref().unwrap_or_default();
        let tok = env.tokenizer()?;
        items
            .par_iter()
            .map(|s| {
                let enc = tok.encode_words(&s.words, self.data.max_length, s.line)?;
                let mut prev: Option<u32> = None;
                let token_labels = enc
                    .word_ids
                    .iter()
                    .map(|w| {
                        let out = match *w {
                            None => None,
                            Some(w) if Some(w) != prev || self.cfg.label_all_tokens => labels
                                .iter()
                                .position(|l| *l == s.tags[w as usize])
                                .map(|i| i as u32),
                            Some(_) => None,
                        };
                        prev = *w;
                        out
                    })
                    .collect();
                let words = s
                    .words
                    .iter()
                    .cloned()
                    .zip(s.tags.iter().cloned())
                    .collect();
                Ok(NerExample {
                    enc,
                    token_labels,
                    words,
                })
            })
            .collect()
    }
}

/// The labelled tokens of packed `examples` (rows of their batch) with their classes.
fn labelled_rows(examples: &[&NerExample]) -> (Vec<u32>, Vec<Option<u32>>) {
    let labels: Vec<Option<u32>> = examples
        .iter()
        .flat_map(|e| e.token_labels.iter().copied())
        .collect();
    let rows: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize].is_some())
        .collect();
    let kept = rows.iter().map(|&i| labels[i as usize]).collect();
    (rows, kept)
}

/// The loss of NER examples from their last hidden states `[N, H]`: cross-entropy over the
/// labelled tokens (`None` when no token is labelled).
pub fn loss_from_hidden(
    model: &Model,
    examples: &[&NerExample],
    hidden: &Tensor,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    // Only labelled tokens go through the classifier.
    let (rows, kept) = labelled_rows(examples);
    if rows.is_empty() {
        return Ok(None);
    }
    let logits = model.token_logits_train(&Model::select_rows(hidden, &rows)?, d)?;
    loss::cross_entropy(&logits, &kept)
}

/// The training loss of a batch distilled from `teacher` at the labelled tokens.
pub fn distilled_loss(
    student: &Model,
    teacher: &Model,
    examples: &[&NerExample],
    distill: &DistillConfig,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let (rows, kept) = labelled_rows(examples);
    if rows.is_empty() {
        return Ok(None);
    }
    let batch = pack(examples.iter().map(|e| &e.enc))?;
    let hidden = student.forward_train(&batch, d)?;
    let logits = student.token_logits_train(&Model::select_rows(&hidden, &rows)?, d)?;
    let taught = teacher.token_logits(&Model::select_rows(&teacher.forward(&batch)?, &rows)?)?;
    distill.blend(loss::cross_entropy(&logits, &kept)?, &logits, &taught)
}

/// The training loss of a batch.
pub fn loss(
    model: &Model,
    examples: &[&NerExample],
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let batch = pack(examples.iter().map(|e| &e.enc))?;
    let hidden = model.forward_train(&batch, d)?;
    loss_from_hidden(model, examples, &hidden, d)
}

impl Objective for Ner {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        let (col, skip) = (self.cfg.tag_column, self.data.skip_bad_rows);
        let s = split(&self.data, env.seed, |p| data::read_conll(p, col, skip))?;
        let labels: Vec<String> = match self.labels.take() {
            Some(l) => l,
            None => s
                .train
                .iter()
                .flat_map(|s| s.tags.iter().cloned())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        for d in &s.dev {
            if let Some((i, t)) = d.tags.iter().enumerate().find(|(_, t)| !labels.contains(t)) {
                return Err(unseen(&s, d.line + i, t));
            }
        }
        self.labels = Some(labels);
        self.train = env.encode_shared(&s.train, |rows, _| self.encode(rows, env))?;
        if env.evaluates() {
            self.dev = self.encode(&s.dev, env)?;
        }
        Ok(DataSummary {
            labels: self.labels.clone().unwrap_or_default(),
            dev_examples: self.dev.len(),
            skipped: s.skipped,
        })
    }

    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        let labels = self.labels.clone().unwrap_or_default();
        let teacher = match &self.cfg.distill {
            Some(dc) => {
                let t = dc.load_teacher(env, HeadKind::TokenClassification)?;
                dc.check_labels(&t, &labels)?;
                Some(t)
            }
            None => None,
        };
        let head = TaskHead {
            kind: HeadKind::TokenClassification,
            labels,
            problem_type: None,
            sentence_order: false,
        };
        let (model, config) = load_for_task(from, &head, env.seed)?;
        let mut nets = Networks::single(model, config);
        nets.frozen.extend(teacher);
        Ok(nets)
    }

    fn load_trained(&mut self, dir: &Path, _env: &Env) -> Result<Networks> {
        let nets = super::common::trained_networks(dir, Some(HeadKind::TokenClassification))?;
        self.labels = Some(nets.main.config.id2label.clone());
        Ok(nets)
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
        let examples: Vec<&NerExample> = batch.iter().map(|&i| &self.train[i]).collect();
        let loss = match (&self.cfg.distill, nets.frozen.first()) {
            (Some(dc), Some(teacher)) => {
                distilled_loss(&nets.main, teacher, &examples, dc, dropout)?
            }
            _ => loss(&nets.main, &examples, dropout)?,
        };
        Ok(BatchLoss {
            loss,
            tokens: batch_tokens(&examples),
            // The loss is a mean over the labelled (first sub-)tokens.
            units: examples
                .iter()
                .map(|e| e.token_labels.iter().flatten().count())
                .sum::<usize>() as f64,
            second: None,
            ..Default::default()
        })
    }

    /// A rank's share: the token classifier's dropout on the labelled rows is keyed by their
    /// place among the global batch's labelled rows (the loop keys the encoder's by tokens).
    fn loss_at(
        &self,
        nets: &Networks,
        batch: &[usize],
        before: &[usize],
        seed: u64,
        dropout: Option<&Dropout>,
        _collective: &dyn crate::dist::Collective,
    ) -> Result<BatchLoss> {
        let labelled: usize = before
            .iter()
            .map(|&i| self.train[i].token_labels.iter().flatten().count())
            .sum();
        let d = dropout.map(|d| d.with_selected_offset(labelled as u64));
        self.loss(nets, batch, seed, d.as_ref())
    }

    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let model = &nets.main;
        let labels = self.labels.as_deref().unwrap_or_default();
        let mut conll: Vec<String> = Vec::new();
        let (mut loss_sum, mut loss_n) = (0.0, 0usize);
        let encs: Vec<&Encoded> = self.dev.iter().map(|e| &e.enc).collect();
        dev_batches(model, &encs, |r, batch, hidden| {
            let chunk = &self.dev[r];
            let refs: Vec<&NerExample> = chunk.iter().collect();
            if let Some(l) = loss_from_hidden(model, &refs, hidden, None)? {
                loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
                loss_n += refs.len();
            }
            let logits = model.token_logits(hidden)?.to_vec2::<f32>()?;
            for (s, e) in chunk.iter().enumerate() {
                let rows = batch.range(s);
                let mut tags = vec!["O".to_string(); e.words.len()];
                let mut seen = vec![false; e.words.len()];
                for (t, w) in e.enc.word_ids.iter().enumerate() {
                    if let Some(w) = *w {
                        let w = w as usize;
                        if !seen[w] {
                            seen[w] = true;
                            tags[w] = labels[argmax(&logits[rows.start + t])].clone();
                        }
                    }
                }
                // Words cut off by max_length are predicted O, as a truncating pipeline would.
                for ((word, gold), p) in e.words.iter().zip(tags) {
                    conll.push(format!("{word} {gold} {p}"));
                }
                conll.push(String::new());
            }
            Ok(())
        })?;
        let mut out = Metrics::new();
        if loss_n > 0 {
            out.insert("loss".into(), (loss_sum / loss_n as f64).into());
        }
        let r = metrics::conlleval::evaluate(conll.iter().map(String::as_str), ' ')
            .map_err(|e| TrainError::Config(format!("dev tags: line {}: {}", e.line, e.message)))?;
        // conlleval computes percentages; berth reports every metric as a fraction.
        out.insert("precision".into(), (r.overall.precision() / 100.0).into());
        out.insert("recall".into(), (r.overall.recall() / 100.0).into());
        out.insert("f1".into(), (r.overall.f1() / 100.0).into());
        out.insert("accuracy".into(), (r.accuracy() / 100.0).into());
        Ok(out)
    }

    fn main_metric(&self) -> &'static str {
        "f1"
    }
}
