//! berth pipelines on top of the encoder, each with the semantics of its transformers /
//! sentence-transformers counterpart: sentence embeddings, fill-mask, sequence
//! classification, token classification (NER), extractive QA, cross-encoder reranking;
//! and the metrics that score them. Every pipeline runs on packed batches (no padding)
//! bounded by a token budget.
#![deny(missing_docs)]

mod classify;
mod embed;
mod error;
mod fill_mask;
pub mod metrics;
mod ner;
mod pipeline;
mod qa;
pub mod quantize;
mod rerank;
pub mod resolve;
pub mod search;

pub use classify::{
    classify, require_head, ClassFunction, ClassifyOptions, LabelScore, TextPair, WindowPool,
    Windows,
};
pub use embed::{
    cosine, embed_encoded, embed_texts, encode_for_embedding, normalize, pool, token_embeddings,
    EmbedOptions, EncodedTexts, Pooling, SentenceConfig,
};
pub use error::{Result, TaskError};
pub use fill_mask::{fill_mask, Prediction};
pub use ner::{argmax, token_classify, Aggregation, Entity, NerOptions};
pub use pipeline::{
    pack, pipelined, run_batches, token_budget_batches, BatchRunner, Pipeline, PipelineOptions,
    DEFAULT_BATCH_TOKENS,
};
pub use qa::{answer, Answer, QaInput, QaOptions};
pub use rerank::{cross_encode, rerank, Ranked};
