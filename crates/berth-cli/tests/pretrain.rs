//! `berth tokenizer train` then `berth pretrain` end to end on a small public-domain corpus
//! (fixtures/vocab/corpus.txt): a tiny BERT and RoBERTa learn (held-out masked accuracy
//! rises, loss falls), checkpoints are `*ForMaskedLM` that `berth fill-mask` and `berth eval`
//! load, continued pretraining creates the missing MLM head, and bad input fails cleanly.
use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::*;

fn corpus() -> PathBuf {
    root().join("fixtures/vocab/corpus.txt")
}

fn evals(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| !v["eval"].is_null())
        .map(|v| v["eval"].clone())
        .collect()
}

/// A tiny BERT (TINY_BERT) in batches of 16.
const BATCH: [&str; 2] = ["--batch-size", "16"];

fn pretrain(args: &[&str]) -> String {
    let mut all = vec!["--threads", "2", "pretrain"];
    all.extend(args);
    ok(&berth(&all))
}

#[test]
fn a_tiny_bert_and_roberta_learn_from_scratch_and_export_masked_lm_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    // `berth tokenizer train` runs here; the pretraining runs use the committed vocabularies
    // (fixtures/vocab, which crates/berth-text/tests/vocab.rs shows training reproduces).
    let vocab = tmp.path().join("vocab-check");
    ok(&berth(&[
        "tokenizer",
        "train",
        "--kind",
        "wordpiece",
        "--vocab-size",
        "800",
        "--output",
        vocab.to_str().unwrap(),
        corpus().to_str().unwrap(),
    ]));
    assert!(vocab.join("tokenizer.json").is_file() && vocab.join("vocab.txt").is_file());
    for (kind, arch, mask) in [
        ("wordpiece", "bert", "[MASK]"),
        ("bpe", "roberta", "<mask>"),
    ] {
        let vocab = root().join("fixtures/vocab").join(kind);
        let run = tmp.path().join(format!("run-{arch}"));
        let best = pretrain(
            &[
                &[
                    "--tokenizer",
                    vocab.to_str().unwrap(),
                    "--data",
                    corpus().to_str().unwrap(),
                    "--output",
                    run.to_str().unwrap(),
                    "--arch",
                    arch,
                ][..],
                &TINY_BERT,
                &BATCH,
                &[
                    "--epochs",
                    "10",
                    "--lr",
                    "2e-3",
                    "--save-every",
                    "50",
                    "--val-fraction",
                    "0.1",
                    "--whole-word",
                ],
            ]
            .concat(),
        );
        let e = evals(&run);
        assert!(e.len() >= 5, "{arch}: {} evaluations", e.len());
        let (first, last) = (&e[0], e.last().unwrap());
        println!(
            "{arch}: held-out masked accuracy {:.3} -> {:.3}, perplexity {:.1} -> {:.1}",
            first["masked_accuracy"],
            last["masked_accuracy"],
            first["perplexity"],
            last["perplexity"]
        );
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
        assert!(
            f(last, "loss") < f(first, "loss") - 0.2,
            "{arch}: {first} -> {last}"
        );
        assert!(
            f(last, "masked_accuracy") > f(first, "masked_accuracy"),
            "{arch}: {first} -> {last}"
        );
        // The training loss falls well below its start (ln 2000 = 7.6 at random init).
        let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["eval"].is_null())
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        let tail = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
        assert!(
            tail < losses[0] - 1.0,
            "{arch}: training loss {} -> {tail}",
            losses[0]
        );
        let ckpt = PathBuf::from(best.trim());
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap())
                .unwrap();
        let class = if arch == "bert" {
            "BertForMaskedLM"
        } else {
            "RobertaForMaskedLM"
        };
        assert_eq!(config["architectures"][0], class);
        let out = json_lines(&ok(&berth(&[
            "fill-mask",
            "--model",
            ckpt.to_str().unwrap(),
            "--top-k",
            "3",
            &format!("the knight rode to the {mask} of the king."),
        ])));
        assert_eq!(out[0]["predictions"].as_array().unwrap().len(), 3);
        // `berth eval` runs the same held-out evaluation on any corpus.
        let report: Value = serde_json::from_str(&ok(&berth(&[
            "eval",
            "--task",
            "pretrain",
            "--model",
            ckpt.to_str().unwrap(),
            "--data",
            corpus().to_str().unwrap(),
            "--max-length",
            "64",
        ])))
        .unwrap();
        assert!(report["masked_tokens"].as_u64().unwrap() > 1000, "{report}");
        assert!(
            report["loss"].as_f64().unwrap() < f(first, "loss"),
            "{report}"
        );
    }
}

