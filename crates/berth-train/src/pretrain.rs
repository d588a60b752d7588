//! Masked-language-model pretraining: corpus → sequences, masked loss, held-out metrics,
//! and a randomly initialised encoder to start from.
//!
//! Corpus: plain or gzip text files (folders recursively), one paragraph per line, documents
//! separated by a blank line (BERT's `create_pretraining_data` convention; a file ends a
//! document too). Each document's paragraphs are tokenized and packed greedily into
//! sequences of at most `max_length` tokens (special tokens included); a longer paragraph is
//! cut. Sequences never span documents, and a batch packs them without padding (each is its
//! own `cu_seqlens` segment), so no token attends across documents.
use std::path::Path;

use berth_model::{Batch, Dropout, Model};
use berth_text::{Encoded, TextTokenizer, Truncation};
use candle_core::Tensor;
use rand::SeedableRng;

use crate::corpus::{specials, Packer, Sequence};
use crate::error::{Result, TrainError};
use crate::loss;
use crate::mlm::{mask_sequence, MaskingConfig};
use crate::trainer::{Example, Prepared, TrainConfig, TrainSet};

/// A packed sequence as a training example (one segment, no offsets).
pub(crate) fn example(seq: Sequence) -> Example {
    let n = seq.ids.len();
    let special: Vec<bool> = seq.words.iter().map(|w| w.is_none()).collect();
    Example::new(Encoded {
        type_ids: vec![0; n],
        tokens: Vec::new(),
        offsets: vec![(0, 0); n],
        sequence_ids: special.iter().map(|&s| (!s).then_some(0)).collect(),
        special,
        word_ids: seq.words,
        truncated: false,
        full_len: n,
        ids: seq.ids,
    })
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
    examples: &[Example],
    objective: SentenceObjective,
    max_length: usize,
    seed: u64,
) -> Vec<Example> {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let content = |e: &Example| -> (Vec<u32>, Vec<Option<u32>>) {
        let n = e.enc.ids.len();
        (
            e.enc.ids[1..n - 1].to_vec(),
            e.enc.word_ids[1..n - 1].to_vec(),
        )
    };
    let mut out = Vec::with_capacity(examples.len());
    for (k, e) in examples.iter().enumerate() {
        let n = e.enc.ids.len();
        if n < 4 {
            continue;
        }
        let (start, end) = (e.enc.ids[0], e.enc.ids[n - 1]);
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
        let mut ex = example(Sequence {
            ids: seq_ids,
            words: seq_words,
        });
        ex.enc.type_ids = (0..len).map(|i| (i > a.0.len() + 1) as u32).collect();
        ex.enc.sequence_ids = (0..len)
            .map(|i| match i {
                0 => None,
                i if i == a.0.len() + 1 || i == len - 1 => None,
                i if i <= a.0.len() => Some(0),
                _ => Some(1),
            })
            .collect();
        ex.class = Some(label);
        out.push(ex);
    }
    out
}

