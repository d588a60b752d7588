//! `berth finetune`: fine-tune a checkpoint for classification (single-label, multi-label,
//! regression), NER, extractive QA, sentence embeddings or cross-encoder reranking.
use std::path::PathBuf;

use anyhow::Context;
use berth_train::config::RunConfig;
use berth_train::objectives::TaskConfig;
use berth_train::train_loop::{self, Event, Plan};
use clap::{Args, ValueEnum};

use crate::resolve;
use crate::train_args::{
    data_config, ColumnArgs, DistillArgs, FinetuneTask, LogFormat, LoopArgs, LoopDefaults,
    TaskExtras,
};
use berth_train::objectives::TaskKind;

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    /// Sequence classification (texts or pairs); multi-label with --multi-label,
    /// regression with --regression.
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

impl From<TaskArg> for FinetuneTask {
    fn from(t: TaskArg) -> Self {
        match t {
            TaskArg::Classify => FinetuneTask::Classify,
            TaskArg::Ner => FinetuneTask::Ner,
            TaskArg::Qa => FinetuneTask::Qa,
            TaskArg::Embed => FinetuneTask::Embed,
            TaskArg::Rerank => FinetuneTask::Rerank,
        }
    }
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
    /// Training data: CSV / TSV with a header or JSON Lines (classify, embed, rerank),
    /// CoNLL (ner), SQuAD JSON (qa).
    #[arg(long)]
    train: PathBuf,
    /// Dev data; without it a seeded --dev-fraction of the training data is held out.
    #[arg(long)]
    dev: Option<PathBuf>,
    /// Held-out fraction when there is no --dev.
    #[arg(long, default_value_t = 0.1, conflicts_with = "dev")]
    dev_fraction: f64,
    /// Run directory (config.json, metrics.jsonl, curve.png, checkpoints/).
    #[arg(long)]
    output: PathBuf,
    /// Token limit per example (default 128; qa: 384, the window size); longer texts are cut.
    #[arg(long)]
    max_length: Option<usize>,
    /// qa: tokens shared by consecutive windows of a long context.
    #[arg(long, default_value_t = 128)]
    doc_stride: usize,
    /// qa: longest answer the dev evaluation considers, in tokens (`berth qa`'s default).
    #[arg(long, default_value_t = 15)]
    max_answer_len: usize,
    /// embed: cosine similarities are multiplied by this before the softmax.
    #[arg(long, default_value_t = 20.0)]
    similarity_scale: f64,
    /// ner: label every sub-token of a word, not only the first.
    #[arg(long)]
    label_all_tokens: bool,
    /// Skip malformed rows (they are counted and reported) instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Stop after N evaluations without a better dev score.
    #[arg(long)]
    early_stopping: Option<usize>,
    #[command(flatten)]
    columns: ColumnArgs,
    #[command(flatten)]
    train_loop: LoopArgs,
    #[command(flatten)]
    distill: DistillArgs,
}

fn print_plan(p: &Plan) {
    // Tasks without labels (QA, embeddings, reranking, pretraining) print no label count.
    let labels = match p.labels.len() {
        0 => String::new(),
        n if n <= 12 => format!("; {n} labels ({})", p.labels.join(", ")),
        n => format!("; {n} labels"),
    };
    eprintln!(
        "train {} examples, dev {}{}{labels}",
        p.train_examples,
        p.dev_examples,
        if p.skipped_rows > 0 {
            format!(" ({} malformed rows skipped)", p.skipped_rows)
        } else {
            String::new()
        },
    );
    eprintln!(
        "{} parameters; {} tokens per epoch; {} batches/epoch, {} steps/epoch, {} steps ({} warmup), effective batch {}",
        p.parameters, p.tokens_per_epoch, p.batches_per_epoch, p.steps_per_epoch, p.total_steps, p.warmup_steps, p.effective_batch
    );
    if p.resumed_at > 0 {
        eprintln!("resuming at step {}", p.resumed_at);
    }
    for c in &p.resume_changes {
        eprintln!("warning: resumed with a changed setting: {c}");
    }
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let base = resolve::model_dir(a.model.as_deref())?;
    // Under mpirun every rank runs this; rank 0 alone owns (locks, clears) the run folder.
    let world = berth_train::dist::world()?;
    let _lock = a
        .train_loop
        .claim_output_of(world.as_ref(), &a.output, &LoopDefaults::FINETUNE)?;
    // Rank 0 alone writes a --student-layers student; the others read it after the barrier.
    let model = if world.is_writer() {
        a.distill.student(base, &a.output, a.train_loop.resume)?
    } else {
        a.distill.student_dir(base, &a.output)
    };
    if world.world_size() > 1 && a.distill.student_layers.is_some() {
        world.broadcast(&mut Vec::new())?;
    }
    let task: FinetuneTask = a.task.into();
    let extras = TaskExtras {
        doc_stride: a.doc_stride,
        max_answer_len: a.max_answer_len,
        similarity_scale: a.similarity_scale,
        label_all_tokens: a.label_all_tokens,
    };
    let mut kind = a.columns.task(task, &extras)?;
    if let Some(d) = a.distill.config()? {
        match &mut kind {
            TaskKind::Classify(c) => c.distill = Some(d),
            TaskKind::Ner(c) => c.distill = Some(d),
            _ => anyhow::bail!("--teacher applies to --task classify and --task ner"),
        }
    }
    let mut data = data_config(a.train, &model, a.max_length, task == FinetuneTask::Qa)?;
    data.dev = a.dev;
    data.dev_fraction = a.dev_fraction;
    data.skip_bad_rows = a.skip_bad_rows;
    let mut run = a
        .train_loop
        .config(model, a.output, &LoopDefaults::FINETUNE);
    if a.early_stopping == Some(0) {
        anyhow::bail!("--early-stopping must be at least 1 (evaluations without a better score)");
    }
    run.early_stopping_patience = a.early_stopping;
    let cfg = RunConfig {
        run,
        task: TaskConfig { data, kind },
    };
    let result = execute(&cfg, &a.train_loop, "finetune", world.as_ref());
    end_ranks_on_error(result, world.as_ref())
}

