//! `berth classify`, `ner`, `qa`, `rerank`, `similarity`: the task pipelines, JSON Lines out.
use std::io::Write;

use anyhow::{bail, Context};
use berth_tasks::{
    Aggregation, ClassFunction, ClassifyOptions, EmbedOptions, NerOptions, Pipeline, QaInput,
    QaOptions,
};
use clap::Args;
use serde::Serialize;

use crate::embed::{report_load, warn_truncated};
use crate::{input, resolve};

/// Texts per chunk: bounds memory on large files while keeping batches full.
const CHUNK: usize = 1024;

use crate::output::stdout;

/// Runs `task` over `items` in chunks of [`CHUNK`] (its second argument: the chunk's first
/// index), warns about truncated inputs unless the task windows them, and prints one JSON line
/// per item, serialised by `line(index, result)` with the item's `meta` (id, kept columns)
/// added.
fn run_chunked<I, R>(
    source: &str,
    items: &[I],
    meta: &[serde_json::Map<String, serde_json::Value>],
    max_length: usize,
    windowed: bool,
    task: impl Fn(&[I], usize) -> anyhow::Result<(Vec<R>, Vec<berth_text::Encoded>)>,
    line: impl Fn(usize, &R) -> serde_json::Result<String>,
) -> anyhow::Result<()> {
    // Under mpirun each rank runs a contiguous share of the inputs; rank 0 gathers the
    // lines (in rank order: input order) and writes them.
    let world = berth_train::dist::world()?;
    let mine = world.shard_range(items.len());
    let result = (|| -> anyhow::Result<()> {
        let sharded = world.world_size() > 1;
        // One process streams to stdout; a rank collects its lines for the gather.
        let mut out = (!sharded).then(stdout);
        let mut lines = Vec::new();
        for (c, chunk) in items[mine.clone()].chunks(CHUNK).enumerate() {
            let first = mine.start + c * CHUNK;
            let (results, encs) = task(chunk, first).with_context(|| source.to_string())?;
            if !windowed {
                warn_truncated(&encs, first, max_length);
            }
            for (i, r) in results.iter().enumerate() {
                let text = input::with_meta(line(first + i, r)?, meta.get(first + i));
                match out.as_mut() {
                    Some(o) => writeln!(o, "{text}")?,
                    None => {
                        lines.extend_from_slice(text.as_bytes());
                        lines.push(b'\n');
                    }
                }
            }
        }
        if sharded {
            let parts = world.gather_all(&lines)?;
            if world.is_writer() {
                let mut so = stdout();
                for p in parts {
                    so.write_all(&p)?;
                }
                so.flush()?;
            }
            return Ok(());
        }
        if let Some(o) = out.as_mut() {
            o.flush()?;
        }
        Ok(())
    })();
    crate::finetune::end_ranks_on_error(result, world.as_ref())
}

fn load(model: &str, text: &input::TextArgs) -> anyhow::Result<Pipeline> {
    let dir = resolve::model_dir(Some(model))?;
    let (p, report) = Pipeline::load(&dir, &text.pipeline_options())?;
    report_load(&report);
    Ok(p)
}

/// Arguments of `berth classify`.
#[derive(Args)]
pub struct ClassifyArgs {
    /// Model directory with a sequence-classification head.
    #[arg(long)]
    model: String,
    /// Labels per text, best first; 0 = all labels.
    #[arg(long, default_value_t = 1)]
    top_k: usize,
    /// Score function; default from the model (regression → none, multi-label or one
    /// output → sigmoid, else softmax), as transformers.
    #[arg(long, value_enum)]
    function: Option<ClassFunction>,
    /// Sentence pairs: arguments are taken two at a time; --input lines hold TEXT<TAB>PAIR.
    #[arg(long)]
    pair: bool,
    #[command(flatten)]
    windows: input::WindowArgs,
    #[command(flatten)]
    text: input::TextArgs,
    /// Texts to classify.
    texts: Vec<String>,
}

#[derive(Serialize)]
struct LabelsLine<'a> {
    index: usize,
    labels: &'a [berth_tasks::LabelScore],
}

