//! berth pipelines on top of the encoder: sentence embeddings and fill-mask.
//! Every pipeline runs on packed batches (no padding) bounded by a token budget.
#![deny(missing_docs)]

mod embed;
mod error;
mod fill_mask;
mod pipeline;

pub use embed::{normalize, pool, Pooling, SentenceConfig};
pub use error::{Result, TaskError};
pub use fill_mask::{fill_mask, Prediction};
pub use pipeline::{token_budget_batches, EncodeOptions, Pipeline};
