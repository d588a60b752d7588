//! End to end through the real `berth` binary: outputs against references made by
//! sentence-transformers / transformers (scripts/make_reference.py), and every bad input
//! ending in a one-line error with a non-zero exit and no panic.
use std::process::Command;

mod common;
use common::*;

/// The sentences of fixtures/minilm.
fn minilm_sentences() -> Vec<String> {
    let path = root().join("fixtures/minilm/sentences.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// sentence-transformers' embeddings of those sentences.
fn minilm_reference(fixture: &std::path::Path) -> Vec<Vec<f32>> {
    let reference = candle_core::safetensors::load(
        fixture.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    reference["embeddings"].to_vec2::<f32>().unwrap()
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let dir = minilm_dir();
    let fixture = root().join("fixtures/minilm");
    let texts = minilm_sentences();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    // Default pooling from the model's sentence-transformers config: mean + normalize.
    let out = json_lines(&ok(&berth(&[
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--batch-tokens",
        "300",
    ])));
    let want = minilm_reference(&fixture);
    assert_eq!(out.len(), texts.len());
    let mut worst = 0f32;
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line["index"], i);
        let got = floats(&line["embedding"]);
        assert_eq!(got.len(), 384);
        let d = got
            .iter()
            .zip(&want[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(d);
    }
    println!(
        "MiniLM, {} sentences: max abs diff to sentence-transformers {worst:.3e}",
        texts.len()
    );
    assert!(worst <= 1e-4, "max abs diff {worst}");
}

/// `berth embed --dtype DTYPE` on the MiniLM fixture sentences: the lowest cosine to
/// sentence-transformers' f32 embeddings.
fn reduced_precision_lowest_cosine(dtype: &str) -> Option<f64> {
    let dir = minilm_dir();
    let fixture = root().join("fixtures/minilm");
    let texts = minilm_sentences();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut args = vec!["embed", "--dtype", dtype, "--model", dir.to_str().unwrap()];
    args.extend(&texts);
    let run = berth(&args);
    if dtype == "bf16" && !berth_kernels::amx::bf16_available() {
        // bf16 needs AMX tiles or AVX-512; elsewhere the flag must fail with a clear
        // message instead.
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && err.contains("AVX-512"), "{err}");
        println!("no bf16 kernel here: bf16 refused with: {err}");
        return None;
    }
    let out = json_lines(&ok(&run));
    assert_eq!(out.len(), texts.len());
    let want = minilm_reference(&fixture);
    let mut lowest = 1f64;
    for (line, w) in out.iter().zip(&want) {
        let got = floats(&line["embedding"]);
        // Both are unit vectors (MiniLM normalises): the cosine is the dot product.
        let cos: f64 = got
            .iter()
            .zip(w)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        lowest = lowest.min(cos);
    }
    println!(
        "MiniLM {dtype}, {} sentences: lowest cosine to sentence-transformers f32 {lowest:.6}",
        out.len()
    );
    Some(lowest)
}

#[test]
fn bf16_embeddings_stay_close_to_sentence_transformers() {
    if let Some(lowest) = reduced_precision_lowest_cosine("bf16") {
        assert!(lowest >= 0.999, "lowest cosine {lowest}");
    }
}

#[test]
fn int8_embeddings_stay_close_to_sentence_transformers() {
    // AMX int8 tiles, VNNI or AVX2 where the CPU has them, else the portable loop (the
    // same integers).
    let lowest = reduced_precision_lowest_cosine("int8").expect("int8 runs on every CPU");
    assert!(lowest >= 0.99, "lowest cosine {lowest}");
}

/// `berth quantize --dtype int8` writes a smaller checkpoint that gives, under `--dtype int8`,
/// exactly the outputs of quantizing the original at load (embeddings and a classifier).
#[test]
fn quantized_checkpoints_give_the_outputs_of_quantize_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let minilm = minilm_dir();
    let classifier = task_model("bert-classify");
    let texts = ["The cat sits outside.", "A man is playing guitar.", "ok"];
    for (src, cmd) in [
        (minilm.to_str().unwrap(), "embed"),
        (&classifier[..], "classify"),
    ] {
        let out = tmp.path().join(format!("{cmd}-int8"));
        let out_s = out.to_str().unwrap();
        let quantized = berth(&["quantize", src, out_s, "--dtype", "int8"]);
        ok(&quantized);
        let note = String::from_utf8_lossy(&quantized.stderr);
        assert!(note.contains("encoder matrices in int8"), "{note}");
        let run = |model: &str| {
            ok(&berth(
                &[&[cmd, "--model", model, "--dtype", "int8"][..], &texts].concat(),
            ))
        };
        let (at_load, stored) = (run(src), run(out_s));
        assert!(!at_load.is_empty());
        assert_eq!(
            at_load, stored,
            "{cmd}: quantized checkpoint differs from quantize-at-load"
        );
        let size = |d: &std::path::Path| {
            std::fs::metadata(d.join("model.safetensors"))
                .unwrap()
                .len()
        };
        let (before, after) = (size(std::path::Path::new(src)), size(&out));
        assert!(after < before, "{cmd}: {after} >= {before} bytes");
        // The tokenizer and sentence-transformers files come along: the folder is a model.
        for f in std::fs::read_dir(src).unwrap() {
            let f = f.unwrap().file_name();
            assert!(out.join(&f).exists(), "{cmd}: {f:?} not copied");
        }
    }
    // MiniLM's six layers of int8 matrices: about 31 MB fewer than f32 (90.9 MB file).
    let q = std::fs::metadata(tmp.path().join("embed-int8/model.safetensors"))
        .unwrap()
        .len();
    let f = std::fs::metadata(minilm.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(f - q > 30_000_000, "{f} -> {q}");
    // A quantized checkpoint is not quantized again, and an existing folder is not overwritten.
    let q8 = tmp.path().join("embed-int8");
    fails_with(
        &berth(&[
            "quantize",
            q8.to_str().unwrap(),
            tmp.path().join("x").to_str().unwrap(),
            "--dtype",
            "bf16",
        ]),
        &["already quantized"],
    );
    fails_with(
        &berth(&[
            "quantize",
            minilm.to_str().unwrap(),
            q8.to_str().unwrap(),
            "--dtype",
            "int8",
        ]),
        &["exists"],
    );
}

#[test]
fn embed_arguments_and_the_default_model_agree() {
    let dir = minilm_dir();
    let a = json_lines(&ok(&berth(&[
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "The cat sits outside.",
        "ok",
    ])));
    let b = json_lines(&ok(&berth(&["embed", "The cat sits outside.", "ok"])));
    assert_eq!(a, b);
    let norm: f32 = floats(&a[0]["embedding"])
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-5,
        "normalised by default, norm {norm}"
    );
    let raw = json_lines(&ok(&berth(&[
        "embed",
        "--pooling",
        "cls",
        "The cat sits outside.",
    ])));
    let norm: f32 = floats(&raw[0]["embedding"])
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "--pooling cls without --normalize is not normalised"
    );
}

