//! `berth finetune`: fine-tune a checkpoint for classification, NER, QA, sentence
//! embeddings or reranking.
use std::path::PathBuf;

use anyhow::Context;
use berth_train::schedule::ScheduleKind;
use berth_train::trainer::{self, Event, Plan, Task, TrainConfig};
use clap::{Args, ValueEnum};

use crate::resolve;

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    /// Sequence classification (texts or pairs); regression with --regression.
    Classify,
    /// Token classification from CoNLL files.
    Ner,
    /// Extractive question answering from SQuAD JSON.
    Qa,
    /// Sentence embeddings: (anchor, positive[, negative]) rows, in-batch negatives (MNRL).
    Embed,
    /// Cross-encoder reranker: (query, passage, relevance) rows, BCE on one logit.
    Rerank,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

/// Arguments of `berth finetune`.
#[derive(Args)]
pub struct FinetuneArgs {
    /// What to fine-tune for.
    #[arg(long, value_enum)]
    task: TaskArg,
    /// Starting checkpoint (directory, cached name; default all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// Training data: CSV / TSV with a header, JSON Lines (classify), CoNLL (ner), SQuAD JSON (qa).
    #[arg(long)]
    train: PathBuf,
    /// Dev data; without it a seeded --dev-fraction of the training data is held out.
    #[arg(long)]
    dev: Option<PathBuf>,
    /// Held-out fraction when there is no --dev.
    #[arg(long, default_value_t = 0.1)]
    dev_fraction: f64,
    /// Run directory (config.json, metrics.jsonl, curve.png, checkpoints/).
    #[arg(long)]
    output: PathBuf,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Train exactly N optimizer steps (overrides --epochs; the schedule spans them).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Token limit per example (default 128; qa: 384, the window size).
    #[arg(long)]
    max_length: Option<usize>,
    /// qa: tokens shared by consecutive windows of a long context.
    #[arg(long, default_value_t = 128)]
    doc_stride: usize,
    /// Warmup: a fraction of all steps (< 1) or a step count (>= 1).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Linear)]
    schedule: ScheduleArg,
    /// AdamW weight decay (not on biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// First text column (header name or 0-based index); default: sentence (classify),
    /// anchor (embed), query (rerank).
    #[arg(long)]
    text_column: Option<String>,
    /// Second text column: classify pairs; default positive (embed), passage (rerank).
    #[arg(long)]
    pair_column: Option<String>,
    /// classify / rerank: label column (rerank: relevance in [0, 1]).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// embed: a hard-negative column (scored against every anchor of the batch).
    #[arg(long)]
    negative_column: Option<String>,
    /// embed: cosine similarities are multiplied by this before the softmax.
    #[arg(long, default_value_t = 20.0)]
    similarity_scale: f64,
    /// classify: numeric labels, MSE loss.
    #[arg(long)]
    regression: bool,
    /// classify: several labels per row (split on --label-separator), BCE loss.
    #[arg(long)]
    multi_label: bool,
    /// classify --multi-label: what separates a row's labels.
    #[arg(long, default_value = ",")]
    label_separator: String,
    /// ner: 0-based tag column (default: the last).
    #[arg(long)]
    tag_column: Option<usize>,
    /// ner: label every sub-token of a word, not only the first.
    #[arg(long)]
    label_all_tokens: bool,
    /// Skip malformed rows (they are counted and reported) instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Evaluate and checkpoint every N steps (default: each epoch).
    #[arg(long)]
    save_every: Option<u64>,
    /// Newest checkpoints kept besides the best.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Stop after N evaluations without a better dev score.
    #[arg(long)]
    early_stopping: Option<usize>,
    /// Log the loss every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
    /// Train without dropout (for comparisons with eval-mode references).
    #[arg(long)]
    no_dropout: bool,
}