#[test]
fn continued_pretraining_creates_a_missing_mlm_head_and_bad_input_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // The tiny BertModel has no MLM head: one is initialised, and the checkpoint has it.
    let best = pretrain(&[
        "--from",
        &tiny("bert-base"),
        "--data",
        corpus().to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--max-length",
        "64",
        "--batch-size",
        "16",
        "--max-steps",
        "4",
    ]);
    let weights = candle_core::safetensors::load(
        PathBuf::from(best.trim()).join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(weights.contains_key("cls.predictions.transform.dense.weight"));
    assert!(weights.contains_key("bert.encoder.layer.0.attention.self.query.weight"));
    // Bad corpus: invalid UTF-8 names file and line; no checkpoint is left behind.
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, b"a fine paragraph.\n\nanother\n\xff\xfe\n").unwrap();
    let out = berth(&[
        "pretrain",
        "--from",
        &tiny("bert-base"),
        "--data",
        bad.to_str().unwrap(),
        "--output",
        tmp.path().join("bad-run").to_str().unwrap(),
        "--max-length",
        "64",
    ]);
    fails_with(&out, &["bad.txt", "4", "UTF-8"]);
    assert!(!tmp.path().join("bad-run/checkpoints").exists());
    // An impossible mask rate; a position init with --from (the checkpoint has positions).
    for (flag, value) in [("--mask-rate", "1.5"), ("--position-init", "sinusoidal")] {
        let out = berth(&[
            "pretrain",
            "--from",
            &tiny("bert-base"),
            "--data",
            corpus().to_str().unwrap(),
            "--output",
            tmp.path().join("r2").to_str().unwrap(),
            flag,
            value,
        ]);
        fails_with(&out, &[flag]);
    }
}

/// `--no-dropout` and `--position-init sinusoidal` reach the run: from the same seed the
/// initial weights match except the position table, which is the sinusoidal one; the run's
/// config records dropout off and the first step's loss differs from the dropout run's
/// (dropout changes the forward); the checkpoint keeps the dropout rates for fine-tuning.
#[test]
fn no_dropout_and_sinusoidal_positions_reach_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    let run = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let best = pretrain(
            &[
                &[
                    "--tokenizer",
                    vocab.to_str().unwrap(),
                    "--data",
                    corpus().to_str().unwrap(),
                    "--output",
                    dir.to_str().unwrap(),
                ][..],
                &TINY_BERT,
                &BATCH,
                &["--max-steps", "2", "--log-every", "1", "--lr", "1e-3"],
                extra,
            ]
            .concat(),
        );
        let first_loss = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["eval"].is_null())
            .unwrap()["loss"]
            .as_f64()
            .unwrap();
        let init = candle_core::safetensors::load(
            dir.join("init/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let ckpt: Value = serde_json::from_str(
            &std::fs::read_to_string(PathBuf::from(best.trim()).join("config.json")).unwrap(),
        )
        .unwrap();
        (first_loss, init, config, ckpt)
    };
    let (loss_d, init_d, config_d, _) = run("dropout", &[]);
    let (loss_n, init_n, config_n, ckpt_n) = run("no-dropout", &["--no-dropout"]);
    let (_, init_s, _, _) = run("sinusoidal", &["--position-init", "sinusoidal"]);
    assert_eq!(config_d["loop"]["dropout"], true);
    assert_eq!(config_n["loop"]["dropout"], false);
    assert_eq!(ckpt_n["hidden_dropout_prob"], 0.1);
    assert!(
        (loss_d - loss_n).abs() > 1e-4,
        "dropout {loss_d} vs none {loss_n}"
    );
    let get = |t: &std::collections::HashMap<String, candle_core::Tensor>, k: &str| {
        t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (pos, words) = (
        "embeddings.position_embeddings.weight",
        "embeddings.word_embeddings.weight",
    );
    assert_eq!(get(&init_d, words), get(&init_s, words));
    assert_eq!(get(&init_d, pos), get(&init_n, pos));
    // Row 0 is (sin 0, cos 0, ...) = (0, r, 0, r, ...), row 1 starts with r sin 1 (r = 0.02 √2).
    let p = get(&init_s, pos);
    let r = 0.02 * std::f32::consts::SQRT_2;
    assert!(
        p[0].abs() < 1e-7 && (p[1] - r).abs() < 1e-6,
        "{:?}",
        &p[..4]
    );
    assert!((p[64] - r * 1f32.sin()).abs() < 1e-6, "{}", p[64]);
}

