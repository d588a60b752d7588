//! Pretraining data: corpus → packed sequences (in memory, or read on demand from the
//! memory-mapped shards of a prepared corpus), and the sentence pairs of NSP / SOP.
//!
//! Corpus: plain or gzip text files (folders recursively), one paragraph per line, documents
//! separated by a blank line (BERT's `create_pretraining_data` convention; a file ends a
//! document too). Each document's paragraphs are tokenized and packed greedily into
//! sequences of at most `max_length` tokens (special tokens included); a longer paragraph is
//! cut. Sequences never span documents, and a batch packs them without padding (each is its
//! own `cu_seqlens` segment), so no token attends across documents.
use std::path::Path;

use std::borrow::Cow;

use berth_text::{Encoded, TextTokenizer, Truncation};
use rand::SeedableRng;

use crate::corpus::{specials, Packer, Sequence};
use crate::error::{Result, TrainError};
use crate::objective::DataConfig;

/// One pretraining sequence: `[CLS] ... [SEP]` (or `[CLS] A [SEP] B [SEP]` for the
/// sentence-pair objectives), never crossing a document boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PretrainSequence {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// Token types (segment A 0, segment B 1).
    pub type_ids: Vec<u32>,
    /// Word of each token (`None` on special tokens, which are never masked).
    pub words: Vec<Option<u32>>,
    /// The NSP / SOP label of a segment pair.
    pub pair_label: Option<u32>,
}

impl PretrainSequence {
    /// Whether each token is special (never chosen for masking).
    pub fn special(&self) -> Vec<bool> {
        self.words.iter().map(|w| w.is_none()).collect()
    }
}

/// A packed corpus sequence (one segment).
pub(crate) fn single(seq: Sequence) -> PretrainSequence {
    PretrainSequence {
        type_ids: vec![0; seq.ids.len()],
        ids: seq.ids,
        words: seq.words,
        pair_label: None,
    }
}

/// Training sequences: in memory, or read on demand from the memory-mapped shards of a
/// corpus prepared by `berth data prepare`, so that the corpus size is not bounded by
/// memory.
pub enum Sequences {
    /// Decoded sequences.
    Memory(Vec<PretrainSequence>),
    /// Packed shards, decoded when a batch needs them.
    Shards(crate::shards::Shards),
}

impl crate::objective::TrainSet for Sequences {
    fn len(&self) -> usize {
        match self {
            Sequences::Memory(v) => v.len(),
            Sequences::Shards(s) => s.len(),
        }
    }

    fn tokens(&self) -> usize {
        Sequences::tokens(self)
    }

    fn ids(&self, i: usize) -> Vec<u32> {
        self.get(i).ids.clone()
    }

    fn example_tokens(&self, i: usize) -> usize {
        match self {
            Sequences::Memory(v) => v[i].ids.len(),
            // From the offsets: a rank reads only its own sequences' tokens.
            Sequences::Shards(s) => s.sequence_len(i),
        }
    }
}

impl Sequences {
    /// Sequence `i`.
    pub fn get(&self, i: usize) -> Cow<'_, PretrainSequence> {
        match self {
            Sequences::Memory(v) => Cow::Borrowed(&v[i]),
            Sequences::Shards(s) => Cow::Owned(single(s.sequence(i))),
        }
    }

    /// Tokens over all sequences.
    pub fn tokens(&self) -> usize {
        match self {
            Sequences::Memory(v) => v.iter().map(|s| s.ids.len()).sum(),
            Sequences::Shards(s) => s.tokens(),
        }
    }
}

/// A sentence-pair objective beside masked-LM (BERT only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SentenceObjective {
    /// BERT's next-sentence prediction: half the pairs get a second segment from another
    /// sequence (label 1), half keep the one that follows (label 0).
    Nsp,
    /// ALBERT's sentence order: half the pairs are swapped (label 1), half in order (0).
    Sop,
}

