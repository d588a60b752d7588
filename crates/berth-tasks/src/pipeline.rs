//! A model with its tokenizer and every inference default decided once: precision, token
//! limit, truncation, token budget per batch, and (for sentence embeddings) the
//! sentence-transformers pooling. The CLI, a server and the Python binding load pipelines
//! here and pass their users' options through; none of them re-decides a default.
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use berth_model::{Batch, LoadReport, Model, Precision};
use berth_text::{Encoded, TextTokenizer, Truncation};
use rayon::prelude::*;

use crate::embed::{Pooling, SentenceConfig};
use crate::error::{Result, TaskError};

/// Real tokens per packed batch by default: large enough that the matrix products run at
/// full speed, small enough that a batch's activations stay in the caches' reach.
pub const DEFAULT_BATCH_TOKENS: usize = 8192;

/// How a pipeline loads and runs.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOptions {
    /// Number format of the encoder's matrix products; the weights are packed for it once,
    /// at load.
    pub precision: Precision,
    /// Token limit per text, special tokens included; `None` = the model's own limit (a
    /// sentence-transformers model's `max_seq_length` for [`Pipeline::load_sentence`]).
    pub max_length: Option<usize>,
    /// What to do with longer texts.
    pub truncation: Truncation,
    /// Real tokens per packed batch (no padding).
    pub batch_tokens: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            precision: Precision::F32,
            max_length: None,
            truncation: Truncation::Truncate,
            batch_tokens: DEFAULT_BATCH_TOKENS,
        }
    }
}

/// Where a pipeline's packed batches run. By default on the calling thread; a server hands
/// them to a scheduler that merges the batches of concurrent requests into one forward pass
/// and returns each caller its own rows.
pub trait BatchRunner: Send + Sync {
    /// The encoder's hidden states `[N, H]` for `batch` (the rows of `batch`'s tokens, in
    /// order).
    fn forward(&self, batch: &Batch) -> Result<candle_core::Tensor>;
}

/// Model + tokenizer + the effective settings. Cloning is cheap (the model and tokenizer
/// are shared): a server keeps one pipeline per model and clones it per request to change
/// the per-request settings (truncation) or the [`BatchRunner`].
#[derive(Clone)]
pub struct Pipeline {
    /// The model, its weights packed for the pipeline's precision.
    pub model: Arc<Model>,
    /// Its tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// Token limit per text.
    pub max_length: usize,
    /// Truncation policy.
    pub truncation: Truncation,
    /// Real tokens per packed batch.
    pub batch_tokens: usize,
    /// The sentence-transformers configuration ([`Pipeline::load_sentence`]).
    pub sentence: Option<SentenceConfig>,
    /// Where batches run; `None`: `model.forward` on the calling thread.
    pub runner: Option<Arc<dyn BatchRunner>>,
}

impl Pipeline {
    /// Loads the model and tokenizer of `dir` as transformers' pipelines do (the token limit
    /// defaults to the model's position table).
    pub fn load(dir: &Path, opts: &PipelineOptions) -> Result<(Self, LoadReport)> {
        Self::load_with(dir, opts, None)
    }

    /// Loads `dir` as sentence-transformers does: its `modules.json` / pooling /
    /// normalize / `max_seq_length` become the defaults ([`Pipeline::embedding`]).
    pub fn load_sentence(dir: &Path, opts: &PipelineOptions) -> Result<(Self, LoadReport)> {
        let st = SentenceConfig::from_dir(dir)?;
        let (mut p, report) = Self::load_with(dir, opts, st.and_then(|c| c.max_seq_length))?;
        p.sentence = st;
        Ok((p, report))
    }

    /// A pipeline around an already loaded `model` (evaluation during training): f32 as
    /// loaded, truncating at `max_length`, the default token budget.
    pub fn from_model(model: Model, tokenizer: TextTokenizer, max_length: usize) -> Self {
        Pipeline {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            max_length,
            truncation: Truncation::Truncate,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            sentence: None,
            runner: None,
        }
    }

