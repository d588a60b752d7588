//! Training a new vocabulary on a corpus with the `tokenizers` crate's trainers, written as
//! the files transformers' fast tokenizers load unchanged:
//!
//! - WordPiece, as BERT: BERT normalizer (optional lowercasing and accent stripping), BERT
//!   pre-tokenizer, `##` continuation, `[CLS] A [SEP] B [SEP]` → tokenizer.json, vocab.txt.
//! - byte-level BPE, as RoBERTa / GPT-2 (GottBERT): byte-level pre-tokenizer and alphabet,
//!   `<s> A </s></s> B </s>` → tokenizer.json, vocab.json, merges.txt.
//! - Unigram, as XLM-R / CamemBERT's sentencepiece: NFKC, `▁` for spaces, the XLM-R template
//!   → tokenizer.json.
//!
//! Each also gets tokenizer_config.json (the transformers class and special tokens) and
//! special_tokens_map.json. Input files are plain text or gzip, one or more texts per line;
//! folders are read recursively in name order.
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{BertNormalizer, Lowercase, NormalizerWrapper, Sequence, NFKC};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, Model, NormalizedString, Normalizer, OffsetReferential, OffsetType,
    PreTokenizedString, PreTokenizer, Tokenizer,
};

use crate::error::{Result, TextError};

/// The vocabulary model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// BERT's WordPiece.
    WordPiece,
    /// RoBERTa's byte-level BPE.
    Bpe,
    /// XLM-R / CamemBERT's Unigram (sentencepiece).
    Unigram,
}

/// What to train.
#[derive(Debug, Clone)]
pub struct VocabOptions {
    /// Model.
    pub kind: VocabKind,
    /// Vocabulary size, special tokens included.
    pub vocab_size: usize,
    /// Lowercase (and, for WordPiece, strip accents) before splitting.
    pub lowercase: bool,
    /// Pairs / words seen fewer times are not merged (WordPiece, BPE).
    pub min_frequency: u64,
    /// `model_max_length` written to tokenizer_config.json.
    pub model_max_length: usize,
}

/// What training produced.
#[derive(Debug, Clone)]
pub struct TrainedVocab {
    /// Final vocabulary size.
    pub vocab_size: usize,
    /// Lines read.
    pub lines: usize,
    /// Files written.
    pub files: Vec<PathBuf>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TextError + '_ {
    move |source| TextError::Io {
        path: path.into(),
        error: source,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> TextError {
    TextError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// The files under `inputs` (folders recursively, in name order).
pub fn corpus_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(io(p))?
                .map(|e| e.map(|e| e.path()).map_err(io(p)))
                .collect::<Result<_>>()?;
            entries.sort();
            for e in entries {
                walk(&e, out)?;
            }
        } else if p.is_file() {
            out.push(p.into());
        } else {
            return Err(TextError::Io {
                path: p.into(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    if p.exists() {
                        "not a file or folder (a device or pipe?)"
                    } else {
                        "no such file or folder"
                    },
                ),
            });
        }
        Ok(())
    }
    let mut out = Vec::new();
    for i in inputs {
        walk(i, &mut out)?;
    }
    if out.is_empty() {
        let named: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(TextError::Corpus {
            path: named.join(", ").into(),
            message:
                "no corpus files there (a folder from `berth data prepare` has a manifest.json)"
                    .into(),
        });
    }
    Ok(out)
}

/// A reader over a plain or gzip file (by its magic bytes, not its name).
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io(path))?;
    let f = std::fs::File::open(path).map_err(io(path))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    })
}

/// Lines of `files`, in order; the first error (unreadable file, invalid UTF-8, corrupt
/// gzip) stops the stream and is kept in `error`.
struct Lines<'a> {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, Box<dyn BufRead + Send>, usize)>,
    error: &'a Mutex<Option<TextError>>,
    count: &'a Mutex<usize>,
}

impl<'a> Lines<'a> {
    fn new(
        files: &[PathBuf],
        error: &'a Mutex<Option<TextError>>,
        count: &'a Mutex<usize>,
    ) -> Self {
        Lines {
            files: files.to_vec().into_iter(),
            current: None,
            error,
            count,
        }
    }
}

