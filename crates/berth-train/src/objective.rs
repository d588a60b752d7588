//! The seam between the task-blind training loop ([`crate::train_loop`]) and what is being
//! learned. An [`Objective`] reads and encodes its own data into its own example type,
//! builds the networks it trains, computes the loss of a batch given by example indices,
//! evaluates, and names the metric that picks the best checkpoint. The loop owns order,
//! optimizer, clipping, schedule, checkpoints, logging and resume, and never sees an example.
//!
//! Adding an objective: one file under `objectives/` implementing this trait, one arm in
//! [`crate::objectives::build`], its settings as a [`crate::objectives::TaskKind`] variant,
//! and its flags in the CLI.
use std::path::Path;

use berth_model::{Dropout, Model, Param};
use berth_text::TextTokenizer;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Where an objective's examples come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataConfig {
    /// Training data.
    pub train: std::path::PathBuf,
    /// Dev data; without it, `dev_fraction` of the training data is split off (seeded).
    pub dev: Option<std::path::PathBuf>,
    /// Fraction held out when there is no dev file.
    pub dev_fraction: f64,
    /// Token limit per example (per sequence for pretraining).
    pub max_length: usize,
    /// Skip (and count) malformed rows instead of failing.
    pub skip_bad_rows: bool,
}

impl DataConfig {
    /// `train` with the defaults: a 10 % seeded dev split, 128 tokens, strict rows.
    pub fn new(train: std::path::PathBuf) -> Self {
        DataConfig {
            train,
            dev: None,
            dev_fraction: 0.1,
            max_length: 128,
            skip_bad_rows: false,
        }
    }
}

impl DataConfig {
    /// Refuses a dev fraction that is not a share strictly between 0 and 1 (when the dev
    /// set is split off the training data).
    pub fn check(&self) -> Result<()> {
        let f = self.dev_fraction;
        if self.dev.is_none() && !(f > 0.0 && f < 1.0) {
            return Err(TrainError::Config(format!(
                "the held-out share {f} (--dev-fraction; pretrain: --val-fraction) must be between 0 and 1 (exclusive), or pass --dev FILE"
            )));
        }
        Ok(())
    }
}

