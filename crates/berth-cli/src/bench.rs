//! `berth bench`: berth against PyTorch eager and ONNX Runtime fp32 in the same run.
//!
//! Workloads (all-MiniLM-L6-v2 by default):
//!   a. 32 sequences x 128 tokens (encoder only, synthetic ids)
//!   b. 1 sequence x 16 tokens (encoder only, synthetic ids)
//!   c. N real texts of mixed length (questions, SST-2 sentences and SQuAD paragraphs from
//!      the shared datasets) embedded end to end (tokenize, encode, pool, normalise) in
//!      batches of 32 in file order. berth packs each batch; the peers pad it to its
//!      longest member, as they must.
//!   d. a bert-base-shaped checkpoint (12 layers, 768 hidden, random weights, written to a
//!      temporary folder and loaded by every engine) at 8 sequences x 128 tokens.
//! berth runs in f32 and, where the CPU has AMX, in bf16; the accuracy of bf16 is the cosine
//! of its (c) embeddings to berth f32's. Peers run in scripts/bench_peers.py with the same
//! thread count (PyTorch eager f32 and bf16 autocast, ONNX Runtime f32); missing peers are
//! "n/a".
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use berth_model::{Batch, Model, Precision};
use berth_tasks::{normalize, pool, EncodeOptions, Pipeline, Pooling, SentenceConfig};
use clap::Args;

use crate::resolve;

/// Arguments of `berth bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Model to benchmark (default: all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// Datasets folder for workload (c) (default: $BERTH_DATASETS or ../shared/datasets).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Texts in workload (c).
    #[arg(long, default_value_t = 1000)]
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

/// Runs `f` until `seconds` have passed (at least 3 runs, after one warm-up); runs/s.
fn rate(seconds: f64, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 3 || start.elapsed().as_secs_f64() < seconds {
        f()?;
        runs += 1;
    }
    Ok(runs as f64 / start.elapsed().as_secs_f64())
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
    berth_train::init::write_random_encoder(dir, &config, tokenizer_dir, 0x9e37_79b9)?;
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
    let dir = resolve::model_dir(a.model.as_deref())?;
    let st = SentenceConfig::from_dir(&dir)?;
    let (p, _) = Pipeline::load(
        &dir,
        EncodeOptions::default(),
        st.and_then(|c| c.max_seq_length),
    )?;
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
    let encs = p.encode(&texts, 0)?;
    let real: usize = encs.iter().map(|e| e.ids.len()).sum();
    let padded: usize = encs
        .chunks(32)
        .map(|c| c.len() * c.iter().map(|e| e.ids.len()).max().unwrap_or(0))
        .sum();
    let base_dir =
        std::env::temp_dir().join(format!("berth-bench-bert-base-{}", std::process::id()));
    bert_base_checkpoint(&base_dir, &dir).with_context(|| {
        format!(
            "cannot write the workload (d) checkpoint to {}",
            base_dir.display()
        )
    })?;
    let (mut base, _) = Model::load(&base_dir, false)?;

    eprintln!("berth: {} ({} threads); (c) {} texts, {real} real tokens, {padded} when padded per batch of 32 ({:.0} % real)",
        dir.display(), threads, texts.len(), 100.0 * real as f64 / padded as f64);
    let pooling = st.map_or(Pooling::Cls, |c| c.pooling);
    let modes: Vec<Precision> = if berth_kernels::amx::available() {
        vec![Precision::F32, Precision::Bf16]
    } else {
        eprintln!("no AMX on this CPU: berth bf16 is skipped");
        vec![Precision::F32]
    };
    let max_length = p.max_length;
    let mut p = p;
    let mut measure = |mode: Precision| -> anyhow::Result<[f64; 4]> {
        p.model.set_precision(mode)?;
        base.set_precision(mode)?;
        let forward = |m: &Model, seqs: &Vec<Vec<u32>>| {
            let batch = Batch::from_sequences(seqs.iter().map(|s| (s.as_slice(), &[][..])))?;
            m.forward(&batch)?;
            Ok(())
        };
        Ok([
            rate(a.seconds, || forward(&p.model, &wa))? * 32.0,
            rate(a.seconds, || forward(&p.model, &wb))?,
            rate(0.0, || embed_all(&p, &texts, pooling).map(|_| ()))? * texts.len() as f64,
            rate(a.seconds, || forward(&base, &wd))? * 8.0,
        ])
    };
    let before: Vec<[f64; 4]> = modes
        .iter()
        .map(|&m| measure(m))
        .collect::<anyhow::Result<_>>()?;
    let spec = serde_json::json!({"a": wa, "b": wb, "c": texts, "d": wd, "d_model": base_dir,
        "max_length": max_length, "seconds": a.seconds, "threads": threads});
    let peer = if a.no_peers {
        serde_json::json!({})
    } else {
        peers(&a, &dir, &spec)?
    };
    // Shared machines drift: berth is measured before and after the peers and the mean is
    // reported, so a slow or fast phase does not favour either side.
    let ours: Vec<[f64; 4]> = if a.no_peers {
        before
    } else {
        let after: Vec<[f64; 4]> = modes
            .iter()
            .map(|&m| measure(m))
            .collect::<anyhow::Result<_>>()?;
        eprintln!("berth before peers {before:.1?}, after {after:.1?} seq/s");
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| [0, 1, 2, 3].map(|i| (b[i] + a[i]) / 2.0))
            .collect()
    };
    let _ = std::fs::remove_dir_all(&base_dir);

    let names = [
        "(a) MiniLM 32 x 128",
        "(b) MiniLM 1 x 16",
        &format!("(c) MiniLM, {} mixed texts, batches of 32", texts.len()),
        "(d) bert-base 8 x 128",
    ];
    let cell = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => format!("{:.2}x", x / y),
        _ => "n/a".into(),
    };
    println!("sequences/s (higher is better); ratios are berth / peer in the same run");
    println!("| workload | berth f32 | berth bf16 | PyTorch f32 | PyTorch bf16 | ORT f32 | f32 / PyTorch | f32 / ORT | bf16 / PyTorch bf16 | bf16 / ORT f32 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, key) in ["a", "b", "c", "d"].iter().enumerate() {
        let get = |peer_name: &str| peer[peer_name][key].as_f64();
        let f32_ = Some(ours[0][i]);
        let bf16 = ours.get(1).map(|o| o[i]);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            names[i],
            cell(f32_),
            cell(bf16),
            cell(get("torch")),
            cell(get("torch_bf16")),
            cell(get("ort")),
            ratio(f32_, get("torch")),
            ratio(f32_, get("ort")),
            ratio(bf16, get("torch_bf16")),
            ratio(bf16, get("ort")),
        );
    }
    // Accuracy of reduced precision: cosine of (c) embeddings to berth f32.
    p.model.set_precision(Precision::F32)?;
    let reference = embed_all(&p, &texts, pooling)?;
    for &mode in &modes[1..] {
        p.model.set_precision(mode)?;
        let (mean, min) = cosine_stats(&reference, &embed_all(&p, &texts, pooling)?);
        println!("berth {mode:?} vs f32 on (c): mean cosine {mean:.6}, lowest {min:.6}");
    }
    if let Some(v) = peer.get("versions") {
        println!("peers: {v}");
    }
    Ok(())
}
