//! Extractive question answering from SQuAD JSON. Contexts run in windows of `max_length`
//! tokens sharing `doc_stride`, each labelled as transformers' run_qa labels it (the
//! answer's tokens, or [CLS] when the window lacks it); the loss is the mean of the start
//! and end cross-entropies over each window's tokens. Dev: the QA pipeline answers every
//! question, scored by the SQuAD metric (exact match, F1).
use std::path::Path;

use berth_model::{Dropout, HeadKind, Model};
use berth_tasks::metrics;
use berth_text::{Encoded, TextTokenizer};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::common::{pack, split};
use crate::data::{self, SquadQuestion};
use crate::error::Result;
use crate::init::{load_for_task, TaskHead};
use crate::loss;
use crate::objective::DataConfig;
use crate::objective::{
    batch_tokens, BatchLoss, DataSummary, Env, Example, Metrics, Networks, Objective, TrainSet,
};

/// Settings of a QA run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QaConfig {
    /// Tokens shared by consecutive windows of a long context.
    pub doc_stride: usize,
    /// Longest answer the dev evaluation considers, in tokens: `berth qa`'s (and
    /// transformers' question-answering pipeline's) default, so `finetune`, `eval --model`
    /// and `berth qa` answer alike.
    #[serde(default = "default_max_answer_len")]
    pub max_answer_len: usize,
}

fn default_max_answer_len() -> usize {
    berth_tasks::QaOptions::default().max_answer_len
}

impl Default for QaConfig {
    fn default() -> Self {
        QaConfig {
            doc_stride: 128,
            max_answer_len: default_max_answer_len(),
        }
    }
}

/// One window of a question and its context with the answer's token span.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QaExample {
    /// Tokens (question, then a window of the context).
    pub enc: Encoded,
    /// Answer start and end token ((0, 0) = [CLS]: no answer in this window).
    pub span: (u32, u32),
}

impl Example for QaExample {
    fn tokens(&self) -> usize {
        self.enc.len()
    }

    fn ids(&self) -> &[u32] {
        &self.enc.ids
    }
}

/// The QA objective.
pub struct Qa {
    data: DataConfig,
    cfg: QaConfig,
    tokenizer: Option<TextTokenizer>,
    train: Vec<QaExample>,
    dev: Vec<SquadQuestion>,
}

impl Qa {
    /// An objective for `cfg` on `data`.
    pub fn new(data: DataConfig, cfg: QaConfig) -> Self {
        Qa {
            data,
            cfg,
            tokenizer: None,
            train: Vec::new(),
            dev: Vec::new(),
        }
    }
}

/// Answer token span of one window, as transformers' run_qa labels it: the tokens covering the
/// first answer's characters when the window holds all of it, else [CLS] (0, 0).
fn answer_span(w: &Encoded, answer: Option<&(String, usize)>) -> (u32, u32) {
    let Some((text, start)) = answer else {
        return (0, 0);
    };
    let (start, end) = (*start, *start + text.chars().count());
    let ctx: Vec<usize> = (0..w.len())
        .filter(|&t| w.sequence_ids[t] == Some(1))
        .collect();
    let (Some(&first), Some(&last)) = (ctx.first(), ctx.last()) else {
        return (0, 0);
    };
    if !(w.offsets[first].0 <= start && w.offsets[last].1 >= end) {
        return (0, 0);
    }
    let mut s = first;
    while s <= last && w.offsets[s].0 <= start {
        s += 1;
    }
    let mut e = last;
    while e >= first && w.offsets[e].1 >= end {
        e -= 1;
    }
    ((s - 1) as u32, (e + 1) as u32)
}

/// The loss of QA windows from their last hidden states: (start loss + end loss) / 2, each
/// a softmax over its window's tokens, averaged over the windows.
pub fn loss_from_hidden(
    model: &Model,
    examples: &[&QaExample],
    batch: &berth_model::Batch,
    hidden: &Tensor,
    d: Option<&Dropout>,
) -> Result<Option<Tensor>> {
    let (start, end) = model.qa_logits_train(hidden, d)?;
    let mut total: Option<Tensor> = None;
    for (k, e) in examples.iter().enumerate() {
        let r = batch.range(k);
        let one = |logits: &Tensor, target: u32| -> Result<Tensor> {
            let row = logits.narrow(0, r.start, r.len())?.unsqueeze(0)?;
            Ok(loss::cross_entropy(&row, &[Some(target)])?.expect("one labelled row"))
        };
        let l = ((one(&start, e.span.0)? + one(&end, e.span.1)?)? * 0.5)?;
        total = Some(match total {
            None => l,
            Some(acc) => (acc + l)?,
        });
    }
    Ok(total.map(|t| t / examples.len() as f64).transpose()?)
}

