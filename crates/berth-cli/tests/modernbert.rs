//! `berth` on the tiny ModernBERT checkpoints of fixtures/modernbert against transformers
//! (scripts/make_modernbert_reference.py): the fill-mask pipeline, and embeddings of a
//! 1,758-token text (longer than BERT's 512 positions and than the 8-token local window).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

mod common;
use common::*;

/// The four sentences of scripts/make_modernbert_reference.py.
const SENTENCES: [&str; 4] = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, this is a tiny corpus for a tiny tokenizer!",
    "who is there? the dog is there, and the fox is not.",
    "berth runs bert in rust, end to end, without padding.",
];

/// The reference's 1,758-token text: the sentences 90 times over.
fn long_text() -> String {
    let parts: Vec<&str> = (0..90).map(|i| SENTENCES[i % 4]).collect();
    parts.join(" ")
}

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
    let text = long_text();
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

/// The ModernBERT `berth pretrain --arch modernbert` wrote (fixtures/pretrain/modernbert-berth)
/// fine-tuned as a classifier (mean pooling, a new classifier on its prediction head): the
/// loss falls, dev accuracy rises well above chance, and a SIGKILLed run resumes to the same
/// weights.
#[test]
fn a_pretrained_modernbert_fine_tunes_and_resumes_exactly() {
    let model = root()
        .join("fixtures/pretrain/modernbert-berth")
        .display()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let (train, dev) = (write_data(tmp.path(), 48, 0), write_data(tmp.path(), 16, 1));
    let run = tmp.path().join("learn");
    let args = ["--log-every", "1", "--epochs", "8", "--lr", "3e-3"];
    ok(&finetune_classify(&model, &run, &train, &dev, &args)
        .output()
        .unwrap());
    let c = curve(&run);
    let losses: Vec<f64> = c.iter().filter_map(|c| c.1.as_f64()).collect();
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&losses[..12]), mean(&losses[losses.len() - 12..]));
    assert!(last < 0.7 * first, "loss went from {first} to {last}");
    let dev_acc: Vec<f64> = c.iter().filter_map(|c| c.3["accuracy"].as_f64()).collect();
    let best = dev_acc.iter().cloned().fold(0.0, f64::max);
    assert!(
        best >= 0.75 && best > dev_acc[0],
        "dev accuracy {dev_acc:?} (chance is 0.5)"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(last_checkpoint(&run).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["architectures"][0],
        "ModernBertForSequenceClassification"
    );
    let (train, dev) = (write_data(tmp.path(), 80, 2), write_data(tmp.path(), 8, 3));
    killed_run_resumes_exactly(tmp.path(), |out, extra| {
        finetune_classify(&model, out, &train, &dev, extra)
    });
}

