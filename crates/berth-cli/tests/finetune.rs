//! `berth finetune` end to end on a tiny checkpoint: reproducible runs, a SIGKILLed run
//! resumed to the same weights, checkpoints in the Hugging Face layout, and bad input.
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

fn finetune(out: &Path, train: &Path, dev: &Path, extra: &[&str]) -> Command {
    finetune_classify(&tiny("bert-base"), out, train, dev, extra)
}

#[test]
fn the_same_seed_gives_the_same_run_and_the_model_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 48, 0), write_data(tmp.path(), 16, 1));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(
        &finetune(&a, &train, &dev, &["--log-every", "1", "--epochs", "8"])
            .output()
            .unwrap(),
    );
    ok(
        &finetune(&b, &train, &dev, &["--log-every", "1", "--epochs", "8"])
            .output()
            .unwrap(),
    );
    let (ca, cb) = (curve(&a), curve(&b));
    assert!(ca.len() > 30, "{} log lines", ca.len());
    assert_eq!(ca, cb, "two runs with the same seed differ");
    assert_eq!(weights(&last_checkpoint(&a)), weights(&last_checkpoint(&b)));
    // Another seed is another run.
    let c = tmp.path().join("c");
    ok(&finetune(
        &c,
        &train,
        &dev,
        &["--log-every", "1", "--epochs", "8", "--seed", "7"],
    )
    .output()
    .unwrap());
    assert_ne!(curve(&c), ca);
    // It learns: the mean loss of the last epoch is well below the first's.
    let losses: Vec<f64> = ca.iter().filter_map(|c| c.1.as_f64()).collect();
    let (first, last) = (
        losses[..12].iter().sum::<f64>() / 12.0,
        losses[losses.len() - 12..].iter().sum::<f64>() / 12.0,
    );
    assert!(last < 0.7 * first, "loss went from {first} to {last}");
    let best_dev = ca
        .iter()
        .filter_map(|c| c.3["accuracy"].as_f64())
        .fold(0.0, f64::max);
    assert!(
        best_dev >= 0.75,
        "dev accuracy never passed {best_dev} (chance is 0.5)"
    );
    assert!(
        a.join("curve.png").is_file()
            && std::fs::read(a.join("curve.png"))
                .unwrap()
                .starts_with(b"\x89PNG")
    );
}

/// `--dtype bf16`: where the CPU has a bf16 product, the run learns as the f32 run does
/// (its own curve, close to f32's) and saves f32 weights; elsewhere it is refused before
/// anything is written.
#[test]
fn bf16_training_learns_like_f32_or_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 48, 0), write_data(tmp.path(), 16, 1));
    let (a, b) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    let args = ["--log-every", "1", "--epochs", "8"];
    let bf16 = finetune(
        &b,
        &train,
        &dev,
        &[&args[..], &["--dtype", "bf16"]].concat(),
    )
    .output()
    .unwrap();
    if !berth_kernels::amx::bf16_available() {
        fails_with(&bf16, &["--dtype bf16", "AVX-512", "--dtype f32"]);
        assert!(
            !b.join("config.json").exists(),
            "a refused run wrote its config"
        );
        return;
    }
    ok(&bf16);
    ok(&finetune(&a, &train, &dev, &args).output().unwrap());
    let loss =
        |run: &Path| -> Vec<f64> { curve(run).iter().filter_map(|c| c.1.as_f64()).collect() };
    let (lf, lb) = (loss(&a), loss(&b));
    assert_eq!(lf.len(), lb.len());
    assert_ne!(lf, lb, "bf16 products gave the f32 run's curve");
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&lb[..12]), mean(&lb[lb.len() - 12..]));
    assert!(last < 0.7 * first, "bf16 loss went from {first} to {last}");
    let f32_last = mean(&lf[lf.len() - 12..]);
    assert!(
        (last - f32_last).abs() < 0.1 * first,
        "last-12-step loss bf16 {last} vs f32 {f32_last} (first {first})"
    );
    let saved = read_json(&b.join("config.json"));
    assert_eq!(saved["loop"]["dtype"], "bf16");
    let ckpt = last_checkpoint(&b);
    let st = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    for (k, t) in header.as_object().unwrap() {
        if k != "__metadata__" {
            assert_eq!(t["dtype"], "F32", "{k} is saved as {}", t["dtype"]);
        }
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 80, 2), write_data(tmp.path(), 8, 3));
    killed_run_resumes_exactly(tmp.path(), |out, extra| finetune(out, &train, &dev, extra));
}

