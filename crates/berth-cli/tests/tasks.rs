//! The task commands end to end through the `berth` binary: classify, ner, qa, rerank,
//! similarity, embed with windows, and eval, against transformers / sentence-transformers /
//! conlleval / scikit-learn outputs (fixtures/tasks, fixtures/metrics), plus their bad inputs.
use std::path::Path;

use serde_json::Value;

mod common;
use common::*;

fn fixture_json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap()
}

fn case(task: &str, model: &str, params: Value) -> Value {
    let cases = fixture_json("fixtures/tasks/pipelines.json");
    cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["task"] == task && c["model"] == model && c["params"] == params)
        .cloned()
        .unwrap_or_else(|| panic!("no fixture case {task} {model} {params}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn close(got: &Value, want: &Value, tol: f64, what: &str) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!((g - w).abs() <= tol, "{what}: {g} vs reference {w}");
}

/// Runs berth with `args` followed by `texts`.
fn run(args: &[&str], texts: &[String]) -> Vec<Value> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(texts.iter().map(String::as_str));
    json_lines(&ok(&berth(&all)))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn classify_matches_the_text_classification_pipeline() {
    let m = task_model("bert-classify");
    let c = case(
        "classify",
        "bert-classify",
        serde_json::json!({"top_k": null}),
    );
    let got = run(
        &["classify", "--model", &m, "--top-k", "0"],
        &strs(&c["inputs"]),
    );
    let pairs = case(
        "classify",
        "bert-classify",
        serde_json::json!({"top_k": null, "pair": true}),
    );
    let flat: Vec<String> = pairs["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(strs)
        .collect();
    let got_pairs = run(
        &["classify", "--model", &m, "--top-k", "0", "--pair"],
        &flat,
    );
    let long = case(
        "classify",
        "bert-classify",
        serde_json::json!({"top_k": null, "max_length": 24, "stride": 6, "long_pool": "max"}),
    );
    let got_long = run(
        &[
            "classify",
            "--model",
            &m,
            "--top-k",
            "0",
            "--max-length",
            "24",
            "--stride",
            "6",
            "--window-pool",
            "max",
        ],
        &strs(&long["inputs"]),
    );
    let multi = case(
        "classify",
        "bert-multilabel",
        serde_json::json!({"top_k": null}),
    );
    let got_multi = run(
        &[
            "classify",
            "--model",
            &task_model("bert-multilabel"),
            "--top-k",
            "0",
        ],
        &strs(&multi["inputs"]),
    );
    let reg = case("classify", "bert-regression", serde_json::json!({}));
    let got_reg = run(
        &["classify", "--model", &task_model("bert-regression")],
        &strs(&reg["inputs"]),
    );
    for (got, c) in [
        (got, c),
        (got_pairs, pairs),
        (got_long, long),
        (got_multi, multi),
        (got_reg, reg),
    ] {
        let want = c["outputs"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g["index"], i);
            let (g, w) = (g["labels"].as_array().unwrap(), w.as_array().unwrap());
            assert_eq!(g.len(), w.len(), "{}", c["params"]);
            for (a, b) in g.iter().zip(w) {
                assert_eq!(a["label"], b["label"], "{} {}", c["model"], c["params"]);
                close(
                    &a["score"],
                    &b["score"],
                    1e-4,
                    &format!("{} {}", c["model"], c["params"]),
                );
            }
        }
    }
}

#[test]
fn ner_matches_the_token_classification_pipeline() {
    for (model, params, flags) in [
        (
            "bert-ner",
            serde_json::json!({"aggregation": "first"}),
            vec!["--aggregation", "first"],
        ),
        (
            "bert-ner",
            serde_json::json!({"aggregation": "none"}),
            vec!["--aggregation", "none"],
        ),
        (
            "roberta-ner",
            serde_json::json!({"aggregation": "average"}),
            vec!["--aggregation", "average"],
        ),
        (
            "roberta-ner",
            serde_json::json!({"aggregation": "simple", "ignore_labels": []}),
            vec!["--ignore-labels", ""],
        ),
        (
            "roberta-ner",
            serde_json::json!({"aggregation": "max", "stride": 6, "max_length": 24}),
            vec![
                "--aggregation",
                "max",
                "--stride",
                "6",
                "--max-length",
                "24",
            ],
        ),
    ] {
        let c = case("ner", model, params);
        let m = task_model(model);
        let mut args = vec!["ner", "--model", m.as_str()];
        args.extend(flags);
        let got = run(&args, &strs(&c["inputs"]));
        for (g, w) in got.iter().zip(c["outputs"].as_array().unwrap()) {
            let (g, w) = (g["entities"].as_array().unwrap(), w.as_array().unwrap());
            assert_eq!(g.len(), w.len(), "{model} {}", c["params"]);
            for (a, b) in g.iter().zip(w) {
                for k in ["entity", "entity_group", "word", "start", "end", "index"] {
                    assert_eq!(a.get(k), b.get(k), "{model} {}: {k}", c["params"]);
                }
                close(&a["score"], &b["score"], 1e-4, model);
            }
        }
    }
}

#[test]
fn qa_matches_the_question_answering_pipeline() {
    let c = case(
        "qa",
        "roberta-qa",
        serde_json::json!({"max_seq_len": 32, "doc_stride": 8, "handle_impossible_answer": true, "top_k": 3}),
    );
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = c["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, x)| serde_json::json!({"id": format!("q{i}"), "question": x["question"], "context": x["context"]}).to_string())
        .collect();
    let input = write(tmp.path(), "qa.jsonl", &lines.join("\n"));
    let m = task_model("roberta-qa");
    let got = run(
        &[
            "qa",
            "--model",
            &m,
            "--input",
            &input,
            "--max-seq-len",
            "32",
            "--doc-stride",
            "8",
            "--handle-impossible-answer",
            "--top-k",
            "3",
        ],
        &[],
    );
    for (i, (g, w)) in got.iter().zip(c["outputs"].as_array().unwrap()).enumerate() {
        assert_eq!(g["id"], format!("q{i}"));
        let (g, w) = (g["answers"].as_array().unwrap(), w.as_array().unwrap());
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            for k in ["answer", "start", "end"] {
                assert_eq!(a[k], b[k], "question {i}: {k}");
            }
            close(&a["score"], &b["score"], 1e-4, "qa");
        }
    }
    // One question on the command line.
    let one = case("qa", "bert-qa", serde_json::json!({}));
    let x = &one["inputs"][0];
    let got = run(
        &[
            "qa",
            "--model",
            &task_model("bert-qa"),
            "--question",
            x["question"].as_str().unwrap(),
            "--context",
            x["context"].as_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        got[0]["answers"][0]["answer"],
        one["outputs"][0][0]["answer"]
    );
}

#[test]
fn rerank_matches_the_cross_encoder() {
    let c = case("rerank", "bert-rerank", serde_json::json!({}));
    let m = task_model("bert-rerank");
    let got = run(
        &[
            "rerank",
            "--model",
            &m,
            "--query",
            c["query"].as_str().unwrap(),
        ],
        &strs(&c["inputs"]),
    );
    let want = c["outputs"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g["rank"], r + 1);
        assert_eq!(g["index"], w["corpus_id"]);
        close(&g["score"], &w["score"], 1e-4, "rerank");
    }
    let top = run(
        &["rerank", "--model", &m, "--query", "who?", "--top-k", "2"],
        &strs(&c["inputs"]),
    );
    assert_eq!(top.len(), 2);
}

#[test]
fn similarity_and_windowed_embeddings_match_sentence_transformers() {
    let r = fixture_json("fixtures/tasks/minilm.json");
    let m = minilm_dir().to_string_lossy().into_owned();
    let got = run(
        &["similarity", "--model", &m],
        &strs(&r["similarity_texts"]),
    );
    for (g, w) in got.iter().zip(r["similarity"].as_array().unwrap()) {
        for (a, b) in g["similarities"]
            .as_array()
            .unwrap()
            .iter()
            .zip(w.as_array().unwrap())
        {
            close(a, b, 1e-5, "cosine similarity");
        }
    }
    let long = r["long_text"].as_str().unwrap().to_string();
    for pool in ["mean", "max", "first"] {
        let got = run(
            &[
                "embed",
                "--model",
                &m,
                "--max-length",
                "128",
                "--stride",
                "32",
                "--window-pool",
                pool,
            ],
            std::slice::from_ref(&long),
        );
        let (g, w) = (
            floats(&got[0]["embedding"]),
            floats(&r["long_embeddings"][pool]),
        );
        let worst = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{pool}-pooled windows: max abs diff {worst}");
    }
}

#[test]
fn eval_reproduces_conlleval_and_the_reference_metrics() {
    // conlleval input (gold and predicted tags in one file): the report, byte for byte.
    let gt = root()
        .join("fixtures/metrics/ground_truth.txt")
        .to_string_lossy()
        .into_owned();
    let report = ok(&berth(&["eval", "--task", "ner", "--gold", &gt]));
    assert_eq!(
        report,
        std::fs::read_to_string(root().join("fixtures/metrics/ground_truth.conlleval.txt"))
            .unwrap()
    );
    // The same data as separate gold and prediction CoNLL files.
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&gt).unwrap();
    let col = |keep: usize| {
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                if f.len() < 4 {
                    String::new()
                } else {
                    format!("{} {} {}", f[0], f[1], f[keep])
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (g, p) = (
        write(tmp.path(), "gold.conll", &col(2)),
        write(tmp.path(), "pred.conll", &col(3)),
    );
    assert_eq!(
        ok(&berth(&[
            "eval",
            "--task",
            "ner",
            "--gold",
            &g,
            "--predictions",
            &p
        ])),
        report
    );

    let reference = fixture_json("fixtures/metrics/reference.json");
    // SQuAD: every tricky case as one question.
    let cases = reference["squad"].as_array().unwrap();
    let qas: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"id": i.to_string(), "question": "q", "answers": c["golds"].as_array().unwrap().iter().map(|t| serde_json::json!({"text": t, "answer_start": 0})).collect::<Vec<_>>()}))
        .collect();
    let gold = serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]});
    let preds: serde_json::Map<String, Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), c["prediction"].clone()))
        .collect();
    let (g, p) = (
        write(tmp.path(), "squad.json", &gold.to_string()),
        write(tmp.path(), "pred.json", &Value::Object(preds).to_string()),
    );
    let got: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "qa",
        "--gold",
        &g,
        "--predictions",
        &p,
    ])))
    .unwrap();
    let mean =
        |k: &str| cases.iter().map(|c| c[k].as_f64().unwrap()).sum::<f64>() / cases.len() as f64;
    close(
        &got["exact_match"],
        &serde_json::json!(mean("exact")),
        1e-9,
        "EM",
    );
    close(&got["f1"], &serde_json::json!(mean("f1")), 1e-9, "F1");

    // Classification against scikit-learn.
    let c = &reference["classification"];
    let g = write(tmp.path(), "labels.txt", &strs(&c["gold"]).join("\n"));
    let p = write(tmp.path(), "pred.txt", &strs(&c["pred"]).join("\n"));
    let got: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "classify",
        "--gold",
        &g,
        "--predictions",
        &p,
    ])))
    .unwrap();
    close(&got["accuracy"], &c["accuracy"], 1e-12, "accuracy");
    close(
        &got["macro_avg"]["f1"],
        &c["macro"]["f1"],
        1e-12,
        "macro F1",
    );

    // Ranking against scikit-learn: every (query, doc) judged, so both average over all queries.
    let n = &reference["ndcg"];
    let (mut qrels, mut runs) = (vec!["query-id\tcorpus-id\tscore".to_string()], Vec::new());
    for (q, (rels, scores)) in n["relevance"]
        .as_array()
        .unwrap()
        .iter()
        .zip(n["scores"].as_array().unwrap())
        .enumerate()
    {
        for (d, (r, s)) in rels
            .as_array()
            .unwrap()
            .iter()
            .zip(scores.as_array().unwrap())
            .enumerate()
        {
            qrels.push(format!("q{q}\td{d}\t{r}"));
            runs.push(format!("q{q}\td{d}\t{s}"));
        }
    }
    let (g, p) = (
        write(tmp.path(), "qrels.tsv", &qrels.join("\n")),
        write(tmp.path(), "run.tsv", &runs.join("\n")),
    );
    let got: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "rerank",
        "--gold",
        &g,
        "--predictions",
        &p,
    ])))
    .unwrap();
    close(&got["ndcg@10"], &n["ndcg@10"], 1e-12, "nDCG@10");

    // Correlation against scipy.
    let c = &reference["correlation"];
    let nums = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (g, p) = (
        write(tmp.path(), "x.txt", &nums(&c["x"])),
        write(tmp.path(), "y.txt", &nums(&c["y"])),
    );
    let got: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "similarity",
        "--gold",
        &g,
        "--predictions",
        &p,
    ])))
    .unwrap();
    close(&got["spearman"], &c["spearman"], 1e-12, "Spearman");
    close(&got["pearson"], &c["pearson"], 1e-12, "Pearson");
}