#[test]
fn prepared_shards_feed_pretraining_and_mismatches_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Documents of 6 lines, plus the same corpus gzip-compressed as a weighted second input.
    let text = std::fs::read_to_string(corpus()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let docs = lines
        .chunks(6)
        .map(|c| c.join("\n"))
        .collect::<Vec<_>>()
        .join("\n\n");
    let a = tmp.path().join("a.txt");
    std::fs::write(&a, &docs).unwrap();
    let b = tmp.path().join("b.txt.gz");
    {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&b).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(docs.as_bytes()).unwrap();
        gz.finish().unwrap();
    }
    let vocab = root().join("fixtures/vocab/wordpiece");
    let data = tmp.path().join("data");
    let report: Value = serde_json::from_str(&ok(&berth(&[
        "data",
        "prepare",
        "--tokenizer",
        vocab.to_str().unwrap(),
        "--output",
        data.to_str().unwrap(),
        "--max-length",
        "64",
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "20000",
        a.to_str().unwrap(),
        "--mix",
        &format!("{}=2", b.display()),
    ])))
    .unwrap();
    let corpora = report["corpora"].as_array().unwrap();
    let get = |i: usize, k: &str| corpora[i][k].as_u64().unwrap();
    // The same documents; weight 2 writes each training sequence of b twice (held-out
    // sequences once): all of a's sequences, less b's held-out ones, times two.
    let all = get(0, "train_sequences") + get(0, "val_sequences");
    assert_eq!(
        get(1, "train_sequences"),
        2 * (all - get(1, "val_sequences")),
        "{report}"
    );
    assert!(report["train_shards"].as_u64().unwrap() >= 2, "{report}");
    assert!(report["val_tokens"].as_u64().unwrap() > 0, "{report}");

    let run = tmp.path().join("run");
    pretrain(&[
        "--tokenizer",
        vocab.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--intermediate",
        "64",
        "--max-length",
        "64",
        "--batch-size",
        "16",
        "--max-steps",
        "6",
        "--save-every",
        "3",
    ]);
    let e = evals(&run);
    assert!(!e.is_empty());
    // The held-out split of the prepared folder is the dev set: all its masked tokens.
    assert!(e[0]["masked_tokens"].as_u64().unwrap() > 100, "{:?}", e[0]);

    // The same data with another tokenizer (MiniLM's), or a longer packing than the run.
    let out = berth(&[
        "pretrain",
        "--from",
        &tiny("bert-base"),
        "--data",
        data.to_str().unwrap(),
        "--output",
        tmp.path().join("other").to_str().unwrap(),
        "--max-length",
        "64",
    ]);
    fails_with(&out, &["manifest.json", "another tokenizer"]);
    let out = berth(&[
        "pretrain",
        "--tokenizer",
        vocab.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        tmp.path().join("short").to_str().unwrap(),
        "--max-length",
        "32",
    ]);
    fails_with(&out, &["manifest.json", "--max-length 32"]);
}

