//! Sentence embeddings: a bi-encoder trained on (anchor, positive[, hard negative]) rows
//! with in-batch negatives, as sentence-transformers' `MultipleNegativesRankingLoss`.
//! Checkpoints are bare encoders with sentence-transformers' module files. Dev: every anchor
//! retrieves among all dev positives and negatives (MRR@10, nDCG@10, accuracy@1).
//!
//! Shapes: `B` examples, `S` packed sequences, `N` tokens, `H` hidden.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use berth_model::{Batch, Dropout, Model};
use berth_tasks::{metrics, Pooling};
use berth_text::{Encoded, Truncation};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::common::{pack, split};
use crate::data::{self, Column, Columns};
use crate::error::{Result, TrainError};
use crate::loss;
use crate::objective::DataConfig;
use crate::objective::{
    batch_tokens, BatchLoss, DataSummary, Env, Example, Metrics, Networks, Objective, TrainSet,
};

/// Settings of a sentence-embedding run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedConfig {
    /// Anchor column.
    pub text_column: String,
    /// Positive column.
    pub pair_column: String,
    /// Hard-negative column (scored against every anchor of the batch).
    pub negative_column: Option<String>,
    /// Cosine similarities are multiplied by this before the softmax
    /// (sentence-transformers' default 20).
    pub similarity_scale: f64,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            text_column: "anchor".into(),
            pair_column: "positive".into(),
            negative_column: None,
            similarity_scale: 20.0,
        }
    }
}

/// An anchor with its positive and optional hard negative.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedExample {
    /// The anchor.
    pub anchor: Encoded,
    /// Its positive.
    pub positive: Encoded,
    /// A hard negative.
    pub negative: Option<Encoded>,
}

impl Example for EmbedExample {
    fn tokens(&self) -> usize {
        self.anchor.len() + self.positive.len() + self.negative.as_ref().map_or(0, |e| e.len())
    }

    fn ids(&self) -> &[u32] {
        &self.anchor.ids
    }
}

/// The sentence-embedding objective.
pub struct Embed {
    data: DataConfig,
    cfg: EmbedConfig,
    /// The pooling trained with: the base model's sentence-transformers pooling, else mean.
    pooling: Pooling,
    /// The base model (its sentence-transformers files are copied into checkpoints).
    base: PathBuf,
    tokenizer: Option<berth_text::TextTokenizer>,
    train: Vec<EmbedExample>,
    dev: Vec<EmbedExample>,
}

impl Embed {
    /// An objective for `cfg` on `data`.
    pub fn new(data: DataConfig, cfg: EmbedConfig) -> Self {
        Embed {
            data,
            cfg,
            pooling: Pooling::Mean,
            base: PathBuf::new(),
            tokenizer: None,
            train: Vec::new(),
            dev: Vec::new(),
        }
    }
}

/// Pools `hidden [N, H]` per sequence of `batch` into `[S, H]`, differentiably: mean pooling
/// is one product with a `[S, N]` averaging matrix; CLS takes first tokens.
pub fn pool_train(hidden: &Tensor, batch: &Batch, pooling: Pooling) -> Result<Tensor> {
    match pooling {
        Pooling::Mean => {
            let (s, n) = (batch.num_sequences(), batch.num_tokens());
            let mut w = vec![0f32; s * n];
            for k in 0..s {
                let r = batch.range(k);
                let v = 1.0 / r.len() as f32;
                w[k * n + r.start..k * n + r.end].fill(v);
            }
            Ok(Tensor::from_vec(w, (s, n), &Device::Cpu)?.matmul(hidden)?)
        }
        Pooling::Cls => Ok(Model::first_tokens(hidden, batch)?),
        other => Err(TrainError::Config(format!(
            "{other:?} pooling cannot be trained (mean or cls)"
        ))),
    }
}

