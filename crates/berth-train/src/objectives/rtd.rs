//! Replaced-token detection (ELECTRA): a small masked-LM generator fills the masked
//! positions with tokens sampled from its own predictions, and the discriminator (the model
//! being pretrained) learns to tell, at every token, whether it is the original or a
//! replacement. The loss is the generator's masked-LM cross-entropy plus `weight` (ELECTRA's
//! λ = 50) times the discriminator's mean binary cross-entropy over all tokens, trained
//! jointly; the sampling is not differentiated through.
//!
//! The generator shares the discriminator's embeddings (word, position, token type and their
//! LayerNorm, as ELECTRA does), so both have the same width; it is made smaller by depth and
//! feed-forward width. Checkpoints: the discriminator is `ElectraForPreTraining` (which
//! `transformers` loads unchanged), the generator `ElectraForMaskedLM` in `generator/`.
use std::path::Path;

use berth_model::{Batch, Dropout, HeadKind, Model};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::mlm::{
    mask_examples, masked_rows, pack_masked, tokens_of, MaskedCorpus, MaskedInput, Tally,
};
use crate::error::{Result, TrainError};
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::masking::MaskingConfig;
use crate::objective::DataConfig;
use crate::objective::{
    BatchLoss, Companion, DataSummary, Env, Metrics, Networks, Objective, TrainSet,
};
use crate::pretrain::PretrainSequence;

/// The generator's folder inside a run's initialisation and each checkpoint.
pub const GENERATOR_DIR: &str = "generator";

/// ELECTRA's weight of the discriminator loss.
pub const DEFAULT_WEIGHT: f64 = 50.0;

/// Makes `generator` use `discriminator`'s embeddings (and its tied decoder their word
/// matrix): the same variables, so both losses update one set. The generator's own
/// embedding variables are dropped from its parameter list.
pub fn share_embeddings(generator: &mut Model, discriminator: &Model) -> Result<()> {
    let g = &generator.config;
    let d = &discriminator.config;
    if (
        g.hidden_size,
        g.vocab_size,
        g.max_position_embeddings,
        g.type_vocab_size,
    ) != (
        d.hidden_size,
        d.vocab_size,
        d.max_position_embeddings,
        d.type_vocab_size,
    ) {
        return Err(TrainError::Config(format!(
            "{}: the generator's embeddings (hidden {}, vocabulary {}) cannot be shared with the \
             discriminator's (hidden {}, vocabulary {})",
            generator.dir.display(),
            g.hidden_size,
            g.vocab_size,
            d.hidden_size,
            d.vocab_size
        )));
    }
    generator.embeddings = discriminator.embeddings.clone();
    if let Some(berth_model::Head::MaskedLm(h)) = &mut generator.head {
        h.decoder = discriminator.embeddings.word_embeddings.clone();
    }
    for p in generator
        .params
        .iter_mut()
        .filter(|p| p.name.contains("embeddings."))
    {
        if let Some(shared) = discriminator.params.iter().find(|q| q.name == p.name) {
            p.var = shared.var.clone();
        }
    }
    Ok(())
}

/// One batch's outputs: the generator's logits at the masked positions `[R, V]` with the
/// original tokens, and the discriminator's logits `[N]` with their targets (1: replaced).
pub struct RtdOutputs {
    /// Generator logits at the masked positions.
    pub generator_logits: Tensor,
    /// Original token at each masked position.
    pub labels: Vec<u32>,
    /// Discriminator logit per token of the packed batch.
    pub discriminator_logits: Tensor,
    /// 1.0 where the discriminator's input differs from the original token.
    pub replaced: Vec<f32>,
}