/// NER, QA, sentence-embedding and reranker fine-tuning of the berth-pretrained ModernBERT
/// write checkpoints of transformers' classes (QA with its two labels) that the pipelines
/// and `berth eval` run.
#[test]
fn every_task_fine_tunes_a_modernbert() {
    let model = root()
        .join("fixtures/pretrain/modernbert-berth")
        .display()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).display().to_string();
    let run = |task: &str, train: &str, dev: Option<&str>| -> std::path::PathBuf {
        let out = path(&format!("run-{task}"));
        let mut args = vec![
            "finetune",
            "--task",
            task,
            "--model",
            &model,
            "--train",
            train,
            "--output",
            &out,
            "--max-steps",
            "4",
            "--batch-size",
            "4",
        ];
        if let Some(dev) = dev {
            args.extend(["--dev", dev]);
        }
        ok(&berth(&args));
        last_checkpoint(std::path::Path::new(&out))
    };
    let class = |ckpt: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap()
    };
    // NER from CoNLL.
    let conll = "John B-PER\nlives O\nin O\nParis B-LOC\n\nMary B-PER\nis O\nthere O\n\n";
    std::fs::write(path("ner.txt"), conll.repeat(4)).unwrap();
    let ner = run("ner", &path("ner.txt"), Some(&path("ner.txt")));
    assert_eq!(
        class(&ner)["architectures"][0],
        "ModernBertForTokenClassification"
    );
    let ckpt = ner.display().to_string();
    let out = json_lines(&ok(&berth(&[
        "ner",
        "--model",
        &ckpt,
        "--aggregation",
        "none",
        "John lives in Paris",
    ])));
    assert!(out[0]["entities"].is_array(), "{out:?}");
    let eval = ok(&berth(&[
        "eval",
        "--task",
        "ner",
        "--model",
        &ckpt,
        "--data",
        &path("ner.txt"),
    ]));
    assert!(eval.contains("\"f1\""), "{eval}");
    // QA from SQuAD.
    let squad = write_squad(tmp.path(), "squad.json", 8, false)
        .display()
        .to_string();
    let qa = run("qa", &squad, None);
    let config = class(&qa);
    assert_eq!(config["architectures"][0], "ModernBertForQuestionAnswering");
    assert_eq!(config["id2label"].as_object().unwrap().len(), 2, "{config}");
    let ckpt = qa.display().to_string();
    let out = json_lines(&ok(&berth(&[
        "qa",
        "--model",
        &ckpt,
        "--question",
        "who is there?",
        "--context",
        "the dog is there.",
    ])));
    assert!(out[0]["answers"][0]["answer"].is_string(), "{out:?}");
    let eval = ok(&berth(&[
        "eval", "--task", "qa", "--model", &ckpt, "--data", &squad,
    ]));
    assert!(eval.contains("\"exact_match\""), "{eval}");
    // Sentence embeddings (a bare ModernBertModel with sentence-transformers' files).
    std::fs::write(
        path("pairs.tsv"),
        "anchor\tpositive\na dog\tthe dog\nhello world\thi world\nthe fox\ta fox\nwho is there\twho is here\n",
    )
    .unwrap();
    let emb = run("embed", &path("pairs.tsv"), None);
    assert_eq!(class(&emb)["architectures"][0], "ModernBertModel");
    assert!(emb.join("modules.json").is_file());
    let ckpt = emb.display().to_string();
    let out = json_lines(&ok(&berth(&["embed", "--model", &ckpt, "a dog"])));
    assert_eq!(out[0]["embedding"].as_array().unwrap().len(), 32);
    // A one-logit cross-encoder.
    std::fs::write(
        path("rerank.tsv"),
        "query\tpassage\tlabel\na dog\tthe dog\t1\nhello\tthe fox\t0\nthe fox\ta fox\t1\nwho\tquick\t0\n",
    )
    .unwrap();
    let rr = run("rerank", &path("rerank.tsv"), None);
    assert_eq!(
        class(&rr)["architectures"][0],
        "ModernBertForSequenceClassification"
    );
    let ckpt = rr.display().to_string();
    let out = json_lines(&ok(&berth(&[
        "rerank", "--model", &ckpt, "--query", "dog", "a dog", "a fox",
    ])));
    assert_eq!(out.len(), 2);
}

/// Training with attention dropout is refused (the sliding-window kernel has none), naming
/// the config and the way out.
#[test]
fn attention_dropout_in_training_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken_copy(&modern("mlm"), |d| {
        let p = d.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["attention_dropout"] = 0.1.into();
        std::fs::write(&p, c.to_string()).unwrap();
    });
    let (train, dev) = (write_data(tmp.path(), 8, 0), write_data(tmp.path(), 4, 1));
    let model = dir.path().display().to_string();
    let out = finetune_classify(&model, &tmp.path().join("run"), &train, &dev, &[])
        .output()
        .unwrap();
    fails_with(&out, &["attention_dropout 0.1", "--no-dropout"]);
    // Without dropout it trains.
    let out = finetune_classify(
        &model,
        &tmp.path().join("run2"),
        &train,
        &dev,
        &["--no-dropout", "--epochs", "1"],
    )
    .output()
    .unwrap();
    ok(&out);
}

