//! Helpers shared by the end-to-end test binaries.
#![allow(dead_code)] // each test binary uses its own subset
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn task_model(name: &str) -> String {
    root()
        .join("fixtures/tasks")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

pub fn tiny(name: &str) -> String {
    root()
        .join("fixtures/tiny")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// `berth` with a private, empty cache so tests never depend on the user's.
pub fn berth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .output()
        .expect("berth runs")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "berth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// Asserts a clean failure: non-zero exit, one `error:` line mentioning each of `needles`.
pub fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "error line lacks {n:?}: {line}");
    }
}

pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is JSON"))
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn minilm_dir() -> PathBuf {
    let cache = std::env::var_os("BERTH_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cache"));
            base.join("berth")
        });
    let dir = cache.join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 missing at {}: run scripts/fetch-assets",
        dir.display()
    );
    dir
}

/// A copy of the model directory `from`, changed by `edit`.
pub fn broken_copy(from: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    edit(tmp.path());
    tmp
}

/// Every tensor of a checkpoint's `model.safetensors`, sorted by name.
pub fn weights(ckpt: &Path) -> Vec<(String, Vec<f32>)> {
    let t =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `berth data prepare` of `corpus` with `tokenizer` into `out` (sequences of 32 tokens,
/// `val_fraction` held out).
pub fn prepare(tokenizer: &str, corpus: &Path, out: &Path, val_fraction: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "data",
            "prepare",
            "--max-length",
            "32",
            "--tokenizer",
            tokenizer,
        ])
        .args(["--val-fraction", val_fraction, "--output"])
        .arg(out)
        .arg(corpus)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny BERT for pretraining tests: 2 layers, 64 hidden, 2 heads, sequences of 64 tokens.
pub const TINY_BERT: [&str; 10] = [
    "--layers",
    "2",
    "--hidden",
    "64",
    "--heads",
    "2",
    "--intermediate",
    "128",
    "--max-length",
    "64",
];

pub const WORDS: [&str; 12] = [
    "the", "quick", "brown", "fox", "lazy", "dog", "hello", "world", "who", "is", "there", "not",
];

/// A small labelled TSV: the label depends on which words a sentence holds, so it is learnable.
pub fn write_data(dir: &Path, n: usize, seed: usize) -> PathBuf {
    let mut lines = vec!["sentence\tlabel".to_string()];
    for i in 0..n {
        let k = (i * 7 + seed) % 5 + 2;
        let words: Vec<&str> = (0..k)
            .map(|j| WORDS[(i * 3 + j * 5 + seed) % WORDS.len()])
            .collect();
        let label = if words.contains(&"dog") || words.contains(&"fox") {
            "animal"
        } else {
            "other"
        };
        lines.push(format!("{}\t{label}", words.join(" ")));
    }
    let p = dir.join(format!("data-{n}-{seed}.tsv"));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// `berth finetune --task classify` of `model` on a TSV pair, batch 4, 3 epochs at lr 1e-3
/// unless `extra` says otherwise.
pub fn finetune_classify(
    model: &str,
    out: &Path,
    train: &Path,
    dev: &Path,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args([
        "--threads",
        "2",
        "finetune",
        "--task",
        "classify",
        "--model",
        model,
        "--train",
    ])
    .arg(train)
    .arg("--dev")
    .arg(dev)
    .arg("--output")
    .arg(out)
    .args(["--batch-size", "4", "--warmup", "0.1"])
    .args(extra);
    if !extra.contains(&"--epochs") {
        c.args(["--epochs", "3"]);
    }
    if !extra.contains(&"--lr") {
        c.args(["--lr", "1e-3"]);
    }
    c
}

/// The (loss, lr, grad_norm) of every logged step, and the evaluations.
pub fn curve(run: &Path) -> Vec<(Value, Value, Value, Value)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].clone(),
                v["loss"].clone(),
                v["grad_norm"].clone(),
                v["eval"].clone(),
            )
        })
        .collect()
}

pub fn last_checkpoint(run: &Path) -> PathBuf {
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|s| (s, e.path()))
        })
        .collect();
    all.sort();
    all.pop().expect("a checkpoint").1
}

/// Runs `run(out, extra)` to the end with `--save-every 2`, then again SIGKILLed once its
/// third checkpoint exists and resumed with `--resume`: both end on the same weights.
pub fn killed_run_resumes_exactly(tmp: &Path, run: impl Fn(&Path, &[&str]) -> Command) {
    let full = tmp.join("full");
    ok(&run(&full, &["--save-every", "2"]).output().unwrap());
    let killed = tmp.join("killed");
    let mut child = run(&killed, &["--save-every", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL once a few checkpoints exist, wherever the run then is.
    let start = std::time::Instant::now();
    while !killed.join("checkpoints/step-6").is_dir() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let resumed = run(&killed, &["--save-every", "2", "--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&resumed.stderr).into_owned();
    ok(&resumed);
    if still_running {
        assert!(err.contains("resuming at step"), "{err}");
    }
    assert_eq!(
        weights(&last_checkpoint(&killed)),
        weights(&last_checkpoint(&full)),
        "resumed run ends elsewhere"
    );
}

/// A SQuAD v1.1 file of `n` one-question paragraphs (with `break_one`, the second answer's
/// offset is off by one).
pub fn write_squad(dir: &Path, name: &str, n: usize, break_one: bool) -> PathBuf {
    let subjects = ["the dog", "the fox", "berth", "the world", "café naïve"];
    let mut qas_paras = Vec::new();
    for i in 0..n {
        let subject = subjects[i % subjects.len()];
        let filler = WORDS[(i * 5) % WORDS.len()];
        let context = format!(
            "hello {filler} world, this is a tiny corpus. {subject} is there, and {filler} is not."
        );
        let start = context[..context.find(subject).unwrap()].chars().count();
        let start = if break_one && i == 1 {
            start + 1
        } else {
            start
        };
        qas_paras.push(serde_json::json!({
            "context": context,
            "qas": [{"id": format!("q{i}"), "question": "who is there?", "answers": [{"text": subject, "answer_start": start}]}]
        }));
    }
    let p = dir.join(name);
    std::fs::write(
        &p,
        serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": qas_paras}]})
            .to_string(),
    )
    .unwrap();
    p
}
