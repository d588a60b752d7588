//! Prepared pretraining corpora (`berth data prepare`): text tokenized once into sharded
//! binary files that `berth pretrain --data DIR` memory-maps.
//!
//! Inputs are plain text (one paragraph per line, a blank line between documents; a file
//! ends a document) or JSON Lines (one document per line, its text in a chosen field,
//! paragraphs split at newlines), gzip-compressed or not, files or folders. Each document is
//! cleaned (Unicode NFC, control characters other than tab dropped), optionally dropped as an
//! exact duplicate of an earlier one, sent to the held-out split by a seeded hash of its
//! position (so the split is by document and does not depend on the rest of the corpus), and
//! packed into sequences exactly as [`crate::pretrain::read_corpus`] packs them. Training
//! sequences of a corpus with weight `w` are written `floor(w)` times plus once more with
//! probability `w - floor(w)` (seeded): up-sampling a small domain corpus.
//!
//! Everything streams: documents are read, tokenized (in parallel, a batch at a time) and
//! written as they come; only one shard's sequences are held in memory, shuffled (seeded)
//! before the shard is written. Shards and the manifest are written to a temporary name and
//! renamed, so a failed run never leaves a half-written file under a final name.
//!
//! Shard format (little-endian): `b"BERTHSEQ"`, version `u32` (1), reserved `u32`,
//! sequences `n: u64`, tokens `t: u64`, CRC-32 `u32` of everything after the 40-byte header,
//! reserved `u32`; then `n + 1` `u64` offsets into the token array; then `t` `u32` tokens,
//! each a token id in the low 30 bits, bit 30 set where a new word starts and bit 31 set on
//! tokens outside any word (the special tokens).
use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use berth_text::{Encoded, TextTokenizer, Truncation};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Shard magic.
pub const MAGIC: &[u8; 8] = b"BERTHSEQ";
/// Shard format version.
pub const VERSION: u32 = 1;
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
pub(crate) const HEADER: usize = 40;
pub(crate) const NO_WORD: u32 = 1 << 31;
pub(crate) const WORD_START: u32 = 1 << 30;
pub(crate) const ID_MASK: u32 = WORD_START - 1;

/// One packed sequence: ids with the special tokens, and word ids (`None` on specials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Word of each token, numbered from 0 within the sequence.
    pub words: Vec<Option<u32>>,
}

impl Sequence {
    fn encode(&self) -> Vec<u32> {
        let mut prev = None;
        self.ids
            .iter()
            .zip(&self.words)
            .map(|(&id, &w)| {
                let flag = match w {
                    None => NO_WORD,
                    Some(_) if w != prev => WORD_START,
                    Some(_) => 0,
                };
                prev = w;
                id | flag
            })
            .collect()
    }

    pub(crate) fn decode(tokens: &[u32]) -> Self {
        let (mut ids, mut words) = (Vec::with_capacity(tokens.len()), Vec::new());
        let mut word: Option<u32> = None;
        for &t in tokens {
            ids.push(t & ID_MASK);
            words.push(if t & NO_WORD != 0 {
                None
            } else {
                if t & WORD_START != 0 || word.is_none() {
                    word = Some(word.map_or(0, |w| w + 1));
                }
                word
            });
        }
        Sequence { ids, words }
    }
}

/// Packs paragraphs (content ids and word ids) of one document into sequences of at most
/// `room + 2` tokens, the start and end tokens around each.
pub(crate) struct Packer {
    start: u32,
    end: u32,
    room: usize,
    ids: Vec<u32>,
    words: Vec<Option<u32>>,
    next_word: u32,
    /// Finished sequences.
    pub out: Vec<Sequence>,
}

impl Packer {
    pub(crate) fn new(start: u32, end: u32, max_length: usize) -> Self {
        Packer {
            start,
            end,
            room: max_length - 2,
            ids: Vec::new(),
            words: Vec::new(),
            next_word: 0,
            out: Vec::new(),
        }
    }

    /// Ends the current sequence (at a document boundary, or when full).
    pub(crate) fn flush(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(self.ids.len() + 2);
        ids.push(self.start);
        ids.append(&mut self.ids);
        ids.push(self.end);
        let mut words = vec![None];
        words.append(&mut self.words);
        words.push(None);
        self.out.push(Sequence { ids, words });
        self.next_word = 0;
    }

