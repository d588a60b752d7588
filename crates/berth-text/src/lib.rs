//! Tokenizer glue for berth: load a Hugging Face tokenizer (`tokenizer.json`), or build one
//! from `vocab.txt` (WordPiece) or `vocab.json` + `merges.txt` (byte-level BPE), and encode
//! text into token ids with explicit truncation.
//!
//! Encodings are per sequence; packing them into a batch is the model crate's `Batch`.
#![deny(missing_docs)]

mod build;
mod error;
pub mod limits;
pub mod train;

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

/// One encoded sequence (serialisable: the ranks of a data-parallel run exchange the
/// examples each encoded).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Encoded {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the second of a pair).
    pub type_ids: Vec<u32>,
    /// Token strings.
    pub tokens: Vec<String>,
    /// Character (Unicode scalar) offsets of each token in its own text, as Python indexes
    /// strings (`(0, 0)` for special tokens); [`byte_offsets`] converts them for slicing.
    pub offsets: Vec<(usize, usize)>,
    /// Word index of each token within its text (`None` for special tokens).
    pub word_ids: Vec<Option<u32>>,
    /// Which text each token comes from: `Some(0)` the first, `Some(1)` the pair, `None` special.
    pub sequence_ids: Vec<Option<usize>>,
    /// Whether each token is a special token added by the post-processor.
    pub special: Vec<bool>,
    /// Whether tokens were dropped to fit the limit.
    pub truncated: bool,
    /// Token count before truncation (for a text cut before tokenizing, see
    /// [`TextTokenizer::encode`], the count of the part tokenized: a lower bound).
    pub full_len: usize,
}