/// Rows of `x` scaled to unit L2 norm (torch's `F.normalize`, eps 1e-12).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Multiple-negatives ranking loss of one batch: anchors, positives and (optional) hard
/// negatives run in one packed forward; `scale · cos(anchor_i, candidate_j)` is scored
/// against every positive and negative of the batch, with the own positive as the target
/// class. The sequences of an example must all exist, so `B` anchors give `B` positives.
pub fn mnrl_loss(
    model: &Model,
    examples: &[&EmbedExample],
    pooling: Pooling,
    scale: f64,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let b = examples.len();
    if b == 0 {
        return Ok(None);
    }
    let seqs: Vec<&Encoded> = examples
        .iter()
        .map(|e| &e.anchor)
        .chain(examples.iter().map(|e| &e.positive))
        .chain(examples.iter().filter_map(|e| e.negative.as_ref()))
        .collect();
    let batch = pack(seqs.iter().copied())?;
    let hidden = model.forward_train(&batch, d)?;
    let emb = l2_normalize(&pool_train(&hidden, &batch, pooling)?)?;
    let anchors = emb.narrow(0, 0, b)?;
    let candidates = emb.narrow(0, b, seqs.len() - b)?;
    let scores = (anchors.matmul(&candidates.t()?)? * scale)?;
    let labels: Vec<Option<u32>> = (0..b as u32).map(Some).collect();
    loss::cross_entropy(&scores, &labels)
}

/// Rows per batch of the dev MNRL loss.
pub const DEV_LOSS_BATCH: usize = 32;

/// The pooling a sentence-embedding run trains with: the base model's sentence-transformers
/// pooling, or mean pooling when it has none.
pub fn training_pooling(model_dir: &Path) -> Result<Pooling> {
    Ok(berth_tasks::SentenceConfig::from_dir(model_dir)
        .map_err(|e| TrainError::Config(e.to_string()))?
        .map_or(Pooling::Mean, |c| c.pooling))
}

impl Embed {
    fn encode(&self, items: &[data::TextExample], env: &Env) -> Result<Vec<EmbedExample>> {
        let tok = env.tokenizer()?;
        items
            .par_iter()
            .map(|e| {
                let one = |t: &str| {
                    tok.encode(t, None, self.data.max_length, Truncation::Truncate, e.line)
                };
                Ok(EmbedExample {
                    anchor: one(&e.text)?,
                    positive: one(e.pair.as_deref().unwrap_or_default())?,
                    negative: e.extra.as_deref().map(one).transpose()?,
                })
            })
            .collect()
    }
}

