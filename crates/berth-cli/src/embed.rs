//! `berth embed`.

use anyhow::Context;
use berth_tasks::quantize::{self, VectorDtype};
use berth_tasks::{
    embed_encoded, encode_for_embedding, pipelined, token_budget_batches, EmbedOptions,
    EncodedTexts, Pipeline, Pooling,
};
use clap::Args;

use crate::output::Output;
use crate::{input, resolve};

/// Arguments of `berth embed`.
#[derive(Args)]
pub struct EmbedArgs {
    /// Model directory, cached model name, or hub id (default: all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// Pooling; default: the model's sentence-transformers config, else CLS.
    /// `none` prints every token's vector (large output).
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// L2-normalise the pooled vectors (on by default when the model's config says so).
    #[arg(long)]
    normalize: bool,
    #[command(flatten)]
    text: input::TextArgs,
    /// Write to FILE instead of stdout: `.npy` for one float32 n x d array (numpy.load),
    /// else JSON Lines. The file appears complete or not at all (written under a temporary
    /// name, then renamed).
    #[arg(long)]
    output: Option<String>,
    #[command(flatten)]
    windows: input::WindowArgs,
    /// Storage format of the vectors, as sentence-transformers' `quantize_embeddings`:
    /// f16; int8 / uint8 (per-dimension buckets between the minimum and maximum over this
    /// run's vectors, written to OUTPUT.ranges.json); binary / ubinary (sign bits packed
    /// eight to a byte). JSON numbers, or the .npy array's element type.
    #[arg(long, value_enum, default_value_t = VectorDtype::F32)]
    output_dtype: VectorDtype,
    /// Texts to embed.
    texts: Vec<String>,
}

/// One output line with per-token vectors (`--pooling none`).
#[derive(serde::Serialize)]
struct TokenLine<'a> {
    index: usize,
    tokens: &'a [String],
    hidden: Vec<&'a [f32]>,
}

/// A progress bar on stderr for file inputs (hidden otherwise, and when stderr is not a terminal).
pub fn progress(len: usize, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} texts {per_sec} eta {eta}")
            .expect("valid progress template; this is a bug"),
    );
    bar
}

/// Prints the loader's findings the way transformers warns about them.
pub fn report_load(report: &berth_model::LoadReport) {
    if let Some((kind, key)) = &report.missing_head {
        eprintln!("warning: the checkpoint has no {} head weights (first missing: {key}); only the encoder is usable", kind.name());
    }
    if !report.unused.is_empty() {
        eprintln!(
            "warning: {} checkpoint weights were not used: {}",
            report.unused.len(),
            report.unused.join(", ")
        );
    }
}

/// Truncated inputs seen so far: count, the first few (input, tokens), the limit.
static TRUNCATED: std::sync::Mutex<(usize, Vec<(usize, usize)>, usize)> =
    std::sync::Mutex::new((0, Vec::new(), 0));

/// Records the truncated inputs among `encs` (numbered from `first`); one summary line is
/// printed at the end by [`report_truncated`], not one warning per input.
pub fn warn_truncated(encs: &[berth_text::Encoded], first: usize, max: usize) {
    let mut t = TRUNCATED.lock().unwrap_or_else(|e| e.into_inner());
    for (i, e) in encs.iter().enumerate().filter(|(_, e)| e.truncated) {
        t.0 += 1;
        if t.1.len() < 3 {
            t.1.push((first + i, e.full_len));
        }
        t.2 = max;
    }
}

/// Prints one warning summarising the truncated inputs, if any.
pub fn report_truncated() {
    let t = TRUNCATED.lock().unwrap_or_else(|e| e.into_inner());
    if t.0 == 0 {
        return;
    }
    let shown: Vec<String> =
        t.1.iter()
            .map(|(i, n)| format!("input {i}: {n} tokens"))
            .collect();
    eprintln!(
        "warning: {} input{} truncated to {} tokens ({}{}); --no-truncate makes this an error",
        t.0,
        if t.0 == 1 { "" } else { "s" },
        t.2,
        shown.join(", "),
        if t.0 > shown.len() { ", ..." } else { "" }
    );
}