#[test]
fn next_sentence_objective_trains_a_bert_for_pretraining() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    // Documents of two kinds, alternating: six lines of the book, or six lines of number
    // words. A random second segment often comes from the other kind, which a small model
    // learns to see.
    let text = std::fs::read_to_string(corpus()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let numbers = [
        "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    let mut state = 7u64;
    let mut docs = Vec::new();
    for (i, chunk) in lines.chunks(6).enumerate() {
        docs.push(chunk.join("\n"));
        let counting: Vec<String> = (0..6)
            .map(|_| {
                (0..12)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(i as u64 | 1);
                        numbers[(state >> 33) as usize % numbers.len()]
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        docs.push(counting.join("\n"));
    }
    let mixed = tmp.path().join("mixed.txt");
    std::fs::write(&mixed, docs.join("\n\n")).unwrap();
    let run = tmp.path().join("nsp");
    let best = pretrain(
        &[
            &[
                "--tokenizer",
                vocab.to_str().unwrap(),
                "--data",
                mixed.to_str().unwrap(),
                "--output",
                run.to_str().unwrap(),
                "--objective",
                "nsp",
            ][..],
            &TINY_BERT,
            &BATCH,
            &[
                "--epochs",
                "12",
                "--lr",
                "2e-3",
                "--save-every",
                "80",
                "--val-fraction",
                "0.2",
            ],
        ]
        .concat(),
    );
    let e = evals(&run);
    let (first, last) = (&e[0], e.last().unwrap());
    println!(
        "NSP: held-out pair accuracy {} -> {}, pair loss {} -> {}, MLM loss {} -> {}",
        first["pair_accuracy"],
        last["pair_accuracy"],
        first["pair_loss"],
        last["pair_loss"],
        first["loss"],
        last["loss"]
    );
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    assert!(f(last, "loss") < f(first, "loss"), "{first} -> {last}");
    // Half the random second segments are of the other kind: up to 75 % is learnable.
    assert!(f(last, "pair_accuracy") > 0.58, "{last}");
    let ckpt = PathBuf::from(best.trim());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForPreTraining");
    let weights =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for key in [
        "cls.seq_relationship.weight",
        "bert.pooler.dense.weight",
        "cls.predictions.bias",
    ] {
        assert!(weights.contains_key(key), "{key} missing");
    }
    // RoBERTa has no sentence-pair head.
    let out = berth(&[
        "pretrain",
        "--tokenizer",
        root().join("fixtures/vocab/bpe").to_str().unwrap(),
        "--arch",
        "roberta",
        "--objective",
        "sop",
        "--data",
        corpus().to_str().unwrap(),
        "--output",
        tmp.path().join("roberta-sop").to_str().unwrap(),
    ]);
    fails_with(&out, &["BertForPreTraining"]);
}

#[test]
fn replaced_token_detection_learns_and_exports_an_electra() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    let run = tmp.path().join("run-rtd");
    let best = pretrain(
        &[
            &[
                "--tokenizer",
                vocab.to_str().unwrap(),
                "--data",
                corpus().to_str().unwrap(),
                "--output",
                run.to_str().unwrap(),
                "--objective",
                "rtd",
                "--generator-layers",
                "1",
                "--mask-rate",
                "0.3",
            ][..],
            &TINY_BERT,
            &BATCH,
            &[
                "--epochs",
                "10",
                "--lr",
                "2e-3",
                "--save-every",
                "50",
                "--val-fraction",
                "0.1",
            ],
        ]
        .concat(),
    );
    let e = evals(&run);
    assert!(e.len() >= 5, "{} evaluations", e.len());
    let (first, last) = (&e[0], e.last().unwrap());
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    // The loss of the best input-blind guess (the replaced share everywhere): that share's
    // binary entropy.
    let blind = |v: &Value| {
        let p = f(v, "replaced_fraction");
        -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
    };
    println!(
        "rtd: discriminator loss {:.3} -> {:.3} (input-blind {:.3}), accuracy {:.3} -> {:.3} (replaced {:.3} -> {:.3}), \
         recall on replaced {:.3} -> {:.3}; generator masked accuracy {:.3} -> {:.3}",
        f(first, "rtd_loss"),
        f(last, "rtd_loss"),
        blind(last),
        f(first, "rtd_accuracy"),
        f(last, "rtd_accuracy"),
        f(first, "replaced_fraction"),
        f(last, "replaced_fraction"),
        f(first, "replaced_recall"),
        f(last, "replaced_recall"),
        f(first, "masked_accuracy"),
        f(last, "masked_accuracy"),
    );
    // The generator learns its masked-LM task...
    assert!(
        f(last, "loss") < f(first, "loss") - 0.1
            && f(last, "masked_accuracy") > f(first, "masked_accuracy"),
        "{first} -> {last}"
    );
    // ...and the discriminator reads its input: its held-out loss is below the input-blind
    // guess's. On a corpus this small the margin is small: the generator's samples are
    // plausible tokens after a few steps.
    assert!(
        f(last, "rtd_loss") < blind(last) - 0.005,
        "discriminator loss {} vs input-blind {}",
        f(last, "rtd_loss"),
        blind(last)
    );
    let ckpt = PathBuf::from(best.trim());
    let config = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(&ckpt)["architectures"][0], "ElectraForPreTraining");
    assert_eq!(config(&ckpt)["embedding_size"], 64);
    let generator = ckpt.join("generator");
    assert_eq!(config(&generator)["architectures"][0], "ElectraForMaskedLM");
    assert_eq!(config(&generator)["num_hidden_layers"], 1);
    let inspect = ok(&berth(&["inspect", "--model", ckpt.to_str().unwrap()]));
    assert!(inspect.contains("replaced-token-detection"), "{inspect}");
    // The generator fills masks; `berth eval` scores the pair on any corpus.
    let out = json_lines(&ok(&berth(&[
        "fill-mask",
        "--model",
        generator.to_str().unwrap(),
        "--top-k",
        "3",
        "the knight rode to the [MASK] of the king.",
    ])));
    assert_eq!(out[0]["predictions"].as_array().unwrap().len(), 3);
    let report: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "pretrain",
        "--model",
        ckpt.to_str().unwrap(),
        "--data",
        corpus().to_str().unwrap(),
        "--max-length",
        "64",
    ])))
    .unwrap();
    assert!(report["rtd_accuracy"].as_f64().unwrap() > 0.5, "{report}");
    // An RTD run is an ELECTRA: RoBERTa and continuing a BERT checkpoint are refused.
    fails_with(
        &berth(&[
            "pretrain",
            "--tokenizer",
            vocab.to_str().unwrap(),
            "--data",
            corpus().to_str().unwrap(),
            "--output",
            tmp.path().join("x").to_str().unwrap(),
            "--objective",
            "rtd",
            "--arch",
            "roberta",
        ]),
        &["drop --arch roberta"],
    );
    fails_with(
        &berth(&[
            "pretrain",
            "--from",
            root().join("fixtures/pretrain/bert-mlm").to_str().unwrap(),
            "--data",
            corpus().to_str().unwrap(),
            "--output",
            tmp.path().join("y").to_str().unwrap(),
            "--objective",
            "rtd",
        ]),
        &["bert-mlm", "ELECTRA"],
    );
}

