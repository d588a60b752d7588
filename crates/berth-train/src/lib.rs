//! berth's training engine: losses, AdamW, learning-rate schedules, data readers,
//! checkpoints in the Hugging Face layout, and the fine-tuning loop.
//!
//! The forward and backward run on berth's own kernels over packed batches (no padding);
//! gradients come from candle's autograd through those kernels' backward passes.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod corpus;
pub mod data;
mod error;
pub mod init;
pub mod loss;
pub mod mlm;
pub mod optim;
pub mod plot;
pub mod pretrain;
pub mod retrieval;
pub mod rtd;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