/// Runs generator and discriminator on masked inputs; `sample(row, logits)` draws the
/// replacement of masked row `row` from the generator's logits there.
pub fn rtd_outputs(
    generator: &Model,
    discriminator: &Model,
    inputs: &[MaskedInput],
    sample: &mut dyn FnMut(usize, &[f32]) -> u32,
    d_generator: Option<&Dropout>,
    d_discriminator: Option<&Dropout>,
) -> Result<Option<RtdOutputs>> {
    let (rows, labels) = masked_rows(inputs);
    if rows.is_empty() {
        return Ok(None);
    }
    let batch = pack_masked(inputs)?;
    let hidden = generator.forward_train(&batch, d_generator)?;
    let generator_logits = generator.mlm_logits(&Model::select_rows(&hidden, &rows)?)?;
    // The discriminator sees the originals with each masked position replaced by a sample.
    let values = generator_logits.to_vec2::<f32>()?;
    let mut replaced = Vec::with_capacity(inputs.iter().map(|m| m.ids.len()).sum());
    let mut disc_ids: Vec<Vec<u32>> = Vec::with_capacity(inputs.len());
    let mut row = 0;
    for m in inputs {
        let mut ids = m.ids.clone();
        let mut flags = vec![0f32; ids.len()];
        for (&p, &original) in m.positions.iter().zip(&m.labels) {
            let token = sample(row, &values[row]);
            ids[p as usize] = token;
            flags[p as usize] = (token != original) as u32 as f32;
            row += 1;
        }
        replaced.extend(flags);
        disc_ids.push(ids);
    }
    let batch = Batch::from_sequences(
        disc_ids
            .iter()
            .zip(inputs)
            .map(|(ids, m)| (ids.as_slice(), m.type_ids.as_slice())),
    )?;
    let hidden = discriminator.forward_train(&batch, d_discriminator)?;
    Ok(Some(RtdOutputs {
        generator_logits,
        labels,
        discriminator_logits: discriminator.replaced_token_logits(&hidden)?,
        replaced,
    }))
}

/// `generator MLM loss + weight × discriminator BCE` (ELECTRA's objective): the
/// generator's mean cross-entropy at the masked positions and the discriminator's mean binary
/// cross-entropy over all tokens.
pub fn rtd_loss(out: &RtdOutputs, weight: f64) -> Result<Tensor> {
    let (generator, discriminator) = rtd_means(out)?;
    Ok((generator.expect("masked rows present") + (discriminator * weight)?)?)
}

/// The two means of [`rtd_loss`] apart: the generator's over the masked positions and the
/// discriminator's over all tokens.
fn rtd_means(out: &RtdOutputs) -> Result<(Option<Tensor>, Tensor)> {
    let generator = loss::cross_entropy(
        &out.generator_logits,
        &out.labels.iter().copied().map(Some).collect::<Vec<_>>(),
    )?;
    let targets = Tensor::new(out.replaced.as_slice(), &candle_core::Device::Cpu)?;
    let discriminator = loss::bce_with_logits(&out.discriminator_logits, &targets)?;
    Ok((generator, discriminator))
}

/// Draws from `softmax(logits)` with a generator seeded by `(seed, row)`.
fn sample_softmax(seed: u64, row: usize, logits: &[f32]) -> u32 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(berth_kernels::seed_stream(seed, row as u64));
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits.iter().map(|&x| ((x - max) as f64).exp()).collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    (logits.len() - 1) as u32
}