/// Pairs from `TEXT<TAB>PAIR` lines or consecutive arguments.
fn pairs(
    texts: Vec<String>,
    from_file: bool,
    source: &str,
) -> anyhow::Result<Vec<berth_tasks::TextPair>> {
    if from_file {
        return texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| match t.split_once('\t') {
                Some((_, b)) if b.contains('\t') => bail!(
                    "{source}:{}: --pair needs two texts separated by one tab, the line has {}",
                    i + 1,
                    t.matches('\t').count()
                ),
                Some((a, b)) => Ok((a.to_string(), Some(b.to_string()))),
                None => bail!(
                    "{source}:{}: --pair needs two texts separated by a tab",
                    i + 1
                ),
            })
            .collect();
    }
    if !texts.len().is_multiple_of(2) {
        bail!(
            "--pair needs texts two at a time (got {} arguments)",
            texts.len()
        );
    }
    Ok(texts
        .chunks(2)
        .map(|c| (c[0].clone(), Some(c[1].clone())))
        .collect())
}

pub fn classify(a: ClassifyArgs) -> anyhow::Result<()> {
    let p = load(&a.model, &a.text)?;
    berth_tasks::require_head(&p.model, berth_model::HeadKind::SequenceClassification)?;
    let rows = a.text.inputs(&a.texts)?;
    if rows.pairs.is_some() && !a.pair {
        anyhow::bail!("--pair-column needs --pair");
    }
    let inputs: Vec<berth_tasks::TextPair> = match (a.pair, rows.pairs) {
        (true, Some(second)) => rows
            .texts
            .into_iter()
            .zip(second.into_iter().map(Some))
            .collect(),
        (true, None) => pairs(rows.texts, rows.from_file, a.text.source())?,
        (false, _) => rows.texts.into_iter().map(|t| (t, None)).collect(),
    };
    let opts = ClassifyOptions {
        top_k: (a.top_k > 0).then_some(a.top_k),
        function: a.function,
        windows: a.windows.windows(),
    };
    run_chunked(
        a.text.source(),
        &inputs,
        &rows.meta,
        p.max_length,
        opts.windows.is_some(),
        |chunk, first| Ok(berth_tasks::classify(&p, chunk, &opts, first)?),
        |index, labels| serde_json::to_string(&LabelsLine { index, labels }),
    )
}

/// Arguments of `berth ner`.
#[derive(Args)]
pub struct NerArgs {
    /// Model directory with a token-classification head.
    #[arg(long)]
    model: String,
    /// How tokens become entities (transformers' aggregation_strategy): `none` lists every
    /// token; the others group B-/I- runs, `first`/`average`/`max` after agreeing per word.
    #[arg(long, value_enum, default_value_t = Aggregation::Simple)]
    aggregation: Aggregation,
    /// Labels (or entity groups) left out; `--ignore-labels ''` keeps everything.
    #[arg(long, value_delimiter = ',', default_value = "O")]
    ignore_labels: Vec<String>,
    /// Long texts: windows of --max-length tokens sharing N tokens; entities found twice in
    /// the overlap are resolved as transformers does.
    #[arg(long, value_name = "N")]
    stride: Option<usize>,
    /// Read S- (single-token) and E- (end) tags as BIOES: transformers knows only B-/I- and
    /// merges runs of S- tags, so this is off by default for parity with it.
    #[arg(long)]
    bioes: bool,
    #[command(flatten)]
    text: input::TextArgs,
    /// Texts to tag.
    texts: Vec<String>,
}

#[derive(Serialize)]
struct EntitiesLine<'a> {
    index: usize,
    entities: &'a [berth_tasks::Entity],
}

