//! Training errors, each naming the file, line or setting at fault.
use std::path::PathBuf;

/// A training error.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] berth_model::ModelError),
    /// Tokenizing failed.
    #[error(transparent)]
    Text(#[from] berth_text::TextError),
    /// A pipeline step (evaluation) failed.
    #[error(transparent)]
    Task(#[from] berth_tasks::TaskError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A data file is unreadable or malformed.
    #[error("{}{}: {message}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when the problem is the whole file).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint or run directory problem.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Settings that cannot work together.
    #[error("{0}")]
    Config(String),
    /// A file-system operation failed.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

/// Result with a [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

/// Wraps an I/O error with its path.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.into(),
        error: source,
    }
}
