//! `berth bench train`: training throughput against PyTorch run as experts run it, in the
//! same run, one after the other on the same threads:
//!   1. fine-tuning all-MiniLM-L6-v2 for sequence classification on the first N SST-2 rows
//!      (1 epoch, batch 32, lr 5e-5, max length 128, seed 42): `berth finetune` against the
//!      Hugging Face Trainer with `group_by_length` (batches of similar lengths, so little
//!      padding) via scripts/train_peer.py; real (unpadded) tokens/s and dev accuracy;
//!   2. MLM pretraining of a 4-layer, 256-wide BERT on pd-books (scripts/pretrain_peer.py):
//!      `berth pretrain` against BertForMaskedLM with its prediction head run only at the
//!      masked positions; real tokens/s and the held-out loss both models get from the
//!      same scorer.
//! berth's tokens/s is the harmonic mean of its logged windows (equal step counts, so
//! roughly equal tokens: total tokens over total time), dev evaluation excluded as the
//! Trainer's `train_runtime` excludes it. Each part also gives the sides' useful GFLOP/s
//! (three times the forward's products per real token) and berth's fraction of its own
//! matrix-product peak in that precision, measured in the same run on the same threads.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use crate::resolve;

/// Arguments of `berth bench train`.
#[derive(Args)]
pub struct TrainBenchArgs {
    /// Model fine-tuned in part 1 (default: all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// Datasets folder (default: $BERTH_DATASETS or ../shared/datasets).
    #[arg(long)]
    data: Option<PathBuf>,
    /// SST-2 training rows in part 1.
    #[arg(long, default_value_t = 8000)]
    rows: usize,
    /// Pretraining steps in part 2 (0 skips it).
    #[arg(long, default_value_t = 300)]
    pretrain_steps: usize,
    /// Skip part 1.
    #[arg(long)]
    no_finetune: bool,
    /// Rounds of part 1, each berth then the Trainer; the table gives every round and the
    /// median ratio. On a machine whose speed drifts between runs (shared vCPUs), one pair
    /// can land 10 % either way; alternating rounds puts both sides through the same drift.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also compare in bf16: `berth finetune --dtype bf16` against the Trainer with bf16
    /// autocast, and pretraining with `--dtype bf16` against PyTorch under autocast (berth's
    /// side needs AMX or AVX-512; without them only the Trainer's bf16 row runs, for
    /// reference).
    #[arg(long, alias = "peer-bf16")]
    bf16: bool,
    /// Worker threads for every side.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Python interpreter with torch / transformers / accelerate for the peers.
    #[arg(long, default_value = "python3")]
    python: String,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name)
}

/// Runs `cmd`, its stderr passed through; stdout returned.
fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `--model M --train T --dev D`, as both sides take them.
fn data_args<'a>(model: &'a Path, train: &'a Path, dev: &'a Path) -> [&'a std::ffi::OsStr; 6] {
    [
        "--model".as_ref(),
        model.as_os_str(),
        "--train".as_ref(),
        train.as_os_str(),
        "--dev".as_ref(),
        dev.as_os_str(),
    ]
}

/// berth's fine-tuning: (tokens/s, dev accuracy).
fn berth_finetune(
    a: &TrainBenchArgs,
    model: &Path,
    train: &Path,
    dev: &Path,
    out: &Path,
    dtype: &str,
) -> anyhow::Result<(f64, f64)> {
    let exe = std::env::current_exe().context("cannot find the berth executable")?;
    let _ = std::fs::remove_dir_all(out);
    output(
        Command::new(exe)
            .args([
                "--threads",
                &a.threads.to_string(),
                "finetune",
                "--task",
                "classify",
            ])
            .args(data_args(model, train, dev))
            .arg("--output")
            .arg(out)
            .args(["--epochs", "1", "--batch-size", "32", "--lr", "5e-5"])
            .args(["--max-length", "128", "--seed", "42", "--log-every", "10"])
            .args(["--dtype", dtype]),
        "berth finetune",
    )?;
    let metrics = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("{}: cannot read", metrics.display()))?;
    let rows: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| metrics.display().to_string())?;
    let rates: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["tokens_per_s"].as_f64())
        .collect();
    let accuracy = rows
        .iter()
        .rev()
        .find_map(|r| r["eval"]["accuracy"].as_f64())
        .context("berth finetune logged no dev accuracy")?;
    if rates.is_empty() {
        bail!("{}: no throughput logged", metrics.display());
    }
    let harmonic = rates.len() as f64 / rates.iter().map(|r| 1.0 / r).sum::<f64>();
    let _ = std::fs::remove_dir_all(out);
    Ok((harmonic, accuracy))
}