#[test]
fn checkpoints_use_the_hugging_face_layout_and_load_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 24, 4), write_data(tmp.path(), 8, 5));
    let run = tmp.path().join("run");
    let out = finetune(&run, &train, &dev, &["--epochs", "1"])
        .output()
        .unwrap();
    let best = PathBuf::from(ok(&out).trim());
    // Same parameter names and shapes as transformers' BertForSequenceClassification.
    let reference = candle_core::safetensors::load(
        root().join("fixtures/tiny/bert-seqcls/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let ours =
        candle_core::safetensors::load(best.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let shape =
        |m: &std::collections::HashMap<String, candle_core::Tensor>, k: &str| m[k].dims().to_vec();
    let mut names: Vec<&String> = reference
        .keys()
        .filter(|k| !k.starts_with("classifier."))
        .collect();
    names.sort();
    for k in names {
        assert_eq!(shape(&ours, k), shape(&reference, k), "{k}");
    }
    assert_eq!(shape(&ours, "classifier.weight"), vec![2, 32]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "animal", "1": "other"})
    );
    for f in [
        "tokenizer.json",
        "vocab.txt",
        "trainer_state.json",
        "optimizer.safetensors",
    ] {
        assert!(best.join(f).is_file(), "{f} missing");
    }
    // berth classify reads it back.
    let got = json_lines(&ok(&berth(&[
        "classify",
        "--model",
        &best.to_string_lossy(),
        "the lazy dog",
    ])));
    assert!(["animal", "other"].contains(&got[0]["labels"][0]["label"].as_str().unwrap()));
    let run_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    // The run's config: the loop's settings and the task's, apart.
    assert_eq!(run_cfg["loop"]["batch_size"], 4);
    assert_eq!(run_cfg["task"]["task"], "classify");
    // The default 128 shrinks to the tiny model's 64 positions.
    assert_eq!(run_cfg["task"]["data"]["max_length"], 64);
    assert_eq!(run_cfg["task"]["label_column"], "label");
}

#[test]
fn bad_training_input_fails_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = write_data(tmp.path(), 8, 6);
    let run = tmp.path().join("run");
    let empty = tmp.path().join("empty.tsv");
    std::fs::write(&empty, "").unwrap();
    fails_with(
        &finetune(&run, &empty, &dev, &[]).output().unwrap(),
        &["empty.tsv", "empty file"],
    );
    let no_label = tmp.path().join("nolabel.tsv");
    std::fs::write(&no_label, "sentence\ttarget\nthe dog\t1\n").unwrap();
    fails_with(
        &finetune(&run, &no_label, &dev, &[]).output().unwrap(),
        &["nolabel.tsv:1", "no column \"label\""],
    );
    let train = write_data(tmp.path(), 16, 7);
    let odd_dev = tmp.path().join("odd.tsv");
    std::fs::write(
        &odd_dev,
        "sentence\tlabel\nthe dog\tanimal\nhello\tunknown\n",
    )
    .unwrap();
    fails_with(
        &finetune(&run, &train, &odd_dev, &[]).output().unwrap(),
        &["odd.tsv:3", "\"unknown\"", "training data"],
    );
    let conll = tmp.path().join("broken.conll");
    std::fs::write(&conll, "EU B-ORG\nrejects O\n\nPeter B-PER I-PER\n").unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args([
        "finetune",
        "--task",
        "ner",
        "--model",
        &tiny("bert-base"),
        "--output",
    ])
    .arg(&run)
    .arg("--train")
    .arg(&conll);
    fails_with(&c.output().unwrap(), &["broken.conll:4", "3 columns"]);
    // An output path that is a file.
    let file = tmp.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    fails_with(
        &finetune(&file, &train, &dev, &[]).output().unwrap(),
        &["afile"],
    );
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_one_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 16, 8), write_data(tmp.path(), 8, 9));
    let run = tmp.path().join("run");
    ok(&finetune(&run, &train, &dev, &["--epochs", "1"])
        .output()
        .unwrap());
    let before = last_checkpoint(&run);
    let saved = weights(&before);
    // Resume for more epochs with files capped at 64 KiB: the next model.safetensors write
    // fails (EFBIG, SIGXFSZ ignored) like a full disk would.
    let cmd = finetune(&run, &train, &dev, &["--epochs", "2", "--resume"]);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' {}",
        env!("CARGO_BIN_EXE_berth"),
        args.join(" ")
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    fails_with(&out, &["model.safetensors"]);
    assert_eq!(
        last_checkpoint(&run),
        before,
        "a partial checkpoint was left as the newest"
    );
    assert_eq!(weights(&before), saved);
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().ends_with(".tmp")),
        "{leftovers:?}"
    );
    // And it still resumes once writes work again.
    ok(
        &finetune(&run, &train, &dev, &["--epochs", "2", "--resume"])
            .output()
            .unwrap(),
    );
}

