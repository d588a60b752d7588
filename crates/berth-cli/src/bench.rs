//! `berth bench`: berth against PyTorch eager and ONNX Runtime fp32 in the same run.
//!
//! Workloads (all-MiniLM-L6-v2 by default):
//!   a. 32 sequences x 128 tokens (encoder only, synthetic ids)
//!   b. 1 sequence x 16 tokens (encoder only, synthetic ids)
//!   c. N real texts of mixed length (questions, SST-2 sentences and SQuAD paragraphs from
//!      the shared datasets) embedded end to end (tokenize, encode, pool, normalise) in
//!      batches of 32 in file order. berth packs each batch; the peers pad it to its
//!      longest member, as they must.
//!   c'. the same texts sorted longest first (by characters, as sentence-transformers'
//!      `encode` sorts them) before batching: how experts run a padded engine, each
//!      batch padding little. Every engine gets the same order.
//!   d. a bert-base-shaped checkpoint (12 layers, 768 hidden, random weights, written to a
//!      temporary folder and loaded by every engine) at 8 sequences x 128 tokens.
//! berth runs in f32, in bf16 where the CPU has AMX or AVX-512, and in int8 where it has AMX or AVX-512
//! VNNI (not on the portable int8 loop, which is far slower than f32); the accuracy of each
//! reduced precision is the cosine of its (c) embeddings to berth f32's. Peers run in
//! scripts/bench_peers.py with the same thread count (PyTorch eager f32 and bf16 autocast,
//! ONNX Runtime f32 and dynamic int8 with per-channel weights); missing peers are "n/a".
//! Throughput is also given as GFLOP/s of useful work (real tokens only) and as a fraction
//! of the measured peak of berth's own matrix product in the same precision.
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use berth_model::{Batch, Model, Precision};
use berth_tasks::{normalize, pool, Pipeline, PipelineOptions, Pooling};
use clap::Args;

use crate::resolve;

/// Arguments of `berth bench`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Model to benchmark (default: all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// Datasets folder for workload (c) (default: $BERTH_DATASETS or ../shared/datasets).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Texts in workload (c) (each engine embeds them once, after a short warm-up).
    #[arg(long, default_value_t = 10_000)]
    sentences: usize,
    /// Minimum seconds per measurement: longer is steadier, slower to finish.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Skip PyTorch / ONNX Runtime.
    #[arg(long)]
    no_peers: bool,
    /// Python interpreter with torch / transformers / onnxruntime for the peers.
    #[arg(long, default_value = "python3")]
    python: String,
}

/// Other benchmarks.
#[derive(clap::Subcommand)]
enum BenchCommand {
    /// `berth serve` against infinity-emb under the same HTTP load (texts/s, p50 / p99).
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Fine-tuning and MLM pretraining against the length-grouped Trainer and PyTorch with a
    /// masked-only MLM head (real tokens/s, dev accuracy, held-out loss).
    Train(crate::bench_train::TrainBenchArgs),
}

/// Deterministic pseudo-random token ids (no RNG dependency needed for a benchmark).
fn synthetic(n: usize, len: usize, vocab: u32, cls: u32, sep: u32) -> Vec<Vec<u32>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            let mut ids = vec![cls];
            for _ in 0..len - 2 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ids.push(1000 + (state % (vocab as u64 - 1000)) as u32);
            }
            ids.push(sep);
            ids
        })
        .collect()
}

/// Runs `f` once after a warm-up `w`; runs/s.
fn once(
    w: impl FnOnce() -> anyhow::Result<()>,
    f: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    w()?;
    let start = Instant::now();
    f()?;
    Ok(1.0 / start.elapsed().as_secs_f64())
}

/// Multiply-adds × 2 of one encoder pass over a sequence of `len` tokens: the four
/// linears per layer and the two attention products.
pub(crate) fn encoder_flops(c: &berth_model::EncoderConfig, len: usize) -> f64 {
    let (h, i, l) = (c.hidden_size as f64, c.intermediate_size as f64, len as f64);
    c.num_layers as f64 * (2.0 * l * h * (4.0 * h + 2.0 * i) + 4.0 * l * l * h)
}