pub fn ner(a: NerArgs) -> anyhow::Result<()> {
    let p = load(&a.model, &a.text)?;
    berth_tasks::require_head(&p.model, berth_model::HeadKind::TokenClassification)?;
    let rows = a.text.inputs(&a.texts)?;
    if rows.pairs.is_some() {
        anyhow::bail!("--pair-column applies to classify --pair");
    }
    let opts = NerOptions {
        aggregation: a.aggregation,
        ignore_labels: a
            .ignore_labels
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect(),
        stride: a.stride,
        bioes: a.bioes,
    };
    run_chunked(
        a.text.source(),
        &rows.texts,
        &rows.meta,
        p.max_length,
        opts.stride.is_some(),
        |chunk, first| Ok(berth_tasks::token_classify(&p, chunk, &opts, first)?),
        |index, entities| serde_json::to_string(&EntitiesLine { index, entities }),
    )
}

/// Arguments of `berth qa`.
#[derive(Args)]
pub struct QaArgs {
    /// Model directory with a question-answering head.
    #[arg(long)]
    model: String,
    /// The question (with --context).
    #[arg(long)]
    question: Option<String>,
    /// The text that holds the answer (with --question).
    #[arg(long)]
    context: Option<String>,
    /// JSON Lines of {"question", "context"} (an "id" is copied to the output); `-` = stdin.
    #[arg(long)]
    input: Option<String>,
    /// Answers per question.
    #[arg(long, default_value_t = 1)]
    top_k: usize,
    /// Window size in tokens; default min(model limit, 384).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Tokens shared by consecutive windows of a long context; default min(window / 2, 128).
    #[arg(long)]
    doc_stride: Option<usize>,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 15)]
    max_answer_len: usize,
    /// Questions longer than this many tokens are cut.
    #[arg(long, default_value_t = 64)]
    max_question_len: usize,
    /// Also consider "no answer" (an empty answer scored by [CLS]).
    #[arg(long)]
    handle_impossible_answer: bool,
    /// Keep answers at token boundaries instead of widening them to whole words.
    #[arg(long)]
    no_align_to_words: bool,
    /// Tokens per packed batch.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
}

#[derive(Serialize)]
struct AnswersLine<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a serde_json::Value>,
    answers: &'a [berth_tasks::Answer],
}