/// The training loss of a batch of windows.
pub fn loss(model: &Model, examples: &[&QaExample], d: Option<&Dropout>) -> Result<Option<Tensor>> {
    let batch = pack(examples.iter().map(|e| &e.enc))?;
    let hidden = model.forward_train(&batch, d)?;
    loss_from_hidden(model, examples, &batch, &hidden, d)
}

impl Objective for Qa {
    fn prepare(&mut self, env: &Env) -> Result<DataSummary> {
        let skip = self.data.skip_bad_rows;
        let s = split(&self.data, env.seed, |p| data::read_squad(p, skip))?;
        let (max_length, stride) = (self.data.max_length, self.cfg.doc_stride);
        let tok = env.tokenizer()?;
        let windows: Vec<Vec<QaExample>> = env.encode_shared(&s.train, |rows, first| {
            rows.par_iter()
                .enumerate()
                .map(|(i, q)| {
                    let ws = tok.encode_windows(
                        &q.question,
                        Some(&q.context),
                        max_length,
                        stride,
                        first + i,
                    )?;
                    Ok(ws
                        .into_iter()
                        .map(|enc| QaExample {
                            span: answer_span(&enc, q.answers.first()),
                            enc,
                        })
                        .collect())
                })
                .collect::<Result<_>>()
        })?;
        self.train = windows.into_iter().flatten().collect();
        self.dev = s.dev;
        self.tokenizer = Some(env.tokenizer()?.clone());
        Ok(DataSummary {
            labels: Vec::new(),
            dev_examples: self.dev.len(),
            skipped: s.skipped,
        })
    }

    fn build(&mut self, from: &Path, env: &Env) -> Result<Networks> {
        let head = TaskHead {
            kind: HeadKind::QuestionAnswering,
            labels: Vec::new(),
            problem_type: None,
            sentence_order: false,
        };
        let (model, config) = load_for_task(from, &head, env.seed)?;
        Ok(Networks::single(model, config))
    }

    fn load_trained(&mut self, dir: &Path, _env: &Env) -> Result<Networks> {
        super::common::trained_networks(dir, Some(HeadKind::QuestionAnswering))
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
        let examples: Vec<&QaExample> = batch.iter().map(|&i| &self.train[i]).collect();
        Ok(BatchLoss {
            loss: loss(&nets.main, &examples, dropout)?,
            tokens: batch_tokens(&examples),
            units: examples.len() as f64,
            second: None,
            ..Default::default()
        })
    }

    /// The QA pipeline answers each dev question (windows, spans up to `max_answer_len`
    /// tokens); EM / F1 as the SQuAD script scores them.
    fn evaluate(&self, nets: &Networks) -> Result<Metrics> {
        let tokenizer = self
            .tokenizer
            .clone()
            .expect("prepare runs before evaluate; this is a bug");
        let p =
            berth_tasks::Pipeline::from_model(nets.main.clone(), tokenizer, self.data.max_length);
        let opts = berth_tasks::QaOptions {
            max_seq_len: Some(self.data.max_length),
            doc_stride: Some(self.cfg.doc_stride),
            max_answer_len: self.cfg.max_answer_len,
            ..berth_tasks::QaOptions::default()
        };
        let (mut em, mut f1) = (0.0, 0.0);
        for chunk in self.dev.chunks(256) {
            let inputs: Vec<berth_tasks::QaInput> = chunk
                .iter()
                .map(|q| berth_tasks::QaInput {
                    question: q.question.clone(),
                    context: q.context.clone(),
                })
                .collect();
            for (q, a) in chunk
                .iter()
                .zip(berth_tasks::answer(&p, &inputs, &opts, 0)?)
            {
                let golds: Vec<String> = q.answers.iter().map(|(t, _)| t.clone()).collect();
                let (e, f) =
                    metrics::squad::score(&golds, a.first().map_or("", |a| a.answer.as_str()));
                em += e;
                f1 += f;
            }
        }
        let n = self.dev.len().max(1) as f64;
        let mut out = Metrics::new();
        // Fractions, as every berth metric (the SQuAD script prints percentages).
        out.insert("exact_match".into(), (em / n).into());
        out.insert("f1".into(), (f1 / n).into());
        Ok(out)
    }

    fn main_metric(&self) -> &'static str {
        "f1"
    }
}
