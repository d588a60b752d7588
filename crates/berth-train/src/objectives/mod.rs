//! The objectives, one file each, their settings ([`TaskKind`]), and the one place a run's
//! [`TaskConfig`] becomes an objective ([`build`]). Helpers they share are in `common`.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::objective::{check_max_length, DataConfig, Env, Metrics, Objective};

pub mod classify;
mod common;
pub mod embed;
pub mod mlm;
pub mod ner;
pub mod qa;
pub mod rerank;
pub mod rtd;

/// The objective of a run with its data and settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskConfig {
    /// The data.
    pub data: DataConfig,
    /// Which objective, with its own settings.
    #[serde(flatten)]
    pub kind: TaskKind,
}

/// One variant per objective (see [`crate::objectives`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum TaskKind {
    /// Sequence classification: single-label, multi-label or regression, texts or pairs.
    Classify(classify::ClassifyConfig),
    /// Token classification from CoNLL files.
    Ner(ner::NerConfig),
    /// Extractive question answering from SQuAD JSON.
    Qa(qa::QaConfig),
    /// Sentence embeddings (multiple-negatives ranking loss).
    Embed(embed::EmbedConfig),
    /// Cross-encoder reranking (BCE on one logit).
    Rerank(rerank::RerankConfig),
    /// Masked-LM pretraining, optionally with next-sentence / sentence-order prediction.
    Pretrain(mlm::MlmConfig),
    /// ELECTRA's replaced-token detection (a generator trained beside the model).
    Rtd(rtd::RtdConfig),
}

impl TaskKind {
    /// The task's name as config.json and the CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Classify(_) => "classify",
            TaskKind::Ner(_) => "ner",
            TaskKind::Qa(_) => "qa",
            TaskKind::Embed(_) => "embed",
            TaskKind::Rerank(_) => "rerank",
            TaskKind::Pretrain(_) => "pretrain",
            TaskKind::Rtd(_) => "rtd",
        }
    }
}

/// The objective of `task`: the single dispatch from configuration to code.
pub fn build(task: &TaskConfig) -> Box<dyn Objective> {
    let data = task.data.clone();
    match &task.kind {
        TaskKind::Classify(c) => Box::new(classify::Classify::new(data, c.clone())),
        TaskKind::Ner(c) => Box::new(ner::Ner::new(data, c.clone())),
        TaskKind::Qa(c) => Box::new(qa::Qa::new(data, c.clone())),
        TaskKind::Embed(c) => Box::new(embed::Embed::new(data, c.clone())),
        TaskKind::Rerank(c) => Box::new(rerank::Rerank::new(data, c.clone())),
        TaskKind::Pretrain(c) => Box::new(mlm::MaskedLm::new(data, c.clone())),
        TaskKind::Rtd(c) => Box::new(rtd::Rtd::new(data, c.clone())),
    }
}

/// Scores the trained checkpoint `model_dir` on the labelled file `data` with `task`'s dev
/// metrics — the code that evaluates during training, so the numbers agree with the run's
/// metrics.jsonl. Classification and NER use the checkpoint's own `id2label`.
pub fn evaluate_checkpoint(
    task: &TaskConfig,
    model_dir: &Path,
    data: &Path,
    seed: u64,
) -> Result<Metrics> {
    let mut task = task.clone();
    task.data.train = data.into();
    task.data.dev = Some(data.into());
    let env = Env::new(model_dir, seed);
    let mut objective = build(&task);
    let nets = objective.load_trained(model_dir, &env)?;
    check_max_length(objective.max_length(), &nets.main, model_dir)?;
    objective.prepare(&env)?;
    objective.evaluate(&nets)
}