/// A small SQuAD file: each context holds its answer at the stated character offset.
#[test]
fn question_answering_fine_tunes_and_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (
        write_squad(tmp.path(), "train.json", 40, false),
        write_squad(tmp.path(), "dev.json", 10, false),
    );
    let run = tmp.path().join("qa");
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args([
        "finetune",
        "--task",
        "qa",
        "--model",
        &tiny("bert-base"),
        "--max-length",
        "24",
        "--doc-stride",
        "6",
    ])
    .args([
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--epochs",
        "6",
        "--train",
    ])
    .arg(&train)
    .arg("--dev")
    .arg(&dev)
    .arg("--output")
    .arg(&run);
    let best = PathBuf::from(ok(&c.output().unwrap()).trim());
    let evals: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    assert_eq!(evals.len(), 6);
    let f1: Vec<f64> = evals
        .iter()
        .map(|e| e["eval"]["f1"].as_f64().unwrap())
        .collect();
    assert!(
        f1.iter().cloned().fold(0.0, f64::max) > f1[0] + 0.10 || f1[0] > 0.80,
        "dev F1 did not improve: {f1:?}"
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForQuestionAnswering");
    let got = json_lines(&ok(&berth(&[
        "qa",
        "--model",
        &best.to_string_lossy(),
        "--question",
        "who is there?",
        "--context",
        "hello world. the fox is there.",
    ])));
    assert!(got[0]["answers"][0]["answer"].is_string());
    // A SQuAD answer not at its stated offset names the question.
    let broken = write_squad(tmp.path(), "broken.json", 4, true);
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args([
        "finetune",
        "--task",
        "qa",
        "--model",
        &tiny("bert-base"),
        "--train",
    ])
    .arg(&broken)
    .arg("--output")
    .arg(tmp.path().join("x"));
    fails_with(
        &c.output().unwrap(),
        &["broken.json", "question q1", "not at character"],
    );
}

#[test]
fn early_stopping_ends_the_run_when_dev_stops_improving() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (
        write_data(tmp.path(), 48, 10),
        write_data(tmp.path(), 8, 11),
    );
    let run = tmp.path().join("run");
    // Learning rate 0: the dev score never improves after the first evaluation.
    ok(&finetune(
        &run,
        &train,
        &dev,
        &[
            "--lr",
            "0",
            "--save-every",
            "2",
            "--early-stopping",
            "2",
            "--log-every",
            "1",
        ],
    )
    .output()
    .unwrap());
    let steps: Vec<u64> = curve(&run).iter().filter_map(|c| c.0.as_u64()).collect();
    assert_eq!(steps.iter().max(), Some(&6), "stopped at {steps:?}");
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Runs `berth finetune` on the tiny BERT with `args` (task, data, ...) into `out`.
fn finetune_task(out: &Path, args: &[&str]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args([
        "--threads",
        "2",
        "finetune",
        "--model",
        &tiny("bert-base"),
        "--max-length",
        "64",
    ])
    .arg("--output")
    .arg(out)
    .args(args);
    ok(&c.output().unwrap())
}

