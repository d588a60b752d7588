//! Masked-language-model pretraining (BERT / RoBERTa), optionally with BERT's
//! next-sentence prediction or ALBERT's sentence-order prediction on the pooled first token
//! (`BertForPreTraining`). Masking is dynamic (a fresh draw each time a batch is seen) and
//! the vocabulary projection runs on the masked positions only. Held-out: masked-LM loss,
//! perplexity and masked accuracy with a fixed masking.
use std::path::Path;

use berth_model::{Batch, Dropout, HeadKind, Model};
use berth_text::TextTokenizer;
use candle_core::Tensor;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::corpus::specials;
use crate::distill::DistillConfig;
use crate::error::{Result, TrainError};
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::masking::{mask_sequence, MaskingConfig};
use crate::objective::DataConfig;
use crate::objective::{BatchLoss, DataSummary, Env, Metrics, Networks, Objective, TrainSet};
use crate::pretrain::{read_sequences, PretrainSequence, SentenceObjective, Sequences};

/// Settings of a masked-LM run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MlmConfig {
    /// Fraction of tokens chosen for prediction.
    pub mask_rate: f64,
    /// Choose whole words.
    pub whole_word: bool,
    /// A sentence-pair objective beside masked-LM (BERT only).
    pub sentence_objective: Option<SentenceObjective>,
    /// Learn from a teacher's masked-token distributions too (self-distillation when the
    /// teacher is the starting checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

impl Default for MlmConfig {
    fn default() -> Self {
        MlmConfig {
            mask_rate: 0.15,
            whole_word: false,
            sentence_objective: None,
            distill: None,
        }
    }
}

/// A pretraining corpus with its masking: what masked-LM and RTD share.
pub(crate) struct MaskedCorpus {
    pub(crate) data: DataConfig,
    rate: f64,
    whole_word: bool,
    masking: Option<MaskingConfig>,
    /// The run's seed (the held-out masking).
    pub(crate) seed: u64,
    train: Sequences,
    pub(crate) dev: Vec<PretrainSequence>,
}

impl MaskedCorpus {
    /// The corpus `data`, masked at `rate` (whole words or tokens).
    pub(crate) fn new(data: DataConfig, rate: f64, whole_word: bool) -> Self {
        MaskedCorpus {
            data,
            rate,
            whole_word,
            masking: None,
            seed: 0,
            train: Sequences::Memory(Vec::new()),
            dev: Vec::new(),
        }
    }

    /// Reads the training and held-out sequences (segment pairs with `pairs`).
    pub(crate) fn prepare(
        &mut self,
        env: &Env,
        pairs: Option<SentenceObjective>,
    ) -> Result<DataSummary> {
        (self.train, self.dev) =
            read_sequences(&self.data, env.tokenizer()?, env.seed, pairs, env.ranks())?;
        self.seed = env.seed;
        Ok(DataSummary {
            labels: Vec::new(),
            dev_examples: self.dev.len(),
            skipped: 0,
        })
    }

    /// Sets the masking for `model`'s vocabulary (checked against the tokenizer's).
    pub(crate) fn mask_for(&mut self, env: &Env, model: &Model) -> Result<()> {
        let m = masking(self.rate, self.whole_word, env.tokenizer()?, model)?;
        // The held-out masking is fixed: a split it leaves without a masked token would
        // report loss 0 and perplexity 1 at every evaluation.
        let masked: usize = self
            .dev
            .chunks(DEV_CHUNK)
            .enumerate()
            .map(|(c, chunk)| {
                let refs: Vec<&PretrainSequence> = chunk.iter().collect();
                mask_examples(&refs, &m, dev_chunk_seed(self.seed, c), 0)
                    .iter()
                    .map(|x| x.labels.len())
                    .sum::<usize>()
            })
            .sum();
        // (Empty before `prepare` when a checkpoint is evaluated: evaluate_mlm checks then.)
        if masked == 0 && !self.dev.is_empty() {
            let tokens: usize = self.dev.iter().map(|s| s.ids.len()).sum();
            return Err(TrainError::Data {
                path: self
                    .data
                    .dev
                    .clone()
                    .unwrap_or_else(|| self.data.train.clone()),
                line: 0,
                message: format!(
                    "the held-out split ({} sequences, {tokens} tokens) gets no masked token \
                     at masking rate {}: too small to evaluate; pass a larger --dev FILE or \
                     raise --val-fraction",
                    self.dev.len(),
                    self.rate
                ),
            });
        }
        self.masking = Some(m);
        Ok(())
    }

    /// The masking (set when the networks were built).
    pub(crate) fn masking(&self) -> &MaskingConfig {
        self.masking
            .as_ref()
            .expect("the networks are built before the loss; this is a bug")
    }

    /// The training sequences.
    pub(crate) fn train(&self) -> &Sequences {
        &self.train
    }

    /// The training sequences `batch` (indices), decoded from shards when needed.
    pub(crate) fn batch(&self, batch: &[usize]) -> Vec<std::borrow::Cow<'_, PretrainSequence>> {
        batch.iter().map(|&i| self.train.get(i)).collect()
    }
}