#[test]
fn pooling_none_gives_the_last_hidden_state() {
    let reference = candle_core::safetensors::load(
        root().join("fixtures/tiny/bert-base/reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let hidden = reference["last_hidden_state"].to_vec2::<f32>().unwrap();
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny("tokenization.json")).unwrap()).unwrap();
    let texts: Vec<&str> = tok["bert"]["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut args = vec!["embed", "--model", &tiny("bert-base"), "--pooling", "none"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(texts.iter().map(|t| t.to_string()));
    let out = json_lines(&ok(&berth(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )));
    let mut row = 0;
    let mut worst = 0f32;
    for line in &out {
        let tokens = line["tokens"].as_array().unwrap();
        assert_eq!(tokens[0], "[CLS]");
        for v in line["hidden"].as_array().unwrap() {
            let d = floats(v)
                .iter()
                .zip(&hidden[row])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(d);
            row += 1;
        }
        assert_eq!(tokens.len(), line["hidden"].as_array().unwrap().len());
    }
    println!("pooling none vs transformers last_hidden_state: max abs diff {worst:.3e}");
    assert!(worst <= 1e-4);
}

#[test]
fn fill_mask_matches_the_transformers_pipeline() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny("fill_mask.json")).unwrap()).unwrap();
    for arch in ["bert", "roberta", "distilbert", "electra"] {
        let r = &reference[arch];
        let texts: Vec<&str> = r["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let model = tiny(&format!("{arch}-mlm"));
        let mut args = vec!["fill-mask", "--model", &model, "--top-k", "5"];
        args.extend(&texts);
        let out = json_lines(&ok(&berth(&args)));
        let mut worst = 0f64;
        for (i, want) in r["outputs"].as_array().unwrap().iter().enumerate() {
            let got = &out[i]["predictions"];
            // transformers returns a flat list for one mask, a list per mask otherwise.
            let (got, want): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) =
                if want[0].is_array() {
                    (
                        got.as_array()
                            .unwrap()
                            .iter()
                            .flat_map(|m| m.as_array().unwrap())
                            .collect(),
                        want.as_array()
                            .unwrap()
                            .iter()
                            .flat_map(|m| m.as_array().unwrap())
                            .collect(),
                    )
                } else {
                    (
                        got.as_array().unwrap().iter().collect(),
                        want.as_array().unwrap().iter().collect(),
                    )
                };
            assert_eq!(got.len(), want.len(), "{arch} text {i}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(
                    g["token_id"], w["token"],
                    "{arch} text {i}: token order differs"
                );
                assert_eq!(g["token"], w["token_str"], "{arch} text {i}");
                assert_eq!(g["sequence"], w["sequence"], "{arch} text {i}");
                worst =
                    worst.max((g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs());
            }
        }
        println!("{arch} fill-mask: max score diff {worst:.3e}");
        assert!(worst <= 1e-4);
    }
}