/// The sentence-embedding pipeline of `--model` (its sentence-transformers config decides
/// the defaults; see [`Pipeline::load_sentence`]).
pub fn load_sentence_pipeline(
    model: Option<&str>,
    text: &input::TextArgs,
) -> anyhow::Result<Pipeline> {
    let dir = resolve::model_dir(model)?;
    let (p, report) = Pipeline::load_sentence(&dir, &text.pipeline_options())?;
    report_load(&report);
    Ok(p)
}

/// Texts per chunk of a file input (bounds memory; one chunk is tokenized ahead).
const CHUNK: usize = 2048;

/// What the ranks of an MPI run computed, gathered on rank 0 in input order.
enum Sharded {
    /// One pooled vector per input.
    Vectors(Vec<Vec<f32>>),
    /// `--pooling none`: the per-token JSON lines, newline-ended.
    Lines(Vec<u8>),
}

/// The per-token JSON lines (`--pooling none`) of `encs`, inputs `first..`, in order.
fn token_lines(
    p: &Pipeline,
    encs: &[berth_text::Encoded],
    first: usize,
    mut line: impl FnMut(String) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let h = p.model.config.hidden_size;
    let lens: Vec<usize> = encs.iter().map(|e| e.ids.len()).collect();
    for r in token_budget_batches(&lens, p.batch_tokens) {
        let (batch, hidden) = p.run(&encs[r.clone()])?;
        let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
        for (s, i) in r.clone().enumerate() {
            let rows = batch.range(s);
            let hidden: Vec<&[f32]> = flat[rows.start * h..rows.end * h].chunks(h).collect();
            line(serde_json::to_string(&TokenLine {
                index: first + i,
                tokens: &encs[i].tokens,
                hidden,
            })?)?;
        }
    }
    Ok(())
}

pub fn run(a: EmbedArgs) -> anyhow::Result<()> {
    let world = berth_train::dist::world()?;
    let result = run_on(a, world.as_ref());
    crate::finetune::end_ranks_on_error(result, world.as_ref())
}