#[test]
fn replaced_token_detection_resumes_to_the_same_generator_and_discriminator() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    let run = tmp.path().join("run");
    let data = corpus();
    let args = |resume: bool| {
        let mut a = vec![
            "--tokenizer",
            vocab.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            run.to_str().unwrap(),
            "--objective",
            "rtd",
            "--max-steps",
            "12",
            "--save-every",
            "6",
        ];
        a.extend(TINY_BERT);
        a.extend(BATCH);
        if resume {
            a.push("--resume");
        }
        a
    };
    pretrain(&args(false));
    let last = run.join("checkpoints/step-12");
    let (disc, generator) = (weights(&last), weights(&last.join("generator")));
    // As if killed after step 6's checkpoint: only it remains, and the run resumes from it.
    std::fs::remove_dir_all(&last).unwrap();
    pretrain(&args(true));
    assert_eq!(
        weights(&last),
        disc,
        "the resumed discriminator ends elsewhere"
    );
    assert_eq!(
        weights(&last.join("generator")),
        generator,
        "the resumed generator ends elsewhere"
    );
    // The generator's copy of the shared embeddings is the discriminator's.
    let embeddings = |t: &[(String, Vec<f32>)]| -> Vec<Vec<f32>> {
        t.iter()
            .filter(|(k, _)| k.contains("embeddings."))
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(embeddings(&disc), embeddings(&generator));
    assert_eq!(embeddings(&disc).len(), 5);
}

/// Self-distillation in continued pretraining: the starting checkpoint as a frozen teacher
/// changes the loss (soft targets at the masked positions) and the run learns; a student of
/// fewer layers starts from the checkpoint's; a teacher with another vocabulary is refused.
#[test]
fn continued_pretraining_distils_from_a_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let from = root().join("fixtures/pretrain/bert-mlm");
    let from = from.to_str().unwrap();
    let data = corpus();
    let data = data.to_str().unwrap();
    let run = |name: &str, extra: &[&str]| -> Vec<f64> {
        let out = tmp.path().join(name);
        let mut args = vec![
            "--from",
            from,
            "--data",
            data,
            "--output",
            out.to_str().unwrap(),
            "--max-length",
            "64",
            "--batch-size",
            "16",
            "--max-steps",
            "12",
            "--lr",
            "1e-3",
            "--log-every",
            "1",
        ];
        args.extend(extra);
        pretrain(&args);
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let plain = run("plain", &[]);
    let taught = run("taught", &["--teacher", from, "--distill-alpha", "0.5"]);
    // Step 0: the same masks and dropout, so the same hard loss; the teacher is the
    // starting checkpoint in eval mode, so the soft term is small but positive (dropout
    // makes the student differ): 0.5 · hard < taught < hard.
    assert!(
        taught[0] > 0.5 * plain[0] && taught[0] < plain[0],
        "first step: plain {} taught {}",
        plain[0],
        taught[0]
    );
    assert!(taught.iter().all(|l| l.is_finite()));
    let small = run("small", &["--student-layers", "1", "--teacher", from]);
    assert!(small.iter().all(|l| l.is_finite()));
    let init: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("small/student-init/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(init["num_hidden_layers"], 1);
    fails_with(
        &berth(&[
            "pretrain",
            "--from",
            from,
            "--data",
            data,
            "--output",
            tmp.path().join("bad").to_str().unwrap(),
            "--teacher",
            root().join("fixtures/tiny/roberta-mlm").to_str().unwrap(),
        ]),
        &["teacher", "vocabulary"],
    );
}
