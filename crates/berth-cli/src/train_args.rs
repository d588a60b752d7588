//! Argument groups shared by the training commands (`finetune`, `pretrain`) and by
//! `eval --model`: the training loop's flags and the data-column flags, each defined once and
//! flattened into the subcommands, plus the one mapping from a task name and its flags to
//! berth-train's task configuration.
use std::path::{Path, PathBuf};

use berth_train::config::{LoopConfig, TrainDtype};
use berth_train::objective::DataConfig;
use berth_train::objectives::TaskKind;
use berth_train::objectives::{classify, embed, ner, qa, rerank};
use berth_train::schedule::ScheduleKind;
use clap::Args;

/// The training loop's flags. Defaults differ by command (fine-tuning follows the Hugging
/// Face Trainer, pretraining BERT's recipe), so they are filled in by [`LoopArgs::config`].
#[derive(Args)]
pub struct LoopArgs {
    /// Epochs (finetune 3, pretrain 1).
    #[arg(long)]
    epochs: Option<usize>,
    /// Train exactly N optimizer steps (overrides --epochs; the schedule spans them).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate (finetune 5e-5, pretrain 1e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Examples per micro-batch (more: steadier gradients, more memory per step).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Micro-batches per optimizer step (a larger effective batch at the same memory).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Warmup: a fraction of all steps (< 1) or a step count (>= 1) (finetune 0, pretrain 0.06).
    #[arg(long)]
    warmup: Option<f64>,
    /// Learning-rate shape after warmup.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    schedule: ScheduleKind,
    /// AdamW weight decay, not on biases and LayerNorm weights (finetune 0, pretrain 0.01).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of data order, dropout, masking and new weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Evaluate and checkpoint every N steps (default: each epoch).
    #[arg(long)]
    save_every: Option<u64>,
    /// Newest checkpoints kept besides the best (more: more disk).
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Log the loss every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    pub resume: bool,
    /// Start again in an --output that holds a run: its config, metrics, curve, initial
    /// model and checkpoints are deleted first. Without it (or --resume) a used --output is
    /// refused and nothing in it changes.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// How progress reaches stderr: text (a progress bar on a terminal, else one line per
    /// logged step and per evaluation, so redirected logs keep them) or json (each
    /// metrics.jsonl event as one line, for machines).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Train without dropout (pretraining: Cramming's and ModernBERT's choice for short
    /// runs; fine-tuning: for comparisons with eval-mode references). Checkpoints keep
    /// their dropout rates.
    #[arg(long)]
    no_dropout: bool,
    /// Number format of the matrix products, forward and backward: bf16 is mixed
    /// precision (bf16 operands, f32 accumulation; weights, optimizer and checkpoints stay
    /// f32), on AMX or AVX-512.
    #[arg(long, value_enum, default_value_t = TrainDtype::F32)]
    dtype: TrainDtype,
}

/// `--log-format` values.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable: a progress bar on a terminal, else plain lines.
    Text,
    /// One JSON object per line (the events metrics.jsonl holds).
    Json,
}

/// What shows that `--output` holds a run: a run that got as far as training writes them.
/// (A start that failed before step 0 leaves none: it can simply be run again.)
const RUN_MARKERS: [&str; 3] = ["config.json", "metrics.jsonl", "checkpoints"];

/// What a training run writes into its `--output` (and `--overwrite` deletes).
const RUN_FILES: [&str; 6] = [
    "config.json",
    "metrics.jsonl",
    "curve.png",
    "checkpoints",
    "init",
    "student-init",
];

