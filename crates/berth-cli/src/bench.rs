//! `berth bench`: berth against PyTorch eager and ONNX Runtime fp32 in the same run.
//!
//! Workloads (all-MiniLM-L6-v2 by default):
//!   a. 32 sequences x 128 tokens (encoder only, synthetic ids)
//!   b. 1 sequence x 16 tokens (encoder only, synthetic ids)
//!   c. N real texts of mixed length (questions, SST-2 sentences and SQuAD paragraphs from
//!      the shared datasets) embedded end to end (tokenize, encode, pool, normalise) in
//!      batches of 32 in file order. berth packs each batch; the peers pad it to its
//!      longest member, as they must.
//! Peers run in scripts/bench_peers.py with the same thread count; missing peers are "n/a".
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use berth_model::Batch;
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

fn embed_all(p: &Pipeline, texts: &[String], pooling: Pooling) -> anyhow::Result<usize> {
    let h = p.model.config.hidden_size;
    let mut n = 0;
    for chunk in texts.chunks(32) {
        let encs = p.encode(chunk, 0)?;
        let (batch, hidden) = p.run(&encs)?;
        for mut v in pool(&hidden.flatten_all()?.to_vec1::<f32>()?, h, &batch, pooling) {
            normalize(&mut v);
            n += 1;
        }
    }
    Ok(n)
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
    let texts = mixed_texts(&data, a.sentences)
        .with_context(|| format!("workload (c) needs {} (pass --data DIR)", data.display()))?;
    let encs = p.encode(&texts, 0)?;
    let real: usize = encs.iter().map(|e| e.ids.len()).sum();
    let padded: usize = encs
        .chunks(32)
        .map(|c| c.len() * c.iter().map(|e| e.ids.len()).max().unwrap_or(0))
        .sum();

    eprintln!("berth: {} ({} threads); (c) {} texts, {real} real tokens, {padded} when padded per batch of 32 ({:.0} % real)",
        dir.display(), threads, texts.len(), 100.0 * real as f64 / padded as f64);
    let forward = |seqs: &Vec<Vec<u32>>| {
        let batch = Batch::from_sequences(seqs.iter().map(|s| (s.as_slice(), &[][..])))?;
        p.model.forward(&batch)?;
        Ok(())
    };
    let pooling = st.map_or(Pooling::Cls, |c| c.pooling);
    let measure = || -> anyhow::Result<[f64; 3]> {
        Ok([
            rate(a.seconds, || forward(&wa))? * 32.0,
            rate(a.seconds, || forward(&wb))?,
            rate(0.0, || embed_all(&p, &texts, pooling).map(|_| ()))? * texts.len() as f64,
        ])
    };
    let before = measure()?;
    let spec = serde_json::json!({"a": wa, "b": wb, "c": texts, "max_length": p.max_length,
        "seconds": a.seconds, "threads": threads});
    let peer = if a.no_peers {
        serde_json::json!({})
    } else {
        peers(&a, &dir, &spec)?
    };
    // Shared machines drift: berth is measured before and after the peers and the mean is
    // reported, so a slow or fast phase does not favour either side.
    let ours = if a.no_peers {
        before
    } else {
        let after = measure()?;
        eprintln!("berth before peers {before:.1?}, after {after:.1?} seq/s");
        [0, 1, 2].map(|i| (before[i] + after[i]) / 2.0)
    };

    println!("| workload | berth seq/s | PyTorch seq/s | ORT fp32 seq/s | berth / PyTorch | berth / ORT |");
    println!("|---|---|---|---|---|---|");
    let names = [
        "(a) 32 x 128",
        "(b) 1 x 16",
        &format!("(c) {} mixed texts, batches of 32", texts.len()),
    ];
    for (i, key) in ["a", "b", "c"].iter().enumerate() {
        let get = |peer_name: &str| peer[peer_name][key].as_f64();
        let cell = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
        let ratio =
            |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.2}x", ours[i] / v));
        println!(
            "| {} | {:.1} | {} | {} | {} | {} |",
            names[i],
            ours[i],
            cell(get("torch")),
            cell(get("ort")),
            ratio(get("torch")),
            ratio(get("ort"))
        );
    }
    if let Some(v) = peer.get("versions") {
        println!("peers: {v}");
    }
    Ok(())
}