/// A loaded tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    kind: TokenizerKind,
    source: PathBuf,
    clean_up_spaces: bool,
    /// For pre-split words, when they need other settings than running text: a byte-level
    /// BPE that does not add a prefix space (RoBERTa) would encode every word but the
    /// first without its leading `Ġ`; transformers requires `add_prefix_space=True` there.
    words: Option<std::sync::Arc<tokenizers::Tokenizer>>,
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json` if present, else built
    /// from `vocab.txt` (+ `tokenizer_config.json` casing) or `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (mut inner, source) = if json.exists() {
            (from_json_file(&json)?, json)
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
            .map_err(|e| TextError::Invalid {
                path: source.clone(),
                message: e.to_string(),
            })?;
        let kind = match inner.get_model() {
            tokenizers::ModelWrapper::WordPiece(_) => TokenizerKind::WordPiece,
            tokenizers::ModelWrapper::BPE(_) => TokenizerKind::Bpe,
            tokenizers::ModelWrapper::Unigram(_) => TokenizerKind::Unigram,
            tokenizers::ModelWrapper::WordLevel(_) => TokenizerKind::WordLevel,
        };
        let clean_up_spaces = build::read_config(dir)?
            .clean_up_tokenization_spaces
            .unwrap_or(false);
        let words = match inner.get_pre_tokenizer() {
            Some(tokenizers::PreTokenizerWrapper::ByteLevel(b)) if !b.add_prefix_space => {
                let mut t = inner.clone();
                t.with_pre_tokenizer(Some(b.add_prefix_space(true)));
                Some(std::sync::Arc::new(t))
            }
            _ => None,
        };
        Ok(TextTokenizer {
            inner,
            kind,
            source,
            clean_up_spaces,
            words,
        })
    }

    /// The shortest token limit that leaves room for one token of each text next to the
    /// special tokens the post-processor adds (BERT: 3 for one text, 5 for a pair).
    pub fn min_length(&self, pair: bool) -> usize {
        use tokenizers::PostProcessor;
        let specials = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(pair));
        specials + if pair { 2 } else { 1 }
    }

    /// Refuses a limit with no room for text (the tokenizers crate's truncation underflows
    /// on one).
    fn check_room(&self, max_len: usize, pair: bool, index: usize) -> Result<()> {
        let least = self.min_length(pair);
        if max_len < least {
            return Err(TextError::Tokenize {
                index,
                message: format!(
                    "a limit of {max_len} tokens leaves no room for text (at least {least})"
                ),
            });
        }
        Ok(())
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

    /// The ids the post-processor adds around a text pair ([CLS], [SEP], <s>, ...): they
    /// come from the template, not the vocabulary, so a vocabulary check misses them.
    pub fn special_ids(&self) -> Vec<u32> {
        match self.inner.encode(("a", "a"), true) {
            Ok(e) => e
                .get_ids()
                .iter()
                .zip(e.get_special_tokens_mask())
                .filter(|(_, &m)| m == 1)
                .map(|(&id, _)| id)
                .collect(),
            // A tokenizer that cannot encode this fails on the first real input, with its
            // index; nothing to check here.
            Err(_) => Vec::new(),
        }
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
        ["[MASK]", "<mask>"]
            .iter()
            .find_map(|t| self.token_to_id(t).map(|id| (t.to_string(), id)))
    }

    /// Encodes pre-split words (a CoNLL sentence) with special tokens, cut to `max_len`
    /// tokens; `word_ids` map each token back to its word. `index` names the input in errors.
    pub fn encode_words(&self, words: &[String], max_len: usize, index: usize) -> Result<Encoded> {
        if words.is_empty() {
            return Err(TextError::EmptyText { index });
        }
        let fail = |e: tokenizers::Error| TextError::Tokenize {
            index,
            message: e.to_string(),
        };
        let input =
            tokenizers::InputSequence::from(words.iter().map(String::as_str).collect::<Vec<_>>());
        let inner = self.words.as_deref().unwrap_or(&self.inner);
        let enc = inner
            .encode_char_offsets(input.clone(), true)
            .map_err(fail)?;
        let full_len = enc.len();
        if full_len <= max_len {
            return Ok(Encoded::from_encoding(&enc, full_len));
        }
        let mut t = inner.clone();
        t.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(fail)?;
        Ok(Encoded::from_encoding(
            &t.encode_char_offsets(input, true).map_err(fail)?,
            full_len,
        ))
    }

    /// Encodes `text` (and `pair`, for sentence pairs) with special tokens, limited to
    /// `max_len` tokens. `index` names the input in errors.
    pub fn encode(
        &self,
        text: &str,
        pair: Option<&str>,
        max_len: usize,
        truncation: Truncation,
        index: usize,
    ) -> Result<Encoded> {
        check_not_empty(text, pair, index)?;
        self.check_room(max_len, pair.is_some(), index)?;
        let (text, pair, enc) = self.encode_prefix(text, pair, max_len, index)?;
        check_kept(&enc, pair.is_some(), index)?;
        let full_len = enc.len();
        if full_len <= max_len {
            return Ok(Encoded::from_encoding(&enc, full_len));
        }
        if truncation == Truncation::Error {
            return Err(TextError::TooLong {
                index,
                tokens: full_len,
                max: max_len,
            });
        }
        // Re-encoding with the tokenizer's own truncation keeps the special tokens and
        // trims the longest text of a pair first, as transformers does.
        let params = tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        };
        let enc = self.encode_raw(text, pair, Some(params), index)?;
        Ok(Encoded::from_encoding(&enc, full_len))
    }

    /// Encodes `text` (and `pair`) into overlapping windows of at most `max_len` tokens, as
    /// transformers does with `return_overflowing_tokens=True, stride=stride`: consecutive
    /// windows share `stride` tokens. With a pair only the pair is windowed (`only_second`,
    /// the question-answering layout); a lone text is windowed itself. A text that fits gives
    /// one window.
    pub fn encode_windows(
        &self,
        text: &str,
        pair: Option<&str>,
        max_len: usize,
        stride: usize,
        index: usize,
    ) -> Result<Vec<Encoded>> {
        check_not_empty(text, pair, index)?;
        self.check_room(max_len, pair.is_some(), index)?;
        let whole = self.encode_raw(text, pair, None, index)?;
        check_kept(&whole, pair.is_some(), index)?;
        let full_len = whole.len();
        if full_len <= max_len {
            return Ok(vec![Encoded::from_encoding(&whole, full_len)]);
        }
        let specials = whole
            .get_special_tokens_mask()
            .iter()
            .filter(|&&m| m != 0)
            .count();
        let first_text = whole
            .get_sequence_ids()
            .iter()
            .filter(|&&s| s == Some(0))
            .count();
        let fixed = specials + if pair.is_some() { first_text } else { 0 };
        if stride >= max_len.saturating_sub(fixed) {
            return Err(TextError::Window {
                index,
                max_len,
                stride,
                fixed,
            });
        }
        // Windows are cut from the whole encoding: the tokens before and after the windowed
        // text (special tokens, and the first text of a pair) repeat in every window, as
        // transformers' overflowing encodings give them. (tokenizers 0.23's own pair overflow
        // loses windows: for a 94-token context with room 55 and stride 32 it gives
        // [0, 55) and [23, 64) where Python's tokenizers gives [0, 55), [23, 78), [46, 94).)
        let full = Encoded::from_encoding(&whole, full_len);
        let windowed = if pair.is_some() { 1 } else { 0 };
        let content: Vec<usize> = (0..full_len)
            .filter(|&t| full.sequence_ids[t] == Some(windowed))
            .collect();
        let (c0, c1) = (content[0], content[content.len() - 1] + 1);
        let room = max_len - (full_len - (c1 - c0));
        let step = room - stride;
        let mut out = Vec::new();
        let mut start = c0;
        loop {
            let stop = (start + room).min(c1);
            let keep: Vec<usize> = (0..c0).chain(start..stop).chain(c1..full_len).collect();
            out.push(full.select(&keep));
            if stop == c1 {
                break;
            }
            start += step;
        }
        Ok(out)
    }

    /// Encodes `text` (and `pair`) whole when they are short, else prefixes of them long
    /// enough to fill `max_len` tokens: a 20 MB line is cut before the tokenizer sees it
    /// (which holds ~180 bytes per input byte), not after. Texts are cut before a
    /// whitespace, so the prefix's words are the text's first words; the prefix grows until
    /// each cut text gives at least `max_len` tokens, up to [`MAX_PREFIX_BYTES`]. Returns the
    /// (possibly cut) texts and their encoding, whose length is then a lower bound of the
    /// whole texts' token count.
    fn encode_prefix<'t>(
        &self,
        text: &'t str,
        pair: Option<&'t str>,
        max_len: usize,
        index: usize,
    ) -> Result<(&'t str, Option<&'t str>, tokenizers::Encoding)> {
        let mut budget = max_len.saturating_mul(64).max(16 << 10);
        loop {
            let (t, p) = (prefix(text, budget), pair.map(|p| prefix(p, budget)));
            let enc = self.encode_raw(t, p, None, index)?;
            let cut = [(t, Some(text), 0), (p.unwrap_or(""), pair, 1)]
                .into_iter()
                .filter(|(part, whole, _)| whole.is_some_and(|w| part.len() < w.len()));
            let enough = cut.clone().all(|(_, _, seq)| {
                enc.get_sequence_ids()
                    .iter()
                    .filter(|&&s| s == Some(seq))
                    .count()
                    >= max_len
            });
            if cut.count() == 0 || enough || budget >= MAX_PREFIX_BYTES {
                return Ok((t, p, enc));
            }
            budget = budget.saturating_mul(4).min(MAX_PREFIX_BYTES);
        }
    }

    fn encode_raw(
        &self,
        text: &str,
        pair: Option<&str>,
        truncation: Option<tokenizers::TruncationParams>,
        index: usize,
    ) -> Result<tokenizers::Encoding> {
        let fail = |e: tokenizers::Error| TextError::Tokenize {
            index,
            message: e.to_string(),
        };
        let t = match truncation {
            None => std::borrow::Cow::Borrowed(&self.inner),
            Some(params) => {
                let mut t = self.inner.clone();
                t.with_truncation(Some(params)).map_err(fail)?;
                std::borrow::Cow::Owned(t)
            }
        };
        // Character offsets, as transformers' fast tokenizers report them. A tokenizer file
        // can still hold a combination the tokenizers crate panics on: an error, not a crash.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match pair {
            None => t.encode_char_offsets(text, true),
            Some(p) => t.encode_char_offsets((text, p), true),
        }))
        .map_err(|_| TextError::Tokenize {
            index,
            message: format!("the tokenizers library failed on {}", self.source.display()),
        })?
        .map_err(fail)
    }

    /// Joins token strings back into text with the tokenizer's decoder, as transformers'
    /// `convert_tokens_to_string` (tokens joined by spaces when there is no decoder).
    pub fn tokens_to_string(&self, tokens: &[String]) -> Result<String> {
        use tokenizers::Decoder;
        match self.inner.get_decoder() {
            Some(d) => d.decode(tokens.to_vec()).map_err(|e| TextError::Tokenize {
                index: 0,
                message: e.to_string(),
            }),
            None => Ok(tokens.join(" ")),
        }
    }

    /// The model's continuing-subword prefix (`##` for WordPiece), when it has a non-empty one:
    /// transformers then tells subwords by their token length.
    pub fn continuing_subword_prefix(&self) -> Option<&str> {
        let p = match self.inner.get_model() {
            tokenizers::ModelWrapper::WordPiece(m) => Some(m.continuing_subword_prefix.as_str()),
            tokenizers::ModelWrapper::BPE(m) => m.continuing_subword_prefix.as_deref(),
            _ => None,
        };
        p.filter(|p| !p.is_empty())
    }

    /// Id of the unknown token, if the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        ["[UNK]", "<unk>"].iter().find_map(|t| self.token_to_id(t))
    }

    /// Id of the classification token (`[CLS]` or `<s>`), if the vocabulary has one.
    pub fn cls_id(&self) -> Option<u32> {
        ["[CLS]", "<s>"].iter().find_map(|t| self.token_to_id(t))
    }

    /// Text of token ids, as transformers' `decode(ids, skip_special_tokens)`, including its
    /// `clean_up_tokenization_spaces` step when tokenizer_config.json asks for it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text =
            self.inner
                .decode(ids, skip_special_tokens)
                .map_err(|e| TextError::Tokenize {
                    index: 0,
                    message: e.to_string(),
                })?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