/// A rank that fails ends the whole MPI job (its error printed first): the other ranks may
/// be waiting for it in a collective and would never finish. One process: the error as is.
pub fn end_ranks_on_error(
    result: anyhow::Result<()>,
    world: &dyn berth_train::dist::Collective,
) -> anyhow::Result<()> {
    if let Err(e) = &result {
        if world.world_size() > 1 {
            eprintln!(
                "error (rank {} of {}): {e:#}",
                world.rank(),
                world.world_size()
            );
            world.abort(1);
        }
    }
    result
}

/// Runs (or resumes) a training run with a progress bar, then writes curve.png; prints the
/// best checkpoint's path on stdout.
pub fn execute(
    cfg: &RunConfig,
    flags: &LoopArgs,
    command: &'static str,
    world: &dyn berth_train::dist::Collective,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // A bar only on a terminal (it is drawn over itself); plain or JSON lines otherwise, so
    // a redirected log keeps every step and evaluation.
    let lines = match flags.log_format {
        LogFormat::Json => Some(LogFormat::Json),
        LogFormat::Text if !std::io::stderr().is_terminal() => Some(LogFormat::Text),
        LogFormat::Text => None,
    };
    let target = if lines.is_some() || !world.is_writer() {
        indicatif::ProgressDrawTarget::hidden()
    } else {
        indicatif::ProgressDrawTarget::stderr()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
            .expect("valid progress template; this is a bug"),
    );
    let mut objective = berth_train::objectives::build(&cfg.task);
    let metric = objective.main_metric();
    let best = train_loop::train(
        cfg,
        objective.as_mut(),
        world,
        flags.resume,
        &mut |p| {
            print_plan(p);
            bar.set_length(p.total_steps);
            bar.set_position(p.resumed_at);
        },
        &mut |e| match e {
            Event::Step {
                step,
                total,
                epoch,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
            } => {
                let shown = format!("loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s");
                match lines {
                    Some(LogFormat::Json) => {
                        eprintln!("{}", serde_json::to_string(e).unwrap_or_default())
                    }
                    Some(LogFormat::Text) => eprintln!(
                        "step {step}/{total} (epoch {epoch:.2}) {shown} grad_norm {grad_norm:.3}"
                    ),
                    None => {
                        bar.set_position(*step);
                        bar.set_message(shown);
                    }
                }
            }
            Event::Eval { step, epoch, eval } => {
                let shown: Vec<String> = eval
                    .iter()
                    .map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect();
                let line = format!("step {step} (epoch {epoch:.2}) dev: {}", shown.join(", "));
                match lines {
                    Some(LogFormat::Json) => {
                        eprintln!("{}", serde_json::to_string(e).unwrap_or_default())
                    }
                    Some(LogFormat::Text) => eprintln!("{line}"),
                    None => bar.println(line),
                }
            }
        },
    )
    .context(command)?;
    bar.finish_and_clear();
    if !world.is_writer() {
        return Ok(());
    }
    // The whole run's history (a resumed run's too), from metrics.jsonl.
    let title = format!("berth {command}: {}", cfg.run.output.display());
    let png = berth_train::plot::write_run_curve(&cfg.run.output, metric, &title)?;
    eprintln!("best checkpoint (dev {metric}): {}", best.display());
    eprintln!("curve: {}", png.display());
    println!("{}", best.display());
    Ok(())
}
