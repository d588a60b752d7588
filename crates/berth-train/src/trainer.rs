//! The fine-tuning loop, readable top to bottom:
//! data → model → for each optimizer step: learning rate → forward / backward over the
//! accumulated micro-batches (dropout on) → clip → AdamW step → log; at each epoch end (or
//! every `save_every` steps): evaluate on dev → checkpoint → early stopping.
//!
//! Determinism: the data order of epoch `e` is a shuffle seeded by `(seed, e)`, and the
//! dropout masks of micro-batch `k` are seeded by `(seed, k)`. Nothing else is random, so
//! the same config and seed give the same losses, and a resumed run (which restores
//! weights, optimizer moments and the data position) continues exactly.
use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_model::{Batch, Dropout, HeadKind, Model};
use berth_tasks::{metrics, Pooling};
use berth_text::{Encoded, TextTokenizer, Truncation};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainerState, FORMAT_VERSION};
use crate::data::{self, Column, Columns};
use crate::error::{io, Result, TrainError};
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::{Schedule, ScheduleKind};

/// What is being fine-tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Sequence classification (single label) or regression (`regression`), texts or pairs.
    Classify,
    /// Token classification from CoNLL files.
    Ner,
    /// Extractive question answering from SQuAD JSON (contexts in `doc_stride` windows).
    Qa,
    /// Sentence embeddings: a bi-encoder trained on (anchor, positive[, negative]) rows with
    /// in-batch negatives (multiple-negatives ranking loss).
    Embed,
    /// Cross-encoder reranking: (query, passage, relevance) rows, one logit, BCE loss.
    Rerank,
    /// Masked-language-model pretraining on a text corpus (from scratch or continued).
    Pretrain,
}

/// The full training configuration (saved as the run's config.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Task.
    pub task: Task,
    /// Starting checkpoint (a model directory).
    pub model: PathBuf,
    /// Training data.
    pub train: PathBuf,
    /// Dev data; without it, `dev_fraction` of the training data is split off (seeded).
    pub dev: Option<PathBuf>,
    /// Fraction held out when there is no dev file.
    pub dev_fraction: f64,
    /// Run directory.
    pub output: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Train for exactly this many optimizer steps, as the Hugging Face Trainer's
    /// `max_steps`: it overrides `epochs` (the data is cycled as needed) and the schedule
    /// spans these steps.
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Token limit per example.
    pub max_length: usize,
    /// Warmup steps (overrides `warmup_ratio`).
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of all optimizer steps.
    pub warmup_ratio: f64,
    /// Schedule after warmup.
    pub schedule: ScheduleKind,
    /// AdamW settings (weight decay included).
    pub adamw: AdamWConfig,
    /// Global gradient-norm limit (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Seed of data order, dropout and new head weights.
    pub seed: u64,
    /// Classify: text column (name or index).
    pub text_column: String,
    /// Classify: second-text column for pairs.
    pub pair_column: Option<String>,
    /// Classify: label column.
    pub label_column: String,
    /// Classify: treat labels as numbers (regression, MSE loss).
    pub regression: bool,
    /// NER: tag column (default: the last).
    pub tag_column: Option<usize>,
    /// NER: label every sub-token of a word (default: only the first; the rest are -100).
    pub label_all_tokens: bool,
    /// QA: tokens shared by consecutive windows of a long context.
    pub doc_stride: usize,
    /// Skip (and count) malformed rows instead of failing.
    pub skip_bad_rows: bool,
    /// Evaluate and checkpoint every N optimizer steps (default: at each epoch end).
    pub save_every: Option<u64>,
    /// Newest checkpoints kept (the best one is kept as well).
    pub keep_checkpoints: usize,
    /// Stop after this many evaluations without a better dev score.
    pub early_stopping_patience: Option<usize>,
    /// Log the training loss every N optimizer steps.
    pub log_every: u64,
    /// Dropout during training (off only for tests against eval-mode references).
    pub dropout: bool,
    /// Embed: column of a hard negative per row.
    #[serde(default)]
    pub negative_column: Option<String>,
    /// Classify: several labels per row (split on `label_separator`), one sigmoid each,
    /// BCE loss (transformers' `multi_label_classification`).
    #[serde(default)]
    pub multi_label: bool,
    /// Classify with `multi_label`: what separates the labels of a row.
    #[serde(default = "default_separator")]
    pub label_separator: String,
    /// Embed: cosine similarities are multiplied by this before the softmax
    /// (sentence-transformers' default 20).
    #[serde(default = "default_scale")]
    pub similarity_scale: f64,
    /// Classify / NER: the label set and order (a trained model's `id2label`, for
    /// evaluation) instead of the one read off the training data.
    #[serde(skip)]
    pub fixed_labels: Option<Vec<String>>,
    /// Pretrain: fraction of tokens chosen for prediction.
    #[serde(default = "default_mask_rate")]
    pub mask_rate: f64,
    /// Pretrain: choose whole words.
    #[serde(default)]
    pub whole_word: bool,
    /// Append each epoch's training sequences, in the order they are trained on, to this
    /// JSON Lines file (`{"epoch", "ids"}`), for a peer to train on the same data order.
    #[serde(default)]
    pub dump_order: Option<PathBuf>,
    /// Pretrain (BERT): a sentence-pair objective beside masked-LM, on the pooled first
    /// token (BERT's next-sentence prediction or ALBERT's sentence order).
    #[serde(default)]
    pub sentence_objective: Option<crate::pretrain::SentenceObjective>,
    /// Pretrain: replaced-token detection (ELECTRA) instead of masked-LM, with this weight on
    /// the discriminator's loss; the model is the discriminator (`ElectraForPreTraining`)
    /// and `model/generator` the generator ([`crate::rtd`]).
    #[serde(default)]
    pub rtd_weight: Option<f64>,
}

fn default_mask_rate() -> f64 {
    0.15
}

fn default_separator() -> String {
    ",".into()
}

fn default_scale() -> f64 {
    20.0
}