/// A tokenizer from `tokenizer.json`: read as a regular file under the size limit, parsed
/// as JSON first (the tokenizers crate panics on some syntax errors inside nested parts such
/// as the decoder), and built with any remaining panic turned into an error.
fn from_json_file(path: &Path) -> Result<tokenizers::Tokenizer> {
    let invalid = |message: String| TextError::Invalid {
        path: path.into(),
        message,
    };
    let text = limits::read_text(path, limits::MAX_JSON_BYTES).map_err(|e| TextError::Io {
        path: path.into(),
        error: e.into(),
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    check_templates(&value["post_processor"]).map_err(invalid)?;
    std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
        .map_err(|_| invalid("the tokenizers library could not read it".into()))?
        .map_err(|e| invalid(e.to_string()))
}

/// A template post-processor must define every special token its templates use (the
/// tokenizers crate indexes its map without checking, and panics on the first encode).
fn check_templates(p: &serde_json::Value) -> std::result::Result<(), String> {
    if let Some(list) = p["processors"].as_array() {
        return list.iter().try_for_each(check_templates);
    }
    if p["type"] != "TemplateProcessing" {
        return Ok(());
    }
    for template in ["single", "pair"] {
        for piece in p[template].as_array().into_iter().flatten() {
            if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                if p["special_tokens"].get(id).is_none() {
                    return Err(format!(
                        "post_processor: the {template} template uses {id:?}, which its special_tokens do not define"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The most bytes of one text [`TextTokenizer::encode`] tokenizes to find its first
/// `max_len` tokens (more only for texts of very long unknown words, which encode to one
/// unknown token per word either way).
pub const MAX_PREFIX_BYTES: usize = 4 << 20;

/// `text` cut to at most `budget` bytes, before a whitespace when one is in the second
/// half of the prefix (so no word is split), else at a character boundary.
fn prefix(text: &str, budget: usize) -> &str {
    if text.len() <= budget {
        return text;
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(char::is_whitespace) {
        Some(ws) if ws >= end / 2 => &text[..ws],
        _ => &text[..end],
    }
}

fn check_not_empty(text: &str, pair: Option<&str>, index: usize) -> Result<()> {
    if text.trim().is_empty() || pair.is_some_and(|p| p.trim().is_empty()) {
        return Err(TextError::EmptyText { index });
    }
    Ok(())
}

/// Refuses an encoding in which the text (or either side of a pair) has no token besides
/// the special ones: its vector would be that of the empty string.
fn check_kept(enc: &tokenizers::Encoding, pair: bool, index: usize) -> Result<()> {
    let sequences = enc.get_sequence_ids();
    let special = enc.get_special_tokens_mask();
    for side in 0..1 + usize::from(pair) {
        let kept = sequences
            .iter()
            .zip(special)
            .any(|(s, &m)| *s == Some(side) && m == 0);
        if !kept {
            return Err(TextError::NoTokens { index });
        }
    }
    Ok(())
}

impl Encoded {
    fn from_encoding(enc: &tokenizers::Encoding, full_len: usize) -> Self {
        Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            tokens: enc.get_tokens().to_vec(),
            offsets: enc.get_offsets().to_vec(),
            word_ids: enc.get_word_ids().to_vec(),
            sequence_ids: enc.get_sequence_ids(),
            special: enc
                .get_special_tokens_mask()
                .iter()
                .map(|&m| m != 0)
                .collect(),
            truncated: full_len > enc.len(),
            full_len,
        }
    }

    /// The tokens at positions `keep`, in that order.
    fn select(&self, keep: &[usize]) -> Encoded {
        Encoded {
            ids: keep.iter().map(|&t| self.ids[t]).collect(),
            type_ids: keep.iter().map(|&t| self.type_ids[t]).collect(),
            tokens: keep.iter().map(|&t| self.tokens[t].clone()).collect(),
            offsets: keep.iter().map(|&t| self.offsets[t]).collect(),
            word_ids: keep.iter().map(|&t| self.word_ids[t]).collect(),
            sequence_ids: keep.iter().map(|&t| self.sequence_ids[t]).collect(),
            special: keep.iter().map(|&t| self.special[t]).collect(),
            truncated: keep.len() < self.full_len,
            full_len: self.full_len,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Character span of word `word` of text `sequence` (first token's start to last token's
    /// end), as tokenizers' `Encoding.word_to_chars`.
    pub fn word_to_chars(&self, word: u32, sequence: usize) -> Option<(usize, usize)> {
        let mut hits = (0..self.len())
            .filter(|&i| self.word_ids[i] == Some(word) && self.sequence_ids[i] == Some(sequence));
        let first = hits.next()?;
        let last = hits.next_back().unwrap_or(first);
        Some((self.offsets[first].0, self.offsets[last].1))
    }
}

/// Byte position of every character boundary of `text`: `table[c]` is the byte offset of
/// character `c` (and `table[char count] == text.len()`), for slicing by character offsets.
pub fn char_to_byte_table(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(text.len()))
        .collect()
}

/// `text[start..end]` by character offsets (clamped to the text).
pub fn char_slice(text: &str, table: &[usize], start: usize, end: usize) -> String {
    let last = table.len() - 1;
    let (s, e) = (table[start.min(last)], table[end.min(last)]);
    if s >= e {
        String::new()
    } else {
        text[s..e].to_string()
    }
}

/// transformers' `clean_up_tokenization`: removes the spaces decoding leaves before
/// punctuation and English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    RULES
        .iter()
        .fold(text.to_string(), |s, (from, to)| s.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer(name: &str) -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/tiny")
            .join(name);
        TextTokenizer::from_dir(&dir).unwrap()
    }

    /// Cutting long texts before tokenizing gives exactly what truncating the whole
    /// encoding gives: WordPiece and byte-level BPE, single texts and pairs, texts just over
    /// the cut and far over it, with and without whitespace near the cut.
    #[test]
    fn long_texts_cut_before_tokenizing_truncate_as_the_whole_text_does() {
        let words = [
            "alpha",
            "beta,",
            "gamma's",
            "déjà",
            "vu",
            "x",
            "longerwordhere",
            "🙂",
        ];
        let long: String = (0..40_000)
            .map(|i| words[(i * 7) % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        let dense: String = "ab".repeat(30_000);
        for name in ["bert-base", "roberta-base"] {
            let tok = tokenizer(name);
            for (text, pair, max_len) in [
                (long.as_str(), None, 128),
                (long.as_str(), None, 512),
                (&long[..20_000], None, 500),
                (long.as_str(), Some("a short question"), 128),
                ("a short question", Some(long.as_str()), 384),
                (long.as_str(), Some(long.as_str()), 256),
                (dense.as_str(), None, 64),
            ] {
                let got = tok
                    .encode(text, pair, max_len, Truncation::Truncate, 0)
                    .unwrap();
                let params = tokenizers::TruncationParams {
                    max_length: max_len,
                    ..Default::default()
                };
                let want = tok.encode_raw(text, pair, Some(params), 0).unwrap();
                assert_eq!(got.ids, want.get_ids(), "{name} {max_len} {}", text.len());
                assert_eq!(got.offsets.len(), want.get_offsets().len());
                let whole = tok.encode_raw(text, pair, None, 0).unwrap().len();
                assert_eq!(got.truncated, whole > max_len, "{name} {max_len}");
                assert!(got.full_len <= whole);
            }
        }
    }
}