impl LoopArgs {
    /// Makes sure a new run never mixes with an old one in `output`: with --resume the run
    /// continues; with --overwrite the old run's files are deleted; otherwise an `output`
    /// holding a run is refused before anything is written.
    /// Settings no run can use (NaN or negative learning rate, ...) are refused first, so a
    /// bad flag changes nothing on disk either.
    /// The returned lock keeps other runs out of `output` until it is dropped.
    /// Under MPI only rank 0 owns the folder: the other ranks claim nothing (`None`).
    pub fn claim_output_of(
        &self,
        world: &dyn berth_train::dist::Collective,
        output: &Path,
        defaults: &LoopDefaults,
    ) -> anyhow::Result<Option<berth_train::checkpoint::RunLock>> {
        if !world.is_writer() {
            return Ok(None);
        }
        self.claim_output(output, defaults).map(Some)
    }

    fn claim_output(
        &self,
        output: &Path,
        defaults: &LoopDefaults,
    ) -> anyhow::Result<berth_train::checkpoint::RunLock> {
        self.config(PathBuf::new(), output.into(), defaults)
            .check()?;
        if output.exists() && !output.is_dir() {
            anyhow::bail!("--output {}: not a directory", output.display());
        }
        let lock = berth_train::checkpoint::RunLock::acquire(output)?;
        let present = |files: &[&'static str]| -> Vec<&'static str> {
            files
                .iter()
                .copied()
                .filter(|f| output.join(f).exists())
                .collect()
        };
        let used = present(&RUN_MARKERS);
        if self.resume {
            if berth_train::checkpoint::list(output)?.is_empty() {
                // Starting at step 0 would append a second run's metrics to the first's.
                if !used.is_empty() {
                    anyhow::bail!(
                        "--resume: {} holds a run without a checkpoint ({}; it stopped before its first save): nothing to resume; start again with --overwrite",
                        output.display(),
                        used.join(", ")
                    );
                }
                eprintln!(
                    "note: --resume: no run in {} yet; starting at step 0",
                    output.display()
                );
            }
            return Ok(lock);
        }
        if used.is_empty() {
            return Ok(lock);
        }
        if !self.overwrite {
            anyhow::bail!(
                "{} already holds a run ({}): pass --resume to continue it or --overwrite to start again",
                output.display(),
                used.join(", ")
            );
        }
        for f in present(&RUN_FILES) {
            let p = output.join(f);
            let gone = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            gone.map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        }
        Ok(lock)
    }
}

/// Per-command defaults of the loop flags left unset.
pub struct LoopDefaults {
    pub epochs: usize,
    pub lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
}

impl LoopDefaults {
    /// Fine-tuning: the Hugging Face Trainer's defaults.
    pub const FINETUNE: LoopDefaults = LoopDefaults {
        epochs: 3,
        lr: 5e-5,
        warmup: 0.0,
        weight_decay: 0.0,
    };
    /// Pretraining: BERT's recipe (warmup 6 %, as RoBERTa; weight decay 0.01).
    pub const PRETRAIN: LoopDefaults = LoopDefaults {
        epochs: 1,
        lr: 1e-4,
        warmup: 0.06,
        weight_decay: 0.01,
    };
}

impl LoopArgs {
    /// The loop configuration for starting checkpoint `model` and run directory `output`.
    pub fn config(&self, model: PathBuf, output: PathBuf, d: &LoopDefaults) -> LoopConfig {
        let mut c = LoopConfig::new(model, output);
        c.epochs = self.epochs.unwrap_or(d.epochs);
        c.max_steps = self.max_steps;
        c.lr = self.lr.unwrap_or(d.lr);
        c.batch_size = self.batch_size;
        c.grad_accum = self.grad_accum;
        let warmup = self.warmup.unwrap_or(d.warmup);
        if warmup.is_finite() && warmup >= 1.0 {
            c.warmup_steps = Some(warmup as u64);
        } else {
            c.warmup_ratio = warmup;
        }
        c.schedule = self.schedule;
        c.adamw.weight_decay = self.weight_decay.unwrap_or(d.weight_decay);
        // 0 turns clipping off; a negative or NaN limit is refused by LoopConfig::check.
        c.max_grad_norm = (self.max_grad_norm != 0.0).then_some(self.max_grad_norm);
        c.seed = self.seed;
        c.save_every = self.save_every;
        c.keep_checkpoints = self.keep_checkpoints;
        c.log_every = self.log_every;
        c.dropout = !self.no_dropout;
        c.dtype = self.dtype;
        c
    }
}

/// Which columns of a CSV / TSV / JSON Lines file hold what, and how labels read.
#[derive(Args)]
pub struct ColumnArgs {
    /// First text column (header name or 0-based index); default: sentence (classify),
    /// anchor (embed), query (rerank).
    #[arg(long)]
    text_column: Option<String>,
    /// Second text column: classify pairs; default positive (embed), passage (rerank).
    #[arg(long)]
    pair_column: Option<String>,
    /// classify / rerank: label column (rerank: relevance in [0, 1]); eval: the gold TSV's.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// embed: a hard-negative column (scored against every anchor of the batch).
    #[arg(long)]
    negative_column: Option<String>,
    /// classify: numeric labels, one output, MSE loss.
    #[arg(long)]
    regression: bool,
    /// classify: several labels per row (split on --label-separator), BCE loss.
    #[arg(long)]
    pub multi_label: bool,
    /// classify --multi-label: what separates a row's labels.
    #[arg(long, default_value = ",")]
    pub label_separator: String,
    /// ner: 0-based tag column (default: the last).
    #[arg(long)]
    tag_column: Option<usize>,
}

/// The fine-tuning tasks, by the name `--task` takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FinetuneTask {
    Classify,
    Ner,
    Qa,
    Embed,
    Rerank,
}