#[test]
fn task_inputs_that_cannot_work_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    // QA without a context.
    fails_with(
        &berth(&[
            "qa",
            "--model",
            &task_model("bert-qa"),
            "--question",
            "who?",
        ]),
        &["--context"],
    );
    let qa_file = write(tmp.path(), "qa.jsonl", "{\"question\": \"who?\"}\n");
    fails_with(
        &berth(&["qa", "--model", &task_model("bert-qa"), "--input", &qa_file]),
        &["qa.jsonl:1", "context"],
    );
    // A pair task given one text.
    fails_with(
        &berth(&[
            "classify",
            "--model",
            &task_model("bert-classify"),
            "--pair",
            "only one",
        ]),
        &["--pair", "two"],
    );
    let one = write(tmp.path(), "one.txt", "no tab here\n");
    fails_with(
        &berth(&[
            "classify",
            "--model",
            &task_model("bert-classify"),
            "--pair",
            "--input",
            &one,
        ]),
        &["one.txt:1", "tab"],
    );
    // A model without the needed head.
    fails_with(
        &berth(&["ner", "--model", &task_model("bert-classify"), "x"]),
        &["bert-classify", "token-classification"],
    );
    fails_with(
        &berth(&[
            "qa",
            "--model",
            &tiny("bert-base"),
            "--question",
            "q",
            "--context",
            "c",
        ]),
        &["bert-base", "question-answering"],
    );
    fails_with(
        &berth(&[
            "rerank",
            "--model",
            &task_model("bert-classify"),
            "--query",
            "q",
            "a",
            "b",
        ]),
        &["one output"],
    );
    // Labels missing from config: id2label names 2 labels for a 3-way head (the loader checks
    // the head's shape against the label count).
    let fewer = broken_copy(&task_model("bert-classify"), |d| {
        let p = d.join("config.json");
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["id2label"] = serde_json::json!({"0": "negative", "1": "positive"});
        c["label2id"] = serde_json::json!({"negative": 0, "positive": 1});
        std::fs::write(&p, c.to_string()).unwrap();
    });
    fails_with(
        &berth(&[
            "classify",
            "--model",
            &fewer.path().to_string_lossy(),
            "x y",
        ]),
        &[
            "model.safetensors",
            "classifier.weight",
            "[3, 32]",
            "config implies [2, 32]",
        ],
    );
    // NER stride without aggregation, as transformers refuses.
    fails_with(
        &berth(&[
            "ner",
            "--model",
            &task_model("bert-ner"),
            "--aggregation",
            "none",
            "--stride",
            "4",
            "x",
        ]),
        &["stride"],
    );
    // A stride that leaves no room for new tokens.
    fails_with(&berth(&["ner", "--model", &task_model("bert-ner"), "--stride", "30", "--max-length", "24", "the quick brown fox jumps over the lazy dog. hello world, this is a tiny corpus for a tiny tokenizer!"]), &["stride 30"]);
    // Predictions whose line count does not match gold.
    let g = write(tmp.path(), "gold.txt", "a\nb\nc\n");
    let p = write(tmp.path(), "pred.txt", "a\nb\n");
    fails_with(
        &berth(&[
            "eval",
            "--task",
            "classify",
            "--gold",
            &g,
            "--predictions",
            &p,
        ]),
        &["pred.txt", "2 lines", "3"],
    );
    let gc = write(tmp.path(), "gold.conll", "EU B-ORG\nrejects O\n");
    let pc = write(
        tmp.path(),
        "pred.conll",
        "EU B-ORG\nrejects O\nGerman B-MISC\n",
    );
    fails_with(
        &berth(&["eval", "--task", "ner", "--gold", &gc, "--predictions", &pc]),
        &["pred.conll", "3 lines", "2"],
    );
    let ragged = write(tmp.path(), "ragged.txt", "EU B-ORG B-ORG\nrejects O\n");
    fails_with(
        &berth(&["eval", "--task", "ner", "--gold", &ragged]),
        &["ragged.txt:2", "fields"],
    );
}

