//! Tokenizer glue for berth: load a Hugging Face tokenizer (`tokenizer.json`), or build one
//! from `vocab.txt` (WordPiece) or `vocab.json` + `merges.txt` (byte-level BPE), and encode
//! text into token ids with explicit truncation.
//!
//! Encodings are per sequence; packing them into a batch is the model crate's `Batch`.
#![deny(missing_docs)]

mod build;
mod error;

use std::path::{Path, PathBuf};

pub use error::{Result, TextError};

/// The subword model behind a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// WordPiece (BERT, DistilBERT).
    WordPiece,
    /// BPE, usually byte-level (RoBERTa, GPT-2 style).
    Bpe,
    /// Unigram (XLM-R, CamemBERT, sentencepiece-derived).
    Unigram,
    /// Whole-word vocabulary.
    WordLevel,
}

/// What to do with text longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Cut to the limit (special tokens kept) and say so in [`Encoded::truncated`].
    Truncate,
    /// Refuse with [`TextError::TooLong`].
    Error,
}

/// One encoded sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the second of a pair).
    pub type_ids: Vec<u32>,
    /// Token strings.
    pub tokens: Vec<String>,
    /// Byte offsets of each token in its source text (`(0, 0)` for special tokens).
    pub offsets: Vec<(usize, usize)>,
    /// Word index of each token (`None` for special tokens).
    pub word_ids: Vec<Option<u32>>,
    /// Whether tokens were dropped to fit the limit.
    pub truncated: bool,
    /// Token count before truncation.
    pub full_len: usize,
}

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    kind: TokenizerKind,
    source: PathBuf,
    clean_up_spaces: bool,
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json` if present, else built
    /// from `vocab.txt` (+ `tokenizer_config.json` casing) or `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (mut inner, source) = if json.is_file() {
            let t = tokenizers::Tokenizer::from_file(&json)
                .map_err(|e| TextError::Invalid { path: json.clone(), message: e.to_string() })?;
            (t, json)
        } else if dir.join("vocab.txt").is_file() {
            (build::wordpiece(dir)?, dir.join("vocab.txt"))
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            (build::byte_level_bpe(dir)?, dir.join("vocab.json"))
        } else {
            return Err(TextError::NoTokenizer { dir: dir.into() });
        };
        // berth packs sequences itself and decides truncation per call.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TextError::Invalid { path: source.clone(), message: e.to_string() })?;
        let kind = match inner.get_model() {
            tokenizers::ModelWrapper::WordPiece(_) => TokenizerKind::WordPiece,
            tokenizers::ModelWrapper::BPE(_) => TokenizerKind::Bpe,
            tokenizers::ModelWrapper::Unigram(_) => TokenizerKind::Unigram,
            tokenizers::ModelWrapper::WordLevel(_) => TokenizerKind::WordLevel,
        };
        let clean_up_spaces = build::read_config(dir)?.clean_up_tokenization_spaces.unwrap_or(false);
        Ok(TextTokenizer { inner, kind, source, clean_up_spaces })
    }

    /// The subword model.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The file it was loaded or built from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// String of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The mask token (`[MASK]` or `<mask>`), if the vocabulary has one.
    pub fn mask_token(&self) -> Option<(String, u32)> {
        ["[MASK]", "<mask>"].iter().find_map(|t| self.token_to_id(t).map(|id| (t.to_string(), id)))
    }

    /// Encodes `text` (and `pair`, for sentence pairs) with special tokens, limited to
    /// `max_len` tokens. `index` names the input in errors.
    pub fn encode(&self, text: &str, pair: Option<&str>, max_len: usize, truncation: Truncation, index: usize) -> Result<Encoded> {
        if text.trim().is_empty() || pair.is_some_and(|p| p.trim().is_empty()) {
            return Err(TextError::EmptyText { index });
        }
        let fail = |e: tokenizers::Error| TextError::Tokenize { index, message: e.to_string() };
        let enc = match pair {
            None => self.inner.encode(text, true),
            Some(p) => self.inner.encode((text, p), true),
        }
        .map_err(fail)?;
        let full_len = enc.len();
        let enc = if full_len <= max_len {
            enc
        } else if truncation == Truncation::Error {
            return Err(TextError::TooLong { index, tokens: full_len, max: max_len });
        } else {
            // Re-encoding with the tokenizer's own truncation keeps the special tokens and
            // trims the longest text of a pair first, as transformers does.
            let mut t = self.inner.clone();
            let params = tokenizers::TruncationParams { max_length: max_len, ..Default::default() };
            t.with_truncation(Some(params)).map_err(fail)?;
            match pair {
                None => t.encode(text, true),
                Some(p) => t.encode((text, p), true),
            }
            .map_err(fail)?
        };
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            tokens: enc.get_tokens().to_vec(),
            offsets: enc.get_offsets().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
            truncated: full_len > max_len,
            full_len,
        })
    }

    /// Text of token ids, as transformers' `decode(ids, skip_special_tokens)`, including its
    /// `clean_up_tokenization_spaces` step when tokenizer_config.json asks for it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenize { index: 0, message: e.to_string() })?;
        Ok(if self.clean_up_spaces { clean_up_tokenization(&text) } else { text })
    }
}

/// transformers' `clean_up_tokenization`: removes the spaces decoding leaves before
/// punctuation and English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ];
    RULES.iter().fold(text.to_string(), |s, (from, to)| s.replace(from, to))
}
