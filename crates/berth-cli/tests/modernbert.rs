//! `berth` on the tiny ModernBERT checkpoints of fixtures/modernbert against transformers
//! (scripts/make_modernbert_reference.py): the fill-mask pipeline, and embeddings of a
//! 1,758-token text (longer than BERT's 512 positions and than the 8-token local window).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

mod common;
use common::*;

fn modern(name: &str) -> String {
    root()
        .join("fixtures/modernbert")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn fill_mask_matches_the_transformers_pipeline() {
    for name in ["mlm", "mlm-biased"] {
        let model = modern(name);
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                root()
                    .join("fixtures/modernbert")
                    .join(name)
                    .join("fill_mask.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let text = r["text"].as_str().unwrap();
        let out = json_lines(&ok(&berth(&[
            "fill-mask",
            "--model",
            &model,
            "--top-k",
            "5",
            text,
        ])));
        let got = out[0]["predictions"].as_array().unwrap();
        let want = r["predictions"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["token_id"], w["token"], "{name}: token order differs");
            assert_eq!(g["token"], w["token_str"], "{name}");
            assert_eq!(g["sequence"], w["sequence"], "{name}");
            let d = (g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs();
            assert!(d <= 1e-6, "{name}: score differs by {d}");
        }
    }
}

/// `berth embed --pooling mean --max-length 2048` of the long reference text is the mean of
/// transformers' last hidden state over its 1,758 tokens (berth tokenizes the text itself:
/// the same ids).
#[test]
fn long_text_embeddings_match_transformers() {
    let dir = root().join("fixtures/modernbert/mlm");
    let r: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let cu: Vec<i64> = r["cu_seqlens"].to_vec1::<i64>().unwrap();
    let (a, b) = (cu[2] as usize, cu[3] as usize);
    let want = r["last_hidden_state"]
        .narrow(0, a, b - a)
        .unwrap()
        .mean(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let sentences = [
        "the quick brown fox jumps over the lazy dog.",
        "hello world, this is a tiny corpus for a tiny tokenizer!",
        "who is there? the dog is there, and the fox is not.",
        "berth runs bert in rust, end to end, without padding.",
    ];
    let text: Vec<&str> = (0..90).map(|i| sentences[i % 4]).collect();
    let text = text.join(" ");
    let model = dir.display().to_string();
    let tok = berth_text::TextTokenizer::from_dir(&dir).unwrap();
    let enc = tok
        .encode(&text, None, 2048, berth_text::Truncation::Truncate, 0)
        .unwrap();
    let ids: Vec<u32> = r["input_ids"].to_vec1::<i64>().unwrap()[a..b]
        .iter()
        .map(|&v| v as u32)
        .collect();
    assert_eq!(
        enc.ids, ids,
        "berth's ids differ from the tokenizer's in transformers"
    );
    let args = [
        "embed",
        "--model",
        &model,
        "--pooling",
        "mean",
        "--max-length",
        "2048",
        &text,
    ];
    let out = json_lines(&ok(&berth(&args)));
    let got: Vec<f64> = serde_json::from_value(out[0]["embedding"].clone()).unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max);
    assert!(worst <= 1e-5, "embedding differs by {worst}");
}

/// Training a ModernBERT is refused before any work with a clear error.
#[test]
fn unsupported_uses_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.tsv");
    std::fs::write(&data, "sentence\tlabel\na\t0\nb\t1\nc\t0\nd\t1\ne\t0\n").unwrap();
    let out = berth(&[
        "finetune",
        "--task",
        "classify",
        "--model",
        &modern("mlm"),
        "--train",
        data.to_str().unwrap(),
        "--output",
        tmp.path().join("run").to_str().unwrap(),
    ]);
    fails_with(&out, &["inference only"]);
}

/// `berth classify` on ModernBERT sequence classifiers (mean pooling; first token with every
/// bias), up to the 1,758-token text: transformers' label (the argmax of its logits) and
/// its softmax score.
#[test]
fn classify_matches_transformers_logits() {
    let sentences = [
        "the quick brown fox jumps over the lazy dog.",
        "hello world, this is a tiny corpus for a tiny tokenizer!",
        "who is there? the dog is there, and the fox is not.",
        "berth runs bert in rust, end to end, without padding.",
    ];
    let long: Vec<&str> = (0..90).map(|i| sentences[i % 4]).collect();
    let long = long.join(" ");
    let texts = [
        "hello world",
        sentences[2],
        &long,
        "the quick brown [MASK] jumps over the lazy dog.",
    ];
    for name in ["seqcls-mean", "seqcls-cls-biased"] {
        let dir = root().join("fixtures/modernbert").join(name);
        let r: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let logits = r["logits"].to_vec2::<f32>().unwrap();
        let model = dir.display().to_string();
        let mut args = vec!["classify", "--model", &model, "--max-length", "2048"];
        args.extend(texts);
        let out = json_lines(&ok(&berth(&args)));
        let names = ["negative", "neutral", "positive"];
        for (k, row) in logits.iter().enumerate() {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
            let best = row.iter().position(|&x| x == max).unwrap();
            let got = &out[k]["labels"][0];
            assert_eq!(got["label"], names[best], "{name} text {k}: {got}");
            let score = got["score"].as_f64().unwrap();
            assert!(
                (score - 1.0 / sum).abs() <= 1e-5,
                "{name} text {k}: {score} vs {}",
                1.0 / sum
            );
        }
    }
}