pub fn qa(a: QaArgs) -> anyhow::Result<()> {
    let (inputs, ids): (Vec<QaInput>, Vec<Option<serde_json::Value>>) =
        match (&a.input, &a.question, &a.context) {
            (Some(path), None, None) => {
                let lines = input::read_lines(path)?;
                let mut inputs = Vec::with_capacity(lines.len());
                let mut ids = Vec::with_capacity(lines.len());
                for (i, line) in lines.iter().enumerate() {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .with_context(|| format!("{path}:{}: invalid JSON", i + 1))?;
                    let field = |k: &str| {
                        v[k].as_str()
                            .map(str::to_string)
                            .with_context(|| format!("{path}:{}: no \"{k}\" string", i + 1))
                    };
                    inputs.push(QaInput {
                        question: field("question")?,
                        context: field("context")?,
                    });
                    ids.push(v.get("id").cloned());
                }
                (inputs, ids)
            }
            (None, Some(q), Some(c)) => (
                vec![QaInput {
                    question: q.clone(),
                    context: c.clone(),
                }],
                vec![None],
            ),
            (None, Some(_), None) => {
                bail!("--question needs --context (the text that holds the answer)")
            }
            (None, None, Some(_)) => bail!("--context needs --question"),
            (Some(_), _, _) => bail!("give either --input or --question with --context, not both"),
            (None, None, None) => bail!("no input: give --question and --context, or --input FILE"),
        };
    let dir = resolve::model_dir(Some(&a.model))?;
    let opts = berth_tasks::PipelineOptions {
        batch_tokens: a.batch_tokens,
        ..Default::default()
    };
    let (p, report) = Pipeline::load(&dir, &opts)?;
    report_load(&report);
    let opts = QaOptions {
        top_k: a.top_k,
        max_seq_len: a.max_seq_len,
        doc_stride: a.doc_stride,
        max_answer_len: a.max_answer_len,
        max_question_len: a.max_question_len,
        handle_impossible_answer: a.handle_impossible_answer,
        align_to_words: !a.no_align_to_words,
    };
    let mut out = stdout();
    for (c, chunk) in inputs.chunks(CHUNK).enumerate() {
        let first = c * CHUNK;
        for (i, answers) in berth_tasks::answer(&p, chunk, &opts, first)?
            .iter()
            .enumerate()
        {
            let line = AnswersLine {
                index: first + i,
                id: ids[first + i].as_ref(),
                answers,
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Arguments of `berth rerank`.
#[derive(Args)]
pub struct RerankArgs {
    /// Cross-encoder model directory (sequence classification with one output).
    #[arg(long)]
    model: String,
    /// The query.
    #[arg(long)]
    query: String,
    /// Print only the best K passages; 0 = all.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[command(flatten)]
    text: input::TextArgs,
    /// Passages to rank.
    passages: Vec<String>,
}

#[derive(Serialize)]
struct RankedLine<'a> {
    rank: usize,
    index: usize,
    score: f32,
    text: &'a str,
}

pub fn rerank(a: RerankArgs) -> anyhow::Result<()> {
    let p = load(&a.model, &a.text)?;
    let (passages, _) = a.text.texts(&a.passages)?;
    let ranked = berth_tasks::rerank(&p, &a.query, &passages, false)
        .with_context(|| a.text.source().to_string())?;
    let mut out = stdout();
    let k = if a.top_k == 0 { ranked.len() } else { a.top_k };
    for (rank, r) in ranked.iter().take(k).enumerate() {
        let line = RankedLine {
            rank: rank + 1,
            index: r.corpus_id,
            score: r.score,
            text: &passages[r.corpus_id],
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    }
    out.flush()?;
    Ok(())
}

/// Arguments of `berth similarity`.
#[derive(Args)]
pub struct SimilarityArgs {
    /// Embedding model (default: all-MiniLM-L6-v2); pooling from its sentence-transformers
    /// config.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    windows: input::WindowArgs,
    #[command(flatten)]
    text: input::TextArgs,
    /// Score pairs instead (STS): `TEXT<TAB>PAIR` lines with --input, or arguments two at a
    /// time; one `{"index", "score"}` line (the pair's cosine) per pair.
    #[arg(long)]
    pair: bool,
    /// Texts to compare, every one with every other.
    texts: Vec<String>,
}

#[derive(Serialize)]
struct SimilarityLine<'a> {
    index: usize,
    similarities: &'a [f32],
}

pub fn similarity(a: SimilarityArgs) -> anyhow::Result<()> {
    let p = crate::embed::load_sentence_pipeline(a.model.as_deref(), &a.text)?;
    let (texts, from_file) = a.text.texts(&a.texts)?;
    // With --pair: both sides of every pair, embedded in one run (first sides, then second).
    let (texts, pair_count) = if a.pair {
        let pairs = pairs(texts, from_file, a.text.source())?;
        let n = pairs.len();
        let (first, second): (Vec<String>, Vec<String>) = pairs
            .into_iter()
            .map(|(x, y)| (x, y.unwrap_or_default()))
            .unzip();
        (first.into_iter().chain(second).collect::<Vec<_>>(), Some(n))
    } else {
        (texts, None)
    };
    // Cosine similarity does not depend on normalisation: the model's pooling only.
    let (pooling, _) = p.embedding(None, false);
    let opts = EmbedOptions {
        pooling,
        normalize: false,
        windows: a.windows.windows(),
    };
    let (vecs, encs) = berth_tasks::embed_texts(&p, &texts, &opts, 0)
        .with_context(|| a.text.source().to_string())?;
    if opts.windows.is_none() {
        warn_truncated(&encs, 0, p.max_length);
    }
    let mut out = stdout();
    if let Some(n) = pair_count {
        for i in 0..n {
            let score = berth_tasks::cosine(&vecs[i], &vecs[n + i]);
            writeln!(out, "{}", serde_json::json!({"index": i, "score": score}))?;
        }
        out.flush()?;
        return Ok(());
    }
    for (i, v) in vecs.iter().enumerate() {
        let sims: Vec<f32> = vecs.iter().map(|w| berth_tasks::cosine(v, w)).collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string(&SimilarityLine {
                index: i,
                similarities: &sims
            })?
        )?;
    }
    out.flush()?;
    Ok(())
}