impl Objective for Embed {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        let cols = Columns {
            text: Column::parse(&self.cfg.text_column),
            pair: Some(Column::parse(&self.cfg.pair_column)),
            label: None,
            extra: self.cfg.negative_column.as_deref().map(Column::parse),
        };
        let skip = self.data.skip_bad_rows;
        let s = split(&self.data, env.seed, |p| {
            data::read_text_examples(p, &cols, skip)
        })?;
        self.train = env.encode_shared(&s.train, |rows, _| self.encode(rows, env))?;
        if env.evaluates() {
            self.dev = self.encode(&s.dev, env)?;
        }
        self.tokenizer = Some(env.tokenizer()?.clone());
        Ok(DataSummary {
            labels: Vec::new(),
            dev_examples: self.dev.len(),
            skipped: s.skipped,
        })
    }

    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        self.pooling = training_pooling(env.model_dir)?;
        self.base = env.model_dir.to_path_buf();
        let (model, config) = crate::init::load_encoder(from)?;
        Ok(Networks::single(model, config))
    }

    fn load_trained(&mut self, dir: &Path, _env: &Env) -> Result<Networks> {
        self.pooling = training_pooling(dir)?;
        super::common::trained_networks(dir, None)
    }

    fn max_length(&self) -> usize {
        self.data.max_length
    }

    fn train_set(&self) -> &dyn TrainSet {
        &self.train
    }

    fn loss(
        &self,
        nets: &Networks,
        batch: &[usize],
        _seed: u64,
        dropout: Option<&Dropout>,
    ) -> Result<BatchLoss> {
        let examples: Vec<&EmbedExample> = batch.iter().map(|&i| &self.train[i]).collect();
        let scale = self.cfg.similarity_scale;
        Ok(BatchLoss {
            loss: mnrl_loss(&nets.main, &examples, self.pooling, scale, dropout)?,
            tokens: batch_tokens(&examples),
            units: examples.len() as f64,
            second: None,
            ..Default::default()
        })
    }

    /// Every dev anchor retrieves among all distinct dev positives and negatives by cosine;
    /// its own positive is the relevant one. MRR@10, nDCG@10, accuracy@1, and the mean MNRL
    /// loss over dev batches of [`DEV_LOSS_BATCH`] rows (fixed, so the number does not depend
    /// on the training batch size).
    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let (model, dev) = (&nets.main, &self.dev);
        let mut out = Metrics::new();
        if dev.is_empty() {
            return Ok(out);
        }
        let (mut loss_sum, mut loss_n) = (0.0, 0usize);
        for chunk in dev.chunks(DEV_LOSS_BATCH) {
            let refs: Vec<&EmbedExample> = chunk.iter().collect();
            let scale = self.cfg.similarity_scale;
            if let Some(l) = mnrl_loss(model, &refs, self.pooling, scale, None)? {
                loss_sum += l.to_scalar::<f32>()? as f64 * refs.len() as f64;
                loss_n += refs.len();
            }
        }
        // Candidates: distinct positive / negative texts (by token ids).
        let mut index: HashMap<&[u32], usize> = HashMap::new();
        let mut cands: Vec<&Encoded> = Vec::new();
        let mut positive_of = Vec::with_capacity(dev.len());
        for e in dev {
            for (k, c) in [Some(&e.positive), e.negative.as_ref()]
                .into_iter()
                .flatten()
                .enumerate()
            {
                let i = *index.entry(c.ids.as_slice()).or_insert_with(|| {
                    cands.push(c);
                    cands.len() - 1
                });
                if k == 0 {
                    positive_of.push(i);
                }
            }
        }
        // Unit vectors from the embedding pipeline, in its token-budget batches.
        let tokenizer = self
            .tokenizer
            .clone()
            .expect("prepare runs before evaluate; this is a bug");
        let p = berth_tasks::Pipeline::from_model(model.clone(), tokenizer, self.data.max_length);
        let opts = berth_tasks::EmbedOptions {
            pooling: self.pooling,
            normalize: true,
            windows: None,
        };
        let embed = |encs: Vec<Encoded>| {
            let ranges = (0..encs.len()).map(|i| i..i + 1).collect();
            berth_tasks::embed_encoded(&p, &berth_tasks::EncodedTexts { encs, ranges }, &opts)
        };
        let a = embed(dev.iter().map(|e| e.anchor.clone()).collect())?;
        let c = embed(cands.iter().map(|&e| e.clone()).collect())?;
        let (mut mrr, mut ndcg, mut top1) = (0.0, 0.0, 0.0);
        for (q, &pos) in a.iter().zip(&positive_of) {
            let scores: Vec<f64> = c.iter().map(|v| berth_tasks::cosine(q, v) as f64).collect();
            let mut rel = vec![0.0; c.len()];
            rel[pos] = 1.0;
            let rr = metrics::reciprocal_rank(&scores, &rel, 10);
            mrr += rr;
            top1 += (rr == 1.0) as u8 as f64;
            ndcg += metrics::ndcg(&scores, &rel, 10);
        }
        let n = dev.len() as f64;
        out.insert("loss".into(), (loss_sum / loss_n.max(1) as f64).into());
        out.insert("mrr@10".into(), (mrr / n).into());
        out.insert("ndcg@10".into(), (ndcg / n).into());
        out.insert("accuracy@1".into(), (top1 / n).into());
        Ok(out)
    }

    fn main_metric(&self) -> &'static str {
        "mrr@10"
    }

    /// A rank's share of the in-batch-negatives loss. Every rank embeds its share — one
    /// forward pass each for its anchors, positives and hard negatives, with the dropout
    /// masks of those rows in the one-process batch (anchors, then positives, then
    /// negatives, packed) — and gathers every rank's embeddings; each then scores all the
    /// batch's anchors against all its candidates and takes the whole batch's mean, its own
    /// embeddings the only ones with a gradient. Summed over the ranks, the gradients are
    /// the one-process batch's.
    fn loss_at(
        &self,
        nets: &Networks,
        batch: &[usize],
        _before: &[usize],
        _seed: u64,
        dropout: Option<&Dropout>,
        collective: &dyn crate::dist::Collective,
    ) -> Result<BatchLoss> {
        let examples: Vec<&EmbedExample> = batch.iter().map(|&i| &self.train[i]).collect();
        let anchors: Vec<&Encoded> = examples.iter().map(|e| &e.anchor).collect();
        let positives: Vec<&Encoded> = examples.iter().map(|e| &e.positive).collect();
        let negatives: Vec<&Encoded> = examples
            .iter()
            .filter_map(|e| e.negative.as_ref())
            .collect();
        let tokens = |v: &[&Encoded]| v.iter().map(|e| e.len() as u64).sum::<u64>();
        // Every rank's [anchors, negatives, anchor, positive and negative tokens].
        let mine = [
            anchors.len() as u64,
            negatives.len() as u64,
            tokens(&anchors),
            tokens(&positives),
            tokens(&negatives),
        ];
        let bytes: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
        let counts: Vec<[u64; 5]> = collective
            .gather_all(&bytes)?
            .iter()
            .map(|b| {
                std::array::from_fn(|k| {
                    u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().expect("8 bytes"))
                })
            })
            .collect();
        let rank = collective.rank();
        let sum = |qs: &[[u64; 5]], k: usize| qs.iter().map(|c| c[k]).sum::<u64>();
        let (all, before) = (&counts[..], &counts[..rank]);
        let b = sum(all, 0);
        let (ta, tp) = (sum(all, 2), sum(all, 3));
        // One forward pass per contiguous run of the one-process batch's rows.
        let mut passes = 0;
        let mut embed = |seqs: &[&Encoded], token_offset: u64, sequence_offset: u64| {
            if seqs.is_empty() {
                return Ok(None);
            }
            passes += 1;
            let packed = pack(seqs.iter().copied())?;
            let d = dropout.map(|d| d.moved(token_offset, sequence_offset));
            let hidden = nets.main.forward_train(&packed, d.as_ref())?;
            Ok::<_, TrainError>(Some(l2_normalize(&pool_train(
                &hidden,
                &packed,
                self.pooling,
            )?)?))
        };
        let own = [
            embed(&anchors, sum(before, 2), sum(before, 0))?,
            embed(&positives, ta + sum(before, 3), b + sum(before, 0))?,
            embed(&negatives, ta + tp + sum(before, 4), 2 * b + sum(before, 1))?,
        ];
        // Every rank's embeddings, as values; this rank's stay the tensors of its graph.
        let mut values = Vec::new();
        for t in own.iter().flatten() {
            values.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let gathered = collective.gather_all(&bytes)?;
        let h = nets.main.config.hidden_size;
        let mut parts: [Vec<Tensor>; 3] = Default::default();
        for (q, (bytes, c)) in gathered.iter().zip(&counts).enumerate() {
            if q == rank {
                for (part, t) in parts.iter_mut().zip(&own) {
                    part.extend(t.clone());
                }
                continue;
            }
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().expect("4 bytes")))
                .collect();
            let rows = [c[0] as usize, c[0] as usize, c[1] as usize];
            if v.len() != h * rows.iter().sum::<usize>() {
                return Err(TrainError::Config(format!(
                    "rank {q} sent {} embedding values, not {} × {h}: ranks disagree",
                    v.len(),
                    rows.iter().sum::<usize>()
                )));
            }
            let mut at = 0;
            for (part, r) in parts.iter_mut().zip(rows) {
                if r > 0 {
                    part.push(Tensor::from_slice(
                        &v[at..at + r * h],
                        (r, h),
                        &Device::Cpu,
                    )?);
                }
                at += r * h;
            }
        }
        let [a, p, n] = parts;
        let mut loss = None;
        if !examples.is_empty() {
            let anchors = Tensor::cat(&a, 0)?;
            let candidates = Tensor::cat(&[p, n].concat(), 0)?;
            let scores = (anchors.matmul(&candidates.t()?)? * self.cfg.similarity_scale)?;
            let labels: Vec<Option<u32>> = (0..b as u32).map(Some).collect();
            loss = loss::cross_entropy(&scores, &labels)?;
        }
        Ok(BatchLoss {
            loss,
            tokens: batch_tokens(&examples),
            units: examples.len() as f64,
            whole_batch: true,
            passes,
            ..Default::default()
        })
    }

    fn gathers(&self) -> bool {
        true
    }

    /// sentence-transformers' module files (modules.json, pooling, normalize) beside the
    /// bare encoder, so `SentenceTransformer(dir)` and `berth embed` load the checkpoint.
    fn write_extras(&self, nets: &Networks, dir: &Path) -> Result<()> {
        crate::checkpoint::write_sentence_files(
            dir,
            &self.base,
            self.pooling,
            nets.main.config.hidden_size,
            self.data.max_length,
        )
    }
}
