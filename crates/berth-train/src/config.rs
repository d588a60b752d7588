//! A run's configuration, saved as its `config.json`: `{"loop": {...}, "task": {...}}`.
//! The loop half is what every run shares (order, optimizer, schedule, checkpoints); the
//! task half is the objective's own (data, columns, losses), one typed struct per task
//! ([`crate::objectives::TaskConfig`]).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::optim::AdamWConfig;
use crate::schedule::ScheduleKind;

/// The whole configuration of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// What the task-blind training loop needs.
    #[serde(rename = "loop")]
    pub run: LoopConfig,
    /// The objective and its data.
    pub task: crate::objectives::TaskConfig,
}

/// The training loop's settings (the Hugging Face Trainer's where it has them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoopConfig {
    /// Starting checkpoint (a model directory; its tokenizer is the run's).
    pub model: PathBuf,
    /// Run directory.
    pub output: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Train for exactly this many optimizer steps, as the Trainer's `max_steps`: it
    /// overrides `epochs` (the data is cycled as needed) and the schedule spans these steps.
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Examples per micro-batch (the global batch: data parallelism splits it).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
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
    /// Seed of data order, dropout, masking and new weights.
    pub seed: u64,
    /// Evaluate and checkpoint every N optimizer steps (default: at each epoch end).
    pub save_every: Option<u64>,
    /// Newest checkpoints kept (the best one is kept as well).
    pub keep_checkpoints: usize,
    /// Stop after this many evaluations without a better dev score.
    pub early_stopping_patience: Option<usize>,
    /// Log the training loss every N optimizer steps.
    pub log_every: u64,
    /// Dropout during training.
    pub dropout: bool,
    /// Append each epoch's training examples, in training order, to this JSON Lines file
    /// (`{"epoch", "ids"}`), for a peer to train on the same data order.
    #[serde(default)]
    pub dump_order: Option<PathBuf>,
    /// The number format of the matrix products, forward and backward (runs saved before
    /// the field existed trained in f32).
    #[serde(default)]
    pub dtype: TrainDtype,
}

/// The number format of training's matrix products. Weights, gradients, optimizer state
/// and checkpoints are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    /// f32 throughout.
    #[default]
    F32,
    /// Mixed precision: the linear layers' products (encoder and heads, forward and
    /// backward) with both operands rounded to bf16 and f32 accumulation, as PyTorch's bf16
    /// autocast runs them; attention, LayerNorm, activations, losses and the optimizer in
    /// f32. Needs AMX or AVX-512; BERT-family encoders only.
    Bf16,
}

impl TrainDtype {
    /// The products the networks run.
    pub fn products(self) -> berth_kernels::Products {
        match self {
            TrainDtype::F32 => berth_kernels::Products::F32,
            TrainDtype::Bf16 => berth_kernels::Products::Bf16,
        }
    }
}

impl LoopConfig {
    /// The Trainer's defaults (lr 5e-5, linear schedule, no warmup, weight decay 0, clip at
    /// 1.0, 3 epochs, batch 32, seed 42).
    pub fn new(model: PathBuf, output: PathBuf) -> Self {
        LoopConfig {
            model,
            output,
            epochs: 3,
            max_steps: None,
            lr: 5e-5,
            batch_size: 32,
            grad_accum: 1,
            warmup_steps: None,
            warmup_ratio: 0.0,
            schedule: ScheduleKind::Linear,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            seed: 42,
            save_every: None,
            keep_checkpoints: 2,
            early_stopping_patience: None,
            log_every: 10,
            dropout: true,
            dump_order: None,
            dtype: TrainDtype::F32,
        }
    }

    /// Refuses settings no run can use, naming the flag: counts of zero, and learning rate,
    /// warmup, weight decay, clipping or AdamW constants that are negative or not finite
    /// (NaN would train silently into an all-NaN checkpoint).
    pub fn check(&self) -> crate::error::Result<()> {
        let bad = |m: String| Err(crate::error::TrainError::Config(m));
        for (flag, v) in [
            ("--batch-size", self.batch_size as u64),
            ("--grad-accum", self.grad_accum as u64),
            ("--epochs", self.epochs as u64),
            ("--log-every", self.log_every),
            ("--max-steps", self.max_steps.unwrap_or(1)),
            ("--save-every", self.save_every.unwrap_or(1)),
        ] {
            if v == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        let finite = |flag: &str, v: f64, lo: f64, hi: f64| -> crate::error::Result<()> {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                bad(format!("{flag} {v} is outside [{lo}, {hi}]"))
            }
        };
        if self.dtype == TrainDtype::Bf16 && !berth_kernels::amx::bf16_available() {
            return bad(
                "--dtype bf16 needs a CPU with AMX bf16 tiles (and Linux 5.16+) or AVX-512 \
                 BF16; this machine has neither: use --dtype f32"
                    .into(),
            );
        }
        finite("--lr", self.lr, 0.0, 10.0)?;
        finite("--warmup", self.warmup_ratio, 0.0, 1.0)?;
        finite("--weight-decay", self.adamw.weight_decay, 0.0, 10.0)?;
        finite("AdamW beta1", self.adamw.beta1, 0.0, 0.999_999)?;
        finite("AdamW beta2", self.adamw.beta2, 0.0, 0.999_999_999)?;
        finite("AdamW eps", self.adamw.eps, 0.0, 1.0)?;
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!(
                    "--max-grad-norm {n} must be a positive number (0 turns clipping off)"
                ));
            }
        }
        Ok(())
    }
}
