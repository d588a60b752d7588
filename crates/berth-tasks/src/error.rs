//! Pipeline errors: model, tokenizer, or input problems, each with its detail.

/// A pipeline error.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] berth_model::ModelError),
    /// Loading the tokenizer or encoding text failed.
    #[error(transparent)]
    Text(#[from] berth_text::TextError),
    /// A configuration file of the pipeline is malformed.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An input the task cannot handle.
    #[error("input {index}: {message}")]
    Input {
        /// Input number (0-based).
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// Options that contradict each other or the model.
    #[error("{0}")]
    Options(String),
    /// A model name that resolves to no model directory.
    #[error("{0}")]
    NotFound(String),
    /// The [`crate::BatchRunner`] could not run a batch (a server's worker stopped or failed).
    #[error("{0}")]
    Runner(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with a [`TaskError`].
pub type Result<T> = std::result::Result<T, TaskError>;