/// Reads the corpus files under `path` into packed sequences of at most `max_length` tokens.
pub fn read_corpus(path: &Path, tok: &TextTokenizer, max_length: usize) -> Result<Vec<Example>> {
    use std::io::BufRead;
    if max_length < 8 {
        return Err(TrainError::Config(format!(
            "--max-length {max_length} is too short to pretrain"
        )));
    }
    let (start, end, _) = specials(tok)?;
    let mut p = Packer::new(start, end, max_length);
    let files = berth_text::train::corpus_files(&[path.into()])?;
    for f in &files {
        let reader = berth_text::train::open_text(f)?;
        let mut batch: Vec<(usize, String)> = Vec::new();
        let flush_batch = |batch: &mut Vec<(usize, String)>, p: &mut Packer| -> Result<()> {
            use rayon::prelude::*;
            let encs: Vec<Option<Encoded>> = batch
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
                .collect::<Result<_>>()?;
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
            if batch.len() == 4096 {
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
    Ok(p.out.into_iter().map(example).collect())
}

/// The training and held-out sequences of a folder written by `berth data prepare`, all
/// decoded into memory (training runs read the training shards on demand instead, see
/// [`crate::trainer::TrainSet`]).
pub fn read_prepared(
    dir: &Path,
    tok: &TextTokenizer,
    max_length: usize,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let c = crate::corpus::open_prepared(dir, tok, max_length)?;
    let read = |shards: &[crate::corpus::Shard]| -> Vec<Example> {
        shards
            .iter()
            .flat_map(|s| (0..s.len()).map(move |i| example(s.sequence(i))))
            .collect()
    };
    Ok((read(&c.train), read(&c.val)))
}

/// Pretraining data: the corpus sequences, a seeded `dev_fraction` held out (or `cfg.dev`).
pub(crate) fn prepare_pretrain(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Prepared> {
    let read = |path: &Path| -> Result<(Vec<Example>, Vec<Example>)> {
        if crate::corpus::is_prepared(path) {
            read_prepared(path, tok, cfg.max_length)
        } else {
            Ok((read_corpus(path, tok, cfg.max_length)?, Vec::new()))
        }
    };
    // A prepared corpus trains straight from its memory-mapped shards (masked-LM and RTD;
    // the sentence-pair objectives build their pairs in memory).
    if crate::corpus::is_prepared(&cfg.train) && cfg.sentence_objective.is_none() {
        let c = crate::corpus::open_prepared(&cfg.train, tok, cfg.max_length)?;
        let dev = match &cfg.dev {
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
                .flat_map(|s| (0..s.len()).map(move |i| example(s.sequence(i))))
                .collect(),
        };
        return Ok(Prepared {
            train: TrainSet::Shards(crate::corpus::Shards::new(c.train)),
            dev,
            labels: Vec::new(),
            skipped: 0,
            qa_dev: Vec::new(),
        });
    }
    let (all, held_out) = read(&cfg.train)?;
    let (train, dev) = match &cfg.dev {
        Some(d) => {
            let (a, b) = read(d)?;
            (all, if b.is_empty() { a } else { b })
        }
        // A prepared folder brings its own held-out split.
        None if !held_out.is_empty() => (all, held_out),
        None => crate::data::split(&all, cfg.dev_fraction, cfg.seed),
    };
    let (train, dev) = match cfg.sentence_objective {
        Some(o) => (
            sentence_pairs(&train, o, cfg.max_length, cfg.seed),
            sentence_pairs(&dev, o, cfg.max_length, cfg.seed ^ 0x5e9),
        ),
        None => (train, dev),
    };
    Ok(Prepared {
        train: train.into(),
        dev,
        labels: Vec::new(),
        skipped: 0,
        qa_dev: Vec::new(),
    })
}

/// The masking of a run.
pub(crate) fn masking(
    cfg: &TrainConfig,
    tok: &TextTokenizer,
    model: &Model,
) -> Result<MaskingConfig> {
    let (_, _, mask_id) = specials(tok)?;
    if tok.vocab_size() > model.config.vocab_size {
        return Err(TrainError::Config(format!(
            "the tokenizer ({}) has {} tokens but the model's embeddings only {}: \
             they do not belong together",
            tok.source().display(),
            tok.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok(MaskingConfig {
        rate: cfg.mask_rate,
        whole_word: cfg.whole_word,
        mask_id,
        vocab_size: model.config.vocab_size as u32,
    })
}

/// One pretraining batch's outputs: masked-LM logits at the chosen positions `[R, V]` with
/// their labels (`None` when nothing was chosen), and the sentence-pair logits `[S, 2]` with
/// their labels when the examples carry them ([`sentence_pairs`]).
struct Outputs {
    mlm: Option<(Tensor, Vec<u32>)>,
    pairs: Option<(Tensor, Vec<u32>)>,
}

/// One sequence after masking: the ids the encoder sees, the token types, the positions
/// whose original tokens are predicted (ascending) with those originals, and the
/// sentence-pair label when the objective has one.
#[derive(Debug, Clone)]
pub struct MaskedInput {
    /// Input ids after masking.
    pub ids: Vec<u32>,
    /// Token type ids (segment A / B).
    pub type_ids: Vec<u32>,
    /// Positions predicted by the masked-LM head.
    pub positions: Vec<u32>,
    /// The original id at each position.
    pub labels: Vec<u32>,
    /// Sentence-pair (NSP / SOP) label.
    pub pair_label: Option<u32>,
}

/// Masks `examples` (example `k` from a generator seeded by `(seed, k)`), runs them packed,
/// and returns the heads' outputs.
fn pretrain_outputs(
    model: &Model,
    examples: &[&Example],
    masking: &MaskingConfig,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Outputs> {
    outputs_of_masked(model, &mask_examples(examples, masking, seed), d)
}

/// Masks `examples`, example `k` from a generator seeded by `(seed, k)`.
pub(crate) fn mask_examples(
    examples: &[&Example],
    masking: &MaskingConfig,
    seed: u64,
) -> Vec<MaskedInput> {
    examples
        .iter()
        .enumerate()
        .map(|(k, e)| {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(berth_kernels::seed_stream(seed, k as u64));
            let m = mask_sequence(
                &e.enc.ids,
                &e.enc.special,
                &e.enc.word_ids,
                masking,
                &mut rng,
            );
            MaskedInput {
                ids: m.ids,
                type_ids: e.enc.type_ids.clone(),
                positions: m.positions,
                labels: m.labels,
                pair_label: e.class,
            }
        })
        .collect()
}

/// The masked positions of `inputs` as rows of their packed batch, with the original tokens.
pub(crate) fn masked_rows(inputs: &[MaskedInput]) -> (Vec<u32>, Vec<u32>) {
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    let mut offset = 0u32;
    for m in inputs {
        rows.extend(m.positions.iter().map(|p| p + offset));
        labels.extend(&m.labels);
        offset += m.ids.len() as u32;
    }
    (rows, labels)
}

/// The heads' outputs for already-masked sequences, run packed. Pair logits come when every
/// sequence carries a pair label.
fn outputs_of_masked(
    model: &Model,
    inputs: &[MaskedInput],
    d: Option<&Dropout>,
) -> Result<Outputs> {
    let (rows, labels) = masked_rows(inputs);
    let pair_labels: Option<Vec<u32>> = inputs.iter().map(|m| m.pair_label).collect();
    if rows.is_empty() && pair_labels.is_none() {
        return Ok(Outputs {
            mlm: None,
            pairs: None,
        });
    }
    let batch = Batch::from_sequences(
        inputs
            .iter()
            .map(|m| (m.ids.as_slice(), m.type_ids.as_slice())),
    )?;
    if pair_labels.is_none() {
        // Only the chosen positions are read: the last layer computes just those rows, and
        // the vocabulary projection runs on them.
        let hidden = model.forward_train_rows(&batch, d, &rows)?;
        return Ok(Outputs {
            mlm: Some((model.mlm_logits(&hidden)?, labels)),
            pairs: None,
        });
    }
    let hidden = model.forward_train(&batch, d)?;
    // The vocabulary projection runs on the chosen positions only.
    let mlm = if rows.is_empty() {
        None
    } else {
        Some((
            model.mlm_logits(&Model::select_rows(&hidden, &rows)?)?,
            labels,
        ))
    };
    let pairs = match pair_labels {
        Some(l) => Some((model.sentence_pair_logits(&hidden, &batch)?, l)),
        None => None,
    };
    Ok(Outputs { mlm, pairs })
}

fn mean_cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Option<Tensor>> {
    loss::cross_entropy(
        logits,
        &labels.iter().copied().map(Some).collect::<Vec<_>>(),
    )
}

/// Mean cross-entropy at the chosen positions of one batch, plus the sentence-pair
/// cross-entropy when the examples carry pair labels (`BertForPreTraining`'s total loss).
pub(crate) fn mlm_loss(
    model: &Model,
    examples: &[&Example],
    masking: &MaskingConfig,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    total_loss(pretrain_outputs(model, examples, masking, seed, d)?)
}

/// [`BertForPreTraining`]'s loss of already-masked sequences: mean cross-entropy over all
/// predicted positions, plus the mean sentence-pair cross-entropy when the inputs carry pair
/// labels (`None` when there is nothing to predict).
///
/// [`BertForPreTraining`]: https://huggingface.co/docs/transformers/model_doc/bert
pub fn masked_lm_loss(
    model: &Model,
    inputs: &[MaskedInput],
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    total_loss(outputs_of_masked(model, inputs, d)?)
}

fn total_loss(out: Outputs) -> Result<Option<Tensor>> {
    let mlm = match &out.mlm {
        Some((logits, labels)) => mean_cross_entropy(logits, labels)?,
        None => None,
    };
    let pairs = match &out.pairs {
        Some((logits, labels)) => mean_cross_entropy(logits, labels)?,
        None => None,
    };
    Ok(match (mlm, pairs) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
}

/// Running held-out classification totals: summed cross-entropy, top-1 hits, rows.
#[derive(Default)]
pub(crate) struct Tally {
    loss: f64,
    correct: usize,
    count: usize,
}

impl Tally {
    /// Adds the rows of `logits [R, C]` with their `labels`.
    pub(crate) fn add(&mut self, logits: &Tensor, labels: &[u32]) -> Result<()> {
        let l = mean_cross_entropy(logits, labels)?.expect("labels present");
        self.loss += l.to_scalar::<f32>()? as f64 * labels.len() as f64;
        let best = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        self.correct += best.iter().zip(labels).filter(|(a, b)| a == b).count();
        self.count += labels.len();
        Ok(())
    }

    fn mean_loss(&self) -> f64 {
        self.loss / self.count.max(1) as f64
    }

    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count.max(1) as f64
    }

    /// The masked-LM metrics: `loss` (mean cross-entropy per masked token), `perplexity` (its
    /// exponential), `masked_accuracy` (top-1 equals the original) and `masked_tokens`.
    pub(crate) fn insert_mlm(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
        out.insert("loss".into(), self.mean_loss().into());
        out.insert("perplexity".into(), self.mean_loss().exp().into());
        out.insert("masked_accuracy".into(), self.accuracy().into());
        out.insert("masked_tokens".into(), self.count.into());
    }
}

/// Held-out masked-LM metrics with a fixed masking (the same positions at every
/// evaluation): loss (mean cross-entropy per masked token), perplexity (its exponential) and
/// masked accuracy (top-1 prediction equals the original token).
pub(crate) fn evaluate_mlm(
    model: &Model,
    dev: &[Example],
    masking: &MaskingConfig,
    seed: u64,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let (mut mlm, mut pairs) = (Tally::default(), Tally::default());
    for (c, chunk) in dev.chunks(64).enumerate() {
        let refs: Vec<&Example> = chunk.iter().collect();
        let chunk_seed = berth_kernels::seed_stream(seed ^ 0xe7a1, c as u64);
        let out = pretrain_outputs(model, &refs, masking, chunk_seed, None)?;
        if let Some((logits, labels)) = out.mlm {
            mlm.add(&logits, &labels)?;
        }
        if let Some((logits, labels)) = out.pairs {
            pairs.add(&logits, &labels)?;
        }
    }
    let mut out = serde_json::Map::new();
    mlm.insert_mlm(&mut out);
    if pairs.count > 0 {
        // Next-sentence / sentence-order prediction on the held-out pairs.
        out.insert("pair_loss".into(), pairs.mean_loss().into());
        out.insert("pair_accuracy".into(), pairs.accuracy().into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequences() -> Vec<Example> {
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
                example(Sequence { ids, words })
            })
            .collect()
    }

    fn content(e: &Example) -> Vec<u32> {
        e.enc.ids[1..e.enc.ids.len() - 1].to_vec()
    }

    fn check(objective: SentenceObjective) {
        let seqs = sequences();
        let max_length = 16;
        let pairs = sentence_pairs(&seqs, objective, max_length, 3);
        assert_eq!(pairs.len(), seqs.len());
        let mut ones = 0;
        for (p, s) in pairs.iter().zip(&seqs) {
            let ids = &p.enc.ids;
            let n = ids.len();
            assert!(n <= max_length, "{n}");
            let seps: Vec<usize> = (0..n).filter(|&i| ids[i] == 2).collect();
            assert_eq!(seps.len(), 2);
            assert_eq!((ids[0], seps[1]), (1, n - 1));
            let (a, b) = (&ids[1..seps[0]], &ids[seps[0] + 1..n - 1]);
            assert!(!a.is_empty() && !b.is_empty());
            // Token types: 0 through the first [SEP], then 1.
            let types: Vec<u32> = (0..n).map(|i| (i > seps[0]) as u32).collect();
            assert_eq!(p.enc.type_ids, types);
            assert!(p.enc.special[0] && p.enc.special[seps[0]] && p.enc.special[n - 1]);
            let original = content(s);
            let label = p.class.expect("labelled");
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
            let wa: Vec<_> = p.enc.word_ids[1..seps[0]].iter().flatten().collect();
            let wb: Vec<_> = p.enc.word_ids[seps[0] + 1..n - 1]
                .iter()
                .flatten()
                .collect();
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