/// The dev metrics a run logged for checkpoint `ckpt` (`.../step-N`).
fn eval_of(run: &Path, ckpt: &Path) -> Value {
    let step: u64 = ckpt.file_name().unwrap().to_str().unwrap()["step-".len()..]
        .parse()
        .unwrap();
    curve(run)
        .into_iter()
        .find(|c| !c.3.is_null() && c.0.as_u64() == Some(step))
        .unwrap()
        .3
}

/// `berth eval --model CKPT --data FILE` must report what the run's own evaluation logged
/// for that checkpoint (same code, same numbers).
fn eval_matches_run(task: &str, ckpt: &Path, data: &Path, extra: &[&str], logged: &Value) {
    let mut args = vec!["eval", "--task", task, "--model", ckpt.to_str().unwrap()];
    args.extend(["--data", data.to_str().unwrap(), "--max-length", "64"]);
    args.extend(extra);
    let report: Value = serde_json::from_str(&ok(&berth(&args))).unwrap();
    for (k, v) in logged.as_object().unwrap() {
        let (a, b) = (report[k].as_f64().unwrap(), v.as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "{task} {k}: eval {a} vs run {b}"
        );
    }
}

#[test]
fn sentence_embedding_training_learns_and_saves_a_sentence_transformers_model() {
    let tmp = tempfile::tempdir().unwrap();
    // Anchor: some words; positive: the same words reversed; negative: other words.
    let rows = |n: usize, seed: usize| -> String {
        (0..n)
            .map(|i| {
                let w = |j: usize| WORDS[(i * 5 + j * 7 + seed) % WORDS.len()];
                let a: Vec<&str> = (0..4).map(w).collect();
                let p: Vec<&str> = a.iter().rev().copied().collect();
                let neg: Vec<&str> = (4..8).map(w).collect();
                serde_json::json!({"anchor": a.join(" "), "positive": p.join(" "), "negative": neg.join(" ")})
                    .to_string()
                    + "\n"
            })
            .collect()
    };
    let (train, dev) = (tmp.path().join("train.jsonl"), tmp.path().join("dev.jsonl"));
    std::fs::write(&train, rows(64, 0)).unwrap();
    std::fs::write(&dev, rows(12, 3)).unwrap();
    let run = tmp.path().join("run");
    let best = finetune_task(
        &run,
        &[
            "--task",
            "embed",
            "--train",
            train.to_str().unwrap(),
            "--dev",
            dev.to_str().unwrap(),
            "--negative-column",
            "negative",
            "--batch-size",
            "8",
            "--epochs",
            "4",
            "--lr",
            "1e-3",
            "--log-every",
            "1",
        ],
    );
    let ckpt = PathBuf::from(best.trim());
    let losses: Vec<f64> = curve(&run).iter().filter_map(|c| c.1.as_f64()).collect();
    let k = 8; // one epoch of steps
    let (first, last) = (
        losses[..k].iter().sum::<f64>() / k as f64,
        losses[losses.len() - k..].iter().sum::<f64>() / k as f64,
    );
    assert!(last < 0.7 * first, "MNRL loss went from {first} to {last}");
    // A bare encoder with sentence-transformers' module files (mean pooling).
    let config = read_json(&ckpt.join("config.json"));
    assert_eq!(config["architectures"][0], "BertModel");
    assert!(ckpt.join("modules.json").is_file() && ckpt.join("1_Pooling/config.json").is_file());
    let pooling = read_json(&ckpt.join("1_Pooling/config.json"));
    assert_eq!(pooling["pooling_mode_mean_tokens"], true);
    let out = json_lines(&ok(&berth(&[
        "embed",
        "--model",
        ckpt.to_str().unwrap(),
        "hello world",
    ])));
    assert_eq!(floats(&out[0]["embedding"]).len(), 32);
    eval_matches_run(
        "embed",
        &ckpt,
        &dev,
        &["--negative-column", "negative"],
        &eval_of(&run, &ckpt),
    );
}