    /// The pooling and normalisation of sentence embeddings: `pooling` when the caller
    /// asks for one (normalised only when `normalize`), else the sentence-transformers
    /// config's (mean + normalize for all-MiniLM-L6-v2), else the first token without
    /// normalisation (a plain transformers model). `normalize` always forces it.
    pub fn embedding(&self, pooling: Option<Pooling>, normalize: bool) -> (Pooling, bool) {
        match pooling {
            Some(p) => (p, normalize),
            None => (
                self.sentence.map_or(Pooling::Cls, |c| c.pooling),
                normalize || self.sentence.is_some_and(|c| c.normalize),
            ),
        }
    }

    /// [`Pipeline::load`] with a default limit (sentence-transformers' `max_seq_length`)
    /// that applies when `opts.max_length` is unset; both are capped by the position table,
    /// and a larger request is an error.
    fn load_with(
        dir: &Path,
        opts: &PipelineOptions,
        default_max: Option<usize>,
    ) -> Result<(Self, LoadReport)> {
        let (mut model, report) = Model::load(dir, false)?;
        // Inference only: pack the weights once for the chosen kernels.
        model.set_precision(opts.precision)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let limit = model.config.max_sequence_length();
        if tokenizer.vocab_size() > model.config.vocab_size {
            return Err(TaskError::Config {
                path: tokenizer.source().into(),
                message: format!(
                    "tokenizer has {} tokens but the model's vocabulary has {}",
                    tokenizer.vocab_size(),
                    model.config.vocab_size
                ),
            });
        }
        if let Some(id) = tokenizer
            .special_ids()
            .into_iter()
            .find(|&id| id as usize >= model.config.vocab_size)
        {
            return Err(TaskError::Config {
                path: tokenizer.source().into(),
                message: format!(
                    "the post-processor adds special token id {id}, outside the model's vocabulary of {}",
                    model.config.vocab_size
                ),
            });
        }
        let max_length = match opts.max_length {
            Some(m) if m > limit => {
                return Err(TaskError::Config {
                    path: model.config.path.clone(),
                    message: format!("--max-length {m} exceeds the model's {limit} positions"),
                })
            }
            Some(m) if m < tokenizer.min_length(false) => {
                return Err(TaskError::Config {
                    path: model.config.path.clone(),
                    message: format!(
                        "--max-length {m} leaves no room for text next to the special tokens (at least {})",
                        tokenizer.min_length(false)
                    ),
                })
            }
            Some(m) => m,
            None => default_max.unwrap_or(limit).min(limit),
        };
        Ok((
            Pipeline {
                model: Arc::new(model),
                tokenizer: Arc::new(tokenizer),
                max_length,
                truncation: opts.truncation,
                batch_tokens: opts.batch_tokens,
                sentence: None,
                runner: None,
            },
            report,
        ))
    }

    /// Encodes texts in parallel; input `i` is named `first_index + i` in errors.
    pub fn encode(&self, texts: &[String], first_index: usize) -> Result<Vec<Encoded>> {
        texts
            .par_iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(self.tokenizer.encode(
                    t,
                    None,
                    self.max_length,
                    self.truncation,
                    first_index + i,
                )?)
            })
            .collect()
    }

    /// Runs the encoder on `encs` packed into one batch: `(batch, hidden [N, H])`.
    pub fn run(&self, encs: &[Encoded]) -> Result<(Batch, candle_core::Tensor)> {
        let batch = pack(encs)?;
        let hidden = self.forward(&batch)?;
        Ok((batch, hidden))
    }

    /// Repacks the weights for `precision` (benchmarks compare precisions on one load).
    /// Refused while the model is shared with a clone of this pipeline.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let model = Arc::get_mut(&mut self.model).ok_or_else(|| {
            TaskError::Options("the model is shared; its precision cannot change".into())
        })?;
        Ok(model.set_precision(precision)?)
    }

    /// The encoder on one packed batch, through the [`BatchRunner`] when there is one.
    pub fn forward(&self, batch: &Batch) -> Result<candle_core::Tensor> {
        match &self.runner {
            Some(r) => r.forward(batch),
            None => Ok(self.model.forward(batch)?),
        }
    }
}

