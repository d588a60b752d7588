//! Metrics against the official scorers and scikit-learn / scipy (fixtures/metrics, made by
//! scripts/make_metric_reference.py).
use std::path::PathBuf;

use berth_tasks::metrics::{self, conlleval, squad};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(root().join("fixtures/metrics").join(name)).unwrap()
}

fn reference() -> Value {
    serde_json::from_str(&fixture("reference.json")).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, got: f64, want: &Value) {
    let want = want.as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-9,
        "{what}: {got} vs reference {want}"
    );
}

#[test]
fn conlleval_report_is_identical_on_its_own_test_file() {
    let text = fixture("ground_truth.txt");
    let r = conlleval::evaluate(text.lines(), ' ').unwrap();
    assert_eq!(r.report(), fixture("ground_truth.conlleval.txt"));
    assert_eq!(
        format!(
            "{:.2} {:.2} {:.2}",
            r.overall.precision(),
            r.overall.recall(),
            r.overall.f1()
        ),
        "68.83 80.83 74.35"
    );
}

#[test]
fn conlleval_report_is_identical_on_wnut16() {
    let cache = std::env::var_os("BERTH_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
            base.join("berth")
        });
    let path = cache.join("data/wnut16/ner.txt");
    let gold = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-assets", path.display()));
    let preds = fixture("wnut16_predictions.txt");
    let gold_lines: Vec<&str> = gold.split('\n').collect();
    let pred_lines: Vec<&str> = preds.split('\n').collect();
    assert_eq!(gold_lines.len(), pred_lines.len());
    let combined: Vec<String> = gold_lines
        .iter()
        .zip(&pred_lines)
        .map(|(g, p)| {
            if g.trim().is_empty() {
                String::new()
            } else {
                format!("{g}\t{p}")
            }
        })
        .collect();
    let r = conlleval::evaluate(combined.iter().map(String::as_str), '\t').unwrap();
    assert_eq!(r.report(), fixture("wnut16.conlleval.txt"));
}

#[test]
fn conlleval_rejects_ragged_lines() {
    let e = conlleval::evaluate(["a B-X B-X", "b I-X"], ' ').unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn squad_scores_match_the_reference_script() {
    for case in reference()["squad"].as_array().unwrap() {
        let golds: Vec<String> = case["golds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_str().unwrap().to_string())
            .collect();
        let pred = case["prediction"].as_str().unwrap();
        let (em, f1) = squad::score(&golds, pred);
        assert_close(&format!("EM of {pred:?} vs {golds:?}"), em, &case["exact"]);
        assert_close(&format!("F1 of {pred:?} vs {golds:?}"), f1, &case["f1"]);
    }
}

#[test]
fn classification_scores_match_scikit_learn() {
    let c = &reference()["classification"];
    let strs = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let r = metrics::classification_report(&strs(&c["gold"]), &strs(&c["pred"]));
    assert_close("accuracy", r.accuracy, &c["accuracy"]);
    for (name, avg) in [
        ("macro", r.macro_avg),
        ("micro", r.micro_avg),
        ("weighted", r.weighted_avg),
    ] {
        assert_close(
            &format!("{name} precision"),
            avg.precision,
            &c[name]["precision"],
        );
        assert_close(&format!("{name} recall"), avg.recall, &c[name]["recall"]);
        assert_close(&format!("{name} f1"), avg.f1, &c[name]["f1"]);
    }
    for (label, want) in c["per_class"].as_object().unwrap() {
        let got = r.per_class[label];
        assert_close(&format!("{label} f1"), got.f1, &want["f1"]);
        assert_eq!(got.support as u64, want["support"].as_u64().unwrap());
    }
}

#[test]
fn ranking_and_correlation_match_scikit_learn_and_scipy() {
    let r = reference();
    let a = &r["auc"];
    let labels: Vec<bool> = f64s(&a["labels"]).iter().map(|&l| l == 1.0).collect();
    assert_close(
        "ROC-AUC",
        metrics::roc_auc(&labels, &f64s(&a["scores"])).unwrap(),
        &a["auc"],
    );

    let rows = |v: &Value| v.as_array().unwrap().iter().map(f64s).collect::<Vec<_>>();
    let n = &r["ndcg"];
    let (rel, sc) = (rows(&n["relevance"]), rows(&n["scores"]));
    for k in [5, 10] {
        let mean = rel
            .iter()
            .zip(&sc)
            .map(|(r, s)| metrics::ndcg(s, r, k))
            .sum::<f64>()
            / rel.len() as f64;
        assert_close(&format!("nDCG@{k}"), mean, &n[format!("ndcg@{k}")]);
    }
    let m = &r["mrr"];
    let (rel, sc) = (rows(&m["relevance"]), rows(&m["scores"]));
    let mrr = rel
        .iter()
        .zip(&sc)
        .map(|(r, s)| metrics::reciprocal_rank(s, r, usize::MAX))
        .sum::<f64>()
        / rel.len() as f64;
    assert_close("MRR", mrr, &m["mrr"]);

    let c = &r["correlation"];
    let (x, y) = (f64s(&c["x"]), f64s(&c["y"]));
    assert_close("Pearson", metrics::pearson(&x, &y), &c["pearson"]);
    assert_close("Spearman", metrics::spearman(&x, &y), &c["spearman"]);
}