#[test]
fn reranker_and_multi_label_training_save_heads_the_pipelines_use() {
    let tmp = tempfile::tempdir().unwrap();
    // Rerank: a passage is relevant when it shares the query's first word.
    let rows = |n: usize, seed: usize| -> String {
        (0..n)
            .map(|i| {
                let w = |j: usize| WORDS[(i * 5 + j * 3 + seed) % WORDS.len()];
                let q = format!("{} {}", w(0), w(1));
                let (pos, neg) = (
                    format!("{} {} {}", w(2), w(0), w(3)),
                    format!("{} {}", w(4), w(5)),
                );
                [(pos, 1), (neg, 0)]
                    .iter()
                    .map(|(p, l)| {
                        serde_json::json!({"query": q, "passage": p, "label": l}).to_string() + "\n"
                    })
                    .collect::<String>()
            })
            .collect()
    };
    let (train, dev) = (tmp.path().join("rr.jsonl"), tmp.path().join("rr-dev.jsonl"));
    std::fs::write(&train, rows(32, 0)).unwrap();
    std::fs::write(&dev, rows(8, 1)).unwrap();
    let run = tmp.path().join("rerank");
    let best = finetune_task(
        &run,
        &[
            "--task",
            "rerank",
            "--train",
            train.to_str().unwrap(),
            "--dev",
            dev.to_str().unwrap(),
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
        ],
    );
    let ckpt = PathBuf::from(best.trim());
    let config = read_json(&ckpt.join("config.json"));
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"].as_object().unwrap().len(), 1);
    let ranked = json_lines(&ok(&berth(&[
        "rerank",
        "--model",
        ckpt.to_str().unwrap(),
        "--query",
        "the fox",
        "a fox",
        "hello world",
    ])));
    assert_eq!(ranked.len(), 2);
    eval_matches_run("rerank", &ckpt, &dev, &[], &eval_of(&run, &ckpt));

    // Multi-label: "animal" when a dog or fox is named, "greeting" for hello; both or none.
    let mut lines = vec!["sentence\tlabel".to_string()];
    for i in 0..40 {
        let words: Vec<&str> = (0..4)
            .map(|j| WORDS[(i * 5 + j * 7) % WORDS.len()])
            .collect();
        let mut labels = Vec::new();
        if words.contains(&"dog") || words.contains(&"fox") {
            labels.push("animal");
        }
        if words.contains(&"hello") {
            labels.push("greeting");
        }
        lines.push(format!("{}\t{}", words.join(" "), labels.join("|")));
    }
    let data = tmp.path().join("ml.tsv");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let run = tmp.path().join("multi");
    let best = finetune_task(
        &run,
        &[
            "--task",
            "classify",
            "--multi-label",
            "--label-separator",
            "|",
            "--train",
            data.to_str().unwrap(),
            "--dev",
            data.to_str().unwrap(),
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--lr",
            "1e-3",
        ],
    );
    let ckpt = PathBuf::from(best.trim());
    let config = read_json(&ckpt.join("config.json"));
    assert_eq!(config["problem_type"], "multi_label_classification");
    assert_eq!(config["id2label"]["0"], "animal");
    assert_eq!(config["id2label"]["1"], "greeting");
    // The classify pipeline reads the problem type: independent sigmoids, not a softmax.
    let out = json_lines(&ok(&berth(&[
        "classify",
        "--model",
        ckpt.to_str().unwrap(),
        "--top-k",
        "0",
        "hello dog",
    ])));
    let scores: Vec<f64> = out[0]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 2);
    assert!(
        (scores.iter().sum::<f64>() - 1.0).abs() > 1e-6,
        "scores {scores:?} look like a softmax"
    );
    eval_matches_run(
        "classify",
        &ckpt,
        &data,
        &["--multi-label", "--label-separator", "|"],
        &eval_of(&run, &ckpt),
    );
}

