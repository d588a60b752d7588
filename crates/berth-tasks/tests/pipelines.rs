//! Parity with transformers' pipelines and sentence-transformers' CrossEncoder on tiny
//! checkpoints: fixtures/tasks/pipelines.json holds their outputs (scripts/make_task_reference.py).
use std::path::PathBuf;

use berth_tasks::*;
use berth_text::Truncation;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("fixtures/tasks/pipelines.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn load(case: &Value) -> Pipeline {
    let dir = root()
        .join("fixtures/tasks")
        .join(case["model"].as_str().unwrap());
    let max_length = case["params"]["max_length"].as_u64().map(|m| m as usize);
    // Small batches: inputs split across several packed batches.
    Pipeline::load(
        &dir,
        &PipelineOptions {
            max_length,
            truncation: Truncation::Truncate,
            batch_tokens: 64,
            ..PipelineOptions::default()
        },
    )
    .unwrap()
    .0
}

fn close(what: &str, got: f64, want: &Value) {
    let want = want.as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-4,
        "{what}: score {got} vs transformers {want}"
    );
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn classification_matches_transformers() {
    let mut n = 0;
    for case in cases().iter().filter(|c| c["task"] == "classify") {
        let p = load(case);
        let params = &case["params"];
        let inputs: Vec<TextPair> = if params["pair"] == true {
            case["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    (
                        x[0].as_str().unwrap().into(),
                        Some(x[1].as_str().unwrap().into()),
                    )
                })
                .collect()
        } else {
            strings(&case["inputs"])
                .into_iter()
                .map(|t| (t, None))
                .collect()
        };
        let top_k = match &params["top_k"] {
            Value::Null if params.get("top_k").is_some() => None, // top_k=None: every label
            Value::Number(k) => Some(k.as_u64().unwrap() as usize),
            _ => Some(1),
        };
        let function = params["function_to_apply"].as_str().map(|f| match f {
            "sigmoid" => ClassFunction::Sigmoid,
            "none" => ClassFunction::Identity,
            _ => ClassFunction::Softmax,
        });
        let windows = params["stride"].as_u64().map(|s| Windows {
            stride: s as usize,
            pool: match params["long_pool"].as_str().unwrap() {
                "mean" => WindowPool::Mean,
                "max" => WindowPool::Max,
                _ => WindowPool::First,
            },
        });
        let opts = ClassifyOptions {
            top_k,
            function,
            windows,
        };
        let (got, encs) = classify(&p, &inputs, &opts, 0).unwrap();
        if let Some(w) = case["windows"].as_u64() {
            assert_eq!(encs.len(), w as usize, "window count of {}", case["model"]);
        }
        for (g, want) in got.iter().zip(case["outputs"].as_array().unwrap()) {
            let want = want.as_array().unwrap();
            assert_eq!(g.len(), want.len(), "{} {params}", case["model"]);
            for (l, w) in g.iter().zip(want) {
                assert_eq!(
                    l.label,
                    w["label"].as_str().unwrap(),
                    "{} {params}",
                    case["model"]
                );
                close(
                    &format!("{} {params}", case["model"]),
                    l.score as f64,
                    &w["score"],
                );
                n += 1;
            }
        }
    }
    assert!(n > 50, "only {n} labels compared");
}

#[test]
fn rerank_matches_cross_encoder() {
    for case in cases().iter().filter(|c| c["task"] == "rerank") {
        let p = load(case);
        let got = rerank(
            &p,
            case["query"].as_str().unwrap(),
            &strings(&case["inputs"]),
            false,
        )
        .unwrap();
        let want = case["outputs"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.corpus_id as u64, w["corpus_id"].as_u64().unwrap());
            close("rerank", g.score as f64, &w["score"]);
        }
    }
}

#[test]
fn token_classification_matches_transformers() {
    let mut n = 0;
    for case in cases().iter().filter(|c| c["task"] == "ner") {
        let p = load(case);
        let params = &case["params"];
        let aggregation = match params["aggregation"].as_str().unwrap() {
            "none" => Aggregation::None,
            "simple" => Aggregation::Simple,
            "first" => Aggregation::First,
            "average" => Aggregation::Average,
            _ => Aggregation::Max,
        };
        let ignore_labels = params
            .get("ignore_labels")
            .map_or(vec!["O".to_string()], strings);
        let stride = params["stride"].as_u64().map(|s| s as usize);
        let opts = NerOptions {
            aggregation,
            ignore_labels,
            stride,
            bioes: false,
        };
        let (got, _) = token_classify(&p, &strings(&case["inputs"]), &opts, 0).unwrap();
        for (t, (g, want)) in got
            .iter()
            .zip(case["outputs"].as_array().unwrap())
            .enumerate()
        {
            let want = want.as_array().unwrap();
            let ctx = format!("{} {params} text {t}", case["model"]);
            assert_eq!(g.len(), want.len(), "{ctx}: {g:#?}\nvs {want:#?}");
            for (e, w) in g.iter().zip(want) {
                let v = serde_json::to_value(e).unwrap();
                for k in ["entity", "entity_group", "word", "start", "end", "index"] {
                    assert_eq!(v.get(k), w.get(k), "{ctx}: {k} of {v} vs {w}");
                }
                close(&ctx, e.score as f64, &w["score"]);
                n += 1;
            }
        }
    }
    assert!(n > 200, "only {n} entities compared");
}

#[test]
fn question_answering_matches_transformers() {
    let mut n = 0;
    for case in cases().iter().filter(|c| c["task"] == "qa") {
        let p = load(case);
        let params = &case["params"];
        let get = |k: &str| params[k].as_u64().map(|v| v as usize);
        let opts = QaOptions {
            top_k: get("top_k").unwrap_or(1),
            max_seq_len: get("max_seq_len"),
            doc_stride: get("doc_stride"),
            max_answer_len: get("max_answer_len").unwrap_or(15),
            handle_impossible_answer: params["handle_impossible_answer"] == true,
            align_to_words: params["align_to_words"] != false,
            ..QaOptions::default()
        };
        let inputs: Vec<QaInput> = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| QaInput {
                question: x["question"].as_str().unwrap().into(),
                context: x["context"].as_str().unwrap().into(),
            })
            .collect();
        let got = answer(&p, &inputs, &opts, 0).unwrap();
        for (t, (g, want)) in got
            .iter()
            .zip(case["outputs"].as_array().unwrap())
            .enumerate()
        {
            let want = want.as_array().unwrap();
            let ctx = format!("{} {params} question {t}", case["model"]);
            assert_eq!(g.len(), want.len(), "{ctx}: {g:#?}\nvs {want:#?}");
            for (a, w) in g.iter().zip(want) {
                assert_eq!(a.answer, w["answer"].as_str().unwrap(), "{ctx}");
                assert_eq!(
                    (a.start as u64, a.end as u64),
                    (w["start"].as_u64().unwrap(), w["end"].as_u64().unwrap()),
                    "{ctx}"
                );
                close(&ctx, a.score, &w["score"]);
                n += 1;
            }
        }
    }
    assert!(n > 50, "only {n} answers compared");
}