/// Masked `inputs` (see [`mask_examples`]) through both networks, replacements sampled from
/// the stream of each masked position's row counted from `row0` (the masked positions of
/// the global batch before these inputs; 0 in one process).
fn outputs(
    generator: &Model,
    discriminator: &Model,
    inputs: &[MaskedInput],
    row0: usize,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Option<RtdOutputs>> {
    let sample_seed = berth_kernels::seed_stream(seed, 0x5a3e);
    // The two networks draw dropout from different streams.
    let d_gen = d.map(|d| d.sibling(berth_kernels::seed_stream(seed, 0x9e4)));
    rtd_outputs(
        generator,
        discriminator,
        inputs,
        &mut |row, logits| sample_softmax(sample_seed, row0 + row, logits),
        d_gen.as_ref(),
        d,
    )
}

/// The training loss of one batch (`None` when nothing was masked).
pub(crate) fn batch_loss(
    generator: &Model,
    discriminator: &Model,
    examples: &[&PretrainSequence],
    masking: &MaskingConfig,
    weight: f64,
    seed: u64,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let inputs = mask_examples(examples, masking, seed, 0);
    outputs(generator, discriminator, &inputs, 0, seed, d)?
        .map(|o| rtd_loss(&o, weight))
        .transpose()
}

/// Held-out metrics with a fixed masking and fixed samples: the generator's masked-LM loss,
/// perplexity and masked accuracy (the names masked-LM pretraining logs), and the
/// discriminator's loss, accuracy over all tokens, the share of replaced tokens (what
/// predicting "original" everywhere would miss) and precision / recall on replaced tokens.
pub(crate) fn evaluate(
    generator: &Model,
    discriminator: &Model,
    dev: &[PretrainSequence],
    masking: &MaskingConfig,
    seed: u64,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut generated = Tally::default();
    let (mut disc_loss, mut right, mut tokens) = (0f64, 0usize, 0usize);
    let (mut replaced, mut flagged, mut caught) = (0usize, 0usize, 0usize);
    for (c, chunk) in dev.chunks(super::mlm::DEV_CHUNK).enumerate() {
        let refs: Vec<&PretrainSequence> = chunk.iter().collect();
        let chunk_seed = super::mlm::dev_chunk_seed(seed, c);
        let inputs = mask_examples(&refs, masking, chunk_seed, 0);
        let Some(out) = outputs(generator, discriminator, &inputs, 0, chunk_seed, None)? else {
            continue;
        };
        generated.add(&out.generator_logits, &out.labels)?;
        let targets = Tensor::new(out.replaced.as_slice(), &candle_core::Device::Cpu)?;
        let d = loss::bce_with_logits(&out.discriminator_logits, &targets)?;
        disc_loss += d.to_scalar::<f32>()? as f64 * out.replaced.len() as f64;
        let logits = out.discriminator_logits.to_vec1::<f32>()?;
        for (&x, &t) in logits.iter().zip(&out.replaced) {
            let (says, is) = (x > 0.0, t > 0.5);
            right += (says == is) as usize;
            replaced += is as usize;
            flagged += says as usize;
            caught += (says && is) as usize;
        }
        tokens += logits.len();
    }
    let ratio = |a: usize, b: usize| a as f64 / b.max(1) as f64;
    let mut out = serde_json::Map::new();
    generated.insert_mlm(&mut out);
    out.insert("rtd_loss".into(), (disc_loss / tokens.max(1) as f64).into());
    out.insert("rtd_accuracy".into(), ratio(right, tokens).into());
    out.insert("replaced_fraction".into(), ratio(replaced, tokens).into());
    out.insert("replaced_precision".into(), ratio(caught, flagged).into());
    out.insert("replaced_recall".into(), ratio(caught, replaced).into());
    Ok(out)
}

/// Settings of a replaced-token-detection run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RtdConfig {
    /// Fraction of tokens masked for the generator.
    pub mask_rate: f64,
    /// Mask whole words.
    pub whole_word: bool,
    /// Weight of the discriminator's loss (ELECTRA's λ).
    pub rtd_weight: f64,
}

impl Default for RtdConfig {
    fn default() -> Self {
        RtdConfig {
            mask_rate: 0.15,
            whole_word: false,
            rtd_weight: DEFAULT_WEIGHT,
        }
    }
}

/// The replaced-token-detection objective: the run's model is the discriminator
/// (`ElectraForPreTraining`), the generator is a companion network in `generator/`.
pub struct Rtd {
    corpus: MaskedCorpus,
    cfg: RtdConfig,
}

impl Rtd {
    /// An objective for `cfg` on the corpus `data`.
    pub fn new(data: DataConfig, cfg: RtdConfig) -> Self {
        Rtd {
            corpus: MaskedCorpus::new(data, cfg.mask_rate, cfg.whole_word),
            cfg,
        }
    }

    fn parts<'a>(&'a self, nets: &'a Networks) -> (&'a Model, &'a MaskingConfig) {
        let generator = &nets
            .companions
            .first()
            .expect("an RTD run has its generator; this is a bug")
            .model;
        (generator, self.corpus.masking())
    }
}

fn masked_lm_head() -> TaskHead {
    TaskHead {
        kind: HeadKind::MaskedLm,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: false,
    }
}