/// RoBERTa NER from CoNLL's pre-split words, end to end: words are encoded as transformers
/// encodes them for token classification (each with its leading `Ġ`), labels sit on first
/// sub-tokens, and a tiny RoBERTa learns a toy tagging task to a perfect dev F1.
#[test]
fn roberta_learns_ner_from_pre_split_words() {
    let tmp = tempfile::tempdir().unwrap();
    let sentences = [
        "Peter B-PER\nlives O\nin O\nParis B-LOC\n. O\n",
        "the O\ndog O\nsees O\nMary B-PER\n. O\n",
        "Mary B-PER\nwent O\nto O\nBerlin B-LOC\n. O\n",
        "who O\nis O\nthere O\n? O\n",
    ];
    let data = |name: &str, n: usize| {
        let path = tmp.path().join(name);
        let text: Vec<&str> = (0..n).map(|i| sentences[i % sentences.len()]).collect();
        std::fs::write(&path, text.join("\n")).unwrap();
        path
    };
    let (train, dev) = (data("train.conll", 48), data("dev.conll", 8));
    let run = tmp.path().join("run");
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args(["--threads", "2", "finetune", "--task", "ner", "--model"])
        .arg(tiny("roberta-base"))
        .arg("--train")
        .arg(&train)
        .arg("--dev")
        .arg(&dev)
        .arg("--output")
        .arg(&run)
        .args([
            "--epochs",
            "8",
            "--lr",
            "5e-3",
            "--batch-size",
            "8",
            "--seed",
            "3",
        ]);
    ok(&c.output().unwrap());
    let f1 = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["eval"]["f1"].as_f64()
        })
        .fold(0.0, f64::max);
    assert!(f1 >= 0.99, "best dev entity F1 {f1}");
    let ckpt = last_checkpoint(&run);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "RobertaForTokenClassification");
}

#[test]
fn distillation_learns_from_a_teacher_and_refuses_mismatched_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 48, 0), write_data(tmp.path(), 16, 1));
    // A teacher: the tiny BERT fine-tuned on the task.
    let teacher_run = tmp.path().join("teacher");
    let teacher = PathBuf::from(
        ok(&finetune(&teacher_run, &train, &dev, &["--epochs", "6"])
            .output()
            .unwrap())
        .trim(),
    );
    let teacher_arg = teacher.to_str().unwrap();
    // A one-layer student of the two-layer model, distilled from the teacher: it learns.
    let student = tmp.path().join("student");
    let best = ok(&finetune(
        &student,
        &train,
        &dev,
        &[
            "--epochs",
            "8",
            "--log-every",
            "1",
            "--student-layers",
            "1",
            "--teacher",
            teacher_arg,
            "--distill-alpha",
            "0.7",
            "--temperature",
            "3",
        ],
    )
    .output()
    .unwrap());
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(best.trim()).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["num_hidden_layers"], 1);
    let run_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(run_cfg["task"]["distill"]["alpha"], 0.7);
    assert_eq!(run_cfg["task"]["distill"]["temperature"], 3.0);
    let losses: Vec<f64> = curve(&student)
        .iter()
        .filter_map(|c| c.1.as_f64())
        .collect();
    let (first, last) = (
        losses[..12].iter().sum::<f64>() / 12.0,
        losses[losses.len() - 12..].iter().sum::<f64>() / 12.0,
    );
    assert!(
        last < 0.7 * first,
        "distillation loss went from {first} to {last}"
    );
    // The teacher changes the loss: the same run without it differs from the first step.
    let plain = tmp.path().join("plain");
    ok(&finetune(
        &plain,
        &train,
        &dev,
        &["--epochs", "1", "--log-every", "1", "--student-layers", "1"],
    )
    .output()
    .unwrap());
    assert_ne!(curve(&plain)[0].1, curve(&student)[0].1);

    // Bad input, each refused before training with the reason.
    let refuse = |extra: &[&str], needles: &[&str]| {
        let out = tmp.path().join("refused");
        fails_with(
            &finetune(&out, &train, &dev, extra).output().unwrap(),
            needles,
        );
        assert!(!out.join("checkpoints").exists());
    };
    // Another tokenizer (RoBERTa's BPE).
    refuse(
        &["--teacher", &tiny("roberta-seqcls")],
        &["teacher", "vocabulary", "differs from the student"],
    );
    // Other labels (negative / neutral / positive).
    refuse(
        &["--teacher", &tiny("bert-seqcls")],
        &["teacher", "labels", "differ"],
    );
    // More student layers than the checkpoint has.
    refuse(
        &["--student-layers", "5"],
        &["--student-layers 5", "2 layers"],
    );
    refuse(
        &["--teacher", teacher_arg, "--distill-alpha", "1.5"],
        &["--distill-alpha 1.5"],
    );
}