/// Input tokens of pretraining sequences.
pub(crate) fn tokens_of(seqs: &[&PretrainSequence]) -> usize {
    seqs.iter().map(|s| s.ids.len()).sum()
}

/// The masked-LM objective.
pub struct MaskedLm {
    corpus: MaskedCorpus,
    cfg: MlmConfig,
}

impl MaskedLm {
    /// An objective for `cfg` on the corpus `data`.
    pub fn new(data: DataConfig, cfg: MlmConfig) -> Self {
        MaskedLm {
            corpus: MaskedCorpus::new(data, cfg.mask_rate, cfg.whole_word),
            cfg,
        }
    }
}

impl Objective for MaskedLm {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        self.corpus.prepare(env, self.cfg.sentence_objective)
    }

    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        let head = TaskHead {
            kind: HeadKind::MaskedLm,
            labels: Vec::new(),
            problem_type: None,
            sentence_order: self.cfg.sentence_objective.is_some(),
        };
        let teacher = match &self.cfg.distill {
            Some(dc) => Some(dc.load_teacher(env, HeadKind::MaskedLm)?),
            None => None,
        };
        let (model, config) = load_for_task(from, &head, env.seed)?;
        self.corpus.mask_for(env, &model)?;
        let mut nets = Networks::single(model, config);
        nets.frozen.extend(teacher);
        Ok(nets)
    }

    fn load_trained(&mut self, dir: &Path, env: &Env) -> Result<Networks> {
        let nets = super::common::trained_networks(dir, Some(HeadKind::MaskedLm))?;
        self.corpus.mask_for(env, &nets.main)?;
        Ok(nets)
    }

    fn max_length(&self) -> usize {
        self.corpus.data.max_length
    }

    fn train_set(&self) -> &dyn TrainSet {
        self.corpus.train()
    }

    fn loss(
        &self,
        nets: &Networks,
        batch: &[usize],
        seed: u64,
        dropout: Option<&Dropout>,
    ) -> Result<BatchLoss> {
        let owned = self.corpus.batch(batch);
        let seqs: Vec<&PretrainSequence> = owned.iter().map(|s| s.as_ref()).collect();
        let (student, masking) = (&nets.main, self.corpus.masking());
        let loss = match (&self.cfg.distill, nets.frozen.first()) {
            (Some(dc), Some(teacher)) => {
                distilled_mlm_loss(student, teacher, &seqs, masking, seed, dc, dropout)?
            }
            _ => mlm_loss(student, &seqs, masking, seed, dropout)?,
        };
        Ok(BatchLoss {
            loss,
            tokens: tokens_of(&seqs),
            units: seqs.len() as f64,
            second: None,
            ..Default::default()
        })
    }

    /// A rank's share: masks keyed by global position, and the masked tokens as the loss
    /// units (the masked-LM loss is a mean over them); with NSP / SOP the sentence-pair
    /// loss is the second mean, over the share's pairs; with a teacher the masked-LM mean
    /// is the distillation blend (a mean over the same masked rows).
    fn loss_at(
        &self,
        nets: &Networks,
        batch: &[usize],
        before: &[usize],
        seed: u64,
        dropout: Option<&Dropout>,
        _collective: &dyn crate::dist::Collective,
    ) -> Result<BatchLoss> {
        let owned = self.corpus.batch(batch);
        let seqs: Vec<&PretrainSequence> = owned.iter().map(|s| s.as_ref()).collect();
        let masked = mask_examples(&seqs, self.corpus.masking(), seed, before.len());
        let out = outputs_of_masked(&nets.main, &masked, dropout)?;
        let loss = match (&out.mlm, &self.cfg.distill, nets.frozen.first()) {
            // Distillation: the blend of the soft and hard means over the masked rows.
            (Some((logits, labels)), Some(dc), Some(teacher)) => {
                distilled_mean(teacher, dc, &masked, logits, labels)?
            }
            (Some((logits, labels)), _, _) => mean_cross_entropy(logits, labels)?,
            (None, _, _) => None,
        };
        let second = match &out.pairs {
            Some((logits, labels)) => {
                mean_cross_entropy(logits, labels)?.map(|l| (l, labels.len() as f64))
            }
            None => None,
        };
        Ok(BatchLoss {
            loss,
            tokens: tokens_of(&seqs),
            units: masked.iter().map(|m| m.positions.len()).sum::<usize>() as f64,
            second,
            ..Default::default()
        })
    }

    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let c = &self.corpus;
        evaluate_mlm(&nets.main, &c.dev, c.masking(), c.seed)
    }

    fn main_metric(&self) -> &'static str {
        "masked_accuracy"
    }
}

/// The masking of a run at `rate` (whole words or tokens), for `model`'s vocabulary.
pub(crate) fn masking(
    rate: f64,
    whole_word: bool,
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
        rate,
        whole_word,
        mask_id,
        vocab_size: model.config.vocab_size as u32,
    })
}