/// GFLOP/s of berth's matrix product in `mode` on the model's largest shape
/// (4096 tokens × hidden → intermediate; activation conversion included for bf16 / int8),
/// the reference for "fraction of peak": the best of `runs` products.
pub(crate) fn matmul_peak(mode: Precision, h: usize, i: usize, runs: usize) -> f64 {
    use berth_kernels::amx::{self, int8::PackedI8, PackedBf16};
    let n = 4096;
    let x: Vec<f32> = (0..n * h)
        .map(|k| ((k * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let w: Vec<f32> = (0..i * h)
        .map(|k| ((k * 104729) % 1000) as f32 / 5e3 - 0.1)
        .collect();
    let b = vec![0f32; i];
    let run: Box<dyn Fn()> = match mode {
        Precision::F32 => {
            let p = berth_kernels::sgemm::PackedB::pack_transposed(&w, i, h);
            let out = std::cell::RefCell::new(vec![0f32; n * i]);
            Box::new(move || {
                let mut y = out.borrow_mut();
                berth_kernels::sgemm::sgemm(
                    n,
                    &x,
                    h,
                    1,
                    &p,
                    &mut y,
                    i,
                    berth_kernels::sgemm::Init::Zero,
                );
                std::hint::black_box(y);
            })
        }
        Precision::Bf16 => {
            let p = PackedBf16::pack(&w, &b, i, h);
            Box::new(move || {
                std::hint::black_box(amx::linear_bf16(&x, n, &p, None));
            })
        }
        Precision::Int8 => {
            let p = PackedI8::quantize(&w, &b, i, h);
            Box::new(move || {
                std::hint::black_box(amx::int8::linear_i8(&x, n, &p, None));
            })
        }
    };
    run();
    // The best of several single products: the peak this machine reaches right now.
    let best = (0..runs)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (n * h * i) as f64 / best / 1e9
}

/// Runs `f` for about `seconds` after one warm-up, in windows of at least 0.25 s and 3
/// runs; runs/s of the best window. The machine's speed drifts and noise only ever slows
/// a run down, so the best window is the steadiest estimate (the peers are timed the same way).
fn rate(seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let start = Instant::now();
    let mut best = 0f64;
    while best == 0.0 || start.elapsed().as_secs_f64() < seconds {
        let window = Instant::now();
        let mut runs = 0;
        while runs < 3 || window.elapsed().as_secs_f64() < 0.25 {
            f()?;
            runs += 1;
        }
        best = best.max(runs as f64 / window.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    std::io::BufReader::new(f)
        .lines()
        .collect::<Result<_, _>>()
        .with_context(|| path.display().to_string())
}

fn jsonl_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    read_lines(path)?
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| path.display().to_string())?;
            Ok(v["text"].as_str().context("no text field")?.to_string())
        })
        .collect()
}

/// Workload (c): every 8th text a SQuAD paragraph, else alternately a SQuAD question and an
/// SST-2 sentence — short queries and long passages, as in retrieval traffic.
fn mixed_texts(data: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let paragraphs = jsonl_texts(&data.join("squad-dev-retrieval/corpus.jsonl"))?;
    let questions = jsonl_texts(&data.join("squad-dev-retrieval/queries.jsonl"))?;
    let sst: Vec<String> = read_lines(&data.join("sst2/dev.tsv"))?
        .into_iter()
        .skip(1)
        .filter_map(|l| l.split('\t').next().map(|s| s.trim().to_string()))
        .collect();
    let (mut p, mut q, mut s) = (
        paragraphs.iter().cycle(),
        questions.iter().cycle(),
        sst.iter().cycle(),
    );
    Ok((0..n)
        .map(|i| match i % 8 {
            7 => p.next(),
            k if k % 2 == 0 => q.next(),
            _ => s.next(),
        })
        .map(|t| {
            t.expect("cycled iterators never end; this is a bug")
                .clone()
        })
        .collect())
}

/// Embeds `texts` in batches of 32 (tokenising each batch, as a server would).
fn embed_all(p: &Pipeline, texts: &[String], pooling: Pooling) -> anyhow::Result<Vec<Vec<f32>>> {
    let h = p.model.config.hidden_size;
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        let encs = p.encode(chunk, 0)?;
        let (batch, hidden) = p.run(&encs)?;
        for mut v in pool(&hidden.flatten_all()?.to_vec1::<f32>()?, h, &batch, pooling) {
            normalize(&mut v);
            out.push(v);
        }
    }
    Ok(out)
}

