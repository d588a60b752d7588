//! Tokenizer errors, each naming the file or input.
use std::path::PathBuf;

/// A tokenizer loading or encoding error.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A tokenizer file is malformed.
    #[error("{path}: invalid tokenizer: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A corpus file or folder is missing, empty or unreadable.
    #[error("{path}: {message}")]
    Corpus {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Training options that cannot work.
    #[error("{0}")]
    Options(String),
    /// No tokenizer file in the model directory.
    #[error("{dir}: no tokenizer (tokenizer.json, vocab.txt, or vocab.json + merges.txt)")]
    NoTokenizer {
        /// The model directory.
        dir: PathBuf,
    },
    /// An input text is empty or only whitespace.
    #[error("input {index}: empty text")]
    EmptyText {
        /// Input number (0-based).
        index: usize,
    },
    /// An input text (or one side of a pair) leaves no token once the tokenizer has removed
    /// what it drops (control and format characters such as NUL or zero-width spaces).
    #[error("input {index}: no token in the text (only characters the tokenizer drops, such as control or zero-width characters)")]
    NoTokens {
        /// Input number (0-based).
        index: usize,
    },
    /// An input is longer than the model allows and truncation is off.
    #[error("input {index}: {tokens} tokens, longer than the maximum of {max} (drop --no-truncate to truncate)")]
    TooLong {
        /// Input number (0-based).
        index: usize,
        /// Its token count.
        tokens: usize,
        /// The limit.
        max: usize,
    },
    /// Windows cannot advance: the stride leaves no room for new tokens.
    #[error("input {index}: stride {stride} must be smaller than the room a window leaves after {fixed} fixed tokens (max length {max_len})")]
    Window {
        /// Input number (0-based).
        index: usize,
        /// Window size.
        max_len: usize,
        /// Overlap asked for.
        stride: usize,
        /// Special tokens plus the first text of a pair.
        fixed: usize,
    },
    /// The tokenizer failed on an input.
    #[error("input {index}: tokenization failed: {message}")]
    Tokenize {
        /// Input number (0-based).
        index: usize,
        /// The tokenizer's message.
        message: String,
    },
}

/// Result with a [`TextError`].
pub type Result<T> = std::result::Result<T, TextError>;