/// `berth classify` on ModernBERT sequence classifiers (mean pooling; first token with every
/// bias), up to the 1,758-token text: transformers' label (the argmax of its logits) and
/// its softmax score.
#[test]
fn classify_matches_transformers_logits() {
    let long = long_text();
    let texts = [
        "hello world",
        SENTENCES[2],
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

/// int8 inference (`--dtype int8`, and a `berth quantize --dtype int8` copy) of a ModernBERT
/// against its f32 embeddings, up to the 1,758-token text: every cosine ≥ 0.99 (the bar
/// set for BERT), and the quantized copy gives exactly what quantizing at load gives. bf16
/// the same where the CPU has AMX tiles; elsewhere it is refused clearly.
#[test]
fn int8_and_bf16_embeddings_stay_close_to_f32() {
    let long = long_text();
    let mut texts: Vec<&str> = SENTENCES.to_vec();
    texts.push(&long);
    let embed = |model: &str, dtype: &str| -> Vec<Vec<f64>> {
        let mut args = vec![
            "embed",
            "--model",
            model,
            "--dtype",
            dtype,
            "--pooling",
            "mean",
            "--max-length",
            "2048",
        ];
        args.extend(texts.iter().copied());
        json_lines(&ok(&berth(&args)))
            .iter()
            .map(|l| serde_json::from_value(l["embedding"].clone()).unwrap())
            .collect()
    };
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = berth_kernels::amx::bf16_available();
    for name in ["mlm", "mlm-biased"] {
        let model = modern(name);
        let f = embed(&model, "f32");
        let close = |q: &[Vec<f64>], dtype: &str| {
            for (k, (a, b)) in f.iter().zip(q).enumerate() {
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let cos = dot / (norm(a) * norm(b));
                assert!(cos >= 0.99, "{name} {dtype} text {k}: cosine {cos}");
            }
        };
        let q = embed(&model, "int8");
        close(&q, "int8");
        if bf16 {
            close(&embed(&model, "bf16"), "bf16");
        } else {
            let out = berth(&["embed", "--model", &model, "--dtype", "bf16", "a"]);
            fails_with(&out, &["AMX", "AVX-512"]);
        }
        let copy = tmp.path().join(name).display().to_string();
        ok(&berth(&["quantize", "--dtype", "int8", &model, &copy]));
        assert_eq!(
            embed(&copy, "int8"),
            q,
            "{name}: the quantized copy differs"
        );
    }
}

/// `berth pretrain --arch modernbert` writes a ModernBertForMaskedLM holding exactly the
/// weights transformers saves for one (the keys of fixtures/modernbert/mlm, written by
/// `save_pretrained` for the same bias-free 4-layer shape), whose held-out loss falls and
/// which fill-mask runs; flags that cannot apply to ModernBERT are refused before anything
/// is written.
#[test]
fn pretrain_arch_modernbert_writes_what_transformers_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = root()
        .join("fixtures/vocab/wordpiece")
        .display()
        .to_string();
    let corpus = root()
        .join("fixtures/vocab/corpus.txt")
        .display()
        .to_string();
    let run = tmp.path().join("run").display().to_string();
    let base = [
        "pretrain",
        "--arch",
        "modernbert",
        "--tokenizer",
        &tokenizer,
        "--data",
        &corpus,
    ];
    let mut args = base.to_vec();
    args.extend([
        "--output",
        &run,
        "--layers",
        "4",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--max-length",
        "64",
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--max-steps",
        "30",
        "--save-every",
        "10",
    ]);
    ok(&berth(&args));
    let ckpt = last_checkpoint(std::path::Path::new(&run));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "ModernBertForMaskedLM");
    assert_eq!(config["model_type"], "modernbert");
    let keys = |dir: &std::path::Path| -> Vec<String> {
        weights(dir).into_iter().map(|(k, _)| k).collect()
    };
    assert_eq!(keys(&ckpt), keys(&root().join("fixtures/modernbert/mlm")));
    let losses: Vec<f64> = curve(std::path::Path::new(&run))
        .iter()
        .filter_map(|c| c.3["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 3 && losses[losses.len() - 1] < losses[0],
        "held-out loss {losses:?}"
    );
    let ckpt = ckpt.display().to_string();
    let out = json_lines(&ok(&berth(&[
        "fill-mask",
        "--model",
        &ckpt,
        "the quick brown [MASK] jumps.",
    ])));
    assert_eq!(out[0]["predictions"].as_array().unwrap().len(), 5);
    for (extra, needle) in [
        (&["--objective", "rtd"][..], "drop --arch modernbert"),
        (&["--objective", "sop"][..], "--objective mlm"),
        (&["--position-init", "sinusoidal"][..], "no position table"),
        (&["--hidden", "32", "--heads", "32"][..], "odd head size"),
    ] {
        let out_dir = tmp.path().join("refused").display().to_string();
        let mut args = base.to_vec();
        args.extend(["--output", &out_dir]);
        args.extend(extra);
        fails_with(&berth(&args), &[needle]);
        assert!(
            !tmp.path().join("refused/init").exists(),
            "{extra:?} wrote a model"
        );
    }
}