/// The Trainer with length grouping: (tokens/s, dev accuracy).
fn trainer(
    a: &TrainBenchArgs,
    model: &Path,
    train: &Path,
    dev: &Path,
    bf16: bool,
) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new(&a.python);
    cmd.arg(script("train_peer.py"))
        .args([
            "--task",
            "classify",
            "--group-by-length",
            "--log-every",
            "1000",
        ])
        .args(data_args(model, train, dev))
        .args(["--threads", &a.threads.to_string()]);
    if bf16 {
        cmd.arg("--bf16");
    }
    let out = output(&mut cmd, "scripts/train_peer.py")?;
    let last = out.lines().last().unwrap_or("{}");
    let v: Value = serde_json::from_str(last).context("train_peer.py output is not JSON")?;
    Ok((
        v["tokens_per_s"].as_f64().context("no tokens_per_s")?,
        v["eval_accuracy"].as_f64().context("no eval_accuracy")?,
    ))
}

/// Useful work per real token of fine-tuning `model` on the TSV `rows` (a header with a
/// `sentence` column first): three times the encoder's forward products (the backward
/// computes two products per forward one) over the sequences the rows encode to (at most 128
/// tokens), and the encoder's config. The pooler, classifier, embeddings, LayerNorm and
/// softmax are not counted; nor is padding, which berth does not compute and the Trainer's
/// length grouping keeps small.
fn finetune_flops_per_token(
    model: &Path,
    rows: &[&str],
) -> anyhow::Result<(f64, berth_model::EncoderConfig)> {
    let config = model.join("config.json");
    let cfg = berth_model::EncoderConfig::from_file(&config)?;
    let tok = berth_text::TextTokenizer::from_dir(model)?;
    let column = rows
        .first()
        .and_then(|h| h.split('\t').position(|c| c == "sentence"))
        .context("SST-2 train.tsv: no sentence column in its header")?;
    let (mut flops, mut tokens) = (0f64, 0usize);
    for (i, row) in rows.iter().enumerate().skip(1) {
        let text = row.split('\t').nth(column).unwrap_or_default();
        let enc = tok.encode(text, None, 128, berth_text::Truncation::Truncate, i)?;
        flops += 3.0 * crate::bench::encoder_flops(&cfg, enc.ids.len());
        tokens += enc.ids.len();
    }
    if tokens == 0 {
        bail!("SST-2 train.tsv: no rows to fine-tune on");
    }
    Ok((flops / tokens as f64, cfg))
}

/// berth's matrix-product peak in `mode` on `threads` threads for a `hidden → intermediate`
/// layer (the reference for "fraction of peak"), GFLOP/s: the best of 32 products, as this
/// machine's speed drifts (callers also take the better of a measurement before and after
/// the runs).
fn peak(mode: berth_model::Precision, threads: usize, cfg: (usize, usize)) -> anyhow::Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    Ok(pool.install(|| crate::bench::matmul_peak(mode, cfg.0, cfg.1, 32)))
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let h = v.len() / 2;
    if v.len() % 2 == 1 {
        v[h]
    } else {
        (v[h - 1] + v[h]) / 2.0
    }
}