    /// Adds one paragraph; a paragraph longer than a sequence is cut.
    pub(crate) fn add(&mut self, enc: &Encoded) {
        let body: Vec<usize> = (0..enc.ids.len()).filter(|&i| !enc.special[i]).collect();
        for chunk in body.chunks(self.room) {
            if self.ids.len() + chunk.len() > self.room {
                self.flush();
            }
            let base = self.next_word;
            let mut first_word: Option<u32> = None;
            for &i in chunk {
                self.ids.push(enc.ids[i]);
                let w = enc.word_ids[i].map(|w| {
                    let f = *first_word.get_or_insert(w);
                    base + (w - f.min(w))
                });
                self.words.push(w);
                if let Some(w) = w {
                    self.next_word = self.next_word.max(w + 1);
                }
            }
        }
    }
}

/// The tokenizer's sequence-start, sequence-end and mask ids (`[CLS]`/`[SEP]`/`[MASK]` or
/// `<s>`/`</s>`/`<mask>`).
pub(crate) fn specials(tok: &TextTokenizer) -> Result<(u32, u32, u32)> {
    let enc = tok.encode("a", None, 16, Truncation::Truncate, 0)?;
    let (first, last) = (enc.ids[0], *enc.ids.last().expect("non-empty"));
    if !enc.special[0] || !enc.special[enc.ids.len() - 1] {
        return Err(TrainError::Config(format!(
            "{}: the tokenizer adds no start / end tokens; pretraining needs them",
            tok.source().display()
        )));
    }
    let mask = tok.mask_token().map(|(_, id)| id).ok_or_else(|| {
        TrainError::Config(format!(
            "{}: the tokenizer has no mask token",
            tok.source().display()
        ))
    })?;
    Ok((first, last, mask))
}

/// A stable fingerprint of a tokenizer's vocabulary (FNV-1a over every token and its id):
/// prepared data records it, and pretraining refuses a tokenizer that differs.
pub fn tokenizer_fingerprint(tok: &TextTokenizer) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for id in 0..tok.vocab_size() as u32 {
        eat(&id.to_le_bytes());
        eat(tok.id_to_token(id).unwrap_or_default().as_bytes());
        eat(&[0xff]);
    }
    format!("{h:016x}")
}

/// Largest sampling weight of a corpus (each unit writes its training sequences once more).
pub const MAX_WEIGHT: f64 = 1000.0;

