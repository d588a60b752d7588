//! Helpers shared by the end-to-end test binaries.
#![allow(dead_code)] // each test binary uses its own subset
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