/// Mean and minimum cosine between matching (normalised) vectors.
fn cosine_stats(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64) {
    let cos: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (*p as f64) * (*q as f64))
                .sum()
        })
        .collect();
    let mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
    (mean, cos.iter().copied().fold(f64::INFINITY, f64::min))
}

/// Writes a bert-base-shaped BertModel with random weights (initialised as transformers
/// does, seeded) and the tokenizer files of `tokenizer_dir` into `dir`, for workload (d).
fn bert_base_checkpoint(dir: &Path, tokenizer_dir: &Path) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768,
        "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
        "vocab_size": 30522, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02});
    berth_train::init::write_random_encoder(
        dir,
        &config,
        tokenizer_dir,
        0x9e37_79b9,
        berth_train::init::PositionInit::Normal,
    )?;
    Ok(())
}

fn peers(a: &BenchArgs, dir: &Path, spec: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_peers.py");
    let tmp = std::env::temp_dir().join(format!("berth-bench-{}.json", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(spec)?)?;
    eprintln!("running peers ({} {})...", a.python, script.display());
    let out = std::process::Command::new(&a.python)
        .arg(&script)
        .arg("--model")
        .arg(dir)
        .arg("--spec")
        .arg(&tmp)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", a.python))?;
    let _ = std::fs::remove_file(&tmp);
    if !out.status.success() {
        bail!("{} failed", script.display());
    }
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("{}")
        .to_string();
    serde_json::from_str(&last).context("peer script output is not JSON")
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.command {
        Some(BenchCommand::Serve(s)) => return crate::bench_serve::run(s),
        Some(BenchCommand::Train(t)) => return crate::bench_train::run(t),
        None => {}
    }
    let dir = resolve::model_dir(a.model.as_deref())?;
    let (p, _) = Pipeline::load_sentence(&dir, &PipelineOptions::default())?;
    let st = p.sentence;
    let data = a
        .data
        .clone()
        .or_else(|| std::env::var_os("BERTH_DATASETS").map(PathBuf::from))
        .unwrap_or_else(|| "../shared/datasets".into());
    let threads = rayon::current_num_threads();
    let vocab = p.model.config.vocab_size as u32;
    let cls = p
        .tokenizer
        .token_to_id("[CLS]")
        .or_else(|| p.tokenizer.token_to_id("<s>"))
        .unwrap_or(0);
    let sep = p
        .tokenizer
        .token_to_id("[SEP]")
        .or_else(|| p.tokenizer.token_to_id("</s>"))
        .unwrap_or(0);
    let wa = synthetic(32, 128, vocab, cls, sep);
    let wb = synthetic(1, 16, vocab, cls, sep);
    let wd = synthetic(8, 128, 30522, cls, sep);
    let texts = mixed_texts(&data, a.sentences)
        .with_context(|| format!("workload (c) needs {} (pass --data DIR)", data.display()))?;
    // (c'): longest first by characters (a stable sort: ties keep file order).
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(texts[i].chars().count()));
    let sorted: Vec<String> = order.iter().map(|&i| texts[i].clone()).collect();
    let encs = p.encode(&texts, 0)?;
    let lens: Vec<usize> = encs.iter().map(|e| e.ids.len()).collect();
    let real: usize = lens.iter().sum();
    let padded_in = |lens: &[usize]| -> usize {
        lens.chunks(32)
            .map(|c| c.len() * c.iter().max().unwrap_or(&0))
            .sum()
    };
    let padded = padded_in(&lens);
    let padded_sorted = padded_in(&order.iter().map(|&i| lens[i]).collect::<Vec<_>>());
    let base_dir =
        std::env::temp_dir().join(format!("berth-bench-bert-base-{}", std::process::id()));
    bert_base_checkpoint(&base_dir, &dir).with_context(|| {
        format!(
            "cannot write the workload (d) checkpoint to {}",
            base_dir.display()
        )
    })?;
    let (mut base, _) = Model::load(&base_dir, false)?;

    eprintln!("berth: {} ({} threads); (c) {} texts, {real} real tokens, {padded} when padded per batch of 32 ({:.0} % real; length-sorted {padded_sorted}, {:.0} % real)",
        dir.display(), threads, texts.len(), 100.0 * real as f64 / padded as f64,
        100.0 * real as f64 / padded_sorted as f64);
    let pooling = st.map_or(Pooling::Cls, |c| c.pooling);
    let mut modes = vec![Precision::F32];
    match berth_kernels::amx::Bf16Kernel::best() {
        Some(kernel) => {
            eprintln!("berth bf16 runs on {kernel:?}");
            modes.push(Precision::Bf16);
        }
        None => eprintln!("no AMX bf16 or AVX-512 on this CPU: berth bf16 is skipped"),
    }
    let int8_kernel = berth_kernels::amx::int8::I8Kernel::best();
    if int8_kernel == berth_kernels::amx::int8::I8Kernel::Portable {
        eprintln!("no AMX int8, AVX-512 VNNI or AVX2 on this CPU: berth int8 (portable loop) is not benchmarked");
    } else {
        eprintln!("berth int8 runs on {int8_kernel:?}");
        modes.push(Precision::Int8);
    }
    let max_length = p.max_length;
    let mut p = p;
    let mut measure = |mode: Precision| -> anyhow::Result<[f64; 5]> {
        p.set_precision(mode)?;
        base.set_precision(mode)?;
        let forward = |m: &Model, seqs: &Vec<Vec<u32>>| {
            let batch = Batch::from_sequences(seqs.iter().map(|s| (s.as_slice(), &[][..])))?;
            m.forward(&batch)?;
            Ok(())
        };
        Ok([
            rate(a.seconds, || forward(&p.model, &wa))? * 32.0,
            rate(a.seconds, || forward(&p.model, &wb))?,
            once(
                || embed_all(&p, &texts[..texts.len().min(256)], pooling).map(|_| ()),
                || embed_all(&p, &texts, pooling).map(|_| ()),
            )? * texts.len() as f64,
            rate(a.seconds, || forward(&base, &wd))? * 8.0,
            once(
                || embed_all(&p, &sorted[..sorted.len().min(256)], pooling).map(|_| ()),
                || embed_all(&p, &sorted, pooling).map(|_| ()),
            )? * sorted.len() as f64,
        ])
    };
    let before: Vec<[f64; 5]> = modes
        .iter()
        .map(|&m| measure(m))
        .collect::<anyhow::Result<_>>()?;
    let spec = serde_json::json!({"a": wa, "b": wb, "c": texts, "c_sorted": sorted, "d": wd, "d_model": base_dir,
        "max_length": max_length, "seconds": a.seconds, "threads": threads,
        // PyTorch's bf16 autocast only where berth runs bf16: without a bf16 product the
        // CPU emulates it, many times slower than f32, and there is no berth row to compare.
        "bf16": modes.contains(&Precision::Bf16)});
    let peer = if a.no_peers {
        serde_json::json!({})
    } else {
        peers(&a, &dir, &spec)?
    };
    // Shared machines drift: berth is measured before and after the peers and the mean is
    // reported, so a slow or fast phase does not favour either side.
    let ours: Vec<[f64; 5]> = if a.no_peers {
        before
    } else {
        let after: Vec<[f64; 5]> = modes
            .iter()
            .map(|&m| measure(m))
            .collect::<anyhow::Result<_>>()?;
        eprintln!("berth before peers {before:.1?}, after {after:.1?} seq/s");
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| [0, 1, 2, 3, 4].map(|i| (b[i] + a[i]) / 2.0))
            .collect()
    };
    let _ = std::fs::remove_dir_all(&base_dir);

    let names = [
        "(a) MiniLM 32 x 128".to_string(),
        "(b) MiniLM 1 x 16".to_string(),
        format!("(c) MiniLM, {} mixed texts, batches of 32", texts.len()),
        "(d) bert-base 8 x 128".to_string(),
        format!(
            "(c') the same {} texts, length-sorted batches of 32",
            sorted.len()
        ),
    ];
    let cell = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => format!("{:.2}x", x / y),
        _ => "n/a".into(),
    };
    let berth_at =
        |mode: Precision, i: usize| modes.iter().position(|&m| m == mode).map(|k| ours[k][i]);
    const KEYS: [&str; 5] = ["a", "b", "c", "d", "c_sorted"];
    let get = |peer_name: &str, i: usize| peer[peer_name][KEYS[i]].as_f64();
    println!("sequences/s (higher is better)");
    println!("| workload | berth f32 | berth bf16 | berth int8 | PyTorch f32 | PyTorch bf16 | ORT f32 | ORT int8 |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            cell(berth_at(Precision::F32, i)),
            cell(berth_at(Precision::Bf16, i)),
            cell(berth_at(Precision::Int8, i)),
            cell(get("torch", i)),
            cell(get("torch_bf16", i)),
            cell(get("ort", i)),
            cell(get("ort_int8", i)),
        );
    }
    println!("\nratios, berth / peer in the same run");
    println!("| workload | f32 / PyTorch | f32 / ORT | bf16 / PyTorch bf16 | bf16 / ORT f32 | int8 / ORT int8 | int8 / ORT f32 |");
    println!("|---|---|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let (f, b, q) = (
            berth_at(Precision::F32, i),
            berth_at(Precision::Bf16, i),
            berth_at(Precision::Int8, i),
        );
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            ratio(f, get("torch", i)),
            ratio(f, get("ort", i)),
            ratio(b, get("torch_bf16", i)),
            ratio(b, get("ort", i)),
            ratio(q, get("ort_int8", i)),
            ratio(q, get("ort", i)),
        );
    }
    // Useful work per sequence (real tokens only) and berth's own product peak per mode.
    let cfg = &p.model.config;
    let mixed = encs
        .iter()
        .map(|e| encoder_flops(cfg, e.ids.len()))
        .sum::<f64>()
        / encs.len() as f64;
    let per_seq = [
        encoder_flops(cfg, 128),
        encoder_flops(cfg, 16),
        mixed,
        encoder_flops(&base.config, 128),
        mixed,
    ];
    let peaks: Vec<f64> = modes
        .iter()
        .map(|&m| matmul_peak(m, cfg.hidden_size, cfg.intermediate_size, 8))
        .collect();
    println!(
        "\nGFLOP/s of useful work (fraction of berth's measured matmul peak in that precision)"
    );
    let heads: Vec<String> = modes
        .iter()
        .zip(&peaks)
        .map(|(m, pk)| format!("berth {m:?} (peak {pk:.0})"))
        .collect();
    println!("| workload | {} | ORT f32 |", heads.join(" | "));
    println!("|---|{}---|", "---|".repeat(modes.len()));
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<String> = ours
            .iter()
            .zip(&peaks)
            .map(|(o, pk)| {
                let g = o[i] * per_seq[i] / 1e9;
                format!("{g:.0} ({:.0} %)", 100.0 * g / pk)
            })
            .collect();
        println!(
            "| {name} | {} | {} |",
            cells.join(" | "),
            get("ort", i).map_or("n/a".into(), |v| format!("{:.0}", v * per_seq[i] / 1e9)),
        );
    }
    // Accuracy of reduced precision: cosine of (c) embeddings to berth f32.
    p.set_precision(Precision::F32)?;
    let reference = embed_all(&p, &texts, pooling)?;
    for &mode in &modes[1..] {
        p.set_precision(mode)?;
        let (mean, min) = cosine_stats(&reference, &embed_all(&p, &texts, pooling)?);
        println!("berth {mode:?} vs berth f32 on (c): mean cosine {mean:.6}, lowest {min:.6}");
    }
    if let Some(c) = peer.get("ort_int8_cosine") {
        println!(
            "ORT int8 vs ORT f32 on (c): mean cosine {:.6}, lowest {:.6}",
            c["mean"].as_f64().unwrap_or(f64::NAN),
            c["min"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(v) = peer.get("versions") {
        println!("peers: {v}");
    }
    Ok(())
}