/// One pretraining batch's outputs: masked-LM logits at the chosen positions `[R, V]` with
/// their labels (`None` when nothing was chosen), and the sentence-pair logits `[S, 2]` with
/// their labels when the sequences carry them ([`crate::pretrain::sentence_pairs`]).
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
    examples: &[&PretrainSequence],
    masking: &MaskingConfig,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Outputs> {
    outputs_of_masked(model, &mask_examples(examples, masking, seed, 0), d)
}

/// Masks `examples`, example `k` from a generator seeded by `(seed, first + k)` (`first`:
/// the position of `examples[0]` in its global batch; 0 in one process).
pub(crate) fn mask_examples(
    examples: &[&PretrainSequence],
    masking: &MaskingConfig,
    seed: u64,
    first: usize,
) -> Vec<MaskedInput> {
    examples
        .iter()
        .enumerate()
        .map(|(k, e)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(berth_kernels::seed_stream(
                seed,
                (first + k) as u64,
            ));
            let m = mask_sequence(&e.ids, &e.special(), &e.words, masking, &mut rng);
            MaskedInput {
                ids: m.ids,
                type_ids: e.type_ids.clone(),
                positions: m.positions,
                labels: m.labels,
                pair_label: e.pair_label,
            }
        })
        .collect()
}

/// Masked sequences packed into one batch (no padding).
pub(crate) fn pack_masked(inputs: &[MaskedInput]) -> Result<Batch> {
    Ok(Batch::from_sequences(
        inputs
            .iter()
            .map(|m| (m.ids.as_slice(), m.type_ids.as_slice())),
    )?)
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
    let batch = pack_masked(inputs)?;
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
pub fn mlm_loss(
    model: &Model,
    examples: &[&PretrainSequence],
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
    with_pairs(mlm, &out)
}

/// `mlm` plus the sentence-pair cross-entropy of `out` when it has pair logits.
fn with_pairs(mlm: Option<Tensor>, out: &Outputs) -> Result<Option<Tensor>> {
    let pairs = match &out.pairs {
        Some((logits, labels)) => mean_cross_entropy(logits, labels)?,
        None => None,
    };
    Ok(match (mlm, pairs) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
}

/// The pretraining loss of a batch distilled from `teacher` (self-distillation in continued
/// pretraining): at the masked positions, `distill`'s blend of the teacher's softened
/// vocabulary distribution and the original tokens; the teacher sees the same masked input.
/// A sentence-pair loss stays on its hard labels.
pub fn distilled_mlm_loss(
    student: &Model,
    teacher: &Model,
    examples: &[&PretrainSequence],
    masking: &MaskingConfig,
    seed: u64,
    distill: &DistillConfig,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let inputs = mask_examples(examples, masking, seed, 0);
    let out = outputs_of_masked(student, &inputs, d)?;
    let Some((logits, labels)) = &out.mlm else {
        return total_loss(out);
    };
    let mlm = distilled_mean(teacher, distill, &inputs, logits, labels)?;
    with_pairs(mlm, &out)
}

/// The distillation blend at the masked positions of `inputs`: the student's `logits` there
/// against the original `labels` and the teacher's logits on the same masked input.
fn distilled_mean(
    teacher: &Model,
    distill: &DistillConfig,
    inputs: &[MaskedInput],
    logits: &Tensor,
    labels: &[u32],
) -> Result<Option<Tensor>> {
    let (rows, _) = masked_rows(inputs);
    let hidden = teacher.forward(&pack_masked(inputs)?)?;
    let taught = teacher.mlm_logits(&Model::select_rows(&hidden, &rows)?)?;
    distill.blend(mean_cross_entropy(logits, labels)?, logits, &taught)
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

/// Held-out sequences are evaluated (and masked) in chunks of this many.
pub(crate) const DEV_CHUNK: usize = 64;

/// The masking seed of held-out chunk `c` (the same positions at every evaluation).
pub(crate) fn dev_chunk_seed(seed: u64, c: usize) -> u64 {
    berth_kernels::seed_stream(seed ^ 0xe7a1, c as u64)
}

/// Held-out masked-LM metrics with a fixed masking (the same positions at every
/// evaluation): loss (mean cross-entropy per masked token), perplexity (its exponential) and
/// masked accuracy (top-1 prediction equals the original token).
pub(crate) fn evaluate_mlm(
    model: &Model,
    dev: &[PretrainSequence],
    masking: &MaskingConfig,
    seed: u64,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let (mut mlm, mut pairs) = (Tally::default(), Tally::default());
    for (c, chunk) in dev.chunks(DEV_CHUNK).enumerate() {
        let refs: Vec<&PretrainSequence> = chunk.iter().collect();
        let chunk_seed = dev_chunk_seed(seed, c);
        let out = pretrain_outputs(model, &refs, masking, chunk_seed, None)?;
        if let Some((logits, labels)) = out.mlm {
            mlm.add(&logits, &labels)?;
        }
        if let Some((logits, labels)) = out.pairs {
            pairs.add(&logits, &labels)?;
        }
    }
    if mlm.count == 0 {
        return Err(TrainError::Config(format!(
            "the evaluation data ({} sequences) gets no masked token: too small to measure \
             masked-LM loss",
            dev.len()
        )));
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
