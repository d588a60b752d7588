//! `berth search` and `berth eval --task retrieval` through the binary, against rankings
//! computed here from `berth embed`'s vectors and `berth rerank`'s order.
mod common;

use std::path::Path;

use common::{berth, fails_with, floats, json_lines, minilm_dir, ok, task_model};
use serde_json::Value;

const DOCS: [(&str, &str, &str); 6] = [
    ("d1", "Dogs", "Dogs bark at strangers and wag their tails."),
    ("d2", "Cats", "Cats purr when they are content."),
    ("d3", "Paris", "Paris is the capital of France."),
    ("d4", "", "The Nile is the longest river in Africa."),
    ("d5", "Guitars", "A guitar usually has six strings."),
    ("d6", "Rust", "Rust is a systems programming language."),
];
const QUERIES: [(&str, &str, &str); 4] = [
    ("q1", "Which animal barks?", "d1"),
    ("q2", "What is the capital of France?", "d3"),
    ("q3", "How many strings does a guitar have?", "d5"),
    ("q4", "What is the longest river in Africa?", "d4"),
];

fn write_beir(dir: &Path) -> (String, String, String) {
    let corpus: Vec<String> = DOCS
        .iter()
        .map(|(id, t, x)| serde_json::json!({"_id": id, "title": t, "text": x}).to_string())
        .collect();
    let queries: Vec<String> = QUERIES
        .iter()
        .map(|(id, x, _)| serde_json::json!({"_id": id, "text": x}).to_string())
        .collect();
    let qrels: Vec<String> = std::iter::once("query-id\tcorpus-id\tscore".to_string())
        .chain(QUERIES.iter().map(|(q, _, d)| format!("{q}\t{d}\t1")))
        .collect();
    let p = |name: &str, lines: Vec<String>| {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.to_string_lossy().into_owned()
    };
    (
        p("corpus.jsonl", corpus),
        p("queries.jsonl", queries),
        p("qrels.tsv", qrels),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn search_ranks_as_cosine_of_the_embeddings_and_reuses_its_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, queries, qrels) = write_beir(tmp.path());
    let model = minilm_dir().to_string_lossy().into_owned();
    let index = tmp.path().join("corpus.idx");
    let idx = index.to_str().unwrap();
    // The reference: cosine of `berth embed` vectors of "title text" documents.
    let docs: Vec<String> = DOCS
        .iter()
        .map(|(_, t, x)| format!("{t} {x}").trim().to_string())
        .collect();
    let mut args = vec!["embed", "--model", &model];
    args.extend(docs.iter().map(String::as_str));
    let doc_vecs: Vec<Vec<f32>> = json_lines(&ok(&berth(&args)))
        .iter()
        .map(|l| floats(&l["embedding"]))
        .collect();
    let search = |extra: &[&str]| {
        let mut a = vec![
            "search", "--model", &model, "--corpus", &corpus, "--index", idx,
        ];
        a.extend_from_slice(extra);
        berth(&a)
    };
    let out = search(&["--queries", &queries, "--top-k", "3"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("embedded"), "{err}");
    let lines = json_lines(&ok(&out));
    assert_eq!(lines.len(), QUERIES.len());
    for (line, (qid, text, relevant)) in lines.iter().zip(QUERIES) {
        assert_eq!(line["query_id"], qid);
        let q =
            floats(&json_lines(&ok(&berth(&["embed", "--model", &model, text])))[0]["embedding"]);
        let mut want: Vec<(f64, &str)> = doc_vecs
            .iter()
            .zip(DOCS)
            .map(|(v, (id, _, _))| (cosine(&q, v), id))
            .collect();
        want.sort_by(|a, b| b.0.total_cmp(&a.0));
        let got = line["results"].as_array().unwrap();
        assert_eq!(got.len(), 3);
        for (g, (score, id)) in got.iter().zip(&want) {
            assert_eq!(g["corpus_id"], *id, "{qid}: {got:?} vs {want:?}");
            assert!((g["score"].as_f64().unwrap() - score).abs() < 1e-5);
        }
        assert_eq!(got[0]["corpus_id"], relevant, "{qid}");
    }
    // The second search loads the index instead of embedding the corpus again.
    let out = search(&["--query", "Which animal barks?", "--top-k", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("loaded"));
    assert_eq!(json_lines(&ok(&out))[0]["results"][0]["corpus_id"], "d1");
    // eval --task retrieval: every query finds its paragraph first, so every metric is 1.
    let report: Value = serde_json::from_str(&ok(&berth(&[
        "eval",
        "--task",
        "retrieval",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--queries",
        &queries,
        "--qrels",
        &qrels,
        "--index",
        idx,
    ])))
    .unwrap();
    for k in ["ndcg@10", "mrr@10", "recall@100", "map@100"] {
        assert!(
            (report[k].as_f64().unwrap() - 1.0).abs() < 1e-12,
            "{k}: {report}"
        );
    }
    assert_eq!(report["queries"], 4);

    // With a cross-encoder: the first candidates come back in the order `berth rerank`
    // gives the same passages.
    let ce = task_model("bert-rerank");
    let q = "Which animal barks?";
    let out = json_lines(&ok(&search(&[
        "--query",
        q,
        "--top-k",
        "4",
        "--rerank",
        &ce,
        "--rerank-top",
        "4",
    ])));
    let got: Vec<&str> = out[0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["corpus_id"].as_str().unwrap())
        .collect();
    let plain = json_lines(&ok(&search(&["--query", q, "--top-k", "4"])));
    let candidates: Vec<&str> = plain[0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["corpus_id"].as_str().unwrap())
        .collect();
    let texts: Vec<String> = candidates
        .iter()
        .map(|id| {
            let (_, t, x) = DOCS.iter().find(|d| d.0 == *id).unwrap();
            format!("{t} {x}").trim().to_string()
        })
        .collect();
    let mut args = vec!["rerank", "--model", &ce, "--query", q];
    args.extend(texts.iter().map(String::as_str));
    let order: Vec<&str> = json_lines(&ok(&berth(&args)))
        .iter()
        .map(|l| candidates[l["index"].as_u64().unwrap() as usize])
        .collect();
    assert_eq!(got, order);

    // A changed corpus rebuilds the index.
    let mut changed = std::fs::read_to_string(&corpus).unwrap();
    changed.push_str(
        &(serde_json::json!({"_id": "d7", "text": "Wolves howl at night."}).to_string() + "\n"),
    );
    std::fs::write(&corpus, changed).unwrap();
    let out = search(&["--query", "Which animal howls?", "--top-k", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("embedded"));
    assert_eq!(json_lines(&ok(&out))[0]["results"][0]["corpus_id"], "d7");

    // A corrupt index is an error naming it.
    std::fs::write(&index, b"BERTHIDXgarbage").unwrap();
    fails_with(
        &search(&["--query", q]),
        &["corpus.idx", "not a berth index"],
    );
    // Bad corpus lines name file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"_id\": \"a\", \"text\": \"x\"}\n{\"_id\": \"a\", \"text\": \"y\"}\n",
    )
    .unwrap();
    fails_with(
        &berth(&[
            "search",
            "--model",
            &model,
            "--corpus",
            bad.to_str().unwrap(),
            "--query",
            q,
        ]),
        &["bad.jsonl", "line 2", "duplicate"],
    );
}

/// STS: `similarity --pair` scores each `TEXT<TAB>PAIR` row with the cosine `similarity`
/// gives the same two texts, and `eval --task similarity` reads a TSV's score column by
/// name (STS-B's layout).
#[test]
fn sts_pairs_score_as_the_similarity_matrix_and_eval_reads_the_score_column() {
    let tmp = tempfile::tempdir().unwrap();
    let model = minilm_dir().to_string_lossy().into_owned();
    let rows = [
        ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
        ("A cat sleeps.", "The stock market fell.", 0.1),
        ("A woman is cooking.", "Someone is preparing food.", 3.9),
    ];
    let input = tmp.path().join("pairs.txt");
    let lines: Vec<String> = rows.iter().map(|(a, b, _)| format!("{a}\t{b}")).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let got = json_lines(&ok(&berth(&[
        "similarity",
        "--model",
        &model,
        "--pair",
        "--input",
        input.to_str().unwrap(),
    ])));
    assert_eq!(got.len(), rows.len());
    for (i, (a, b, _)) in rows.iter().enumerate() {
        let m = json_lines(&ok(&berth(&["similarity", "--model", &model, a, b])));
        let want = m[0]["similarities"][1].as_f64().unwrap();
        assert_eq!(got[i]["index"], i);
        assert!((got[i]["score"].as_f64().unwrap() - want).abs() < 1e-6);
    }
    let preds = tmp.path().join("preds.jsonl");
    std::fs::write(
        &preds,
        got.iter().map(|v| v.to_string() + "\n").collect::<String>(),
    )
    .unwrap();
    let gold = tmp.path().join("gold.tsv");
    let mut text = "sentence1\tsentence2\tscore\tgenre\n".to_string();
    for (a, b, s) in rows {
        text.push_str(&format!("{a}\t{b}\t{s}\tmain\n"));
    }
    std::fs::write(&gold, text).unwrap();
    let plain = tmp.path().join("gold.txt");
    std::fs::write(
        &plain,
        rows.iter()
            .map(|r| format!("{}\n", r.2))
            .collect::<String>(),
    )
    .unwrap();
    let eval = |g: &Path, extra: &[&str]| -> Value {
        let mut a = vec![
            "eval",
            "--task",
            "similarity",
            "--gold",
            g.to_str().unwrap(),
        ];
        a.extend_from_slice(&["--predictions", preds.to_str().unwrap()]);
        a.extend_from_slice(extra);
        serde_json::from_str(&ok(&berth(&a))).unwrap()
    };
    let by_column = eval(&gold, &["--label-column", "score"]);
    assert_eq!(by_column, eval(&plain, &[]));
    assert_eq!(by_column["pairs"], 3);
    assert!(
        by_column["spearman"].as_f64().unwrap() > 0.99,
        "{by_column}"
    );
}