#[test]
fn inspect_reports_the_parameter_count_pytorch_counts() {
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny("param_counts.json")).unwrap()).unwrap();
    for (name, n) in counts.as_object().unwrap() {
        let out = ok(&berth(&["inspect", "--model", &tiny(name)]));
        let line = out.lines().find(|l| l.starts_with("parameters:")).unwrap();
        assert!(
            line.contains(&format!(" {n} ")),
            "{name}: {line} (PyTorch: {n})"
        );
    }
    let out = ok(&berth(&["inspect", "--model", &tiny("roberta-seqcls")]));
    assert!(
        out.contains("sequence-classification")
            && out.contains("labels: negative, neutral, positive"),
        "{out}"
    );
}

#[test]
fn bad_checkpoints_fail_with_one_line_naming_the_file() {
    let truncated = broken_copy(&tiny("bert-base"), |d| {
        let f = d.join("model.safetensors");
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
    });
    fails_with(
        &berth(&["embed", "--model", truncated.path().to_str().unwrap(), "hi"]),
        &["model.safetensors", "corrupt"],
    );

    let gpt = broken_copy(&tiny("bert-base"), |d| {
        let c = std::fs::read_to_string(d.join("config.json")).unwrap();
        std::fs::write(
            d.join("config.json"),
            c.replace("\"model_type\": \"bert\"", "\"model_type\": \"llama\""),
        )
        .unwrap();
    });
    fails_with(
        &berth(&["inspect", "--model", gpt.path().to_str().unwrap()]),
        &["config.json", "unknown model_type \"llama\""],
    );

    let shape = broken_copy(&tiny("bert-base"), |d| {
        let c = std::fs::read_to_string(d.join("config.json")).unwrap();
        std::fs::write(
            d.join("config.json"),
            c.replace("\"vocab_size\": ", "\"vocab_size\": 1"),
        )
        .unwrap();
    });
    fails_with(
        &berth(&["embed", "--model", shape.path().to_str().unwrap(), "hi"]),
        &["word_embeddings.weight", "shape"],
    );

    let no_tok = broken_copy(&tiny("bert-base"), |d| {
        for f in ["tokenizer.json", "vocab.txt"] {
            std::fs::remove_file(d.join(f)).unwrap();
        }
    });
    fails_with(
        &berth(&["embed", "--model", no_tok.path().to_str().unwrap(), "hi"]),
        &["no tokenizer"],
    );

    fails_with(
        &berth(&["fill-mask", "--model", &tiny("bert-base"), "a [MASK]"]),
        &["no masked-LM head"],
    );
    fails_with(
        &berth(&["embed", "--model", "nobody/no-such-model", "hi"]),
        &["nobody/no-such-model", "--model"],
    );
}