impl Iterator for Lines<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if self.current.is_none() {
                let path = self.files.next()?;
                match open_text(&path) {
                    Ok(r) => self.current = Some((path, r, 0)),
                    Err(e) => {
                        *self.error.lock().expect("not poisoned") = Some(e);
                        return None;
                    }
                }
            }
            let (path, reader, line) = self.current.as_mut().expect("opened above");
            let mut buf = Vec::new();
            match reader
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
            {
                Ok(0) => self.current = None,
                Ok(n) if n > MAX_LINE_BYTES => {
                    *self.error.lock().expect("not poisoned") = Some(TextError::Corpus {
                        path: path.clone(),
                        message: format!(
                            "line {}: longer than {} MiB",
                            *line + 1,
                            MAX_LINE_BYTES >> 20
                        ),
                    });
                    return None;
                }
                Ok(_) => {
                    *line += 1;
                    match String::from_utf8(buf) {
                        Ok(s) => {
                            *self.count.lock().expect("not poisoned") += 1;
                            return Some(without_long_words(s));
                        }
                        Err(_) => {
                            *self.error.lock().expect("not poisoned") = Some(TextError::Corpus {
                                path: path.clone(),
                                message: format!("line {line}: invalid UTF-8"),
                            });
                            return None;
                        }
                    }
                }
                Err(e) => {
                    *self.error.lock().expect("not poisoned") =
                        Some(invalid(path, format!("line {}: {e}", *line + 1)));
                    return None;
                }
            }
        }
    }
}

/// Largest vocabulary trained (published multilingual vocabularies have ~250,000 tokens).
pub const MAX_VOCAB_SIZE: usize = 1 << 20;

/// Longest line read from a corpus (an endless file without newlines ends here).
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Words (whitespace-separated) longer than this many characters are left out of vocabulary
/// training: WordPiece encodes them as one unknown token anyway (its
/// `max_input_chars_per_word` is 100), and the merge trainers' time grows with the square of
/// a word's length (one 5 MB word took minutes).
pub const MAX_WORD_CHARS: usize = 100;

/// `line` without its words longer than [`MAX_WORD_CHARS`] (unchanged when it has none).
fn without_long_words(line: String) -> String {
    if line.len() <= MAX_WORD_CHARS
        || !line
            .split_whitespace()
            .any(|w| w.chars().nth(MAX_WORD_CHARS).is_some())
    {
        return line;
    }
    line.split_whitespace()
        .filter(|w| w.chars().nth(MAX_WORD_CHARS).is_none())
        .collect::<Vec<_>>()
        .join(" ")
        + "\n"
}

/// The special tokens of a kind, in id order (they take ids 0, 1, ...).
fn specials(kind: VocabKind) -> Vec<AddedToken> {
    match kind {
        VocabKind::WordPiece => ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect(),
        // RoBERTa's order; its <mask> swallows the space before it.
        VocabKind::Bpe | VocabKind::Unigram => vec![
            AddedToken::from("<s>", true),
            AddedToken::from("<pad>", true),
            AddedToken::from("</s>", true),
            AddedToken::from("<unk>", true),
            AddedToken::from("<mask>", true).lstrip(true),
        ],
    }
}

fn tf(e: tokenizers::Error, path: &Path) -> TextError {
    invalid(path, e.to_string())
}