fn run_on(a: EmbedArgs, world: &dyn berth_train::dist::Collective) -> anyhow::Result<()> {
    let p = load_sentence_pipeline(a.model.as_deref(), &a.text)?;
    let (pooling, norm) = p.embedding(a.pooling, a.normalize);
    let rows = a.text.inputs(&a.texts)?;
    if rows.pairs.is_some() {
        anyhow::bail!("--pair-column applies to classify --pair");
    }
    let (texts, from_file) = (rows.texts, rows.from_file);
    let source = a.text.source();
    let opts = EmbedOptions {
        pooling,
        normalize: norm,
        windows: a.windows.windows(),
    };
    if pooling == Pooling::None && a.windows.stride.is_some() {
        anyhow::bail!(
            "--stride pools windows into one vector per text: it needs a pooling other than none"
        );
    }
    // Under mpirun: each rank embeds a contiguous share of the texts; rank 0 gathers the
    // vectors (in rank order: input order) and writes the one output.
    let sharded = if world.world_size() > 1 && pooling == Pooling::None {
        // Per-token output: each rank writes its share's lines; rank 0 writes them in order.
        let mine = world.shard_range(texts.len());
        let mut bytes = Vec::new();
        for (c, chunk) in texts[mine.clone()].chunks(CHUNK).enumerate() {
            let first = mine.start + c * CHUNK;
            let encs = p.encode(chunk, first).with_context(|| source.to_string())?;
            warn_truncated(&encs, first, p.max_length);
            token_lines(&p, &encs, first, |line| {
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
                Ok(())
            })?;
        }
        let parts = world.gather_all(&bytes)?;
        if !world.is_writer() {
            return Ok(());
        }
        Some(Sharded::Lines(parts.concat()))
    } else if world.world_size() > 1 {
        let mine = world.shard_range(texts.len());
        let mut bytes = Vec::new();
        for (c, chunk) in texts[mine.clone()].chunks(CHUNK).enumerate() {
            let first = mine.start + c * CHUNK;
            let e = encode_for_embedding(&p, chunk, &opts, first)
                .with_context(|| source.to_string())?;
            if opts.windows.is_none() {
                warn_truncated(&e.encs, first, p.max_length);
            }
            for v in embed_encoded(&p, &e, &opts).with_context(|| source.to_string())? {
                bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
        let parts = world.gather_all(&bytes)?;
        if !world.is_writer() {
            return Ok(());
        }
        let flat: Vec<f32> = parts
            .concat()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let dim = flat.len() / texts.len().max(1);
        Some(Sharded::Vectors(
            flat.chunks(dim.max(1))
                .map(<[f32]>::to_vec)
                .collect::<Vec<_>>(),
        ))
    } else {
        None
    };
    let mut out = Output::open(a.output.as_deref(), pooling == Pooling::None)?;
    if pooling == Pooling::None && rows.meta.iter().any(|m| !m.is_empty()) {
        anyhow::bail!("--id-column / --keep-columns apply to pooled vectors, not --pooling none");
    }
    out.set_meta(rows.meta)?;
    if a.output_dtype != VectorDtype::F32 && pooling == Pooling::None {
        anyhow::bail!("--output-dtype applies to pooled vectors, not --pooling none");
    }
    if a.output_dtype.needs_ranges() && a.output.is_none() {
        anyhow::bail!(
            "--output-dtype {:?} needs --output FILE: its per-dimension ranges are written beside it",
            a.output_dtype
        );
    }
    // Vectors kept for a storage format other than f32 (int8 / uint8 need all of them for
    // their ranges).
    let mut kept: Vec<Vec<f32>> = Vec::new();
    let bar = progress(texts.len(), from_file);
    match sharded {
        Some(Sharded::Vectors(vecs)) if a.output_dtype == VectorDtype::F32 => {
            for (i, v) in vecs.iter().enumerate() {
                out.vector(i, v)?;
            }
        }
        Some(Sharded::Vectors(vecs)) => kept = vecs,
        Some(Sharded::Lines(bytes)) => {
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                out.line(std::str::from_utf8(line).expect("JSON lines written by berth"))?;
            }
        }
        None => {}
    }
    // Chunks bound memory for large files. Each chunk is tokenized (in parallel) on a
    // background thread while the model runs the one before it.
    let todo: &[String] = if world.world_size() > 1 { &[] } else { &texts };
    let chunks = todo.chunks(CHUNK).enumerate();
    let tokenize = |(c, chunk): (usize, &[String])| {
        let first = c * CHUNK;
        let encoded = if pooling != Pooling::None {
            encode_for_embedding(&p, chunk, &opts, first)
        } else {
            p.encode(chunk, first).map(|encs| EncodedTexts {
                ranges: (0..encs.len()).map(|i| i..i + 1).collect(),
                encs,
            })
        };
        (first, encoded)
    };
    pipelined(chunks, tokenize, |(first, encoded)| -> anyhow::Result<()> {
        let e = encoded.with_context(|| source.to_string())?;
        if pooling != Pooling::None {
            let vecs = embed_encoded(&p, &e, &opts).with_context(|| source.to_string())?;
            if opts.windows.is_none() {
                warn_truncated(&e.encs, first, p.max_length);
            }
            bar.inc(vecs.len() as u64);
            if a.output_dtype == VectorDtype::F32 {
                for (i, v) in vecs.iter().enumerate() {
                    out.vector(first + i, v)?;
                }
            } else {
                kept.extend(vecs);
            }
            return Ok(());
        }
        let encs = &e.encs;
        warn_truncated(encs, first, p.max_length);
        token_lines(&p, encs, first, |line| out.line(&line))?;
        bar.inc(encs.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    if a.output_dtype != VectorDtype::F32 {
        let ranges = a
            .output_dtype
            .needs_ranges()
            .then(|| quantize::ranges(&kept));
        for (i, v) in kept.iter().enumerate() {
            out.stored(
                i,
                &quantize::quantize(v, a.output_dtype, ranges.as_ref()),
                a.output_dtype,
            )?;
        }
        if let (Some((lo, hi)), Some(path)) = (&ranges, &a.output) {
            let file = format!("{path}.ranges.json");
            let text = serde_json::json!({"starts": lo, "ends": hi}).to_string();
            std::fs::write(&file, text).with_context(|| format!("{file}: cannot write"))?;
        }
    }
    out.finish()
}