/// `--input` as CSV / TSV / JSON Lines: the text (and pair) columns are what is run — the
/// same results as the texts given as arguments — and `--id-column` / `--keep-columns` are
/// carried to each output line. Bad rows are errors naming file and line.
#[test]
fn column_inputs_run_their_text_column_and_carry_ids() {
    use common::{berth, fails_with, json_lines, ok};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cls = common::task_model("bert-classify");
    let texts = ["a great, great film", "awful \"acting\"", "fine"];
    let csv = write(
        d,
        "in.csv",
        &format!(
            "id,text,label\n7,\"{}\",pos\n8,\"{}\",neg\n9,{},pos\n",
            texts[0],
            texts[1].replace('"', "\"\""),
            texts[2]
        ),
    );
    let by_args = json_lines(&ok(&berth(
        &[&["classify", "--model", &cls][..], &texts[..]].concat(),
    )));
    let from_csv = ["classify", "--model", &cls, "--input", &csv];
    let with = |extra: &[&str]| berth(&[&from_csv[..], extra].concat());
    let by_rows = json_lines(&ok(&with(&[
        "--id-column",
        "id",
        "--keep-columns",
        "label",
    ])));
    assert_eq!(by_rows.len(), 3);
    for (i, (row, arg)) in by_rows.iter().zip(&by_args).enumerate() {
        assert_eq!(row["labels"], arg["labels"]);
        assert_eq!(row["index"], i);
        assert_eq!(row["id"], ["7", "8", "9"][i]);
        assert_eq!(row["label"], ["pos", "neg", "pos"][i]);
    }
    // Pairs from two columns equal tab-separated pair lines.
    let pair_tsv = write(
        d,
        "pairs.tsv",
        "q\tp\nis it good?\tit is great\nwho?\tnobody\n",
    );
    let pair_lines = write(d, "pairs.txt", "is it good?\tit is great\nwho?\tnobody\n");
    let a = json_lines(&ok(&berth(&[
        "classify",
        "--model",
        &cls,
        "--pair",
        "--input",
        &pair_tsv,
        "--text-column",
        "q",
        "--pair-column",
        "p",
    ])));
    let b = json_lines(&ok(&berth(&[
        "classify",
        "--model",
        &cls,
        "--pair",
        "--input",
        &pair_lines,
    ])));
    assert_eq!(a, b);
    // embed from a TSV column; JSON Lines ids keep their JSON type.
    let tiny = common::tiny("bert-base");
    let tsv = write(d, "in.tsv", "sentence\tn\nhello world\t1\nthe fox\t2\n");
    let tsv_args = [
        "embed",
        "--model",
        &tiny,
        "--input",
        &tsv,
        "--text-column",
        "sentence",
        "--id-column",
        "n",
    ];
    let rows = json_lines(&ok(&berth(&tsv_args)));
    let args = json_lines(&ok(&berth(&[
        "embed",
        "--model",
        &tiny,
        "hello world",
        "the fox",
    ])));
    for (r, a) in rows.iter().zip(&args) {
        assert_eq!(r["embedding"], a["embedding"]);
    }
    assert_eq!(rows[1]["id"], "2");
    let ner = common::task_model("bert-ner");
    let jsonl = write(d, "in.jsonl", "{\"id\": 5, \"text\": \"EU rejects German call\"}\n{\"id\": 6, \"text\": \"Peter lives in Paris\"}\n");
    let rows = json_lines(&ok(&berth(&[
        "ner",
        "--model",
        &ner,
        "--input",
        &jsonl,
        "--id-column",
        "id",
    ])));
    let args = json_lines(&ok(&berth(&[
        "ner",
        "--model",
        &ner,
        "EU rejects German call",
        "Peter lives in Paris",
    ])));
    assert_eq!(rows[0]["entities"], args[0]["entities"]);
    assert_eq!(rows[1]["id"], 6);
    // Errors name file and line.
    fails_with(
        &with(&["--text-column", "nope"]),
        &["in.csv:1", "no column \"nope\"", "id, text, label"],
    );
    let empty = write(d, "empty.tsv", "text\tid\nok\t1\n\t2\n");
    fails_with(
        &berth(&["embed", "--model", &tiny, "--input", &empty]),
        &["empty.tsv:3", "empty text"],
    );
    let ragged = write(d, "ragged.csv", "text,id\nok,1\nbad\n");
    fails_with(
        &berth(&["embed", "--model", &tiny, "--input", &ragged]),
        &["ragged.csv:3"],
    );
    fails_with(
        &with(&["--keep-columns", "label,index"]),
        &["--keep-columns \"index\"", "already"],
    );
    fails_with(
        &with(&["--id-column", "id", "--keep-columns", "id"]),
        &["--keep-columns \"id\""],
    );
    let unterminated = write(d, "quote.csv", "text\nok\n\"never closed\nmore\n");
    fails_with(
        &berth(&["embed", "--model", &tiny, "--input", &unterminated]),
        &["quote.csv:3", "unterminated quoted field"],
    );
    let blank = write(d, "blank.txt", "ok\n\nmore\n");
    fails_with(
        &berth(&["embed", "--model", &tiny, "--input", &blank]),
        &["blank.txt:2", "empty line"],
    );
    fails_with(
        &berth(&[
            "embed",
            "--model",
            &tiny,
            "--input",
            &blank,
            "--id-column",
            "id",
        ]),
        &["--id-column", "CSV, TSV, JSON Lines or Parquet"],
    );
    let npy = d.join("v.npy");
    fails_with(
        &berth(&[&tsv_args[..], &["--output", npy.to_str().unwrap()]].concat()),
        &["v.npy", "JSON Lines"],
    );
    assert!(!npy.exists(), "no output file is left behind");
    fails_with(
        &berth(&[
            "fill-mask",
            "--model",
            &common::tiny("bert-mlm"),
            "--input",
            &tsv,
            "--id-column",
            "n",
        ]),
        &["--id-column", "classify, ner and embed"],
    );
}