/// Task settings that are not column flags.
pub struct TaskExtras {
    pub doc_stride: usize,
    pub max_answer_len: usize,
    pub similarity_scale: f64,
    pub label_all_tokens: bool,
}

impl Default for TaskExtras {
    fn default() -> Self {
        TaskExtras {
            doc_stride: qa::QaConfig::default().doc_stride,
            max_answer_len: qa::QaConfig::default().max_answer_len,
            similarity_scale: embed::EmbedConfig::default().similarity_scale,
            label_all_tokens: false,
        }
    }
}

impl ColumnArgs {
    /// The task configuration of `task` with these columns.
    pub fn task(&self, task: FinetuneTask, x: &TaskExtras) -> anyhow::Result<TaskKind> {
        if self.multi_label && (task != FinetuneTask::Classify || self.regression) {
            anyhow::bail!("--multi-label applies to --task classify without --regression");
        }
        if self.multi_label && self.label_separator.is_empty() {
            anyhow::bail!("--label-separator must not be empty");
        }
        if self.text_column.is_some() && self.text_column == self.pair_column {
            anyhow::bail!("--pair-column names the --text-column");
        }
        if task == FinetuneTask::Qa && x.max_answer_len == 0 {
            anyhow::bail!("--max-answer-len must be at least 1");
        }
        let scale = x.similarity_scale;
        if task == FinetuneTask::Embed && !(scale.is_finite() && scale > 0.0 && scale <= 1e4) {
            anyhow::bail!("--similarity-scale {scale} must be a positive number (at most 1e4)");
        }
        let text = |default: &str| self.text_column.clone().unwrap_or_else(|| default.into());
        let pair = |default: &str| self.pair_column.clone().unwrap_or_else(|| default.into());
        Ok(match task {
            FinetuneTask::Classify => TaskKind::Classify(classify::ClassifyConfig {
                text_column: text("sentence"),
                pair_column: self.pair_column.clone(),
                label_column: self.label_column.clone(),
                regression: self.regression,
                multi_label: self.multi_label,
                label_separator: self.label_separator.clone(),
                distill: None,
            }),
            FinetuneTask::Ner => TaskKind::Ner(ner::NerConfig {
                tag_column: self.tag_column,
                label_all_tokens: x.label_all_tokens,
                distill: None,
            }),
            FinetuneTask::Qa => TaskKind::Qa(qa::QaConfig {
                doc_stride: x.doc_stride,
                max_answer_len: x.max_answer_len,
            }),
            FinetuneTask::Embed => TaskKind::Embed(embed::EmbedConfig {
                text_column: text("anchor"),
                pair_column: pair("positive"),
                negative_column: self.negative_column.clone(),
                similarity_scale: x.similarity_scale,
            }),
            FinetuneTask::Rerank => TaskKind::Rerank(rerank::RerankConfig {
                text_column: text("query"),
                pair_column: pair("passage"),
                label_column: self.label_column.clone(),
            }),
        })
    }
}

