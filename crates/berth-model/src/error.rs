//! Errors from loading and running models: each names the file or input and the problem.
use std::path::PathBuf;

/// A model loading or running error.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// config.json is not valid JSON or lacks a field.
    #[error("{path}: invalid config: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// config.json names a `model_type` berth does not implement.
    #[error("{path}: unknown model_type {model_type:?} (berth supports bert, roberta, xlm-roberta, camembert, distilbert, electra, modernbert)")]
    UnknownModelType {
        /// The config file.
        path: PathBuf,
        /// The value found.
        model_type: String,
    },
    /// The model directory has no weight file berth can read.
    #[error("{dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// A weight file is truncated, corrupt or not in the expected format.
    #[error("{path}: corrupt or unreadable weights: {message}")]
    CorruptWeights {
        /// The weight file.
        path: PathBuf,
        /// What the reader reported.
        message: String,
    },
    /// A weight the architecture needs is not in the checkpoint.
    #[error("{path}: missing weight {name:?}")]
    WeightMissing {
        /// Checkpoint key.
        name: String,
        /// Weight file or directory.
        path: PathBuf,
    },
    /// A weight has a shape other than the config implies.
    #[error("{path}: weight {name:?} has shape {got:?}, config implies {expected:?}")]
    ShapeMismatch {
        /// Checkpoint key.
        name: String,
        /// Shape implied by config.json.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
        /// Weight file or directory.
        path: PathBuf,
    },
    /// A task needs a head the checkpoint does not have.
    #[error("{dir}: the checkpoint has no {head} head (architectures: {architectures:?})")]
    HeadMissing {
        /// The model directory.
        dir: PathBuf,
        /// The head asked for.
        head: String,
        /// `architectures` from config.json.
        architectures: Vec<String>,
    },
    /// A batch that does not fit the model (ids beyond the vocabulary, too long, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with a [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