/// Trains a vocabulary on `inputs` and writes the tokenizer files into `out` (created).
pub fn train_vocabulary(
    inputs: &[PathBuf],
    opts: &VocabOptions,
    out: &Path,
) -> Result<TrainedVocab> {
    check_output(out)?;
    let files = corpus_files(inputs)?;
    let special = specials(opts.kind);
    if opts.vocab_size > MAX_VOCAB_SIZE {
        return Err(TextError::Options(format!(
            "--vocab-size {} is more than the {MAX_VOCAB_SIZE} this trainer builds",
            opts.vocab_size
        )));
    }
    if opts.vocab_size <= special.len() {
        return Err(invalid(
            out,
            format!(
                "vocabulary size {} leaves no room beyond the {} special tokens",
                opts.vocab_size,
                special.len()
            ),
        ));
    }
    let mut tok: Tokenizer;
    let mut trainer: TrainerWrapper;
    match opts.kind {
        VocabKind::WordPiece => {
            tok = Tokenizer::new(
                WordPiece::builder()
                    .unk_token("[UNK]".into())
                    .build()
                    .map_err(|e| tf(e, out))?,
            );
            // As BertTokenizerFast: clean text, split CJK characters, strip accents when lowercasing.
            tok.with_normalizer(Some(BertNormalizer::new(true, true, None, opts.lowercase)))
                .map_err(|e| tf(e, out))?;
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            // The trainer would create the `##` pieces in hash-map order, numbering them
            // differently on every run, and merge ties are broken by those numbers: the
            // vocabulary itself varied (huggingface/tokenizers#1794). Handing it every `##`
            // piece it will create, in character order, as extra special tokens fixes their
            // ids; they are ordinary pieces again in the final tokenizer.
            let mut fixed = special.clone();
            fixed.extend(
                continuation_chars(&files, &tok)?
                    .into_iter()
                    .map(|c| AddedToken::from(format!("##{c}"), true)),
            );
            trainer = WordPieceTrainerBuilder::new()
                .vocab_size(opts.vocab_size)
                .min_frequency(opts.min_frequency)
                .special_tokens(fixed)
                .show_progress(false)
                .build()
                .into();
        }
        VocabKind::Bpe => {
            tok = Tokenizer::new(BPE::default());
            if opts.lowercase {
                tok.with_normalizer(Some(Lowercase))
                    .map_err(|e| tf(e, out))?;
            }
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            trainer = BpeTrainerBuilder::new()
                .vocab_size(opts.vocab_size)
                .min_frequency(opts.min_frequency)
                .special_tokens(special.clone())
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .show_progress(false)
                .build()
                .into();
        }
        VocabKind::Unigram => {
            tok = Tokenizer::new(Unigram::default());
            let mut norms: Vec<NormalizerWrapper> = vec![NFKC.into()];
            if opts.lowercase {
                norms.push(Lowercase.into());
            }
            tok.with_normalizer(Some(Sequence::new(norms)))
                .map_err(|e| tf(e, out))?;
            tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
            trainer = UnigramTrainerBuilder::default()
                .vocab_size(opts.vocab_size as u32)
                .special_tokens(special.clone())
                .unk_token(Some("<unk>".into()))
                .show_progress(false)
                .build()
                .map_err(|e| invalid(out, e.to_string()))?
                .into();
        }
    }
    let (error, count) = (Mutex::new(None), Mutex::new(0usize));
    let lines = Lines::new(&files, &error, &count);
    tok.train(&mut trainer, lines).map_err(|e| tf(e, out))?;
    if let Some(e) = error.into_inner().expect("not poisoned") {
        return Err(e);
    }
    let lines = count.into_inner().expect("not poisoned");
    if lines == 0 {
        return Err(invalid(&files[0], "the corpus is empty"));
    }
    if opts.kind == VocabKind::WordPiece {
        tok = canonical_wordpiece(&tok, &special, out)?;
    }
    let vocab = tok.get_vocab(true);
    let id = |t: &str| *vocab.get(t).expect("special tokens are in the vocabulary");
    // A template post-processor framing texts with `start` / `end`.
    let template = |single: &str, pair: &str, start: &str, end: &str| {
        TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| invalid(out, e))?
            .special_tokens(vec![(start, id(start)), (end, id(end))])
            .build()
            .map_err(|e| invalid(out, e.to_string()))
    };
    match opts.kind {
        VocabKind::WordPiece => {
            tok.with_post_processor(Some(template(
                "[CLS] $A [SEP]",
                "[CLS] $A [SEP] $B:1 [SEP]:1",
                "[CLS]",
                "[SEP]",
            )?));
            tok.with_decoder(Some(WordPieceDecoder::default()));
        }
        VocabKind::Bpe => {
            tok.with_post_processor(Some(
                RobertaProcessing::new(("</s>".into(), id("</s>")), ("<s>".into(), id("<s>")))
                    .trim_offsets(true)
                    .add_prefix_space(false),
            ));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
        }
        VocabKind::Unigram => {
            tok.with_post_processor(Some(template(
                "<s> $A </s>",
                "<s> $A </s> </s> $B </s>",
                "<s>",
                "</s>",
            )?));
            tok.with_decoder(Some(MetaspaceDecoder::new(
                '▁',
                PrependScheme::Always,
                true,
            )));
        }
    }
    write_files(&tok, opts, out, lines)
}

/// The characters that occur after the first character of a word once `tok` has normalised
/// and pre-tokenised the corpus: exactly the `##c` pieces WordPiece training creates.
fn continuation_chars(files: &[PathBuf], tok: &Tokenizer) -> Result<BTreeSet<char>> {
    let (error, count) = (Mutex::new(None), Mutex::new(0usize));
    let lines = Lines::new(files, &error, &count);
    let mut chars = BTreeSet::new();
    for line in lines {
        let mut normalized = NormalizedString::from(line.as_str());
        if let Some(n) = tok.get_normalizer() {
            n.normalize(&mut normalized).map_err(|e| tf(e, &files[0]))?;
        }
        let mut words = PreTokenizedString::from(normalized);
        if let Some(p) = tok.get_pre_tokenizer() {
            p.pre_tokenize(&mut words).map_err(|e| tf(e, &files[0]))?;
        }
        for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            chars.extend(word.chars().skip(1));
        }
    }
    match error.into_inner().expect("not poisoned") {
        Some(e) => Err(e),
        None => Ok(chars),
    }
}