/// `train` with a token limit: `max_length`, else 128 (QA: 384) or the model's position
/// limit when it is smaller.
pub fn data_config(
    train: PathBuf,
    model: &Path,
    max_length: Option<usize>,
    qa: bool,
) -> anyhow::Result<DataConfig> {
    let mut d = DataConfig::new(train);
    d.max_length = match max_length {
        Some(m) => m,
        None => {
            let cfg = berth_model::EncoderConfig::from_file(&model.join("config.json"))?;
            (if qa { 384 } else { 128 }).min(cfg.max_sequence_length())
        }
    };
    Ok(d)
}

/// Knowledge distillation and student initialisation.
#[derive(Args)]
pub struct DistillArgs {
    /// Learn from this teacher checkpoint's softened predictions too (same tokenizer; same
    /// labels for classify / ner). It only runs forward: costs its inference time per step.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Weight of the teacher's soft targets; 1 - alpha weighs the hard labels.
    #[arg(long, default_value_t = 0.5, requires = "teacher")]
    distill_alpha: f64,
    /// Softmax temperature of the soft targets (higher: more of the teacher's view of the
    /// wrong classes). The soft term is scaled by T², as Hinton et al. do.
    #[arg(long, default_value_t = 2.0, requires = "teacher")]
    temperature: f64,
    /// Start from N of the model's layers, evenly spaced from the first (DistilBERT's
    /// initialisation): a smaller, faster student (written to OUTPUT/student-init).
    #[arg(long)]
    pub student_layers: Option<usize>,
}

impl DistillArgs {
    /// The distillation settings, when a teacher is given.
    pub fn config(&self) -> anyhow::Result<Option<berth_train::distill::DistillConfig>> {
        let Some(teacher) = &self.teacher else {
            return Ok(None);
        };
        let teacher = crate::resolve::model_dir(Some(&teacher.to_string_lossy()))?;
        let c = berth_train::distill::DistillConfig {
            teacher,
            alpha: self.distill_alpha,
            temperature: self.temperature,
        };
        c.check()?;
        Ok(Some(c))
    }

    /// Where [`Self::student`] puts the model to train (what the other MPI ranks read after
    /// rank 0 wrote it).
    pub fn student_dir(&self, model: PathBuf, output: &Path) -> PathBuf {
        match self.student_layers {
            Some(_) => output.join("student-init"),
            None => model,
        }
    }

    /// The model to train: `model`, or a student of `--student-layers` of its layers written
    /// to `output/student-init` (kept when resuming).
    pub fn student(&self, model: PathBuf, output: &Path, resume: bool) -> anyhow::Result<PathBuf> {
        let Some(n) = self.student_layers else {
            return Ok(model);
        };
        let dst = output.join("student-init");
        if resume && dst.join("config.json").is_file() {
            return Ok(dst);
        }
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| anyhow::anyhow!("{}: {e}", dst.display()))?;
        }
        std::fs::create_dir_all(output)
            .map_err(|e| anyhow::anyhow!("{}: {e}", output.display()))?;
        let taken = berth_train::init::write_student(&model, &dst, n)?;
        eprintln!(
            "student: layers {taken:?} of {} -> {}",
            model.display(),
            dst.display()
        );
        Ok(dst)
    }
}