/// Refuses a token limit that leaves no room for a pair of texts next to the special
/// tokens of the tokenizer in `dir`.
pub fn check_min_length(max_length: usize, dir: &Path) -> Result<()> {
    let least = TextTokenizer::from_dir(dir)?.min_length(true);
    if max_length < least {
        return Err(TrainError::Config(format!(
            "--max-length {max_length} leaves no room for text next to the special tokens of {} (at least {least})",
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses a token limit beyond the model's position table (`dir` names the model).
pub fn check_max_length(max_length: usize, model: &Model, dir: &Path) -> Result<()> {
    let limit = model.config.max_sequence_length();
    if max_length > limit {
        return Err(TrainError::Config(format!(
            "--max-length {max_length} exceeds the {limit} positions of {} (pass --max-length {limit} or less)",
            dir.display()
        )));
    }
    Ok(())
}

/// Dev metrics: name → value (JSON numbers), as metrics.jsonl logs them.
pub type Metrics = serde_json::Map<String, serde_json::Value>;

/// What an objective is given besides its own settings.
pub struct Env<'a> {
    /// The starting checkpoint.
    pub model_dir: &'a Path,
    /// The run's seed (dev splits, new head weights).
    pub seed: u64,
    /// This process's part of the reading (a prepared corpus over several ranks).
    pub share: crate::dist::Share,
    /// The run's ranks (several: they divide the encoding of the training data).
    collective: Option<&'a dyn crate::dist::Collective>,
    tokenizer: std::sync::OnceLock<TextTokenizer>,
}

impl<'a> Env<'a> {
    /// The environment of a run from `model_dir` with `seed`.
    pub fn new(model_dir: &'a Path, seed: u64) -> Self {
        Env {
            model_dir,
            seed,
            share: Default::default(),
            collective: None,
            tokenizer: std::sync::OnceLock::new(),
        }
    }

    /// The environment of one rank of `collective`'s run.
    pub fn with_collective(self, collective: &'a dyn crate::dist::Collective) -> Self {
        Env {
            share: crate::dist::Share::of(collective),
            collective: Some(collective),
            ..self
        }
    }

    /// Encodes the training rows `items` into examples with `encode(rows, index of the
    /// first)`, which must map rows to examples in order, each row's alone. With several
    /// ranks each encodes (tokenizes) a contiguous share of the rows only, and the ranks
    /// exchange what they encoded: every rank ends with all the examples, in row order,
    /// as one process encodes them. Each rank fingerprints all the rows it read; ranks that
    /// read different rows all stop with the same error (the exchange would otherwise hand
    /// every rank the same mix of their files).
    pub fn encode_shared<I, E>(
        &self,
        items: &[I],
        encode: impl Fn(&[I], usize) -> Result<Vec<E>>,
    ) -> Result<Vec<E>>
    where
        I: std::fmt::Debug,
        E: serde::Serialize + serde::de::DeserializeOwned,
    {
        use std::hash::{Hash, Hasher};
        let Some(c) = self.ranks() else {
            return encode(items, 0);
        };
        // `DefaultHasher::new` has fixed keys: the same value in every process of one build.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        items.len().hash(&mut h);
        for row in items {
            format!("{row:?}").hash(&mut h);
        }
        let range = c.shard_range(items.len());
        let mine = encode(&items[range.clone()], range.start)?;
        let mut bytes = h.finish().to_le_bytes().to_vec();
        serde_json::to_writer(&mut bytes, &mine).map_err(|e| {
            crate::TrainError::Config(format!("encoding examples for the other ranks: {e}"))
        })?;
        let all = c.gather_all(&bytes)?;
        for (q, b) in all.iter().enumerate() {
            if b.get(..8) != all[0].get(..8) {
                return Err(crate::TrainError::Config(format!(
                    "rank {q}'s training data (the rows read) differ from rank 0's: every rank \
                     must run the same command on the same files"
                )));
            }
        }
        let mut out = Vec::with_capacity(items.len());
        let mut mine = Some(mine);
        for (q, b) in all.iter().enumerate() {
            if q == c.rank() {
                out.extend(mine.take().into_iter().flatten());
                continue;
            }
            let theirs: Vec<E> = serde_json::from_slice(&b[8..]).map_err(|e| {
                crate::TrainError::Config(format!(
                    "the examples rank {q} encoded do not read back: {e} (ranks of different berth versions?)"
                ))
            })?;
            out.extend(theirs);
        }
        Ok(out)
    }

    /// The run's ranks, when it has several.
    pub fn ranks(&self) -> Option<&'a dyn crate::dist::Collective> {
        self.collective.filter(|c| c.world_size() > 1)
    }

    /// Whether this rank evaluates (reads and encodes the dev data): rank 0 of a
    /// data-parallel run, or the one process.
    pub fn evaluates(&self) -> bool {
        self.share.evaluates()
    }

    /// The starting checkpoint's tokenizer, loaded on first use (objectives that read
    /// text ask for it; the loop never does).
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let t = TextTokenizer::from_dir(self.model_dir)?;
        Ok(self.tokenizer.get_or_init(|| t))
    }
}

/// What the prepared data looks like, for the plan printed before step 0.
#[derive(Debug, Clone, Default)]
pub struct DataSummary {
    /// Label names (classification, NER); empty for other objectives.
    pub labels: Vec<String>,
    /// Dev examples (or questions, for QA).
    pub dev_examples: usize,
    /// Malformed rows skipped.
    pub skipped: usize,
}

/// A network trained beside the main model and saved in a subfolder of each checkpoint
/// (ELECTRA's generator under `generator/`).
pub struct Companion {
    /// Subfolder of the checkpoint, and the prefix of its optimizer-state names.
    pub dir: &'static str,
    /// The network.
    pub model: Model,
    /// Its config.json.
    pub config: serde_json::Value,
}

/// The networks of a run: the main model (saved at the checkpoint's top level), networks
/// trained with it, and frozen ones that only run forward (a distillation teacher).
pub struct Networks {
    /// The model being trained.
    pub main: Model,
    /// Its config.json as saved.
    pub config: serde_json::Value,
    /// Trained networks beside it (one optimizer steps them all).
    pub companions: Vec<Companion>,
    /// Networks used forward only: no gradient, no optimizer state, never saved.
    pub frozen: Vec<Model>,
}

impl Networks {
    /// Sets the matrix products of every trained network (frozen ones stay f32).
    pub fn set_train_products(&mut self, p: berth_kernels::Products) -> Result<()> {
        self.main.set_train_products(p)?;
        for c in &mut self.companions {
            c.model.set_train_products(p)?;
        }
        Ok(())
    }

    /// The trained networks with untracked weights ([`Model::detached`]), for evaluation;
    /// frozen networks as they are.
    pub fn detached(&self) -> Result<Self> {
        Ok(Networks {
            main: self.main.detached()?,
            config: self.config.clone(),
            companions: self
                .companions
                .iter()
                .map(|c| {
                    Ok(Companion {
                        dir: c.dir,
                        model: c.model.detached()?,
                        config: c.config.clone(),
                    })
                })
                .collect::<Result<_>>()?,
            frozen: self.frozen.clone(),
        })
    }

    /// One trained model and nothing else.
    pub fn single(main: Model, config: serde_json::Value) -> Self {
        Networks {
            main,
            config,
            companions: Vec::new(),
            frozen: Vec::new(),
        }
    }

    /// The parameters one optimizer steps: the main model's, then each companion's under
    /// `DIR/` names (a variable shared with the main model, such as tied embeddings, is
    /// stepped once: the optimizer merges parameters by variable).
    pub fn params(&self) -> Vec<Param> {
        let mut params = self.main.params.clone();
        for c in &self.companions {
            params.extend(c.model.params.iter().map(|p| Param {
                name: format!("{}/{}", c.dir, p.name),
                ..p.clone()
            }));
        }
        params
    }

    /// The trained networks' fused weights, in the order a backward reaches them (see
    /// `berth_model::Model::fused_weights`): the main model's, then each companion's.
    pub fn fused_weights(&self) -> Vec<Tensor> {
        let mut all = self.main.fused_weights();
        for c in &self.companions {
            all.extend(c.model.fused_weights());
        }
        all
    }

    /// Sets (or with `None` removes) the fused-layer gradient listener of every trained
    /// network (see `berth_model::Model::set_grad_listener`).
    pub fn set_grad_listener(&self, listener: Option<berth_kernels::GradListener>) {
        self.main.set_grad_listener(listener.clone());
        for c in &self.companions {
            c.model.set_grad_listener(listener.clone());
        }
    }

    /// Back-propagates `loss` through every trained network.
    pub fn backward(&self, loss: &Tensor) -> Result<crate::optim::Grads> {
        let mut dense = self.main.backward(loss)?;
        for c in &self.companions {
            c.model.collect_grads(&mut dense)?;
        }
        let rows = std::iter::once(&self.main)
            .chain(self.companions.iter().map(|c| &c.model))
            .map(|m| {
                let (table, rows) = m.take_word_grads();
                crate::optim::RowGrads { table, rows }
            })
            .filter(|r| !r.rows.is_empty())
            .collect();
        Ok(crate::optim::Grads { dense, rows })
    }

    /// Turns on row gradients for the word table (see
    /// `berth_model::Model::set_sparse_word_grads`) where they are exact and cheaper: one
    /// trained network (no companion sharing its table) whose head does not reuse the table
    /// (not a masked-LM decoder). Returns whether they are on.
    pub fn use_sparse_word_grads(&mut self) -> bool {
        self.companions.is_empty() && self.main.set_sparse_word_grads(true)
    }
}

/// An objective's training examples seen from the loop: how many, how many input tokens
/// (no padding: what is computed), and the token ids of one (for `dump_order`).
pub trait TrainSet {
    /// Examples.
    fn len(&self) -> usize;

    /// Whether there is no example.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Input tokens over all examples.
    fn tokens(&self) -> usize;

    /// The token ids of example `i`'s first sequence.
    fn ids(&self, i: usize) -> Vec<u32>;

    /// Input tokens of example `i` (its place in a packed batch: data-parallel dropout keys
    /// a rank's share by the tokens before it).
    fn example_tokens(&self, i: usize) -> usize;
}

/// A typed example that knows its input tokens.
pub trait Example {
    /// Input tokens it feeds the encoder (every sequence of it).
    fn tokens(&self) -> usize;

    /// Its first sequence's ids.
    fn ids(&self) -> &[u32];
}

impl<E: Example> TrainSet for Vec<E> {
    fn len(&self) -> usize {
        <[E]>::len(self)
    }

    fn tokens(&self) -> usize {
        self.iter().map(Example::tokens).sum()
    }

    fn ids(&self, i: usize) -> Vec<u32> {
        self[i].ids().to_vec()
    }

    fn example_tokens(&self, i: usize) -> usize {
        self[i].tokens()
    }
}

/// Input tokens of a batch of examples.
pub fn batch_tokens<E: Example>(examples: &[&E]) -> usize {
    examples.iter().map(|e| e.tokens()).sum()
}

/// The loss of one batch and the tokens it fed the encoder(s).
pub struct BatchLoss {
    /// Mean loss over the batch (`None`: nothing to learn from, e.g. every token ignored).
    pub loss: Option<Tensor>,
    /// Input tokens of the batch (for tokens/s).
    pub tokens: usize,
    /// The units `loss` is the mean over (examples; labelled tokens for NER): a data-parallel
    /// run weights each rank's mean by its share of the global batch's units, so the summed
    /// gradient is the one-process batch's.
    pub units: f64,
    /// A second mean added to `loss`, with units of its own (set by [`Objective::loss_at`]
    /// for the sentence-pair loss of NSP / SOP, a mean over pairs beside the mean over
    /// masked tokens): a data-parallel run weights each of the two means by its own units.
    pub second: Option<(Tensor, f64)>,
    /// `loss` is already the whole global batch's mean, computed on every rank from values
    /// gathered from all of them, with gradients flowing only into this rank's share (the
    /// in-batch-negatives loss): a data-parallel run takes it unweighted.
    pub whole_batch: bool,
    /// Forward passes through the trained networks in `loss`'s graph (a fused layer hands
    /// out its weights' gradients once per pass; the gradient summing waits for all).
    pub passes: usize,
}

impl Default for BatchLoss {
    /// Nothing to learn from: no loss, no tokens, one pass.
    fn default() -> Self {
        BatchLoss {
            loss: None,
            tokens: 0,
            units: 0.0,
            second: None,
            whole_batch: false,
            passes: 1,
        }
    }
}

/// What is being learned; see the module documentation.
pub trait Objective: Sync {
    /// Reads, splits, labels and encodes the training and dev data.
    fn prepare(&mut self, env: &Env) -> Result<DataSummary>;

    /// The networks to train, starting from `from` (the base checkpoint, or the checkpoint
    /// a resumed run continues): heads created as transformers creates them.
    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks>;

    /// The networks of an already trained checkpoint, for evaluation (`berth eval
    /// --model`): its heads must exist (no new weights are created).
    fn load_trained(&mut self, dir: &Path, env: &Env) -> Result<Networks>;

    /// Token limit per example (checked against the model's position table).
    fn max_length(&self) -> usize;

    /// The training examples, as the loop sees them (a count, tokens, ids).
    fn train_set(&self) -> &dyn TrainSet;

    /// The loss of the training examples `batch` (indices). `seed` is the batch's own
    /// randomness (masking, sampling), keyed by its position in the run; `dropout` is on
    /// during training.
    fn loss(
        &self,
        nets: &Networks,
        batch: &[usize],
        seed: u64,
        dropout: Option<&Dropout>,
    ) -> Result<BatchLoss>;

    /// [`Self::loss`] of a rank's share `batch` of a global batch, after the global batch's
    /// examples `before` (the other ranks' shares before it): randomness drawn per example
    /// (masked positions, sampled replacements) is keyed by the example's global position,
    /// so the shares together draw what one process draws.
    /// `collective` is the run's: an objective whose loss needs every rank's values (see
    /// [`Self::gathers`]) gathers them there.
    fn loss_at(
        &self,
        nets: &Networks,
        batch: &[usize],
        before: &[usize],
        seed: u64,
        dropout: Option<&Dropout>,
        collective: &dyn crate::dist::Collective,
    ) -> Result<BatchLoss> {
        let _ = (before, collective);
        self.loss(nets, batch, seed, dropout)
    }

    /// Whether [`Self::loss_at`] makes collective calls: then every rank calls it for every
    /// micro-batch, also with an empty share.
    fn gathers(&self) -> bool {
        false
    }

    /// Dev metrics of `nets`.
    fn evaluate(&self, nets: &Networks) -> Result<Metrics>;

    /// The metric that decides the best checkpoint and early stopping (higher is better).
    fn main_metric(&self) -> &'static str;

    /// Writes files of the objective's own into a checkpoint folder `dir` beside the
    /// weights (a bi-encoder's sentence-transformers module files).
    fn write_extras(&self, _nets: &Networks, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Rank `rank` of a pretend 2-rank world: `gather_all` records this rank's payload and
    /// answers with `answer` (the payloads of both ranks), or with its own twice.
    struct Pretend {
        rank: usize,
        answer: Option<Vec<Vec<u8>>>,
        sent: Mutex<Vec<u8>>,
    }

    impl crate::dist::Collective for Pretend {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
            unreachable!()
        }
        fn gather_all(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            *self.sent.lock().unwrap() = mine.to_vec();
            Ok(self
                .answer
                .clone()
                .unwrap_or_else(|| vec![mine.to_vec(), mine.to_vec()]))
        }
        fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
            unreachable!()
        }
    }

    /// Each rank encodes only its contiguous share of the rows (told the index of its
    /// first), and with the other rank's share both end with every example in row order —
    /// what one process encodes; ranks that read other rows both refuse.
    #[test]
    fn ranks_encode_their_share_and_exchange_it() {
        let rows: Vec<String> = (0..7).map(|i| format!("row {i}")).collect();
        let seen = Mutex::new(Vec::new());
        let encode = |part: &[String], first: usize| -> Result<Vec<(usize, String)>> {
            seen.lock().unwrap().push((first, part.len()));
            Ok(part
                .iter()
                .enumerate()
                .map(|(i, r)| (first + i, r.to_uppercase()))
                .collect())
        };
        let dir = Path::new(".");
        let one = Env::new(dir, 0).encode_shared(&rows, encode).unwrap();
        seen.lock().unwrap().clear();
        let payloads: Vec<Vec<u8>> = (0..2)
            .map(|rank| {
                let c = Pretend {
                    rank,
                    answer: None,
                    sent: Mutex::new(Vec::new()),
                };
                Env::new(dir, 0)
                    .with_collective(&c)
                    .encode_shared(&rows, encode)
                    .unwrap();
                c.sent.into_inner().unwrap()
            })
            .collect();
        assert_eq!(*seen.lock().unwrap(), [(0, 4), (4, 3)]);
        for rank in 0..2 {
            let c = Pretend {
                rank,
                answer: Some(payloads.clone()),
                sent: Mutex::new(Vec::new()),
            };
            let got = Env::new(dir, 0)
                .with_collective(&c)
                .encode_shared(&rows, encode)
                .unwrap();
            assert_eq!(got, one, "rank {rank}");
        }
        // Rank 1 read one row fewer: both refuse.
        let mut theirs = payloads.clone();
        let c = Pretend {
            rank: 1,
            answer: None,
            sent: Mutex::new(Vec::new()),
        };
        Env::new(dir, 0)
            .with_collective(&c)
            .encode_shared(&rows[..6], encode)
            .unwrap();
        theirs[1] = c.sent.into_inner().unwrap();
        for rank in 0..2 {
            let c = Pretend {
                rank,
                answer: Some(theirs.clone()),
                sent: Mutex::new(Vec::new()),
            };
            let e = Env::new(dir, 0)
                .with_collective(&c)
                .encode_shared(&rows, encode)
                .unwrap_err()
                .to_string();
            assert!(e.contains("rank 1's training data"), "{e}");
        }
    }
}