/// Every file of a run directory with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Regression test for #23 (logs without a terminal; runs never mix).
#[test]
fn redirected_logs_keep_every_step_and_a_used_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 24, 0), write_data(tmp.path(), 8, 1));
    let run = tmp.path().join("run");
    // stderr is a pipe here, as with `2> log`: one line per logged step and evaluation.
    let out = finetune(&run, &train, &dev, &["--epochs", "2", "--log-every", "2"])
        .output()
        .unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let steps = err
        .lines()
        .filter(|l| l.starts_with("step ") && l.contains(" tok/s"))
        .count();
    let devs = err.lines().filter(|l| l.contains(" dev: accuracy")).count();
    assert_eq!((steps, devs), (6, 2), "{err}");
    // --log-format json: the metrics.jsonl events, one JSON object per line.
    let json_run = tmp.path().join("json");
    let out = finetune(
        &json_run,
        &train,
        &dev,
        &["--epochs", "1", "--log-format", "json"],
    )
    .output()
    .unwrap();
    ok(&out);
    let events: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logged: Vec<Value> = std::fs::read_to_string(json_run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events, logged);

    // A second run into the used folder is refused and changes nothing.
    let before = snapshot(&run);
    let again = finetune(&run, &train, &dev, &["--epochs", "2", "--lr", "2e-3"])
        .output()
        .unwrap();
    fails_with(&again, &["already holds a run", "--resume", "--overwrite"]);
    assert_eq!(snapshot(&run), before);
    // --overwrite starts clean: only the new run's lines and checkpoints.
    ok(&finetune(
        &run,
        &train,
        &dev,
        &["--epochs", "1", "--overwrite", "--log-every", "1"],
    )
    .output()
    .unwrap());
    let lines = curve(&run);
    assert_eq!(lines.iter().filter(|c| !c.3.is_null()).count(), 1);
    assert_eq!(lines.iter().filter(|c| c.1.is_number()).count(), 6);
    assert_eq!(
        std::fs::read_dir(run.join("checkpoints")).unwrap().count(),
        1
    );
    // A start that fails before step 0 leaves nothing behind to refuse.
    let fresh = tmp.path().join("fresh");
    let bad = tmp.path().join("bad.tsv");
    std::fs::write(&bad, "sentence\tlabel\nonly a sentence\n").unwrap();
    assert!(!finetune(&fresh, &bad, &dev, &[])
        .output()
        .unwrap()
        .status
        .success());
    ok(&finetune(&fresh, &train, &dev, &["--epochs", "1"])
        .output()
        .unwrap());
}

/// `--model RUN_DIR` uses the run's best checkpoint, with a note on stderr (regression
/// test for #23: it used to fail with "no model_type field").
#[test]
fn a_run_directory_resolves_to_its_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 24, 2), write_data(tmp.path(), 8, 3));
    let run = tmp.path().join("run");
    let best = ok(&finetune(&run, &train, &dev, &["--epochs", "2"])
        .output()
        .unwrap());
    let via_run = berth(&["classify", "--model", run.to_str().unwrap(), "the lazy dog"]);
    let direct = berth(&["classify", "--model", best.trim(), "the lazy dog"]);
    assert_eq!(json_lines(&ok(&via_run)), json_lines(&ok(&direct)));
    let note = String::from_utf8_lossy(&via_run.stderr);
    assert!(
        note.contains("training run") && note.contains(best.trim()),
        "{note}"
    );
}