#[test]
fn bad_inputs_fail_with_one_line_naming_the_input() {
    let m = tiny("bert-base");
    fails_with(
        &berth(&["embed", "--model", &m, "fine", ""]),
        &["input 1", "empty text"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("bad.txt");
    std::fs::write(&f, b"good line\nbad \xff\xfe line\n").unwrap();
    fails_with(
        &berth(&["embed", "--model", &m, "--input", f.to_str().unwrap()]),
        &["bad.txt:2", "invalid UTF-8"],
    );
    let long = "word ".repeat(100);
    fails_with(
        &berth(&["embed", "--model", &m, "--no-truncate", &long]),
        &["input 0", "maximum of 64"],
    );
    fails_with(
        &berth(&["embed", "--model", &m, "--max-length", "1000", "hi"]),
        &["--max-length 1000", "64 positions"],
    );
    fails_with(
        &berth(&["fill-mask", "--model", &tiny("bert-mlm"), "no mask here"]),
        &["input 0", "no [MASK] token"],
    );
    // Over-long text is truncated by default, with a warning on stderr and JSON on stdout.
    let out = berth(&["embed", "--model", &m, &long]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated to 64"));
    assert_eq!(json_lines(&ok(&out)).len(), 1);
}

#[test]
fn missing_default_model_says_how_to_fetch_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .env("BERTH_HOME", tmp.path())
        .args(["embed", "hi"])
        .output()
        .unwrap();
    fails_with(&out, &["scripts/fetch-assets"]);
}

/// `eval --task classify --multi-label` scores label sets (gold split on the separator;
/// predictions as label lists or `berth classify` output, a label counting when its score
/// passes 0.5). Expected values by hand, as scikit-learn defines them: news P 1/2 R 1/2,
/// sports P 2/3 R 1 → macro-F1 (0.5 + 0.8) / 2; micro-F1 2·3 / (2·3 + 2 + 1); one row of
/// four exactly right.
#[test]
fn eval_scores_multi_label_files() {
    let tmp = tempfile::tempdir().unwrap();
    let gold = tmp.path().join("gold.tsv");
    std::fs::write(&gold, "label\nsports,news\nnews\n\nsports\n").unwrap();
    let plain = tmp.path().join("pred.txt");
    std::fs::write(&plain, "sports\nnews,sports\nnews\nsports\n").unwrap();
    let json = tmp.path().join("pred.jsonl");
    let row = |labels: &[(&str, f64)]| {
        let l: Vec<serde_json::Value> = labels
            .iter()
            .map(|(n, s)| serde_json::json!({"label": n, "score": s}))
            .collect();
        serde_json::json!({"index": 0, "labels": l}).to_string()
    };
    let lines = [
        row(&[("sports", 0.9), ("news", 0.2)]),
        row(&[("news", 0.7), ("sports", 0.6)]),
        row(&[("news", 0.51), ("sports", 0.1)]),
        row(&[("sports", 0.8), ("news", 0.5)]),
    ];
    std::fs::write(&json, lines.join("\n") + "\n").unwrap();
    for pred in [&plain, &json] {
        let out: serde_json::Value = serde_json::from_str(&ok(&berth(&[
            "eval",
            "--task",
            "classify",
            "--multi-label",
            "--gold",
            gold.to_str().unwrap(),
            "--predictions",
            pred.to_str().unwrap(),
        ])))
        .unwrap();
        let near = |k: &str, want: f64| {
            let got = out[k].as_f64().unwrap();
            assert!((got - want).abs() < 1e-12, "{k}: {got} vs {want}");
        };
        near("macro_f1", (0.5 + 0.8) / 2.0);
        near("micro_f1", 6.0 / 9.0);
        near("subset_accuracy", 0.25);
        assert_eq!(out["labels"], serde_json::json!(["news", "sports"]));
    }
}

/// `--model ORG/NAME` finds a model transformers / sentence-transformers downloaded into
/// the Hugging Face cache (`$HF_HOME/hub/models--ORG--NAME/snapshots/REV`, REV from
/// refs/main) before any network (regression test for #23).
#[test]
fn hub_ids_resolve_to_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--someone--tiny-bert");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(tiny("bert-seqcls")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    let run = |hf_home: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .env("HF_HOME", hf_home)
            .env("BERTH_HOME", tmp.path().join("berth-cache"))
            .args(["classify", "--model", "someone/tiny-bert", "hello world"])
            .output()
            .unwrap()
    };
    let via_cache = json_lines(&ok(&run(tmp.path())));
    let direct = json_lines(&ok(&berth(&[
        "classify",
        "--model",
        &tiny("bert-seqcls"),
        "hello world",
    ])));
    assert_eq!(via_cache, direct);
    // Not in the cache: a clear error naming the id, no panic.
    let missing = run(&tmp.path().join("elsewhere"));
    fails_with(&missing, &["someone/tiny-bert"]);
}