impl Objective for Rtd {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        self.corpus.prepare(env, None)
    }

    /// The discriminator from `from`, the generator from `from/generator`, sharing the
    /// discriminator's embeddings.
    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        let head = TaskHead {
            kind: HeadKind::ReplacedTokenDetection,
            ..masked_lm_head()
        };
        let (model, config) = load_for_task(from, &head, env.seed)?;
        self.corpus.mask_for(env, &model)?;
        let (mut g, g_config) =
            load_for_task(&from.join(GENERATOR_DIR), &masked_lm_head(), env.seed)?;
        share_embeddings(&mut g, &model)?;
        let mut nets = Networks::single(model, config);
        nets.companions.push(Companion {
            dir: GENERATOR_DIR,
            model: g,
            config: g_config,
        });
        Ok(nets)
    }

    /// An ELECTRA discriminator is scored with the generator saved beside it.
    fn load_trained(&mut self, dir: &Path, env: &Env) -> Result<Networks> {
        let mut nets =
            super::common::trained_networks(dir, Some(HeadKind::ReplacedTokenDetection))?;
        self.corpus.mask_for(env, &nets.main)?;
        nets.companions.push(Companion {
            dir: GENERATOR_DIR,
            model: crate::init::load_frozen(&dir.join(GENERATOR_DIR), None)?,
            config: serde_json::Value::Null,
        });
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
        let (generator, masking) = self.parts(nets);
        let owned = self.corpus.batch(batch);
        let seqs: Vec<&PretrainSequence> = owned.iter().map(|s| s.as_ref()).collect();
        let weight = self.cfg.rtd_weight;
        Ok(BatchLoss {
            loss: batch_loss(generator, &nets.main, &seqs, masking, weight, seed, dropout)?,
            tokens: tokens_of(&seqs),
            units: seqs.len() as f64,
            second: None,
            ..Default::default()
        })
    }

    /// A rank's share: masks keyed by global position ([`mask_examples`]), replacements
    /// drawn from the stream of each masked position's global row (the masked positions of
    /// the examples `before` are counted from their masks), and the two means apart: the
    /// generator's over masked tokens, the weighted discriminator's over all tokens.
    fn loss_at(
        &self,
        nets: &Networks,
        batch: &[usize],
        before: &[usize],
        seed: u64,
        dropout: Option<&Dropout>,
        _collective: &dyn crate::dist::Collective,
    ) -> Result<BatchLoss> {
        let (generator, masking) = self.parts(nets);
        let owned = self.corpus.batch(batch);
        let seqs: Vec<&PretrainSequence> = owned.iter().map(|s| s.as_ref()).collect();
        let earlier = self.corpus.batch(before);
        let earlier: Vec<&PretrainSequence> = earlier.iter().map(|s| s.as_ref()).collect();
        let row0: usize = mask_examples(&earlier, masking, seed, 0)
            .iter()
            .map(|m| m.positions.len())
            .sum();
        let inputs = mask_examples(&seqs, masking, seed, before.len());
        let weight = self.cfg.rtd_weight;
        let tokens = tokens_of(&seqs);
        let out = outputs(generator, &nets.main, &inputs, row0, seed, dropout)?;
        let (loss, units, discriminator) = match out {
            Some(o) => {
                let (g, d) = rtd_means(&o)?;
                (g, o.labels.len() as f64, d)
            }
            // Nothing masked in this share: its tokens still count, unreplaced, in the
            // discriminator's mean over the whole batch.
            None => {
                let hidden = nets.main.forward_train(&pack_masked(&inputs)?, dropout)?;
                let logits = nets.main.replaced_token_logits(&hidden)?;
                let targets = Tensor::zeros(logits.dims(), logits.dtype(), logits.device())?;
                (None, 0.0, loss::bce_with_logits(&logits, &targets)?)
            }
        };
        Ok(BatchLoss {
            loss,
            tokens,
            units,
            second: Some(((discriminator * weight)?, tokens as f64)),
            ..Default::default()
        })
    }

    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let (generator, masking) = self.parts(nets);
        evaluate(
            generator,
            &nets.main,
            &self.corpus.dev,
            masking,
            self.corpus.seed,
        )
    }

    fn main_metric(&self) -> &'static str {
        "masked_accuracy"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY, (6.0f32).ln()];
        let mut counts = [0usize; 4];
        for row in 0..20_000 {
            counts[sample_softmax(7, row, &logits) as usize] += 1;
        }
        let share: Vec<f64> = counts.iter().map(|&c| c as f64 / 20_000.0).collect();
        assert_eq!(counts[2], 0);
        for (got, want) in share.iter().zip([0.1, 0.3, 0.0, 0.6]) {
            assert!((got - want).abs() < 0.015, "{share:?}");
        }
        // Seeded: the same row draws the same token.
        assert_eq!(sample_softmax(7, 3, &logits), sample_softmax(7, 3, &logits));
    }
}