impl Pipeline {
    /// Runs `encs` in consecutive batches of at most [`Pipeline::batch_tokens`] tokens
    /// (packed, no padding), handing each batch's range of `encs`, its packing and its hidden
    /// states `[N, H]` to `f`.
    pub fn for_each_batch(
        &self,
        encs: &[Encoded],
        f: impl FnMut(Range<usize>, &Batch, &candle_core::Tensor) -> Result<()>,
    ) -> Result<()> {
        batches_with(encs, self.batch_tokens, |b| self.forward(b), f)
    }

    /// Label names of the classification head with `classes` outputs: `id2label`, or
    /// `LABEL_i` when the config has none (as transformers names them).
    pub fn labels(&self, classes: usize) -> Result<Vec<String>> {
        let names = &self.model.config.id2label;
        if names.is_empty() {
            return Ok((0..classes).map(|i| format!("LABEL_{i}")).collect());
        }
        if names.len() != classes {
            return Err(TaskError::Config {
                path: self.model.config.path.clone(),
                message: format!(
                    "id2label names {} labels but the head has {classes} outputs",
                    names.len()
                ),
            });
        }
        Ok(names.clone())
    }
}

/// Encoded sequences packed into one batch: concatenated, no padding.
pub fn pack<E: std::borrow::Borrow<Encoded>>(encs: &[E]) -> Result<Batch> {
    Ok(Batch::from_sequences(encs.iter().map(|e| {
        let e = e.borrow();
        (e.ids.as_slice(), e.type_ids.as_slice())
    }))?)
}

/// Runs `model` on `encs` in consecutive packed batches of at most `budget` tokens, handing
/// each batch's range of `encs`, its packing and its hidden states `[N, H]` to `f` (what
/// every pipeline does; training's evaluations use it too). `f`'s error type is the
/// caller's.
pub fn run_batches<S, E>(
    model: &Model,
    encs: &[S],
    budget: usize,
    f: impl FnMut(Range<usize>, &Batch, &candle_core::Tensor) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    S: std::borrow::Borrow<Encoded>,
    E: From<TaskError>,
{
    batches_with(encs, budget, |b| Ok(model.forward(b)?), f)
}

/// [`run_batches`] with the encoder call given.
fn batches_with<S, E>(
    encs: &[S],
    budget: usize,
    forward: impl Fn(&Batch) -> Result<candle_core::Tensor>,
    mut f: impl FnMut(Range<usize>, &Batch, &candle_core::Tensor) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    S: std::borrow::Borrow<Encoded>,
    E: From<TaskError>,
{
    let lens: Vec<usize> = encs.iter().map(|e| e.borrow().len()).collect();
    for r in token_budget_batches(&lens, budget) {
        let batch = pack(&encs[r.clone()])?;
        let hidden = forward(&batch)?;
        f(r, &batch, &hidden)?;
    }
    Ok(())
}

/// Splits `lens` (token counts, in input order) into consecutive ranges of at most
/// `budget` tokens each (a longer single input gets a range of its own).
pub fn token_budget_batches(lens: &[usize], budget: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &l) in lens.iter().enumerate() {
        if i > start && tokens + l > budget {
            out.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += l;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget_and_keep_order() {
        assert_eq!(
            token_budget_batches(&[3, 3, 3, 10, 1], 6),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(token_budget_batches(&[1, 1, 1], 100), vec![0..3]);
        assert!(token_budget_batches(&[], 5).is_empty());
    }
}

/// Runs `prepare` on each item on a background thread, one item ahead of `consume` on this
/// one, so the two overlap (tokenizing the next chunk of texts while the model runs this
/// one); stops at the first error `consume` returns.
pub fn pipelined<T: Send, U: Send, E>(
    items: impl Iterator<Item = T> + Send,
    prepare: impl Fn(T) -> U + Send,
    mut consume: impl FnMut(U) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || {
            for item in items {
                // A closed channel means the consumer stopped (an error): stop too.
                if tx.send(prepare(item)).is_err() {
                    break;
                }
            }
        });
        for prepared in rx {
            consume(prepared)?;
        }
        Ok(())
    })
}
