//! berth's training engine: one task-blind training loop ([`train_loop`]) over pluggable
//! objectives ([`objective::Objective`], one file each under [`objectives`]), with a
//! data-parallel seam ([`dist::Collective`]); losses, AdamW, learning-rate schedules, data
//! readers, pretraining corpora and checkpoints in the Hugging Face layout.
//!
//! The forward and backward run on berth's own kernels over packed batches (no padding);
//! gradients come from candle's autograd through those kernels' backward passes.
//!
//! Modules depend one way: `train_loop` → `objective` ← `objectives::*` → {`data`,
//! `pretrain`, `corpus`, `masking`, `loss`, `init`, `checkpoint`}; no objective imports
//! the loop and the loop names no objective.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod data;
pub mod dist;
pub mod distill;
mod error;
pub mod init;
pub mod loss;
pub mod masking;
pub mod objective;
pub mod objectives;
pub mod optim;
pub mod plot;
pub mod pretrain;
pub mod quantize;
pub mod schedule;
pub mod shards;
pub mod train_loop;

pub use error::{Result, TrainError};
