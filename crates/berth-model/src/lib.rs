//! BERT-family encoders (BERT, RoBERTa / XLM-R / CamemBERT, DistilBERT, ELECTRA) and
//! ModernBERT, and their heads, running on packed batches with no padding, loaded from the
//! Hugging Face layout.
//!
//! Data flow: [`Batch`] (token ids of several sequences, concatenated) → [`Model::forward`]
//! → last hidden state `[N, H]` → a head method (`mlm_logits`, `sequence_logits`,
//! `token_logits`, `qa_logits`) → logits. Module fields follow checkpoint keys; the one
//! place where names differ per architecture is `names.rs`.
#![deny(missing_docs)]

mod batch;
mod config;
mod dropout;
mod encoder;
mod error;
mod heads;
mod model;
mod modernbert;
mod modules;
mod names;
mod weights;

pub use batch::Batch;
pub use config::{
    Arch, BertConfig, DistilBertConfig, DropoutRates, EncoderConfig, ModernBertConfig,
    ModernSettings, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
};
pub use dropout::Dropout;
pub use encoder::{Embeddings, Layer};
pub use error::{ModelError, Result};
pub use heads::{Head, HeadKind, MaskedLmHead, SequenceClassificationHead};
pub use model::{LoadReport, Model};
pub use modernbert::{ModernLayer, ModernStack};
pub use modules::{LayerNorm, Linear, Packed, Precision};
pub use names::mlm_head as mlm_head_keys;
pub use weights::{Int8Weight, Int8Weights, Param, Weights};