/// `eval --model --task qa` and `berth qa` answer alike by default (the same longest answer,
/// windows and stride): scoring `berth qa`'s answers with `eval --task qa` gives the numbers
/// `eval --model` reports. Long contexts make the answer-length limit matter.
#[test]
fn qa_evaluation_and_berth_qa_share_their_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::task_model("bert-qa");
    let squad = write_squad(tmp.path(), "dev.json", 12, false);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&squad).unwrap()).unwrap();
    let mut lines = String::new();
    for p in v["data"][0]["paragraphs"].as_array().unwrap() {
        for q in p["qas"].as_array().unwrap() {
            let context = format!(
                "{} {}",
                p["context"].as_str().unwrap(),
                "and more words here ".repeat(20)
            );
            lines +=
                &(serde_json::json!({"id": q["id"], "question": q["question"], "context": context})
                    .to_string() + "\n");
        }
    }
    // The same long contexts in the SQuAD file (answers keep their offsets: text appended).
    let mut v2 = v.clone();
    for p in v2["data"][0]["paragraphs"].as_array_mut().unwrap() {
        let c = format!(
            "{} {}",
            p["context"].as_str().unwrap(),
            "and more words here ".repeat(20)
        );
        p["context"] = c.into();
    }
    std::fs::write(&squad, v2.to_string()).unwrap();
    let input = tmp.path().join("qa.jsonl");
    std::fs::write(&input, lines).unwrap();
    // The tiny model has 64 positions: both sides get that window and a stride that fits.
    let window = ["--doc-stride", "16"];
    let answers = ok(&berth(&[
        "qa",
        "--model",
        &model,
        "--input",
        input.to_str().unwrap(),
        "--max-seq-len",
        "64",
        window[0],
        window[1],
    ]));
    let preds = tmp.path().join("preds.jsonl");
    std::fs::write(&preds, &answers).unwrap();
    // Gold answers = berth qa's own answers: the evaluation with the same defaults must then
    // score 100, and one with another answer-length limit must not.
    let predicted: Vec<Value> = json_lines(&answers);
    for (p, a) in v2["data"][0]["paragraphs"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(&predicted)
    {
        let best = &a["answers"][0];
        p["qas"][0]["answers"] =
            serde_json::json!([{"text": best["answer"], "answer_start": best["start"]}]);
    }
    std::fs::write(&squad, v2.to_string()).unwrap();
    let scored: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "qa",
        "--gold",
        squad.to_str().unwrap(),
        "--predictions",
        preds.to_str().unwrap(),
    ])))
    .unwrap();
    let eval_model = |extra: &[&str]| -> Value {
        let mut a = vec![
            "eval",
            "--task",
            "qa",
            "--model",
            &model,
            "--data",
            squad.to_str().unwrap(),
            "--max-length",
            "64",
            window[0],
            window[1],
        ];
        a.extend_from_slice(extra);
        serde_json::from_str(&ok(&berth(&a))).unwrap()
    };
    let direct = eval_model(&[]);
    // The limit matters on these contexts: 30 tokens (transformers' run_qa) answers differently.
    let longer = eval_model(&["--max-answer-len", "30"]);
    assert!(longer["exact_match"].as_f64().unwrap() < 1.0, "{longer}");
    assert_eq!(direct["exact_match"].as_f64().unwrap(), 1.0, "{direct}");
    for k in ["exact_match", "f1"] {
        let (a, b) = (scored[k].as_f64().unwrap(), direct[k].as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-9,
            "{k}: berth qa {a} vs eval --model {b} ({scored} / {direct})"
        );
    }
}