/// Refuses a preparation whose shards would not fit on the output's file system: about four
/// bytes per token and a token per three to four bytes of text make the shards roughly the
/// size of the text (gzip inputs: three times their size), times each corpus's weight.
fn check_disk_space(inputs: &[CorpusInput], out: &Path) -> Result<()> {
    let mut estimate = 0f64;
    for input in inputs {
        let files = berth_text::train::corpus_files(std::slice::from_ref(&input.path))?;
        for f in files {
            let mut magic = [0u8; 2];
            let gz = std::fs::File::open(&f)
                .and_then(|mut h| std::io::Read::read_exact(&mut h, &mut magic))
                .is_ok()
                && magic == [0x1f, 0x8b];
            let len = std::fs::metadata(&f).map_or(0, |m| m.len()) as f64;
            estimate += len * if gz { 3.0 } else { 1.0 } * input.weight.ceil();
        }
    }
    let mut probe = out;
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    if let Some(free) = free_bytes(probe) {
        if estimate > free as f64 {
            return Err(TrainError::Config(format!(
                "{}: the shards would take ~{:.1} GiB (text size x weight) but only {:.1} GiB are free",
                out.display(),
                estimate / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

/// Bytes an unprivileged process can still write on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter of the right type.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// One input of [`prepare`]: a file or folder and its sampling weight.
#[derive(Debug, Clone)]
pub struct CorpusInput {
    /// File or folder.
    pub path: PathBuf,
    /// Training copies per sequence (> 0; fractions sampled).
    pub weight: f64,
}

/// Options of [`prepare`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Tokens per sequence, special tokens included.
    pub max_length: usize,
    /// Fraction of documents held out.
    pub val_fraction: f64,
    /// Seeds the split, the up-sampling and the shard shuffles.
    pub seed: u64,
    /// Drop documents identical (after cleaning) to an earlier one.
    pub dedup: bool,
    /// JSON Lines: the field holding the text.
    pub json_field: String,
    /// Tokens per shard (a shard is shuffled in memory before it is written).
    pub shard_tokens: usize,
}

/// What [`prepare`] read from one input.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CorpusStats {
    /// The input as given.
    pub path: PathBuf,
    /// Its weight.
    pub weight: f64,
    /// Files read.
    pub files: usize,
    /// Documents kept.
    pub documents: usize,
    /// Exact duplicates dropped.
    pub duplicates: usize,
    /// Documents held out.
    pub val_documents: usize,
    /// Training sequences written (after up-sampling).
    pub train_sequences: usize,
    /// Held-out sequences written.
    pub val_sequences: usize,
}

/// One shard file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    /// File name inside the prepared folder.
    pub file: String,
    /// Sequences.
    pub sequences: usize,
    /// Tokens.
    pub tokens: usize,
    /// CRC-32 of the shard's body (also in its header).
    pub crc32: u32,
}

/// `manifest.json` of a prepared folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub format_version: u32,
    /// Where the tokenizer came from (informational).
    pub tokenizer: PathBuf,
    /// Its vocabulary size.
    pub vocab_size: usize,
    /// [`tokenizer_fingerprint`].
    pub tokenizer_fingerprint: String,
    /// Tokens per sequence at most.
    pub max_length: usize,
    /// The options used.
    pub val_fraction: f64,
    /// The seed used.
    pub seed: u64,
    /// Whether duplicates were dropped.
    pub dedup: bool,
    /// Per input.
    pub corpora: Vec<CorpusStats>,
    /// Training shards.
    pub train: Vec<ShardInfo>,
    /// Held-out shards.
    pub val: Vec<ShardInfo>,
}

/// Accumulates sequences and writes them as shuffled shards.
struct ShardWriter {
    dir: PathBuf,
    prefix: &'static str,
    limit: usize,
    buffer: Vec<Vec<u32>>,
    tokens: usize,
    rng: rand::rngs::StdRng,
    shards: Vec<ShardInfo>,
}

impl ShardWriter {
    fn new(dir: &Path, prefix: &'static str, limit: usize, seed: u64) -> Self {
        ShardWriter {
            dir: dir.into(),
            prefix,
            limit: limit.max(1),
            buffer: Vec::new(),
            tokens: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            shards: Vec::new(),
        }
    }

    fn push(&mut self, seq: Vec<u32>) -> Result<()> {
        self.tokens += seq.len();
        self.buffer.push(seq);
        if self.tokens >= self.limit {
            self.write()?;
        }
        Ok(())
    }

    fn write(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        use rand::seq::SliceRandom;
        self.buffer.shuffle(&mut self.rng);
        let n = self.buffer.len();
        let mut body = Vec::with_capacity(8 * (n + 1) + 4 * self.tokens);
        let mut offset = 0u64;
        body.extend_from_slice(&offset.to_le_bytes());
        for s in &self.buffer {
            offset += s.len() as u64;
            body.extend_from_slice(&offset.to_le_bytes());
        }
        for s in &self.buffer {
            for t in s {
                body.extend_from_slice(&t.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&body);
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(n as u64).to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&body);
        let file = format!("{}-{:05}.bin", self.prefix, self.shards.len());
        crate::checkpoint::write_atomic(&self.dir.join(&file), &bytes)?;
        self.shards.push(ShardInfo {
            file,
            sequences: n,
            tokens: offset as usize,
            crc32: crc,
        });
        self.buffer.clear();
        self.tokens = 0;
        Ok(())
    }
}

/// A document: its source (for error messages) and paragraphs.
struct Document {
    file: PathBuf,
    line: usize,
    paragraphs: Vec<String>,
}

/// NFC, control characters (other than tab) dropped, surrounding space trimmed.
fn clean(text: &str) -> String {
    use unicode_normalization_alignments::UnicodeNormalization;
    text.nfc()
        .map(|(c, _)| c)
        .filter(|c| !c.is_control() || *c == '\t')
        .collect::<String>()
        .trim()
        .to_string()
}

fn is_json_lines(path: &Path) -> bool {
    let name = path.to_string_lossy().to_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson")
}

/// Streams the documents of one file to `sink`, in batches.
fn read_documents(
    file: &Path,
    json_field: &str,
    sink: &mut dyn FnMut(Vec<Document>) -> Result<()>,
) -> Result<()> {
    let reader = berth_text::train::open_text(file)?;
    let json = is_json_lines(file);
    let bad = |line: usize, message: String| TrainError::Data {
        path: file.into(),
        line,
        message,
    };
    let mut batch: Vec<Document> = Vec::new();
    let mut current: Option<Document> = None;
    for (i, raw) in reader.split(b'\n').enumerate() {
        let line = i + 1;
        let bytes = raw.map_err(|e| bad(line, e.to_string()))?;
        if bytes.contains(&0) {
            return Err(bad(
                line,
                "contains NUL bytes: a binary file, not text".into(),
            ));
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            bad(
                line,
                "invalid UTF-8 (a binary file, or not UTF-8 text)".into(),
            )
        })?;
        if json {
            if text.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(line, format!("invalid JSON: {e}")))?;
            let body = v.get(json_field).and_then(|t| t.as_str()).ok_or_else(|| {
                bad(
                    line,
                    format!("no string field {json_field:?} (choose one with --field)"),
                )
            })?;
            batch.push(Document {
                file: file.into(),
                line,
                paragraphs: body.lines().map(str::to_string).collect(),
            });
        } else if text.trim().is_empty() {
            batch.extend(current.take());
        } else {
            current
                .get_or_insert_with(|| Document {
                    file: file.into(),
                    line,
                    paragraphs: Vec::new(),
                })
                .paragraphs
                .push(text);
        }
        if batch.len() >= 512 {
            sink(std::mem::take(&mut batch))?;
        }
    }
    batch.extend(current.take());
    if !batch.is_empty() {
        sink(batch)?;
    }
    Ok(())
}

/// A seeded hash in [0, 1) of `(seed, corpus, document)`: decides the held-out split.
fn unit_hash(seed: u64, a: u64, b: u64) -> f64 {
    let mut x =
        seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Tokenizes `inputs` into shards under `out` (created; it must not hold prepared data
/// already) and writes `manifest.json` last.
pub fn prepare(
    inputs: &[CorpusInput],
    tok: &TextTokenizer,
    out: &Path,
    opts: &PrepareOptions,
) -> Result<Manifest> {
    if opts.max_length < 8 {
        return Err(TrainError::Config(format!(
            "--max-length {} is too short to pretrain",
            opts.max_length
        )));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(TrainError::Config(format!(
            "--val-fraction {} must be in [0, 1)",
            opts.val_fraction
        )));
    }
    if tok.vocab_size() > ID_MASK as usize {
        return Err(TrainError::Config(format!(
            "{}: {} tokens do not fit the shard format (at most 2^30)",
            tok.source().display(),
            tok.vocab_size()
        )));
    }
    if let Some(bad) = inputs
        .iter()
        .find(|c| !(c.weight > 0.0 && c.weight <= MAX_WEIGHT))
    {
        return Err(TrainError::Config(format!(
            "{}: weight {} must be in (0, {MAX_WEIGHT}]",
            bad.path.display(),
            bad.weight
        )));
    }
    if opts.shard_tokens < opts.max_length {
        return Err(TrainError::Config(format!(
            "--shard-tokens {} must hold at least one sequence of --max-length {}",
            opts.shard_tokens, opts.max_length
        )));
    }
    check_disk_space(inputs, out)?;
    if out.join("manifest.json").exists() {
        return Err(TrainError::Config(format!(
            "{} already holds prepared data: choose a new --output",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io {
        path: out.into(),
        error: e,
    })?;
    let (start, end, _) = specials(tok)?;
    let mut train = ShardWriter::new(out, "train", opts.shard_tokens, opts.seed);
    let mut val = ShardWriter::new(out, "val", opts.shard_tokens, opts.seed ^ 1);
    let mut upsample = rand::rngs::StdRng::seed_from_u64(opts.seed ^ 2);
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut corpora = Vec::new();
    for (ci, input) in inputs.iter().enumerate() {
        let files = berth_text::train::corpus_files(std::slice::from_ref(&input.path))?;
        let mut stats = CorpusStats {
            path: input.path.clone(),
            weight: input.weight,
            files: files.len(),
            ..Default::default()
        };
        let mut doc_index = 0u64;
        for f in &files {
            let mut sink = |docs: Vec<Document>| -> Result<()> {
                use rayon::prelude::*;
                // Clean, drop empties and duplicates (in order), then tokenize in parallel.
                let mut kept = Vec::new();
                for d in docs {
                    let paragraphs: Vec<String> = d
                        .paragraphs
                        .iter()
                        .map(|p| clean(p))
                        .filter(|p| !p.is_empty())
                        .collect();
                    if paragraphs.is_empty() {
                        continue;
                    }
                    if opts.dedup && !seen.insert(doc_hash(&paragraphs)) {
                        stats.duplicates += 1;
                        continue;
                    }
                    kept.push((d.file, d.line, paragraphs));
                }
                let encoded: Vec<Vec<Encoded>> = kept
                    .par_iter()
                    .map(|(file, line, paragraphs)| {
                        paragraphs
                            .iter()
                            .map(|p| {
                                tok.encode(p, None, usize::MAX / 2, Truncation::Truncate, *line)
                                    .map_err(|e| TrainError::Data {
                                        path: file.clone(),
                                        line: *line,
                                        message: e.to_string(),
                                    })
                            })
                            .collect()
                    })
                    .collect::<Result<_>>()?;
                for encs in encoded {
                    let held_out = unit_hash(opts.seed, ci as u64, doc_index) < opts.val_fraction;
                    doc_index += 1;
                    stats.documents += 1;
                    let mut packer = Packer::new(start, end, opts.max_length);
                    for e in &encs {
                        packer.add(e);
                    }
                    packer.flush();
                    if held_out {
                        stats.val_documents += 1;
                    }
                    for s in packer.out {
                        let tokens = s.encode();
                        if held_out {
                            stats.val_sequences += 1;
                            val.push(tokens)?;
                            continue;
                        }
                        let whole = input.weight.floor() as usize;
                        let extra = upsample.random::<f64>() < input.weight - whole as f64;
                        let copies = whole + extra as usize;
                        for _ in 0..copies {
                            stats.train_sequences += 1;
                            train.push(tokens.clone())?;
                        }
                    }
                }
                Ok(())
            };
            read_documents(f, &opts.json_field, &mut sink)?;
        }
        // (A corpus whose documents all duplicate earlier ones is not empty, just redundant.)
        if stats.documents == 0 && stats.duplicates == 0 {
            return Err(TrainError::Data {
                path: input.path.clone(),
                line: 0,
                message: "the corpus has no text".into(),
            });
        }
        corpora.push(stats);
    }
    train.write()?;
    val.write()?;
    if train.shards.is_empty() {
        return Err(TrainError::Data {
            path: inputs.first().map(|c| c.path.clone()).unwrap_or_default(),
            line: 0,
            message: "every document went to the held-out split: lower --val-fraction".into(),
        });
    }
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        tokenizer: tok.source().to_path_buf(),
        vocab_size: tok.vocab_size(),
        tokenizer_fingerprint: tokenizer_fingerprint(tok),
        max_length: opts.max_length,
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        dedup: opts.dedup,
        corpora,
        train: train.shards,
        val: val.shards,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    crate::checkpoint::write_atomic(&out.join("manifest.json"), &json)?;
    Ok(manifest)
}

/// Two independent 64-bit FNV-1a hashes of a document's paragraphs (exact-duplicate test).
fn doc_hash(paragraphs: &[String]) -> (u64, u64) {
    let (mut a, mut b) = (0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4u64);
    for p in paragraphs {
        for &byte in p.as_bytes().iter().chain(&[b'\n']) {
            a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ byte as u64).wrapping_mul(0x0000_0001_b300_0100 | 1);
        }
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_flags_round_trip() {
        let s = Sequence {
            ids: vec![101, 7, 8, 9, 10, 11, 102],
            words: vec![None, Some(0), Some(0), Some(1), Some(2), Some(2), None],
        };
        assert_eq!(Sequence::decode(&s.encode()), s);
    }

    #[test]
    fn held_out_hash_is_uniform_enough() {
        let n = 20_000;
        let below = (0..n).filter(|&i| unit_hash(42, 0, i) < 0.1).count();
        assert!((below as f64 / n as f64 - 0.1).abs() < 0.01, "{below}");
    }

    #[test]
    fn cleaning_normalises_and_drops_control_characters() {
        // "e" + combining acute → "é" (NFC); a BEL and a zero-width... control dropped.
        assert_eq!(clean(" cafe\u{301}\u{7} ok\u{0}\t"), "café ok");
    }
}