pub fn run(a: TrainBenchArgs) -> anyhow::Result<()> {
    // berth's bf16 side runs only where the CPU has a bf16 product.
    let berth_bf16 = a.bf16 && berth_kernels::amx::bf16_available();
    let data = a
        .data
        .clone()
        .or_else(|| std::env::var_os("BERTH_DATASETS").map(PathBuf::from))
        .unwrap_or_else(|| "../shared/datasets".into());
    if !a.no_finetune {
        if a.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        let model = resolve::model_dir(a.model.as_deref())?;
        let source = data.join("sst2/train.tsv");
        let text = std::fs::read_to_string(&source)
            .with_context(|| format!("{}: cannot read (pass --data DIR)", source.display()))?;
        let tmp = std::env::temp_dir().join(format!("berth-bench-train-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let train = tmp.join("train.tsv");
        let rows: Vec<&str> = text.lines().take(a.rows + 1).collect();
        std::fs::write(&train, rows.join("\n") + "\n")?;
        let (per_token, cfg) = finetune_flops_per_token(&model, &rows)?;
        let dev = data.join("sst2/dev.tsv");
        eprintln!(
            "fine-tuning {} on {} SST-2 rows, {} threads, {} round(s): berth, then the Trainer (group_by_length)",
            model.display(),
            rows.len() - 1,
            a.threads,
            a.rounds
        );
        // Each precision's matmul peak is taken before the runs and again after them, and
        // the better kept: one measurement at a slow moment of a drifting machine made the
        // fraction of peak read above 100 %.
        let layer = (cfg.hidden_size, cfg.intermediate_size);
        let f32_peak_before = peak(berth_model::Precision::F32, a.threads, layer)?;
        let bf16_peak_before = if berth_bf16 {
            peak(berth_model::Precision::Bf16, a.threads, layer)?
        } else {
            0.0
        };
        let mut results = Vec::with_capacity(a.rounds);
        for _ in 0..a.rounds {
            let ours = berth_finetune(&a, &model, &train, &dev, &tmp.join("run"), "f32")?;
            let peer = trainer(&a, &model, &train, &dev, false)?;
            results.push((ours, peer));
        }
        let ours_bf16 = if berth_bf16 {
            Some(berth_finetune(
                &a,
                &model,
                &train,
                &dev,
                &tmp.join("run"),
                "bf16",
            )?)
        } else {
            None
        };
        let peer_bf16 = if a.bf16 {
            Some(trainer(&a, &model, &train, &dev, true)?)
        } else {
            None
        };
        let _ = std::fs::remove_dir_all(&tmp);
        println!("fine-tuning, real tokens/s (dev accuracy)");
        println!("| side | tokens/s | dev accuracy | berth / side |");
        println!("|---|---|---|---|");
        for (round, (ours, peer)) in results.iter().enumerate() {
            let label = if results.len() > 1 {
                format!(" (round {})", round + 1)
            } else {
                String::new()
            };
            println!(
                "| berth f32{label} | {:.0} | {:.4} | 1.00x |",
                ours.0, ours.1
            );
            println!(
                "| Trainer f32, group_by_length{label} | {:.0} | {:.4} | {:.2}x |",
                peer.0,
                peer.1,
                ours.0 / peer.0
            );
        }
        let ratios: Vec<f64> = results.iter().map(|(o, p)| o.0 / p.0).collect();
        if ratios.len() > 1 {
            let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "| median berth / Trainer f32 over {} rounds ({}) | | | {:.2}x |",
                ratios.len(),
                list.join(", "),
                median(&ratios)
            );
        }
        let berth_rates: Vec<f64> = results.iter().map(|(o, _)| o.0).collect();
        let ours = (median(&berth_rates), results[0].0 .1);
        let f32_peak = peak(berth_model::Precision::F32, a.threads, layer)?.max(f32_peak_before);
        let peer_rates: Vec<f64> = results.iter().map(|(_, p)| p.0).collect();
        let gflops = |tokens_per_s: f64| tokens_per_s * per_token / 1e9;
        println!(
            "useful work {:.2} MFLOP per real token (3 x the encoder's forward products); \
             medians: berth f32 {:.1} GFLOP/s ({:.0} % of berth's f32 matmul peak, {f32_peak:.0}), \
             Trainer f32 {:.1} GFLOP/s",
            per_token / 1e6,
            gflops(ours.0),
            100.0 * gflops(ours.0) / f32_peak,
            gflops(median(&peer_rates)),
        );
        if let Some(p) = peer_bf16 {
            // berth bf16 against the Trainer's bf16 when berth ran it, else berth f32.
            let (side, mine) = match ours_bf16 {
                Some(b) => ("berth bf16", b),
                None => ("berth f32", ours),
            };
            if let Some(b) = ours_bf16 {
                println!("| berth bf16 | {:.0} | {:.4} | - |", b.0, b.1);
                let bf16_peak =
                    peak(berth_model::Precision::Bf16, a.threads, layer)?.max(bf16_peak_before);
                println!(
                    "berth bf16 {:.1} GFLOP/s ({:.0} % of berth's bf16 matmul peak, {bf16_peak:.0})",
                    gflops(b.0),
                    100.0 * gflops(b.0) / bf16_peak
                );
            }
            println!(
                "| Trainer bf16 autocast, group_by_length | {:.0} | {:.4} | {:.2}x ({side}) |",
                p.0,
                p.1,
                mine.0 / p.0
            );
        }
    }
    if a.pretrain_steps > 0 {
        eprintln!("pretraining: scripts/pretrain_peer.py --corpus books --head sparse");
        // The script's model: 4 layers, 256 wide, feed-forward 1024.
        let mode = if berth_bf16 {
            berth_model::Precision::Bf16
        } else {
            berth_model::Precision::F32
        };
        let pretrain_peak = peak(mode, a.threads, (256, 1024))?;
        let out = output(
            Command::new(&a.python)
                .arg(script("pretrain_peer.py"))
                .args(["--corpus", "books", "--head", "sparse"])
                .args(["--steps", &a.pretrain_steps.to_string()])
                .args(["--peak", &format!("{pretrain_peak:.1}")])
                .args(berth_bf16.then_some("--bf16")),
            "scripts/pretrain_peer.py",
        )?;
        println!("\nMLM pretraining, 4 layers x 256, batch 32 x 128, pd-books");
        print!("{out}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[1.6, 1.3, 1.5]), 1.5);
        assert_eq!(median(&[1.0, 4.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[1.2]), 1.2);
    }
}
