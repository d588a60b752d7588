//! Sequence classification of texts or pairs: single-label (cross-entropy), multi-label
//! (one sigmoid per label, BCE: transformers' `multi_label_classification`) or regression
//! (one output, MSE). Dev: accuracy and macro-F1; micro / macro-F1 and subset accuracy;
//! Pearson / Spearman.
use std::path::Path;

use berth_model::{Dropout, HeadKind, Model};
use berth_tasks::metrics;
use berth_text::{Encoded, Truncation};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::common::{dev_batches, pack, split, unseen};
use crate::data::{self, Column, Columns};
use crate::distill::DistillConfig;
use crate::error::{Result, TrainError};
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::objective::DataConfig;
use crate::objective::{
    batch_tokens, BatchLoss, DataSummary, Env, Example, Metrics, Networks, Objective, TrainSet,
};
use berth_tasks::argmax;

/// Settings of a classification run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyConfig {
    /// Text column (name or 0-based index).
    pub text_column: String,
    /// Second-text column for pairs.
    pub pair_column: Option<String>,
    /// Label column.
    pub label_column: String,
    /// Numeric labels, one output, MSE loss.
    pub regression: bool,
    /// Several labels per row (split on `label_separator`), one sigmoid each, BCE loss.
    pub multi_label: bool,
    /// What separates the labels of a row with `multi_label`.
    pub label_separator: String,
    /// Learn from a teacher's softened predictions too (single-label only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig {
            text_column: "sentence".into(),
            pair_column: None,
            label_column: "label".into(),
            regression: false,
            multi_label: false,
            label_separator: ",".into(),
            distill: None,
        }
    }
}

/// What a classification example is trained towards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Target {
    /// A class index (`None`: a label outside the label set, ignored by the loss).
    Class(Option<u32>),
    /// A regression value.
    Value(f32),
    /// One 0 / 1 target per label (multi-label).
    Labels(Vec<f32>),
}

/// One encoded text (or pair) with its target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyExample {
    /// Tokens.
    pub enc: Encoded,
    /// Target.
    pub target: Target,
}

impl Example for ClassifyExample {
    fn tokens(&self) -> usize {
        self.enc.len()
    }

    fn ids(&self) -> &[u32] {
        &self.enc.ids
    }
}

/// The classification objective.
pub struct Classify {
    data: DataConfig,
    cfg: ClassifyConfig,
    /// The label set and order: the training data's (sorted), or a trained model's.
    labels: Option<Vec<String>>,
    train: Vec<ClassifyExample>,
    dev: Vec<ClassifyExample>,
}

impl Classify {
    /// An objective for `cfg` on `data` (nothing is read yet).
    pub fn new(data: DataConfig, cfg: ClassifyConfig) -> Self {
        Classify {
            data,
            cfg,
            labels: None,
            train: Vec::new(),
            dev: Vec::new(),
        }
    }

    fn head(&self) -> TaskHead {
        let labels = self.labels.clone().unwrap_or_default();
        let (labels, problem) = if self.cfg.multi_label {
            (labels, "multi_label_classification")
        } else if self.cfg.regression {
            (vec!["LABEL_0".into()], "regression")
        } else {
            (labels, "single_label_classification")
        };
        TaskHead {
            kind: HeadKind::SequenceClassification,
            labels,
            problem_type: Some(problem.into()),
            sentence_order: false,
        }
    }

    /// A row's label names: one, or several split on the separator (multi-label; none is
    /// allowed: every target 0).
    fn split_labels(&self, label: &str) -> Vec<String> {
        if self.cfg.multi_label {
            label
                .split(self.cfg.label_separator.as_str())
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        } else {
            vec![label.to_string()]
        }
    }

    fn encode(
        &self,
        items: &[data::TextExample],
        path: &Path,
        env: &Env,
    ) -> Result<Vec<ClassifyExample>> {
        let labels = self.labels.as_deref().unwrap_or_default();
        let tok = env.tokenizer()?;
        items
            .par_iter()
            .map(|e| {
                let enc = tok.encode(
                    &e.text,
                    e.pair.as_deref(),
                    self.data.max_length,
                    Truncation::Truncate,
                    e.line,
                )?;
                let target = if self.cfg.multi_label {
                    let mut t = vec![0f32; labels.len()];
                    for l in self.split_labels(&e.label) {
                        t[labels
                            .iter()
                            .position(|x| *x == l)
                            .expect("checked in prepare")] = 1.0;
                    }
                    Target::Labels(t)
                } else if self.cfg.regression {
                    Target::Value(
                        e.label
                            .parse::<f32>()
                            .ok()
                            .filter(|v| v.is_finite())
                            .ok_or_else(|| TrainError::Data {
                                path: path.into(),
                                line: e.line,
                                message: format!(
                                    "regression label {:?} is not a finite number",
                                    e.label
                                ),
                            })?,
                    )
                } else {
                    Target::Class(labels.iter().position(|l| *l == e.label).map(|i| i as u32))
                };
                Ok(ClassifyExample { enc, target })
            })
            .collect()
    }
}