/// Turns packed sequences into segment pairs `[CLS] A [SEP] B [SEP]` (token types 0 for
/// `[CLS] A [SEP]`, 1 for `B [SEP]`) with the objective's label as `class`, as BERT's
/// `create_pretraining_data` does: each sequence is cut at a random word boundary into A and
/// B; SOP swaps half of them, NSP replaces half the B segments by a piece of the same length
/// from another sequence. Seeded; sequences with fewer than two content tokens are dropped.
pub fn sentence_pairs(
    examples: &[PretrainSequence],
    objective: SentenceObjective,
    max_length: usize,
    seed: u64,
) -> Vec<PretrainSequence> {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let content = |e: &PretrainSequence| -> (Vec<u32>, Vec<Option<u32>>) {
        let n = e.ids.len();
        (e.ids[1..n - 1].to_vec(), e.words[1..n - 1].to_vec())
    };
    let mut out = Vec::with_capacity(examples.len());
    for (k, e) in examples.iter().enumerate() {
        let n = e.ids.len();
        if n < 4 {
            continue;
        }
        let (start, end) = (e.ids[0], e.ids[n - 1]);
        let (ids, words) = content(e);
        // One [SEP] more than the packed sequence: drop the last content token if needed.
        let keep = ids.len().min(max_length.saturating_sub(3));
        let (ids, words) = (&ids[..keep], &words[..keep]);
        if ids.len() < 2 {
            continue;
        }
        // A random cut, moved forward to the next word start when there is one.
        let mut cut = rng.random_range(1..ids.len());
        while cut < ids.len() - 1 && words[cut].is_some() && words[cut] == words[cut - 1] {
            cut += 1;
        }
        let (mut a, mut b) = (
            (ids[..cut].to_vec(), words[..cut].to_vec()),
            (ids[cut..].to_vec(), words[cut..].to_vec()),
        );
        let flip = rng.random_bool(0.5);
        let label = match objective {
            SentenceObjective::Sop => {
                if flip {
                    std::mem::swap(&mut a, &mut b);
                }
                flip as u32
            }
            SentenceObjective::Nsp if flip && examples.len() > 1 => {
                // B from another sequence: a piece of the same length where it has one.
                let mut other = rng.random_range(0..examples.len() - 1);
                if other >= k {
                    other += 1;
                }
                let (oi, ow) = content(&examples[other]);
                let len = b.0.len().min(oi.len()).max(1);
                let at = rng.random_range(0..=oi.len().saturating_sub(len));
                b = (oi[at..at + len].to_vec(), ow[at..at + len].to_vec());
                1
            }
            SentenceObjective::Nsp => 0,
        };
        // Words renumbered so A's and B's never share an id.
        let shift = a.1.iter().flatten().max().map_or(0, |m| m + 1);
        let first_b = b.1.iter().flatten().min().copied().unwrap_or(0);
        let mut seq_ids = vec![start];
        seq_ids.extend(&a.0);
        seq_ids.push(end);
        seq_ids.extend(&b.0);
        seq_ids.push(end);
        let mut seq_words = vec![None];
        seq_words.extend(&a.1);
        seq_words.push(None);
        seq_words.extend(b.1.iter().map(|w| w.map(|w| w - first_b.min(w) + shift)));
        seq_words.push(None);
        let len = seq_ids.len();
        out.push(PretrainSequence {
            ids: seq_ids,
            type_ids: (0..len).map(|i| (i > a.0.len() + 1) as u32).collect(),
            words: seq_words,
            pair_label: Some(label),
        });
    }
    out
}

/// Reads the corpus files under `path` into packed sequences of at most `max_length` tokens.
pub fn read_corpus(
    path: &Path,
    tok: &TextTokenizer,
    max_length: usize,
) -> Result<Vec<PretrainSequence>> {
    read_corpus_shared(path, tok, max_length, None)
}

/// Lines read and tokenized at a time.
const LINE_BATCH: usize = 4096;