impl TrainConfig {
    /// Defaults of the Hugging Face Trainer where it has them (lr 5e-5, linear schedule,
    /// no warmup, weight decay 0, clip at 1.0, 3 epochs, seed 42).
    pub fn new(task: Task, model: PathBuf, train: PathBuf, output: PathBuf) -> Self {
        TrainConfig {
            task,
            model,
            train,
            dev: None,
            dev_fraction: 0.1,
            output,
            epochs: 3,
            max_steps: None,
            lr: 5e-5,
            batch_size: 32,
            grad_accum: 1,
            max_length: 128,
            warmup_steps: None,
            warmup_ratio: 0.0,
            schedule: ScheduleKind::Linear,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            seed: 42,
            text_column: "sentence".into(),
            pair_column: None,
            label_column: "label".into(),
            regression: false,
            tag_column: None,
            label_all_tokens: false,
            doc_stride: 128,
            skip_bad_rows: false,
            save_every: None,
            keep_checkpoints: 2,
            early_stopping_patience: None,
            log_every: 10,
            dropout: true,
            negative_column: None,
            multi_label: false,
            label_separator: default_separator(),
            similarity_scale: default_scale(),
            fixed_labels: None,
            mask_rate: default_mask_rate(),
            whole_word: false,
            dump_order: None,
            sentence_objective: None,
            rtd_weight: None,
        }
    }
}

/// One encoded training example with its targets.
#[derive(Debug, Clone)]
pub struct Example {
    /// Tokens.
    pub enc: Encoded,
    /// Classify: the class index (or `None` for regression).
    pub class: Option<u32>,
    /// Regression target.
    pub value: f32,
    /// NER: per-token class (`None` = ignored, transformers' -100).
    pub token_labels: Vec<Option<u32>>,
    /// NER: gold tag per word, for conlleval.
    pub words: Vec<(String, String)>,
    /// QA: answer start and end token (0, 0 = [CLS]: no answer in this window).
    pub span: Option<(u32, u32)>,
    /// Embed: the positive text.
    pub pair_enc: Option<Encoded>,
    /// Embed: the hard negative, if any.
    pub neg_enc: Option<Encoded>,
    /// Multi-label classify: one 0 / 1 target per label.
    pub targets: Vec<f32>,
    /// Rerank: the query this row belongs to (dev rankings group by it).
    pub group: usize,
}

impl Example {
    /// An example of `enc` with no targets yet.
    pub fn new(enc: Encoded) -> Self {
        Example {
            enc,
            class: None,
            value: 0.0,
            token_labels: Vec::new(),
            words: Vec::new(),
            span: None,
            pair_enc: None,
            neg_enc: None,
            targets: Vec::new(),
            group: 0,
        }
    }

    /// Tokens this example feeds the encoder.
    pub fn tokens(&self) -> usize {
        self.enc.len()
            + self.pair_enc.as_ref().map_or(0, |e| e.len())
            + self.neg_enc.as_ref().map_or(0, |e| e.len())
    }
}

/// Training examples: in memory, or read on demand from the memory-mapped shards of a
/// corpus prepared by `berth data prepare` (pretraining), so that the corpus size is not
/// bounded by memory.
pub enum TrainSet {
    /// Decoded examples.
    Memory(Vec<Example>),
    /// Packed pretraining sequences, decoded when a batch needs them.
    Shards(crate::corpus::Shards),
}