fn print_plan(p: &Plan) {
    eprintln!(
        "train {} examples, dev {}{}; {} labels{}",
        p.train_examples,
        p.dev_examples,
        if p.skipped_rows > 0 {
            format!(" ({} malformed rows skipped)", p.skipped_rows)
        } else {
            String::new()
        },
        p.labels.len(),
        if p.labels.len() <= 12 && !p.labels.is_empty() {
            format!(" ({})", p.labels.join(", "))
        } else {
            String::new()
        }
    );
    eprintln!(
        "{} parameters; {} tokens per epoch; {} batches/epoch, {} steps/epoch, {} steps ({} warmup), effective batch {}",
        p.parameters, p.tokens_per_epoch, p.batches_per_epoch, p.steps_per_epoch, p.total_steps, p.warmup_steps, p.effective_batch
    );
    if p.resumed_at > 0 {
        eprintln!("resuming at step {}", p.resumed_at);
    }
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let model = resolve::model_dir(a.model.as_deref())?;
    let task = match a.task {
        TaskArg::Classify => Task::Classify,
        TaskArg::Ner => Task::Ner,
        TaskArg::Qa => Task::Qa,
        TaskArg::Embed => Task::Embed,
        TaskArg::Rerank => Task::Rerank,
    };
    if a.multi_label && (task != Task::Classify || a.regression) {
        anyhow::bail!("--multi-label applies to --task classify without --regression");
    }
    let mut cfg = TrainConfig::new(task, model, a.train, a.output.clone());
    cfg.dev = a.dev;
    cfg.dev_fraction = a.dev_fraction;
    cfg.epochs = a.epochs;
    cfg.max_steps = a.max_steps;
    cfg.lr = a.lr;
    cfg.batch_size = a.batch_size;
    cfg.grad_accum = a.grad_accum;
    cfg.max_length = match a.max_length {
        Some(m) => m,
        // The default (128; QA 384) shrinks to fit a model with fewer positions.
        None => crate::finetune::default_max_length(&cfg.model, task == Task::Qa)?,
    };
    cfg.doc_stride = a.doc_stride;
    if a.warmup >= 1.0 {
        cfg.warmup_steps = Some(a.warmup as u64);
    } else {
        cfg.warmup_ratio = a.warmup;
    }
    cfg.schedule = match a.schedule {
        ScheduleArg::Linear => ScheduleKind::Linear,
        ScheduleArg::Cosine => ScheduleKind::Cosine,
        ScheduleArg::Constant => ScheduleKind::Constant,
    };
    cfg.adamw.weight_decay = a.weight_decay;
    cfg.max_grad_norm = (a.max_grad_norm > 0.0).then_some(a.max_grad_norm);
    cfg.seed = a.seed;
    cfg.text_column = a.text_column.unwrap_or_else(|| {
        match task {
            Task::Embed => "anchor",
            Task::Rerank => "query",
            _ => "sentence",
        }
        .into()
    });
    cfg.pair_column = a.pair_column;
    cfg.label_column = a.label_column;
    cfg.negative_column = a.negative_column;
    cfg.similarity_scale = a.similarity_scale;
    cfg.regression = a.regression;
    cfg.multi_label = a.multi_label;
    cfg.label_separator = a.label_separator;
    cfg.tag_column = a.tag_column;
    cfg.label_all_tokens = a.label_all_tokens;
    cfg.skip_bad_rows = a.skip_bad_rows;
    cfg.save_every = a.save_every;
    cfg.keep_checkpoints = a.keep_checkpoints;
    cfg.early_stopping_patience = a.early_stopping;
    cfg.log_every = a.log_every.max(1);
    cfg.dropout = !a.no_dropout;
    execute(&cfg, a.resume)
}

/// 128 tokens (QA: 384), or the model's position limit when it is smaller.
pub fn default_max_length(model: &std::path::Path, qa: bool) -> anyhow::Result<usize> {
    let cfg = berth_model::EncoderConfig::from_file(&model.join("config.json"))?;
    Ok((if qa { 384 } else { 128 }).min(cfg.max_sequence_length()))
}

/// Runs (or resumes) a training run with a progress bar, then writes curve.png; prints the
/// best checkpoint's path on stdout.
pub fn execute(cfg: &TrainConfig, resume: bool) -> anyhow::Result<()> {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
            .expect("valid progress template; this is a bug"),
    );
    let (mut losses, mut evals): (Vec<(f64, f64)>, Vec<(f64, f64)>) = (Vec::new(), Vec::new());
    let metric = trainer::main_metric(cfg);
    let best = trainer::train(
        cfg,
        resume,
        &mut |p| {
            print_plan(p);
            bar.set_length(p.total_steps);
            bar.set_position(p.resumed_at);
        },
        &mut |e| match e {
            Event::Step {
                step,
                loss,
                lr,
                tokens_per_s,
                ..
            } => {
                bar.set_position(*step);
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
                ));
                losses.push((*step as f64, *loss));
            }
            Event::Eval { step, epoch, eval } => {
                let shown: Vec<String> = eval
                    .iter()
                    .map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect();
                bar.println(format!(
                    "step {step} (epoch {epoch:.2}) dev: {}",
                    shown.join(", ")
                ));
                evals.push((
                    *step as f64,
                    eval.get(metric)
                        .and_then(|v| v.as_f64())
                        .unwrap_or(f64::NAN),
                ));
            }
        },
    )
    .context("finetune")?;
    bar.finish_and_clear();
    // Blue: training loss; orange: the dev metric (each on its own scale).
    let png = cfg.output.join("curve.png");
    berth_train::plot::write_curves(&png, &[(&losses, [31, 119, 180]), (&evals, [255, 127, 14])])?;
    eprintln!("best checkpoint (dev {metric}): {}", best.display());
    eprintln!(
        "curve: {} (blue: training loss, orange: dev {metric})",
        png.display()
    );
    println!("{}", best.display());
    Ok(())
}