/// [`read_corpus`] with the ranks of `ranks` dividing the tokenization: every rank reads the
/// lines, but of each batch of [`LINE_BATCH`] lines it tokenizes a contiguous share only,
/// and the ranks exchange the encodings, so each packs the sequences one process packs.
/// Ranks whose files differ (another line count) all stop with an error, none waiting.
pub fn read_corpus_shared(
    path: &Path,
    tok: &TextTokenizer,
    max_length: usize,
    ranks: Option<&dyn crate::dist::Collective>,
) -> Result<Vec<PretrainSequence>> {
    use std::io::BufRead;
    let ranks = ranks.filter(|c| c.world_size() > 1);
    if max_length < 8 {
        return Err(TrainError::Config(format!(
            "--max-length {max_length} is too short to pretrain"
        )));
    }
    let (start, end, _) = specials(tok)?;
    let mut p = Packer::new(start, end, max_length);
    let files = berth_text::train::corpus_files(&[path.into()])?;
    for (k, f) in files.iter().enumerate() {
        let reader = berth_text::train::open_text(f)?;
        let mut batch: Vec<(usize, String)> = Vec::new();
        let encode = |lines: &[(usize, String)]| -> Result<Vec<Option<Encoded>>> {
            use rayon::prelude::*;
            lines
                .par_iter()
                .map(|(line, text)| {
                    if text.trim().is_empty() {
                        Ok(None) // a document boundary
                    } else {
                        tok.encode(text, None, usize::MAX / 2, Truncation::Truncate, *line)
                            .map(Some)
                            .map_err(|e| TrainError::Data {
                                path: f.clone(),
                                line: *line,
                                message: e.to_string(),
                            })
                    }
                })
                .collect()
        };
        let flush_batch = |batch: &mut Vec<(usize, String)>, p: &mut Packer| -> Result<()> {
            let encs = match ranks {
                None => encode(batch)?,
                Some(c) => exchange_encodings(c, (k, f), batch, encode)?,
            };
            for e in encs {
                match e {
                    Some(e) => p.add(&e),
                    None => p.flush(),
                }
            }
            batch.clear();
            Ok(())
        };
        for (i, line) in reader.split(b'\n').enumerate() {
            let bytes = line.map_err(|e| TrainError::Data {
                path: f.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
            let text = String::from_utf8(bytes).map_err(|_| TrainError::Data {
                path: f.clone(),
                line: i + 1,
                message: "invalid UTF-8".into(),
            })?;
            batch.push((i + 1, text));
            if batch.len() == LINE_BATCH {
                flush_batch(&mut batch, &mut p)?;
            }
        }
        flush_batch(&mut batch, &mut p)?;
        p.flush(); // a file ends a document
    }
    if p.out.is_empty() {
        return Err(TrainError::Data {
            path: path.into(),
            line: 0,
            message: "the corpus has no text".into(),
        });
    }
    Ok(p.out.into_iter().map(single).collect())
}

/// One batch of lines of file `index` encoded by the ranks of `c` together: each encodes a
/// contiguous share and all exchange them, each payload headed by the batch's file number,
/// first line, length and a hash of its lines (not the path: hosts may mount the corpus
/// elsewhere), so ranks that read different corpora stop with an error instead of mixing
/// batches.
fn exchange_encodings(
    c: &dyn crate::dist::Collective,
    (index, file): (usize, &Path),
    batch: &[(usize, String)],
    encode: impl Fn(&[(usize, String)]) -> Result<Vec<Option<Encoded>>>,
) -> Result<Vec<Option<Encoded>>> {
    use std::hash::{Hash, Hasher};
    let first = batch.first().map_or(0, |(line, _)| *line);
    // `DefaultHasher::new` has fixed keys: the same value in every process of one build.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    batch.hash(&mut h);
    let head = serde_json::json!([index, first, batch.len(), h.finish()]).to_string();
    let mine = encode(&batch[c.shard_range(batch.len())])?;
    let mut payload = head.clone().into_bytes();
    payload.push(b'\n');
    payload.extend(serde_json::to_vec(&mine).expect("encodings serialise"));
    let mut out = Vec::with_capacity(batch.len());
    for (q, theirs) in c.gather_all(&payload)?.iter().enumerate() {
        let cut = theirs.iter().position(|&b| b == b'\n');
        let (their_head, body) = match cut {
            Some(i) => (&theirs[..i], &theirs[i + 1..]),
            None => (&theirs[..], &[][..]),
        };
        if their_head != head.as_bytes() {
            return Err(TrainError::Data {
                path: file.into(),
                line: first,
                message: format!(
                    "rank {q}'s training data (the corpus lines read) differ from rank {}'s \
                     here (file, first line, lines, hash: {} vs {head}): every rank must \
                     read the same corpus",
                    c.rank(),
                    String::from_utf8_lossy(&their_head[..their_head.len().min(200)]),
                ),
            });
        }
        let part: Vec<Option<Encoded>> =
            serde_json::from_slice(body).map_err(|e| TrainError::Data {
                path: file.into(),
                line: first,
                message: format!("the encodings rank {q} sent do not read back: {e}"),
            })?;
        out.extend(part);
    }
    Ok(out)
}

/// The training and held-out sequences of a folder written by `berth data prepare`, all
/// decoded into memory (training runs read the training shards on demand instead, see
/// [`Sequences`]).
pub fn read_prepared(
    dir: &Path,
    tok: &TextTokenizer,
    max_length: usize,
) -> Result<(Vec<PretrainSequence>, Vec<PretrainSequence>)> {
    let c = crate::shards::open_prepared(dir, tok, max_length)?;
    let read = |shards: &[crate::shards::Shard]| -> Vec<PretrainSequence> {
        shards
            .iter()
            .flat_map(|s| (0..s.len()).map(move |i| single(s.sequence(i))))
            .collect()
    };
    Ok((read(&c.train), read(&c.val)))
}

/// Pretraining data: the corpus's training sequences and held-out ones — a prepared
/// folder's held-out split, `data.dev`, or a seeded `dev_fraction` — turned into segment
/// pairs when a sentence-pair objective is on. A prepared corpus trains straight from its
/// memory-mapped shards (the sentence-pair objectives build their pairs in memory); one
/// rank of several checks only its share of those shards, and only the evaluating rank
/// reads held-out sequences (the others get none); the ranks of `ranks` divide the
/// tokenization of a text corpus ([`read_corpus_shared`]).
pub fn read_sequences(
    data: &DataConfig,
    tok: &TextTokenizer,
    seed: u64,
    pairs: Option<SentenceObjective>,
    ranks: Option<&dyn crate::dist::Collective>,
) -> Result<(Sequences, Vec<PretrainSequence>)> {
    let share = ranks.map_or_else(Default::default, crate::dist::Share::of);
    let max_length = data.max_length;
    let read = |path: &Path| -> Result<(Vec<PretrainSequence>, Vec<PretrainSequence>)> {
        if crate::shards::is_prepared(path) {
            read_prepared(path, tok, max_length)
        } else {
            Ok((
                read_corpus_shared(path, tok, max_length, ranks)?,
                Vec::new(),
            ))
        }
    };
    if crate::shards::is_prepared(&data.train) && pairs.is_none() {
        let c = crate::shards::open_prepared_share(&data.train, tok, max_length, share)?;
        let train = Sequences::Shards(crate::shards::Shards::new(c.train));
        if !share.evaluates() {
            return Ok((train, Vec::new()));
        }
        let dev = match &data.dev {
            Some(d) => {
                let (a, b) = read(d)?;
                if b.is_empty() {
                    a
                } else {
                    b
                }
            }
            None => c
                .val
                .iter()
                .flat_map(|s| (0..s.len()).map(move |i| single(s.sequence(i))))
                .collect(),
        };
        let dev = non_empty_dev(dev, data)?;
        return Ok((train, dev));
    }
    let (all, held_out) = read(&data.train)?;
    let (train, dev) = match &data.dev {
        Some(d) => {
            let (a, b) = read(d)?;
            (all, if b.is_empty() { a } else { b })
        }
        // A prepared folder brings its own held-out split.
        None if !held_out.is_empty() => (all, held_out),
        None if all.len() < 2 => {
            return Err(TrainError::Data {
                path: data.train.clone(),
                line: 0,
                message: format!(
                    "{} sequence(s): too few to hold out a dev split; pass --dev FILE or more text",
                    all.len()
                ),
            })
        }
        None => crate::data::split(&all, data.dev_fraction, seed),
    };
    let (train, dev) = match pairs {
        Some(o) => (
            sentence_pairs(&train, o, max_length, seed),
            sentence_pairs(&dev, o, max_length, seed ^ 0x5e9),
        ),
        None => (train, dev),
    };
    let dev = non_empty_dev(dev, data)?;
    Ok((Sequences::Memory(train), dev))
}

/// An empty held-out split would report loss 0 and perplexity 1: refuse it, naming where
/// the held-out data came from.
fn non_empty_dev(dev: Vec<PretrainSequence>, data: &DataConfig) -> Result<Vec<PretrainSequence>> {
    if !dev.is_empty() {
        return Ok(dev);
    }
    Err(TrainError::Data {
        path: data.dev.clone().unwrap_or_else(|| data.train.clone()),
        line: 0,
        message: "the held-out split has no sequences: pass --dev FILE or raise --val-fraction \
                  (a prepared folder: prepare it with a larger --val-fraction)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequences() -> Vec<PretrainSequence> {
        (0..400u32)
            .map(|k| {
                let len = 3 + (k % 20) as usize;
                let mut ids = vec![1];
                ids.extend((0..len as u32).map(|i| 100 + k * 50 + i));
                ids.push(2);
                let mut words = vec![None];
                // Two tokens per word.
                words.extend((0..len as u32).map(|i| Some(i / 2)));
                words.push(None);
                single(Sequence { ids, words })
            })
            .collect()
    }

    fn content(e: &PretrainSequence) -> Vec<u32> {
        e.ids[1..e.ids.len() - 1].to_vec()
    }

    fn check(objective: SentenceObjective) {
        let seqs = sequences();
        let max_length = 16;
        let pairs = sentence_pairs(&seqs, objective, max_length, 3);
        assert_eq!(pairs.len(), seqs.len());
        let mut ones = 0;
        for (p, s) in pairs.iter().zip(&seqs) {
            let ids = &p.ids;
            let n = ids.len();
            assert!(n <= max_length, "{n}");
            let seps: Vec<usize> = (0..n).filter(|&i| ids[i] == 2).collect();
            assert_eq!(seps.len(), 2);
            assert_eq!((ids[0], seps[1]), (1, n - 1));
            let (a, b) = (&ids[1..seps[0]], &ids[seps[0] + 1..n - 1]);
            assert!(!a.is_empty() && !b.is_empty());
            // Token types: 0 through the first [SEP], then 1.
            let types: Vec<u32> = (0..n).map(|i| (i > seps[0]) as u32).collect();
            assert_eq!(p.type_ids, types);
            let special = p.special();
            assert!(special[0] && special[seps[0]] && special[n - 1]);
            let original = content(s);
            let label = p.pair_label.expect("labelled");
            ones += label;
            let joined = |x: &[u32], y: &[u32]| [x, y].concat();
            match (objective, label) {
                (SentenceObjective::Sop, 0) | (SentenceObjective::Nsp, 0) => {
                    assert!(original.starts_with(&joined(a, b)))
                }
                (SentenceObjective::Sop, _) => assert!(original.starts_with(&joined(b, a))),
                (SentenceObjective::Nsp, _) => {
                    assert!(original.starts_with(a));
                    // B comes from another sequence (ids are unique per sequence).
                    assert!(b.iter().all(|t| !original.contains(t)));
                }
            }
            // The cut falls between words (two tokens per word) unless a word is cut by the
            // length limit; word ids of A and B never coincide.
            let wa: Vec<_> = p.words[1..seps[0]].iter().flatten().collect();
            let wb: Vec<_> = p.words[seps[0] + 1..n - 1].iter().flatten().collect();
            assert!(wb.iter().all(|w| !wa.contains(w)));
        }
        let share = ones as f64 / pairs.len() as f64;
        assert!((share - 0.5).abs() < 0.08, "{objective:?}: {share}");
    }

    #[test]
    fn sentence_order_pairs_are_swapped_halves() {
        check(SentenceObjective::Sop);
    }

    #[test]
    fn next_sentence_pairs_take_half_their_second_segments_elsewhere() {
        check(SentenceObjective::Nsp);
    }
}
