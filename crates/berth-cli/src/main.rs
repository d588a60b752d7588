//! `berth`: BERT in Rust, end to end. Thin glue over the berth crates.
//!
//!     scripts/fetch-assets                      # default model into ~/.cache/berth
//!     berth embed "some text"                   # sentence embedding, JSON Lines
//!     berth fill-mask --model DIR "the [MASK] sat on the mat."
//!     berth classify --model DIR "great film"  # also ner, qa, rerank, similarity
//!     berth eval --task ner --gold G --predictions P
//!     berth inspect
//!     berth bench                               # berth vs PyTorch / ONNX Runtime
//!     berth tokenizer train --kind wordpiece --vocab-size 30522 --output DIR corpus/
//!     berth data prepare --tokenizer DIR --output DATA corpus/
//!     berth serve --model DIR --port 8080           # HTTP server (TEI-compatible routes)
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

mod bench;
mod bench_serve;
mod bench_train;
mod data;
mod embed;
mod eval;
mod fill_mask;
mod finetune;
mod input;
mod inspect;
mod output;
#[cfg(feature = "parquet")]
mod parquet_io;
mod pretrain;
mod quantize;
use berth_tasks::resolve;
mod search;
mod serve;
mod tasks;
mod tokenizer;
mod train_args;

// Large activations stay in the heap instead of a fresh mmap per tensor (see DESIGN.md §2).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "BERT in Rust: embed, classify, ner, qa, rerank, similarity, fill-mask, serve, eval, inspect, bench"
)]
struct Cli {
    /// Worker threads (default: all cores). Fewer threads leave cores for other work.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sentence (or token) embeddings as JSON Lines.
    Embed(embed::EmbedArgs),
    /// Top-k predictions for each mask token, as JSON Lines.
    FillMask(fill_mask::FillMaskArgs),
    /// Sequence classification (sentiment, topic, ...; pairs with --pair), as JSON Lines.
    Classify(tasks::ClassifyArgs),
    /// Named entities (token classification with aggregation), as JSON Lines.
    Ner(tasks::NerArgs),
    /// Extractive question answering: answer spans of a context, as JSON Lines.
    Qa(tasks::QaArgs),
    /// Cross-encoder reranking of passages for a query, best first, as JSON Lines.
    Rerank(tasks::RerankArgs),
    /// Cosine similarity of sentence embeddings, every text against every other.
    Similarity(tasks::SimilarityArgs),
    /// Dense retrieval over a BEIR corpus.jsonl: exact top-k, an on-disk index, optional
    /// cross-encoder rerank; JSON Lines per query.
    Search(search::SearchArgs),
    /// Fine-tune a checkpoint (classification, multi-label, regression, NER, QA, sentence
    /// embeddings, reranking): checkpoints, metrics.jsonl, curve.png.
    Finetune(finetune::FinetuneArgs),
    /// Score predictions against gold: accuracy/F1, conlleval, SQuAD EM/F1, MRR/nDCG, correlation.
    Eval(eval::EvalArgs),
    /// Architecture, sizes, parameter count, tokenizer and heads of a model.
    Inspect(inspect::InspectArgs),
    /// A copy of a model with its encoder matrices stored as int8 (berth-specific) or bf16:
    /// smaller on disk, loaded without quantizing.
    Quantize(quantize::QuantizeArgs),
    /// Throughput of berth against PyTorch and ONNX Runtime (when installed) in one run.
    Bench(bench::BenchArgs),
    /// Pretraining: masked-LM (with NSP / SOP) or ELECTRA replaced-token detection, from
    /// scratch or continued from a checkpoint.
    Pretrain(pretrain::PretrainArgs),
    /// Corpora: `berth data prepare` tokenizes them once into shards for pretraining.
    Data(data::DataArgs),
    /// Vocabularies: `berth tokenizer train --kind wordpiece|bpe|unigram ...`.
    Tokenizer(tokenizer::TokenizerArgs),
    /// HTTP inference server: TEI / OpenAI embedding routes, /predict, /rerank, /ner, /qa,
    /// /fill-mask; requests batched together; Prometheus /metrics.
    Serve(serve::ServeArgs),
}

/// Most worker threads `--threads` may ask for, per core: more only adds switching.
const MAX_THREADS_PER_CORE: usize = 8;

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let max = MAX_THREADS_PER_CORE * cores;
        if n == 0 || n > max {
            anyhow::bail!("--threads {n} is outside 1..={max} ({MAX_THREADS_PER_CORE} per core, {cores} cores)");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
        // candle's matmul reads its thread count from here.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match cli.command {
        Command::Embed(a) => embed::run(a),
        Command::FillMask(a) => fill_mask::run(a),
        Command::Classify(a) => tasks::classify(a),
        Command::Ner(a) => tasks::ner(a),
        Command::Qa(a) => tasks::qa(a),
        Command::Rerank(a) => tasks::rerank(a),
        Command::Similarity(a) => tasks::similarity(a),
        Command::Search(a) => search::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Tokenizer(a) => tokenizer::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Data(a) => data::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys 0.1.49).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory instead of returning it to the OS after 10 ms: a forward or training
    // step frees and re-allocates the same large activation buffers every time, and fresh
    // pages from the OS must be zeroed by the kernel first (measured: pretraining ~10 % faster).
    // SAFETY: sets a process-wide allocator option; no allocation is in flight.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle runs its element-wise maps (the few tensor ops berth leaves to candle in
    // training: embedding sums, head activations, the backward's gradient sums) on a pool
    // of its own beside berth's rayon workers; after each op its worker spins on a core the
    // rayon workers need, and the caller spins waiting for it to wake. With one thread the
    // maps run inline: SST-2 fine-tuning ~2 % faster here (same bits). A user's setting wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // No other thread exists yet.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    quiet_stdout_errors();
    // A file-size limit (ulimit -f) must fail the write with EFBIG, which is reported with
    // the file's name, instead of killing berth with SIGXFSZ.
    // SAFETY: installs SIG_IGN for one signal before any other thread exists.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help / --version go to stdout: a failed write is an error, not a silent success.
        Err(e) if !e.use_stderr() => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            return match write!(out, "{}", e.render()).and_then(|_| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(w) if w.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(w) => {
                    eprintln!("error: writing to stdout: {w}");
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => e.exit(),
    };
    let result = run(cli);
    embed::report_truncated();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error: stop quietly, as Unix tools do.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` comes from writing to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` panics when stdout fails. A closed reader (`| head`) ends the process quietly
/// and successfully; any other failure (`> /dev/full`) is one error line, not a panic.
fn quiet_stdout_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if let Some(reason) = msg.strip_prefix("failed printing to stdout: ") {
            if reason.contains("Broken pipe") {
                std::process::exit(0);
            }
            eprintln!("error: writing to stdout: {reason}");
            std::process::exit(1);
        }
        default(info)
    }));
}