/// The loss of classification examples from their pooled last hidden states `[S, H]`
/// ([`Model::sequence_states`]; the head runs here).
pub fn loss_from_first(
    model: &Model,
    examples: &[&ClassifyExample],
    first: &Tensor,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    hard_loss(examples, &model.sequence_logits_first(first, d)?)
}

/// The loss of `logits [S, C]` against the examples' targets: cross-entropy, BCE over
/// labels, or MSE, as the targets say.
fn hard_loss(examples: &[&ClassifyExample], logits: &Tensor) -> Result<Option<Tensor>> {
    match examples.first().map(|e| &e.target) {
        None => Ok(None),
        Some(Target::Labels(_)) => {
            let rows: Vec<Vec<f32>> = examples
                .iter()
                .map(|e| match &e.target {
                    Target::Labels(t) => t.clone(),
                    _ => unreachable!("a batch has one kind of target; this is a bug"),
                })
                .collect();
            Ok(Some(loss::bce_with_logits(
                &logits,
                &loss::targets(&rows)?,
            )?))
        }
        Some(Target::Value(_)) => {
            let rows: Vec<Vec<f32>> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Value(v) => vec![v],
                    _ => unreachable!("a batch has one kind of target; this is a bug"),
                })
                .collect();
            Ok(Some(loss::mse(&logits, &loss::targets(&rows)?)?))
        }
        Some(Target::Class(_)) => {
            let classes: Vec<Option<u32>> = examples
                .iter()
                .map(|e| match e.target {
                    Target::Class(c) => c,
                    _ => unreachable!("a batch has one kind of target; this is a bug"),
                })
                .collect();
            loss::cross_entropy(&logits, &classes)
        }
    }
}

/// The training loss of a batch: under first-token pooling the last layer computes only
/// the first tokens (the head reads nothing else).
pub fn loss(
    model: &Model,
    examples: &[&ClassifyExample],
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let batch = pack(examples.iter().map(|e| &e.enc))?;
    let first = model.forward_train_sequences(&batch, d)?;
    loss_from_first(model, examples, &first, d)
}

/// The training loss of a batch distilled from `teacher` (which runs forward on the same
/// packed batch): `distill`'s blend of the teacher's softened class distribution and the
/// hard labels.
pub fn distilled_loss(
    student: &Model,
    teacher: &Model,
    examples: &[&ClassifyExample],
    distill: &DistillConfig,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let batch = pack(examples.iter().map(|e| &e.enc))?;
    let first = student.forward_train_sequences(&batch, d)?;
    let logits = student.sequence_logits_first(&first, d)?;
    let taught = teacher.sequence_logits(&teacher.forward(&batch)?, &batch)?;
    distill.blend(hard_loss(examples, &logits)?, &logits, &taught)
}