impl TrainSet {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            TrainSet::Memory(v) => v.len(),
            TrainSet::Shards(s) => s.len(),
        }
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`.
    pub fn get(&self, i: usize) -> std::borrow::Cow<'_, Example> {
        match self {
            TrainSet::Memory(v) => std::borrow::Cow::Borrowed(&v[i]),
            TrainSet::Shards(s) => std::borrow::Cow::Owned(crate::pretrain::example(s.sequence(i))),
        }
    }

    /// Tokens over all examples.
    pub fn tokens(&self) -> usize {
        match self {
            TrainSet::Memory(v) => v.iter().map(Example::tokens).sum(),
            TrainSet::Shards(s) => s.tokens(),
        }
    }
}

impl From<Vec<Example>> for TrainSet {
    fn from(v: Vec<Example>) -> Self {
        TrainSet::Memory(v)
    }
}

/// The prepared data of a run.
pub struct Prepared {
    /// Label names (empty for regression).
    pub labels: Vec<String>,
    /// Training examples.
    pub train: TrainSet,
    /// Dev examples.
    pub dev: Vec<Example>,
    /// Rows skipped as malformed (with `skip_bad_rows`).
    pub skipped: usize,
    /// QA: the dev questions, answered by the QA pipeline for EM / F1.
    pub qa_dev: Vec<data::SquadQuestion>,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// An optimizer step.
    Step {
        /// Steps taken.
        step: u64,
        /// Total steps of the schedule.
        total: u64,
        /// Epoch (fractional).
        epoch: f64,
        /// Mean training loss of the step's micro-batches.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Training tokens per second over the step.
        tokens_per_s: f64,
    },
    /// A dev evaluation.
    Eval {
        /// Steps taken.
        step: u64,
        /// Epoch (fractional).
        epoch: f64,
        /// Metric name → value.
        eval: serde_json::Map<String, serde_json::Value>,
    },
}

fn head_for(cfg: &TrainConfig, labels: &[String]) -> TaskHead {
    match cfg.task {
        Task::Pretrain => TaskHead {
            kind: if cfg.rtd_weight.is_some() {
                HeadKind::ReplacedTokenDetection
            } else {
                HeadKind::MaskedLm
            },
            labels: Vec::new(),
            problem_type: None,
            sentence_order: cfg.sentence_objective.is_some(),
        },
        // Embed trains the bare encoder; this head is never built (see `init::load_encoder`).
        Task::Embed => TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: Vec::new(),
            problem_type: None,
            sentence_order: false,
        },
        Task::Rerank => TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: vec!["LABEL_0".into()],
            problem_type: None,
            sentence_order: false,
        },
        Task::Classify if cfg.multi_label => TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: labels.to_vec(),
            problem_type: Some("multi_label_classification".into()),
            sentence_order: false,
        },
        Task::Classify if cfg.regression => TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: vec!["LABEL_0".into()],
            problem_type: Some("regression".into()),
            sentence_order: false,
        },
        Task::Classify => TaskHead {
            kind: HeadKind::SequenceClassification,
            labels: labels.to_vec(),
            problem_type: Some("single_label_classification".into()),
            sentence_order: false,
        },
        Task::Ner => TaskHead {
            kind: HeadKind::TokenClassification,
            labels: labels.to_vec(),
            problem_type: None,
            sentence_order: false,
        },
        Task::Qa => TaskHead {
            kind: HeadKind::QuestionAnswering,
            labels: Vec::new(),
            problem_type: None,
            sentence_order: false,
        },
    }
}

/// Reads, splits, labels and tokenizes the data.
pub fn prepare(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    match cfg.task {
        Task::Classify => prepare_classify(cfg, tok),
        Task::Ner => prepare_ner(cfg, tok),
        Task::Qa => prepare_qa(cfg, tok),
        Task::Embed => crate::retrieval::prepare_embed(cfg, tok),
        Task::Rerank => crate::retrieval::prepare_rerank(cfg, tok),
        Task::Pretrain => crate::pretrain::prepare_pretrain(cfg, tok),
    }
}

fn unseen(path: &Path, line: usize, label: &str) -> TrainError {
    TrainError::Data {
        path: path.into(),
        line,
        message: format!("label {label:?} does not occur in the training data"),
    }
}

fn prepare_classify(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let cols = Columns {
        text: Column::parse(&cfg.text_column),
        pair: cfg.pair_column.as_deref().map(Column::parse),
        label: Some(Column::parse(&cfg.label_column)),
        extra: None,
    };
    let (train, mut skipped) = data::read_text_examples(&cfg.train, &cols, cfg.skip_bad_rows)?;
    let (train, dev, dev_path) = match &cfg.dev {
        Some(d) => {
            let (dev, s) = data::read_text_examples(d, &cols, cfg.skip_bad_rows)?;
            skipped += s;
            (train, dev, d.clone())
        }
        None => {
            let (t, d) = data::split(&train, cfg.dev_fraction, cfg.seed);
            (t, d, cfg.train.clone())
        }
    };
    // A row's label names: one, or several split on the separator (multi-label; none is
    // allowed: every target 0).
    let split = |label: &str| -> Vec<String> {
        if cfg.multi_label {
            label
                .split(cfg.label_separator.as_str())
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        } else {
            vec![label.to_string()]
        }
    };
    let mut labels: Vec<String> = Vec::new();
    if !cfg.regression {
        labels = match &cfg.fixed_labels {
            Some(l) => l.clone(),
            None => train
                .iter()
                .flat_map(|e| split(&e.label))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        for e in &dev {
            if let Some(l) = split(&e.label).iter().find(|l| !labels.contains(l)) {
                return Err(unseen(&dev_path, e.line, l));
            }
        }
    }
    let encode = |items: &[data::TextExample], path: &Path| -> Result<Vec<Example>> {
        use rayon::prelude::*;
        items
            .par_iter()
            .map(|e| {
                let enc = tok.encode(
                    &e.text,
                    e.pair.as_deref(),
                    cfg.max_length,
                    Truncation::Truncate,
                    e.line,
                )?;
                let mut targets = Vec::new();
                if cfg.multi_label {
                    targets = vec![0f32; labels.len()];
                    for l in split(&e.label) {
                        targets[labels.iter().position(|x| *x == l).expect("seen above")] = 1.0;
                    }
                }
                let (class, value) = if cfg.multi_label {
                    (None, 0.0)
                } else if cfg.regression {
                    let v: f32 = e.label.parse().map_err(|_| TrainError::Data {
                        path: path.into(),
                        line: e.line,
                        message: format!("regression label {:?} is not a number", e.label),
                    })?;
                    (None, v)
                } else {
                    (
                        labels.iter().position(|l| *l == e.label).map(|i| i as u32),
                        0.0,
                    )
                };
                Ok(Example {
                    enc,
                    class,
                    value,
                    token_labels: Vec::new(),
                    words: Vec::new(),
                    span: None,
                    pair_enc: None,
                    neg_enc: None,
                    targets,
                    group: 0,
                })
            })
            .collect()
    };
    Ok(Prepared {
        train: encode(&train, &cfg.train)?.into(),
        dev: encode(&dev, &dev_path)?,
        labels,
        skipped,
        qa_dev: Vec::new(),
    })
}

fn prepare_ner(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let (train, mut skipped) = data::read_conll(&cfg.train, cfg.tag_column, cfg.skip_bad_rows)?;
    let (train, dev, dev_path) = match &cfg.dev {
        Some(d) => {
            let (dev, s) = data::read_conll(d, cfg.tag_column, cfg.skip_bad_rows)?;
            skipped += s;
            (train, dev, d.clone())
        }
        None => {
            let (t, d) = data::split(&train, cfg.dev_fraction, cfg.seed);
            (t, d, cfg.train.clone())
        }
    };
    let labels: Vec<String> = match &cfg.fixed_labels {
        Some(l) => l.clone(),
        None => train
            .iter()
            .flat_map(|s| s.tags.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    for s in &dev {
        if let Some((i, t)) = s.tags.iter().enumerate().find(|(_, t)| !labels.contains(t)) {
            return Err(unseen(&dev_path, s.line + i, t));
        }
    }
    let encode = |items: &[data::TaggedSentence]| -> Result<Vec<Example>> {
        use rayon::prelude::*;
        items
            .par_iter()
            .map(|s| {
                let enc = tok.encode_words(&s.words, cfg.max_length, s.line)?;
                let mut prev: Option<u32> = None;
                let token_labels = enc
                    .word_ids
                    .iter()
                    .map(|w| {
                        let out = match *w {
                            None => None,
                            Some(w) if Some(w) != prev || cfg.label_all_tokens => labels
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
                Ok(Example {
                    enc,
                    class: None,
                    value: 0.0,
                    token_labels,
                    words,
                    span: None,
                    pair_enc: None,
                    neg_enc: None,
                    targets: Vec::new(),
                    group: 0,
                })
            })
            .collect()
    };
    Ok(Prepared {
        train: encode(&train)?.into(),
        dev: encode(&dev)?,
        labels,
        skipped,
        qa_dev: Vec::new(),
    })
}

/// Answer token span of one window, as transformers' run_qa labels it: the tokens covering the
/// first answer's characters when the window holds all of it, else [CLS] (0, 0).
fn answer_span(w: &Encoded, answer: Option<&(String, usize)>) -> (u32, u32) {
    let Some((text, start)) = answer else {
        return (0, 0);
    };
    let (start, end) = (*start, *start + text.chars().count());
    let ctx: Vec<usize> = (0..w.len())
        .filter(|&t| w.sequence_ids[t] == Some(1))
        .collect();
    let (Some(&first), Some(&last)) = (ctx.first(), ctx.last()) else {
        return (0, 0);
    };
    if !(w.offsets[first].0 <= start && w.offsets[last].1 >= end) {
        return (0, 0);
    }
    let mut s = first;
    while s <= last && w.offsets[s].0 <= start {
        s += 1;
    }
    let mut e = last;
    while e >= first && w.offsets[e].1 >= end {
        e -= 1;
    }
    ((s - 1) as u32, (e + 1) as u32)
}

fn prepare_qa(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let (train, mut skipped) = data::read_squad(&cfg.train, cfg.skip_bad_rows)?;
    let (train, dev) = match &cfg.dev {
        Some(d) => {
            let (dev, s) = data::read_squad(d, cfg.skip_bad_rows)?;
            skipped += s;
            (train, dev)
        }
        None => data::split(&train, cfg.dev_fraction, cfg.seed),
    };
    use rayon::prelude::*;
    let windows: Vec<Vec<Example>> = train
        .par_iter()
        .enumerate()
        .map(|(i, q)| {
            let ws = tok.encode_windows(
                &q.question,
                Some(&q.context),
                cfg.max_length,
                cfg.doc_stride,
                i,
            )?;
            Ok(ws
                .into_iter()
                .map(|enc| {
                    let span = Some(answer_span(&enc, q.answers.first()));
                    Example {
                        span,
                        ..Example::new(enc)
                    }
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    Ok(Prepared {
        train: windows.into_iter().flatten().collect::<Vec<_>>().into(),
        dev: Vec::new(),
        labels: Vec::new(),
        skipped,
        qa_dev: dev,
    })
}

/// Packs examples into one batch.
fn pack(examples: &[&Example]) -> Result<Batch> {
    Ok(Batch::from_sequences(examples.iter().map(|e| {
        (e.enc.ids.as_slice(), e.enc.type_ids.as_slice())
    }))?)
}

/// What a batch's loss depends on besides its examples.
#[derive(Debug, Clone, Copy)]
pub struct LossSpec {
    /// Task.
    pub task: Task,
    /// Classify: regression (MSE).
    pub regression: bool,
    /// Classify: multi-label (BCE over labels).
    pub multi_label: bool,
    /// Embed: how token states become a sentence vector.
    pub pooling: Pooling,
    /// Embed: similarity scale.
    pub scale: f64,
    /// Pretrain: how tokens are masked.
    pub masking: Option<crate::mlm::MaskingConfig>,
}

impl LossSpec {
    /// The loss of `cfg`'s run (embed pools as the base model's sentence-transformers
    /// config says, else by mean).
    pub fn of(cfg: &TrainConfig) -> Result<Self> {
        Ok(LossSpec {
            task: cfg.task,
            regression: cfg.regression,
            multi_label: cfg.multi_label,
            pooling: if cfg.task == Task::Embed {
                crate::retrieval::training_pooling(&cfg.model)?
            } else {
                Pooling::Mean
            },
            scale: cfg.similarity_scale,
            masking: None,
        })
    }
}

/// The task loss of one micro-batch (`None` when it has nothing to learn from, e.g. every
/// token ignored), and its token count.
pub fn batch_loss(
    model: &Model,
    task: Task,
    regression: bool,
    examples: &[&Example],
    d: Option<&Dropout>,
) -> Result<Option<candle_core::Tensor>> {
    let spec = LossSpec {
        task,
        regression,
        multi_label: false,
        pooling: Pooling::Mean,
        scale: default_scale(),
        masking: None,
    };
    batch_loss_with(model, &spec, examples, 0, d)
}

/// [`batch_loss`] for any [`LossSpec`]; `seed` draws the batch's masking (pretraining).
pub fn batch_loss_with(
    model: &Model,
    spec: &LossSpec,
    examples: &[&Example],
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Option<candle_core::Tensor>> {
    if spec.task == Task::Pretrain {
        let masking = spec.masking.as_ref().ok_or_else(|| {
            TrainError::Config("pretraining needs a masking configuration".into())
        })?;
        return crate::pretrain::mlm_loss(model, examples, masking, seed, d);
    }
    if spec.task == Task::Embed {
        return crate::retrieval::mnrl_loss(model, examples, spec.pooling, spec.scale, d);
    }
    let batch = pack(examples)?;
    if matches!(spec.task, Task::Classify | Task::Rerank) {
        // The head reads first tokens only: the last layer computes just those rows.
        let rows = Model::first_token_rows(&batch);
        let first = model.forward_train_rows(&batch, d, &rows)?;
        return first_token_loss(model, spec, examples, &first, d);
    }
    let hidden = model.forward_train(&batch, d)?;
    loss_from_hidden(model, spec, examples, &batch, &hidden, d)
}

/// The loss of a sequence-level task (classification, reranking) from the first tokens'
/// last hidden states `[S, H]`.
fn first_token_loss(
    model: &Model,
    spec: &LossSpec,
    examples: &[&Example],
    first: &candle_core::Tensor,
    d: Option<&Dropout>,
) -> Result<Option<candle_core::Tensor>> {
    let logits = model.sequence_logits_first(first, d)?;
    match spec.task {
        Task::Rerank => crate::retrieval::rerank_loss(examples, &logits),
        Task::Classify if spec.multi_label => {
            let t = loss::targets(
                &examples
                    .iter()
                    .map(|e| e.targets.clone())
                    .collect::<Vec<_>>(),
            )?;
            Ok(Some(loss::bce_with_logits(&logits, &t)?))
        }
        Task::Classify if spec.regression => {
            let t = loss::targets(&examples.iter().map(|e| vec![e.value]).collect::<Vec<_>>())?;
            Ok(Some(loss::mse(&logits, &t)?))
        }
        Task::Classify => loss::cross_entropy(
            &logits,
            &examples.iter().map(|e| e.class).collect::<Vec<_>>(),
        ),
        _ => unreachable!("sequence-level tasks only"),
    }
}

/// The task loss of packed `examples` from their last hidden state (the head runs here).
fn loss_from_hidden(
    model: &Model,
    spec: &LossSpec,
    examples: &[&Example],
    batch: &Batch,
    hidden: &candle_core::Tensor,
    d: Option<&Dropout>,
) -> Result<Option<candle_core::Tensor>> {
    match spec.task {
        Task::Embed | Task::Pretrain => unreachable!("handled in batch_loss_with"),
        Task::Rerank | Task::Classify => first_token_loss(
            model,
            spec,
            examples,
            &Model::first_tokens(hidden, batch)?,
            d,
        ),
        Task::Ner => {
            let labels: Vec<Option<u32>> = examples
                .iter()
                .flat_map(|e| e.token_labels.iter().copied())
                .collect();
            // Only labelled tokens go through the classifier.
            let rows: Vec<u32> = (0..labels.len() as u32)
                .filter(|&i| labels[i as usize].is_some())
                .collect();
            if rows.is_empty() {
                return Ok(None);
            }
            let logits = model.token_logits_train(&Model::select_rows(hidden, &rows)?, d)?;
            let kept: Vec<Option<u32>> = rows.iter().map(|&i| labels[i as usize]).collect();
            loss::cross_entropy(&logits, &kept)
        }
        Task::Qa => {
            // (start loss + end loss) / 2, each a softmax over its window's tokens.
            let (start, end) = model.qa_logits_train(hidden, d)?;
            let mut total: Option<candle_core::Tensor> = None;
            for (k, e) in examples.iter().enumerate() {
                let r = batch.range(k);
                let (s, t) = e.span.expect("QA examples carry a span");
                let one =
                    |logits: &candle_core::Tensor, target: u32| -> Result<candle_core::Tensor> {
                        let row = logits.narrow(0, r.start, r.len())?.unsqueeze(0)?;
                        Ok(loss::cross_entropy(&row, &[Some(target)])?.expect("one labelled row"))
                    };
                let l = ((one(&start, s)? + one(&end, t)?)? * 0.5)?;
                total = Some(match total {
                    None => l,
                    Some(acc) => (acc + l)?,
                });
            }
            Ok(total.map(|t| t / examples.len() as f64).transpose()?)
        }
    }
}

/// Dev metrics: accuracy and macro-F1 (classify), Pearson / Spearman (regression), or
/// conlleval precision / recall / F1 (NER, on each word's first sub-token).
pub fn evaluate(
    model: &Model,
    tok: &TextTokenizer,
    cfg: &TrainConfig,
    data: &Prepared,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let (labels, dev) = (&data.labels, &data.dev);
    let spec = LossSpec::of(cfg)?;
    match cfg.task {
        Task::Embed => {
            return crate::retrieval::evaluate_embed(model, dev, spec.pooling, spec.scale)
        }
        Task::Rerank => return crate::retrieval::evaluate_rerank(model, dev),
        Task::Pretrain => {
            let masking = crate::pretrain::masking(cfg, tok, model)?;
            return crate::pretrain::evaluate_mlm(model, dev, &masking, cfg.seed);
        }
        _ => {}
    }
    let mut out = serde_json::Map::new();
    if cfg.task == Task::Qa {
        // The QA pipeline answers each dev question (windows, spans up to 30 tokens, as
        // transformers' run_qa post-processing); EM / F1 as the SQuAD script scores them.
        let p = berth_tasks::Pipeline {
            model: model.clone(),
            tokenizer: tok.clone(),
            max_length: cfg.max_length,
            truncation: Truncation::Truncate,
        };
        let opts = berth_tasks::QaOptions {
            max_seq_len: Some(cfg.max_length),
            doc_stride: Some(cfg.doc_stride),
            max_answer_len: 30,
            ..berth_tasks::QaOptions::default()
        };
        let (mut em, mut f1) = (0.0, 0.0);
        for chunk in data.qa_dev.chunks(256) {
            let inputs: Vec<berth_tasks::QaInput> = chunk
                .iter()
                .map(|q| berth_tasks::QaInput {
                    question: q.question.clone(),
                    context: q.context.clone(),
                })
                .collect();
            for (q, a) in chunk
                .iter()
                .zip(berth_tasks::answer(&p, &inputs, &opts, 0)?)
            {
                let golds: Vec<String> = q.answers.iter().map(|(t, _)| t.clone()).collect();
                let (e, f) =
                    metrics::squad::score(&golds, a.first().map_or("", |a| a.answer.as_str()));
                em += e;
                f1 += f;
            }
        }
        let n = data.qa_dev.len().max(1) as f64;
        out.insert("exact_match".into(), (100.0 * em / n).into());
        out.insert("f1".into(), (100.0 * f1 / n).into());
        return Ok(out);
    }
    let mut gold = Vec::new();
    let mut pred = Vec::new();
    let (mut gv, mut pv) = (Vec::new(), Vec::new());
    let mut conll: Vec<String> = Vec::new();
    let mut multi: Vec<(Vec<f32>, Vec<bool>)> = Vec::new();
    let mut loss_sum = 0.0;
    let mut loss_n = 0usize;
    for chunk in dev.chunks(64) {
        let refs: Vec<&Example> = chunk.iter().collect();
        // One forward per chunk serves both the dev loss and the predictions.
        let batch = pack(&refs)?;
        let hidden = model.forward(&batch)?;
        if let Some(l) = loss_from_hidden(model, &spec, &refs, &batch, &hidden, None)? {
            loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
            loss_n += refs.len();
        }
        match cfg.task {
            Task::Qa | Task::Embed | Task::Rerank | Task::Pretrain => {
                unreachable!("evaluated above")
            }
            Task::Classify => {
                let logits = model.sequence_logits(&hidden, &batch)?.to_vec2::<f32>()?;
                for (e, row) in chunk.iter().zip(logits) {
                    if cfg.multi_label {
                        // A label is predicted when its sigmoid passes 0.5 (logit > 0).
                        multi.push((e.targets.clone(), row.iter().map(|&v| v > 0.0).collect()));
                    } else if cfg.regression {
                        gv.push(e.value as f64);
                        pv.push(row[0] as f64);
                    } else {
                        gold.push(
                            labels[e.class.expect("classify examples carry a class") as usize]
                                .clone(),
                        );
                        let best =
                            (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                        pred.push(labels[best].clone());
                    }
                }
            }
            Task::Ner => {
                let logits = model.token_logits(&hidden)?.to_vec2::<f32>()?;
                for (s, e) in chunk.iter().enumerate() {
                    let rows = batch.range(s);
                    let mut tags = vec!["O".to_string(); e.words.len()];
                    let mut seen = vec![false; e.words.len()];
                    for (t, w) in e.enc.word_ids.iter().enumerate() {
                        if let Some(w) = *w {
                            let w = w as usize;
                            if !seen[w] {
                                seen[w] = true;
                                let row = &logits[rows.start + t];
                                let best =
                                    (0..row.len())
                                        .fold(0, |b, i| if row[i] > row[b] { i } else { b });
                                tags[w] = labels[best].clone();
                            }
                        }
                    }
                    // Words cut off by max_length are predicted O, as a truncating pipeline would.
                    for ((word, gold), p) in e.words.iter().zip(tags) {
                        conll.push(format!("{word} {gold} {p}"));
                    }
                    conll.push(String::new());
                }
            }
        }
    }
    if loss_n > 0 {
        out.insert("loss".into(), (loss_sum / loss_n as f64).into());
    }
    match cfg.task {
        Task::Classify if cfg.multi_label => multi_label_metrics(&multi, labels.len(), &mut out),
        Task::Classify if cfg.regression => {
            out.insert("pearson".into(), metrics::pearson(&gv, &pv).into());
            out.insert("spearman".into(), metrics::spearman(&gv, &pv).into());
        }
        Task::Classify => {
            let r = metrics::classification_report(&gold, &pred);
            out.insert("accuracy".into(), r.accuracy.into());
            out.insert("macro_f1".into(), r.macro_avg.f1.into());
        }
        Task::Qa | Task::Embed | Task::Rerank | Task::Pretrain => unreachable!("handled above"),
        Task::Ner => {
            let r = metrics::conlleval::evaluate(conll.iter().map(String::as_str), ' ').map_err(
                |e| TrainError::Config(format!("dev tags: line {}: {}", e.line, e.message)),
            )?;
            out.insert("precision".into(), r.overall.precision().into());
            out.insert("recall".into(), r.overall.recall().into());
            out.insert("f1".into(), r.overall.f1().into());
            out.insert("accuracy".into(), r.accuracy().into());
        }
    }
    Ok(out)
}

/// Refuses a token limit beyond the model's position table.
fn check_max_length(cfg: &TrainConfig, model: &Model) -> Result<()> {
    let limit = model.config.max_sequence_length();
    if cfg.max_length > limit {
        return Err(TrainError::Config(format!(
            "--max-length {} exceeds the {} positions of {} (pass --max-length {limit} or less)",
            cfg.max_length,
            limit,
            cfg.model.display()
        )));
    }
    Ok(())
}

/// Scores the trained model at `cfg.model` on `data` with the task's dev metrics (the
/// same code that evaluates during fine-tuning): `cfg.task` and the column settings say how
/// to read the file; classify / NER labels are the model's own `id2label`.
pub fn evaluate_model(
    cfg: &TrainConfig,
    data: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let tok = TextTokenizer::from_dir(&cfg.model)?;
    let (mut model, report) = Model::load(&cfg.model, false)?;
    let rtd = cfg.task == Task::Pretrain && model.has_head(HeadKind::ReplacedTokenDetection);
    let needed = match cfg.task {
        Task::Pretrain if rtd => Some(HeadKind::ReplacedTokenDetection),
        Task::Classify | Task::Rerank => Some(HeadKind::SequenceClassification),
        Task::Ner => Some(HeadKind::TokenClassification),
        Task::Qa => Some(HeadKind::QuestionAnswering),
        Task::Pretrain => Some(HeadKind::MaskedLm),
        Task::Embed => None,
    };
    if let Some(kind) = needed {
        if !model.has_head(kind) {
            return Err(TrainError::Config(format!(
                "{}: {} (the model has no {} head{})",
                cfg.model.display(),
                model.missing_head(kind),
                kind.name(),
                report
                    .missing_head
                    .map_or(String::new(), |(_, key)| format!("; missing {key}"))
            )));
        }
    }
    model.set_precision(berth_model::Precision::F32)?;
    check_max_length(cfg, &model)?;
    let mut cfg = cfg.clone();
    cfg.train = data.into();
    cfg.dev = Some(data.into());
    if matches!(cfg.task, Task::Classify | Task::Ner) && !cfg.regression {
        cfg.fixed_labels = Some(model.config.id2label.clone());
    }
    let mut prepared = prepare(&cfg, &tok)?;
    prepared.train = TrainSet::Memory(Vec::new());
    if rtd {
        // An ELECTRA discriminator is scored with the generator saved beside it.
        let (mut generator, _) = Model::load(&cfg.model.join(crate::rtd::GENERATOR_DIR), false)?;
        generator.set_precision(berth_model::Precision::F32)?;
        let masking = crate::pretrain::masking(&cfg, &tok, &model)?;
        return crate::rtd::evaluate(&generator, &model, &prepared.dev, &masking, cfg.seed);
    }
    evaluate(&model, &tok, &cfg, &prepared)
}

/// Multi-label scores from (gold targets, predicted flags) per row: subset accuracy (every
/// label right), micro-F1 over all (row, label) decisions, macro-F1 (mean of per-label F1,
/// 0 for a label never predicted nor gold, as scikit-learn's zero_division=0).
fn multi_label_metrics(
    rows: &[(Vec<f32>, Vec<bool>)],
    labels: usize,
    out: &mut serde_json::Map<String, serde_json::Value>,
) {
    let (mut tp, mut fp, mut fn_) = (
        vec![0usize; labels],
        vec![0usize; labels],
        vec![0usize; labels],
    );
    let mut exact = 0usize;
    for (gold, pred) in rows {
        let mut all = true;
        for l in 0..labels {
            let g = gold[l] > 0.5;
            match (g, pred[l]) {
                (true, true) => tp[l] += 1,
                (false, true) => fp[l] += 1,
                (true, false) => fn_[l] += 1,
                (false, false) => {}
            }
            all &= g == pred[l];
        }
        exact += all as usize;
    }
    let f1 = |tp: usize, fp: usize, fn_: usize| {
        if tp == 0 {
            0.0
        } else {
            2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
        }
    };
    let sum = |v: &[usize]| v.iter().sum::<usize>();
    let macro_f1 =
        (0..labels).map(|l| f1(tp[l], fp[l], fn_[l])).sum::<f64>() / labels.max(1) as f64;
    out.insert(
        "subset_accuracy".into(),
        (exact as f64 / rows.len().max(1) as f64).into(),
    );
    out.insert("micro_f1".into(), f1(sum(&tp), sum(&fp), sum(&fn_)).into());
    out.insert("macro_f1".into(), macro_f1.into());
}

/// The metric that decides the best checkpoint and early stopping (higher is better).
pub fn main_metric(cfg: &TrainConfig) -> &'static str {
    match cfg.task {
        Task::Embed | Task::Rerank => "mrr@10",
        Task::Pretrain => "masked_accuracy",
        Task::Classify if cfg.multi_label => "micro_f1",
        Task::Classify if cfg.regression => "spearman",
        Task::Classify => "accuracy",
        Task::Ner | Task::Qa => "f1",
    }
}

/// Numbers derived from the config and data, printed before step 0.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Training examples.
    pub train_examples: usize,
    /// Dev examples.
    pub dev_examples: usize,
    /// Labels.
    pub labels: Vec<String>,
    /// Micro-batches per epoch.
    pub batches_per_epoch: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps in all.
    pub total_steps: u64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Effective batch size (batch size × accumulation).
    pub effective_batch: usize,
    /// Trainable parameters.
    pub parameters: usize,
    /// Training tokens per epoch (no padding: what is computed).
    pub tokens_per_epoch: usize,
    /// Malformed rows skipped.
    pub skipped_rows: usize,
    /// Step resumed from (0 for a fresh run).
    pub resumed_at: u64,
}

/// Runs (or resumes) a fine-tuning run; `on_event` sees every step and evaluation, and
/// `on_plan` the derived numbers before step 0. Returns the path of the best checkpoint.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    on_plan: &mut dyn FnMut(&Plan),
    on_event: &mut dyn FnMut(&Event),
) -> Result<PathBuf> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.epochs == 0 {
        return Err(TrainError::Config(
            "batch size, gradient accumulation and epochs must be at least 1".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.output).map_err(io(&cfg.output))?;
    let cfg_path = cfg.output.join("config.json");
    let cfg_text = serde_json::to_string_pretty(cfg).expect("config serialises");
    // Written atomically: a full disk must not leave a truncated config behind.
    let tmp = cfg.output.join(".config.json.tmp");
    std::fs::write(&tmp, &cfg_text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &cfg_path).map_err(io(&cfg_path))?;

    // Data.
    let tok = TextTokenizer::from_dir(&cfg.model)?;
    let data = prepare(cfg, &tok)?;
    let head = head_for(cfg, &data.labels);

    // Model and optimizer: fresh, or from the newest checkpoint.
    let latest = if resume {
        checkpoint::list(&cfg.output)?.pop()
    } else {
        None
    };
    let from = latest
        .as_ref()
        .map_or(cfg.model.as_path(), |(_, d)| d.as_path());
    let (model, model_config) = if cfg.task == Task::Embed {
        crate::init::load_encoder(from)?
    } else {
        load_for_task(from, &head, cfg.seed)?
    };
    let mut spec = LossSpec::of(cfg)?;
    if cfg.task == Task::Pretrain {
        spec.masking = Some(crate::pretrain::masking(cfg, &tok, &model)?);
    }
    check_max_length(cfg, &model)?;
    // Replaced-token detection: the generator beside the model, sharing its embeddings, one
    // optimizer over both.
    let generator = match cfg.rtd_weight {
        Some(_) if cfg.task == Task::Pretrain => {
            let head = TaskHead {
                kind: HeadKind::MaskedLm,
                labels: Vec::new(),
                problem_type: None,
                sentence_order: false,
            };
            let (mut g, g_config) =
                load_for_task(&from.join(crate::rtd::GENERATOR_DIR), &head, cfg.seed)?;
            crate::rtd::share_embeddings(&mut g, &model)?;
            Some((g, g_config))
        }
        _ => None,
    };
    let mut opt = match &generator {
        Some((g, _)) => AdamW::new(&crate::rtd::joint_params(g, &model), cfg.adamw),
        None => AdamW::new(&model.params, cfg.adamw),
    };
    let mut state = TrainerState {
        format_version: FORMAT_VERSION,
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: cfg.seed,
        best: None,
        evals_without_improvement: 0,
    };
    if let Some((_, dir)) = &latest {
        let (saved, tensors) = checkpoint::read_state(dir)?;
        if saved.seed != cfg.seed {
            return Err(TrainError::Checkpoint {
                path: dir.clone(),
                message: format!("was trained with seed {}, not {}", saved.seed, cfg.seed),
            });
        }
        opt.load_state(&tensors, saved.step, &dir.join("optimizer.safetensors"))?;
        state = saved;
    }

    // The schedule.
    let batches_per_epoch = data.train.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum) as u64;
    let total = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs as u64);
    let epochs = total.div_ceil(steps_per_epoch.max(1)) as usize;
    let warmup = cfg
        .warmup_steps
        .unwrap_or((cfg.warmup_ratio * total as f64).ceil() as u64);
    let schedule = Schedule {
        kind: cfg.schedule,
        base_lr: cfg.lr,
        warmup,
        total,
    };
    let last_step = total;
    on_plan(&Plan {
        train_examples: data.train.len(),
        dev_examples: data.dev.len() + data.qa_dev.len(),
        labels: data.labels.clone(),
        batches_per_epoch,
        steps_per_epoch,
        total_steps: total,
        warmup_steps: warmup,
        effective_batch: cfg.batch_size * cfg.grad_accum,
        parameters: model.num_parameters(),
        tokens_per_epoch: data.train.tokens(),
        skipped_rows: data.skipped,
        resumed_at: state.step,
    });

    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.output.join("metrics.jsonl"))
        .map_err(io(&cfg.output.join("metrics.jsonl")))?;
    let mut emit = |e: &Event, log: &mut std::fs::File| -> Result<()> {
        use std::io::Write;
        writeln!(
            log,
            "{}",
            serde_json::to_string(e).expect("events serialise")
        )
        .map_err(io(&cfg.output.join("metrics.jsonl")))?;
        on_event(e);
        Ok(())
    };
    let mut best_dir = latest.as_ref().map(|(_, d)| d.clone());
    let (mut loss_acc, mut loss_count, mut tokens, mut t0) =
        (0.0f64, 0usize, 0usize, Instant::now());

    'epochs: for epoch in state.epoch..epochs {
        // The epoch's data order.
        let mut order: Vec<usize> = (0..data.train.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
            berth_kernels::seed_stream(cfg.seed, epoch as u64),
        ));
        if let Some(path) = &cfg.dump_order {
            use std::io::Write;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io(path))?;
            let mut w = std::io::BufWriter::new(f);
            for &i in &order {
                writeln!(
                    w,
                    "{}",
                    serde_json::json!({"epoch": epoch, "ids": data.train.get(i).enc.ids})
                )
                .map_err(io(path))?;
            }
            w.flush().map_err(io(path))?;
        }
        let batches: Vec<&[usize]> = order.chunks(cfg.batch_size).collect();
        let first = if epoch == state.epoch {
            state.batch_in_epoch
        } else {
            0
        };
        for group_start in (first..batches.len()).step_by(cfg.grad_accum) {
            if state.step >= last_step {
                break 'epochs;
            }
            let group = &batches[group_start..(group_start + cfg.grad_accum).min(batches.len())];
            // Forward and backward over the step's micro-batches, dropout seeded by position.
            let lr = schedule.lr(state.step);
            for (k, idx) in group.iter().enumerate() {
                let owned: Vec<std::borrow::Cow<Example>> =
                    idx.iter().map(|&i| data.train.get(i)).collect();
                let examples: Vec<&Example> = owned.iter().map(|e| e.as_ref()).collect();
                let micro = (epoch * batches.len() + group_start + k) as u64;
                let dropout = cfg
                    .dropout
                    .then(|| Dropout::new(berth_kernels::seed_stream(cfg.seed ^ 0xd0d0, micro)));
                // Masking is drawn afresh each time a batch is seen (dynamic masking).
                let mask_seed = berth_kernels::seed_stream(cfg.seed ^ 0x3a5c, micro);
                let loss = match (&generator, cfg.rtd_weight, &spec.masking) {
                    (Some((g, _)), Some(weight), Some(masking)) => crate::rtd::batch_loss(
                        g,
                        &model,
                        &examples,
                        masking,
                        weight,
                        mask_seed,
                        dropout.as_ref(),
                    )?,
                    _ => batch_loss_with(&model, &spec, &examples, mask_seed, dropout.as_ref())?,
                };
                if let Some(loss) = loss {
                    loss_acc += loss.to_scalar::<f32>()? as f64;
                    loss_count += 1;
                    let mut grads = model.backward(&(loss / cfg.grad_accum as f64)?)?;
                    if let Some((g, _)) = &generator {
                        g.collect_grads(&mut grads)?;
                    }
                    opt.accumulate(&grads, 1.0)?;
                }
                tokens += examples.iter().map(|e| e.tokens()).sum::<usize>();
            }
            let grad_norm = opt.clip(cfg.max_grad_norm);
            opt.step(lr)?;
            state.step += 1;
            state.batch_in_epoch = group_start + group.len();
            state.epoch = epoch;
            if state.batch_in_epoch == batches.len() {
                state.epoch = epoch + 1;
                state.batch_in_epoch = 0;
            }
            let epoch_f = epoch as f64 + (group_start + group.len()) as f64 / batches.len() as f64;
            if state.step.is_multiple_of(cfg.log_every) || state.step == last_step {
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                let ev = Event::Step {
                    step: state.step,
                    total,
                    epoch: epoch_f,
                    loss: loss_acc / loss_count.max(1) as f64,
                    lr,
                    grad_norm,
                    tokens_per_s: tokens as f64 / secs,
                };
                emit(&ev, &mut log)?;
                (loss_acc, loss_count, tokens, t0) = (0.0, 0, 0, Instant::now());
            }
            // Evaluate, checkpoint, and maybe stop.
            let boundary = match cfg.save_every {
                Some(n) => state.step.is_multiple_of(n),
                None => state.batch_in_epoch == 0,
            };
            if boundary || state.step == last_step {
                let paused = Instant::now();
                let eval = match (&generator, &spec.masking) {
                    (Some((g, _)), Some(masking)) => {
                        crate::rtd::evaluate(g, &model, &data.dev, masking, cfg.seed)?
                    }
                    _ => evaluate(&model, &tok, cfg, &data)?,
                };
                let score = eval
                    .get(main_metric(cfg))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(f64::NAN);
                emit(
                    &Event::Eval {
                        step: state.step,
                        epoch: epoch_f,
                        eval,
                    },
                    &mut log,
                )?;
                let improved = state.best.is_none_or(|(b, _)| score > b);
                if improved {
                    state.best = Some((score, state.step));
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                }
                let sentence = (cfg.task == Task::Embed).then_some((
                    cfg.model.as_path(),
                    spec.pooling,
                    cfg.max_length,
                ));
                let dir = checkpoint::save(
                    &cfg.output,
                    &model,
                    &model_config,
                    &cfg.model,
                    sentence,
                    generator
                        .as_ref()
                        .map(|(g, c)| (crate::rtd::GENERATOR_DIR, g, c)),
                    &opt,
                    &state,
                )?;
                if improved {
                    best_dir = Some(dir);
                }
                checkpoint::rotate(&cfg.output, cfg.keep_checkpoints, state.best.map(|b| b.1))?;
                // Evaluation and checkpointing are not training time: tokens/s leaves them out.
                t0 += paused.elapsed();
                if cfg
                    .early_stopping_patience
                    .is_some_and(|p| state.evals_without_improvement >= p)
                {
                    break 'epochs;
                }
            }
        }
    }
    best_dir
        .ok_or_else(|| TrainError::Config("no step was run (the run had already finished?)".into()))
}