/// The trained WordPiece tokenizer rebuilt with only the real special tokens and a canonical
/// id order: the special tokens keep ids `0..special.len()`, then pieces follow by length in
/// characters, word-initial before `##` continuation, then by text (single characters first,
/// as in BERT's vocab.txt). WordPiece encoding depends only on the set of pieces (greedy
/// longest match), so the order changes no tokenization.
fn canonical_wordpiece(
    trained: &Tokenizer,
    special: &[AddedToken],
    out: &Path,
) -> Result<Tokenizer> {
    let n_special = special.len();
    let mut pieces: Vec<(String, u32)> = trained.get_model().get_vocab().into_iter().collect();
    pieces.sort_by_cached_key(|(t, id)| {
        let (continuation, body) = match t.strip_prefix("##") {
            Some(body) => (true, body),
            None => (false, t.as_str()),
        };
        let rank = if (*id as usize) < n_special {
            *id as usize
        } else {
            n_special
        };
        (rank, body.chars().count(), continuation, body.to_string())
    });
    let vocab: ahash::AHashMap<String, u32> = pieces
        .into_iter()
        .enumerate()
        .map(|(i, (t, _))| (t, i as u32))
        .collect();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| tf(e, out))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(trained.get_normalizer().cloned())
        .map_err(|e| tf(e, out))?;
    tok.with_pre_tokenizer(trained.get_pre_tokenizer().cloned());
    tok.add_special_tokens(special.to_vec())
        .map_err(|e| tf(e, out))?;
    Ok(tok)
}

/// Files a trained tokenizer may write; a folder holding any of them is refused, so a
/// model's own tokenizer is never overwritten.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Refuses an output folder that already holds tokenizer files.
fn check_output(out: &Path) -> Result<()> {
    let refuse = |why: String| {
        Err(TextError::Options(format!(
            "--output {}: {why}: choose a new folder",
            out.display()
        )))
    };
    if out.exists() && !out.is_dir() {
        return refuse("exists and is not a folder".into());
    }
    if let Some(f) = TOKENIZER_FILES.iter().find(|f| out.join(f).exists()) {
        return refuse(format!("already holds a tokenizer ({f})"));
    }
    Ok(())
}

/// Writes the tokenizer's files into a staging folder beside `out`, then moves them into
/// `out` (tokenizer.json last): a failed or killed run leaves no partial tokenizer in `out`.
fn write_files(
    tok: &Tokenizer,
    opts: &VocabOptions,
    out: &Path,
    lines: usize,
) -> Result<TrainedVocab> {
    check_output(out)?;
    let name = out
        .file_name()
        .map_or("tokenizer".into(), |n| n.to_string_lossy());
    let stage = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).map_err(io(&stage))?;
    }
    let staged = write_staged(tok, opts, &stage).and_then(|written| {
        std::fs::create_dir_all(out).map_err(io(out))?;
        let mut files = Vec::new();
        // tokenizer.json is written first and moved last: its presence marks a whole set.
        for f in written.iter().skip(1).chain(written.first()) {
            let dst = out.join(f.file_name().expect("a file name"));
            std::fs::rename(f, &dst).map_err(io(&dst))?;
            files.push(dst);
        }
        files.rotate_right(1);
        Ok(files)
    });
    let _ = std::fs::remove_dir_all(&stage);
    Ok(TrainedVocab {
        vocab_size: tok.get_vocab_size(true),
        lines,
        files: staged?,
    })
}

/// Writes the tokenizer's files into `out` (tokenizer.json first); returns their paths.
fn write_staged(tok: &Tokenizer, opts: &VocabOptions, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut files = Vec::new();
    let json = out.join("tokenizer.json");
    tok.save(&json, true).map_err(|e| tf(e, &json))?;
    files.push(json);
    if opts.kind != VocabKind::Unigram {
        // vocab.txt (WordPiece) or vocab.json + merges.txt (BPE), for the slow tokenizers.
        files.extend(tok.get_model().save(out, None).map_err(|e| tf(e, out))?);
    }
    let (class, tokens) = match opts.kind {
        VocabKind::WordPiece => (
            "BertTokenizer",
            serde_json::json!({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "mask_token": "[MASK]"}),
        ),
        VocabKind::Bpe | VocabKind::Unigram => (
            if opts.kind == VocabKind::Bpe {
                "RobertaTokenizer"
            } else {
                "XLMRobertaTokenizer"
            },
            serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}),
        ),
    };
    let mut config = tokens.clone();
    let c = config.as_object_mut().expect("an object");
    c.insert("tokenizer_class".into(), class.into());
    c.insert("model_max_length".into(), opts.model_max_length.into());
    match opts.kind {
        VocabKind::WordPiece => {
            c.insert("do_lower_case".into(), opts.lowercase.into());
            c.insert("strip_accents".into(), serde_json::Value::Null);
            c.insert("tokenize_chinese_chars".into(), true.into());
        }
        VocabKind::Bpe => {
            c.insert("add_prefix_space".into(), false.into());
            c.insert("trim_offsets".into(), true.into());
        }
        VocabKind::Unigram => {}
    }
    for (name, value) in [
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", tokens),
    ] {
        let p = out.join(name);
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&value).expect("JSON serialises"),
        )
        .map_err(io(&p))?;
        files.push(p);
    }
    Ok(files)
}