impl Objective for Classify {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        let cols = Columns {
            text: Column::parse(&self.cfg.text_column),
            pair: self.cfg.pair_column.as_deref().map(Column::parse),
            label: Some(Column::parse(&self.cfg.label_column)),
            extra: None,
        };
        let skip = self.data.skip_bad_rows;
        let s = split(&self.data, env.seed, |p| {
            data::read_text_examples(p, &cols, skip)
        })?;
        // An empty cell is a missing label, not a class named "" (multi-label rows may
        // have none: every target 0).
        if !self.cfg.multi_label {
            for (path, e) in s
                .train
                .iter()
                .map(|e| (&self.data.train, e))
                .chain(s.dev.iter().map(|e| (&s.dev_path, e)))
            {
                if e.label.trim().is_empty() {
                    return Err(TrainError::Data {
                        path: path.clone(),
                        line: e.line,
                        message: format!("empty {:?} cell", self.cfg.label_column),
                    });
                }
            }
        }
        if !self.cfg.regression {
            let labels = match self.labels.take() {
                Some(l) => l,
                None => s
                    .train
                    .iter()
                    .flat_map(|e| self.split_labels(&e.label))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            };
            for e in &s.dev {
                if let Some(l) = self
                    .split_labels(&e.label)
                    .iter()
                    .find(|l| !labels.contains(l))
                {
                    return Err(unseen(&s, e.line, l));
                }
            }
            self.labels = Some(labels);
        }
        self.train =
            env.encode_shared(&s.train, |rows, _| self.encode(rows, &self.data.train, env))?;
        if env.evaluates() {
            self.dev = self.encode(&s.dev, &s.dev_path, env)?;
        }
        Ok(DataSummary {
            labels: self.labels.clone().unwrap_or_default(),
            dev_examples: self.dev.len(),
            skipped: s.skipped,
        })
    }

    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        // The teacher is checked before the student is built: a mismatch fails fast.
        let teacher = match &self.cfg.distill {
            Some(_) if self.cfg.multi_label || self.cfg.regression => {
                return Err(TrainError::Config(
                    "--teacher distils single-label classification (softmax over labels); \
                     drop --multi-label / --regression"
                        .into(),
                ))
            }
            Some(dc) => {
                let t = dc.load_teacher(env, HeadKind::SequenceClassification)?;
                dc.check_labels(&t, self.labels.as_deref().unwrap_or_default())?;
                Some(t)
            }
            None => None,
        };
        let (model, config) = load_for_task(from, &self.head(), env.seed)?;
        let mut nets = Networks::single(model, config);
        nets.frozen.extend(teacher);
        Ok(nets)
    }

    fn load_trained(&mut self, dir: &Path, _env: &Env) -> Result<Networks> {
        let nets = super::common::trained_networks(dir, Some(HeadKind::SequenceClassification))?;
        if !self.cfg.regression {
            self.labels = Some(nets.main.config.id2label.clone());
        }
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
        let examples: Vec<&ClassifyExample> = batch.iter().map(|&i| &self.train[i]).collect();
        let loss = match (&self.cfg.distill, nets.frozen.first()) {
            (Some(dc), Some(teacher)) => {
                distilled_loss(&nets.main, teacher, &examples, dc, dropout)?
            }
            _ => loss(&nets.main, &examples, dropout)?,
        };
        Ok(BatchLoss {
            loss,
            tokens: batch_tokens(&examples),
            units: examples.len() as f64,
            second: None,
            ..Default::default()
        })
    }

    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let model = &nets.main;
        let labels = self.labels.as_deref().unwrap_or_default();
        let (mut gold, mut pred) = (Vec::new(), Vec::new());
        let (mut gv, mut pv) = (Vec::new(), Vec::new());
        let mut multi: Vec<(Vec<f32>, Vec<bool>)> = Vec::new();
        let (mut loss_sum, mut loss_n) = (0.0, 0usize);
        let encs: Vec<&Encoded> = self.dev.iter().map(|e| &e.enc).collect();
        dev_batches(model, &encs, |r, batch, hidden| {
            let chunk = &self.dev[r];
            let refs: Vec<&ClassifyExample> = chunk.iter().collect();
            // One forward per batch serves both the dev loss and the predictions.
            let first = model.sequence_states(hidden, batch)?;
            if let Some(l) = loss_from_first(model, &refs, &first, None)? {
                loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
                loss_n += refs.len();
            }
            let logits = model.sequence_logits(hidden, batch)?.to_vec2::<f32>()?;
            for (e, row) in chunk.iter().zip(logits) {
                match &e.target {
                    // A label is predicted when its sigmoid passes 0.5 (logit > 0).
                    Target::Labels(t) => {
                        multi.push((t.clone(), row.iter().map(|&v| v > 0.0).collect()))
                    }
                    Target::Value(v) => {
                        gv.push(*v as f64);
                        pv.push(row[0] as f64);
                    }
                    Target::Class(c) => {
                        let c = c.expect("dev labels are checked in prepare");
                        gold.push(labels[c as usize].clone());
                        pred.push(labels[argmax(&row)].clone());
                    }
                }
            }
            Ok(())
        })?;
        let mut out = Metrics::new();
        if loss_n > 0 {
            out.insert("loss".into(), (loss_sum / loss_n as f64).into());
        }
        if self.cfg.multi_label {
            let m = metrics::multi_label(&multi, labels.len());
            out.insert("subset_accuracy".into(), m.subset_accuracy.into());
            out.insert("micro_f1".into(), m.micro_f1.into());
            out.insert("macro_f1".into(), m.macro_f1.into());
        } else if self.cfg.regression {
            out.insert("pearson".into(), metrics::pearson(&gv, &pv).into());
            out.insert("spearman".into(), metrics::spearman(&gv, &pv).into());
        } else {
            let r = metrics::classification_report(&gold, &pred);
            out.insert("accuracy".into(), r.accuracy.into());
            out.insert("macro_f1".into(), r.macro_avg.f1.into());
        }
        Ok(out)
    }

    fn main_metric(&self) -> &'static str {
        if self.cfg.multi_label {
            "micro_f1"
        } else if self.cfg.regression {
            "spearman"
        } else {
            "accuracy"
        }
    }
}
