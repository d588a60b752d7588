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
use crate::trainer::{Example, Prepared, TrainConfig};

/// A packed sequence as a training example (one segment, no offsets).
fn example(seq: Sequence) -> Example {
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

/// The training and held-out sequences of a folder written by `berth data prepare`.
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
    Ok(Prepared {
        train,
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

/// Masks `examples` (example `k` from a generator seeded by `(seed, k)`), runs them packed,
/// and returns the MLM logits at the chosen positions `[R, V]` with their labels; `None`
/// when nothing was chosen.
fn masked_logits(
    model: &Model,
    examples: &[&Example],
    masking: &MaskingConfig,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Option<(Tensor, Vec<u32>)>> {
    let mut seqs = Vec::with_capacity(examples.len());
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    let mut offset = 0u32;
    for (k, e) in examples.iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(berth_kernels::seed_stream(seed, k as u64));
        let m = mask_sequence(
            &e.enc.ids,
            &e.enc.special,
            &e.enc.word_ids,
            masking,
            &mut rng,
        );
        rows.extend(m.positions.iter().map(|p| p + offset));
        labels.extend(m.labels);
        offset += m.ids.len() as u32;
        seqs.push(m.ids);
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let batch = Batch::from_sequences(
        seqs.iter()
            .zip(examples)
            .map(|(ids, e)| (ids.as_slice(), e.enc.type_ids.as_slice())),
    )?;
    let hidden = model.forward_train(&batch, d)?;
    // The vocabulary projection runs on the chosen positions only.
    let logits = model.mlm_logits(&Model::select_rows(&hidden, &rows)?)?;
    Ok(Some((logits, labels)))
}

/// Mean cross-entropy at the chosen positions of one batch.
pub(crate) fn mlm_loss(
    model: &Model,
    examples: &[&Example],
    masking: &MaskingConfig,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    match masked_logits(model, examples, masking, seed, d)? {
        None => Ok(None),
        Some((logits, labels)) => {
            loss::cross_entropy(&logits, &labels.into_iter().map(Some).collect::<Vec<_>>())
        }
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
    let (mut loss_sum, mut correct, mut count) = (0f64, 0usize, 0usize);
    for (c, chunk) in dev.chunks(64).enumerate() {
        let refs: Vec<&Example> = chunk.iter().collect();
        let chunk_seed = berth_kernels::seed_stream(seed ^ 0xe7a1, c as u64);
        let Some((logits, labels)) = masked_logits(model, &refs, masking, chunk_seed, None)? else {
            continue;
        };
        let l = loss::cross_entropy(
            &logits,
            &labels.iter().copied().map(Some).collect::<Vec<_>>(),
        )?
        .expect("labels present");
        loss_sum += l.to_scalar::<f32>()? as f64 * labels.len() as f64;
        let best = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        correct += best.iter().zip(&labels).filter(|(a, b)| a == b).count();
        count += labels.len();
    }
    let mut out = serde_json::Map::new();
    let mean = loss_sum / count.max(1) as f64;
    out.insert("loss".into(), mean.into());
    out.insert("perplexity".into(), mean.exp().into());
    out.insert(
        "masked_accuracy".into(),
        (correct as f64 / count.max(1) as f64).into(),
    );
    out.insert("masked_tokens".into(), count.into());
    Ok(out)
}