/// `embed --output FILE.npy` writes one float32 n x d array (NumPy's format) equal to the
/// JSON Lines vectors; a failed run leaves an existing output file as it was and no
/// temporary file (regression tests for #23 item 5 and #24's lost-data family).
#[test]
fn embed_writes_npy_arrays_and_never_a_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("bert-base");
    let texts = ["hello world", "the quick brown fox", "who is there?"];
    let npy = tmp.path().join("vectors.npy");
    let mut args = vec!["embed", "--model", &model, "--pooling", "mean", "--output"];
    args.push(npy.to_str().unwrap());
    args.extend(texts);
    ok(&berth(&args));
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert_eq!((10 + header_len) % 64, 0, "{header}");
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'shape': (3, 32)"),
        "{header}"
    );
    let data: Vec<f32> = bytes[10 + header_len..]
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut json_args = vec!["embed", "--model", &model, "--pooling", "mean"];
    json_args.extend(texts);
    let lines = json_lines(&ok(&berth(&json_args)));
    let want: Vec<f32> = lines.iter().flat_map(|l| floats(&l["embedding"])).collect();
    assert_eq!(data, want);
    // A run that fails (an over-long text with --no-truncate) keeps the old file whole.
    let jsonl = tmp.path().join("vectors.jsonl");
    std::fs::write(&jsonl, "old results\n").unwrap();
    let long = "word ".repeat(500);
    let out = berth(&[
        "embed",
        "--model",
        &model,
        "--no-truncate",
        "--output",
        jsonl.to_str().unwrap(),
        "ok",
        &long,
    ]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&jsonl).unwrap(), "old results\n");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Per-token vectors do not fit one array.
    fails_with(
        &berth(&[
            "embed",
            "--model",
            &model,
            "--pooling",
            "none",
            "--output",
            npy.to_str().unwrap(),
            "hi",
        ]),
        &["vectors.npy", "--pooling none"],
    );
}

/// A reader that stops early (`| head`) ends berth quietly and successfully; a full disk
/// behind stdout (`> /dev/full`) is one error line. Neither panics (regression tests for
/// #23 item 8 / #24 family 1).
#[test]
fn a_closed_or_full_stdout_is_not_a_panic() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("many.txt");
    let lines: Vec<String> = (0..3000).map(|i| format!("text number {i}")).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "embed",
            "--model",
            &tiny("bert-base"),
            "--pooling",
            "none",
            "--input",
        ])
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little, then hang up.
    let mut first = [0u8; 64];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    // /dev/full: a clean failure.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["inspect", "--model", &tiny("bert-base")])
        .stdout(full)
        .output()
        .unwrap();
    fails_with(&out, &["stdout", "No space left"]);
}

/// `eval --task rerank` warns about gold queries the run has no results for (they score
/// 0) and counts them.
#[test]
fn rerank_eval_reports_queries_missing_from_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let qrels = tmp.path().join("qrels.tsv");
    std::fs::write(&qrels, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n").unwrap();
    let run = tmp.path().join("run.tsv");
    std::fs::write(&run, "q1\td1\t0.9\nq1\td3\t0.1\n").unwrap();
    let out = berth(&[
        "eval",
        "--task",
        "rerank",
        "--gold",
        qrels.to_str().unwrap(),
        "--predictions",
        run.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["queries_without_results"], 1);
    // q1 ranks its relevant passage first, q2 has nothing: MRR (1 + 0) / 2.
    assert_eq!(report["mrr@10"], 0.5);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 of 2 queries") && err.contains("run.tsv"),
        "{err}"
    );
}

/// The `index`, `id` (if any) and `embedding` columns of a Parquet file `berth embed` wrote,
/// read with the parquet crate's Arrow reader.
fn read_parquet_vectors(path: &std::path::Path) -> (Vec<i64>, Option<Vec<String>>, Vec<Vec<f64>>) {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float16Type, Float32Type, Int64Type, Int8Type, UInt8Type};
    use arrow_array::Array;
    use arrow_schema::DataType;
    let f = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let (mut index, mut ids, mut vectors) = (Vec::new(), None::<Vec<String>>, Vec::new());
    for batch in reader {
        let batch = batch.unwrap();
        index.extend(
            batch
                .column_by_name("index")
                .unwrap()
                .as_primitive::<Int64Type>()
                .values(),
        );
        if let Some(id) = batch.column_by_name("id") {
            let id = id.as_string::<i32>();
            ids.get_or_insert_with(Vec::new)
                .extend((0..id.len()).map(|i| id.value(i).to_string()));
        }
        let list = batch
            .column_by_name("embedding")
            .unwrap()
            .as_fixed_size_list();
        for r in 0..list.len() {
            let v = list.value(r);
            let row: Vec<f64> = match v.data_type() {
                DataType::Float32 => v
                    .as_primitive::<Float32Type>()
                    .values()
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
                DataType::Float16 => v
                    .as_primitive::<Float16Type>()
                    .values()
                    .iter()
                    .map(|x| x.to_f64())
                    .collect(),
                DataType::Int8 => v
                    .as_primitive::<Int8Type>()
                    .values()
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
                DataType::UInt8 => v
                    .as_primitive::<UInt8Type>()
                    .values()
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
                t => panic!("embedding element type {t}"),
            };
            vectors.push(row);
        }
    }
    (index, ids, vectors)
}

/// Parquet in and out: `embed --output FILE.parquet` holds the JSON Lines output's index,
/// ids, kept columns and vectors (f32 exactly); a Parquet `--input` gives the rows a CSV of
/// the same table gives; bad Parquet inputs are clean errors naming the file.
#[test]
fn parquet_inputs_and_outputs_match_csv_and_json_lines() {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let model = minilm_dir().to_string_lossy().into_owned();
    let (ids, texts) = (
        [7i64, 3, 11],
        [
            "The cat sits outside.",
            "A man, with \"quotes\", plays guitar.",
            "stocks fell",
        ],
    );
    // The table as CSV and as Parquet (written by the arrow writer, dictionary-encoded and
    // zstd-compressed: not the settings berth writes with).
    let csv = tmp.path().join("rows.csv");
    let mut text = String::from("id,sentence\n");
    for (i, t) in ids.iter().zip(texts) {
        text.push_str(&format!("{i},\"{}\"\n", t.replace('"', "\"\"")));
    }
    std::fs::write(&csv, text).unwrap();
    let write_parquet = |path: &std::path::Path, sentences: Vec<Option<&str>>| {
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
            (
                "sentence",
                Arc::new(StringArray::from(sentences)) as ArrayRef,
            ),
        ])
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_dictionary_enabled(true)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    };
    let pq_in = tmp.path().join("rows.parquet");
    write_parquet(&pq_in, texts.iter().map(|t| Some(*t)).collect());
    let run = |input: &std::path::Path, extra: &[&str]| {
        let a = [
            &[
                "embed",
                "--model",
                &model,
                "--input",
                input.to_str().unwrap(),
                "--text-column",
                "sentence",
                "--id-column",
                "id",
            ][..],
            extra,
        ]
        .concat();
        berth(&a)
    };
    let from_csv = ok(&run(&csv, &[]));
    let from_parquet = ok(&run(&pq_in, &[]));
    // CSV ids are strings, Parquet's int64 numbers: the vectors and order agree.
    let (a, b) = (json_lines(&from_csv), json_lines(&from_parquet));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["embedding"], y["embedding"]);
        assert_eq!(
            x["id"].as_str().unwrap(),
            y["id"].as_i64().unwrap().to_string()
        );
    }
    // Parquet out: the JSON Lines values, f32 for f32.
    let out = tmp.path().join("out.parquet");
    ok(&run(&csv, &["--output", out.to_str().unwrap()]));
    let (index, got_ids, vectors) = read_parquet_vectors(&out);
    assert_eq!(index, vec![0, 1, 2]);
    assert_eq!(got_ids.unwrap(), ["7", "3", "11"]);
    for (v, line) in vectors.iter().zip(&a) {
        let want: Vec<f64> = floats(&line["embedding"])
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert_eq!(v, &want);
    }
    // Bad inputs.
    let not_parquet = tmp.path().join("fake.parquet");
    std::fs::write(&not_parquet, "id,sentence\n1,hi\n").unwrap();
    fails_with(
        &run(&not_parquet, &[]),
        &["fake.parquet", "not a readable Parquet file"],
    );
    fails_with(
        &berth(&[
            "embed",
            "--model",
            &model,
            "--input",
            pq_in.to_str().unwrap(),
        ]),
        &["rows.parquet", "no column \"text\"", "sentence"],
    );
    let holes = tmp.path().join("holes.parquet");
    write_parquet(&holes, vec![Some("fine"), None, Some("")]);
    fails_with(
        &run(&holes, &[]),
        &["holes.parquet: row 2", "no text in column \"sentence\""],
    );
    // A failed run leaves no output file behind.
    let never = tmp.path().join("never.parquet");
    fails_with(
        &run(&holes, &["--output", never.to_str().unwrap()]),
        &["row 2"],
    );
    assert!(!never.exists());
}

/// `embed --output-dtype`: the vectors `berth embed` gives in f32, stored as
/// sentence-transformers' `quantize_embeddings` stores them (the quantizer itself is checked
/// against sentence-transformers in berth-tasks), in JSON Lines and in .npy arrays of the
/// matching element type; int8 / uint8 write their ranges beside the output.
#[test]
fn embed_stores_quantized_vectors() {
    use berth_tasks::quantize::{quantize, ranges, Quantized, VectorDtype};
    let tmp = tempfile::tempdir().unwrap();
    let model = minilm_dir().to_string_lossy().into_owned();
    let texts = [
        "hello world",
        "a cat sits outside",
        "stocks fell sharply",
        "the fox",
    ];
    let mut args = vec!["embed", "--model", &model];
    args.extend(texts);
    let f32s: Vec<Vec<f32>> = json_lines(&ok(&berth(&args)))
        .iter()
        .map(|l| floats(&l["embedding"]))
        .collect();
    let r = ranges(&f32s);
    for (name, dtype, width) in [
        ("f16", VectorDtype::F16, 2),
        ("int8", VectorDtype::Int8, 1),
        ("uint8", VectorDtype::Uint8, 1),
        ("binary", VectorDtype::Binary, 1),
        ("ubinary", VectorDtype::Ubinary, 1),
    ] {
        let want: Vec<Quantized> = f32s.iter().map(|v| quantize(v, dtype, Some(&r))).collect();
        let jsonl = tmp.path().join(format!("{name}.jsonl"));
        let npy = tmp.path().join(format!("{name}.npy"));
        let parquet = tmp.path().join(format!("{name}.parquet"));
        for out in [&jsonl, &npy, &parquet] {
            let mut a = args.clone();
            a.extend(["--output-dtype", name, "--output", out.to_str().unwrap()]);
            ok(&berth(&a));
        }
        let lines = json_lines(&std::fs::read_to_string(&jsonl).unwrap());
        for (l, w) in lines.iter().zip(&want) {
            let got = match w {
                Quantized::Floats(_) => Quantized::Floats(floats(&l["embedding"])),
                Quantized::Ints(_) => Quantized::Ints(
                    l["embedding"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_i64().unwrap() as i32)
                        .collect(),
                ),
            };
            assert_eq!(&got, w, "{name}");
        }
        let bytes = std::fs::read(&npy).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            header.contains(&format!("'descr': '{}'", dtype.npy_descr())),
            "{header}"
        );
        let body = &bytes[10 + header_len..];
        let per_row = body.len() / texts.len() / width;
        assert!(
            header.contains(&format!("'shape': ({}, {per_row})", texts.len())),
            "{header}"
        );
        let flat: Vec<f64> = match dtype {
            VectorDtype::F16 => body
                .chunks(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            VectorDtype::Int8 | VectorDtype::Binary => {
                body.iter().map(|&b| b as i8 as f64).collect()
            }
            _ => body.iter().map(|&b| b as f64).collect(),
        };
        let want_flat: Vec<f64> = want
            .iter()
            .flat_map(|q| match q {
                Quantized::Floats(f) => f.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                Quantized::Ints(i) => i.iter().map(|&x| x as f64).collect(),
            })
            .collect();
        assert_eq!(flat, want_flat, "{name} .npy");
        let (index, _, vectors) = read_parquet_vectors(&parquet);
        assert_eq!(index, (0..texts.len() as i64).collect::<Vec<_>>());
        assert_eq!(vectors.concat(), want_flat, "{name} .parquet");
        let ranges_file = tmp.path().join(format!("{name}.npy.ranges.json"));
        assert_eq!(ranges_file.exists(), dtype.needs_ranges(), "{name}");
    }
    fails_with(
        &berth(&[&args[..], &["--output-dtype", "int8"]].concat()),
        &["--output-dtype", "--output FILE"],
    );
}
