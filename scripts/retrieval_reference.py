#!/usr/bin/env python3
"""Reference for `berth eval --task retrieval`: sentence-transformers encodes the same BEIR
corpus and queries, exact search (a matrix product, top 100) ranks them, and pytrec_eval
(PyPI `pytrec-eval-terrier`, the scorer BEIR uses) scores nDCG@10, Recall@100 and MAP@100;
MRR@10 as BEIR computes it. Then berth runs the same evaluation in this process's run, and
both are printed with the differences and the time ratios (same threads).

    pip install torch sentence-transformers pytrec-eval-terrier
    cargo build --release -p berth-cli
    python3 scripts/retrieval_reference.py [--data ../shared/datasets/squad-dev-retrieval]

The peer runs as sentence-transformers recommends: `encode` sorts texts by length (its
default), batch 32, normalised embeddings, cosine = dot product of normalised vectors.
"""
import argparse
import json
import os
import subprocess
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "../shared/datasets/squad-dev-retrieval"))
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/berth/models/all-MiniLM-L6-v2"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--berth", default=os.path.join(ROOT, "target/release/berth"))
    a = ap.parse_args()

    import pytrec_eval
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    corpus = read_jsonl(os.path.join(a.data, "corpus.jsonl"))
    queries = read_jsonl(os.path.join(a.data, "queries.jsonl"))
    qrels = {}
    with open(os.path.join(a.data, "qrels/test.tsv"), encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    queries = [q for q in queries if q["_id"] in qrels]
    # BEIR's sentence-transformers wrapper: title + " " + text, stripped.
    docs = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    ids = [d["_id"] for d in corpus]

    model = SentenceTransformer(a.model, device="cpu")
    t = time.perf_counter()
    c = model.encode(docs, batch_size=32, normalize_embeddings=True, convert_to_tensor=True)
    index_s = time.perf_counter() - t
    t = time.perf_counter()
    q = model.encode([x["text"] for x in queries], batch_size=32, normalize_embeddings=True,
                     convert_to_tensor=True)
    scores, top = torch.topk(q @ c.T, k=100, dim=1)
    search_s = time.perf_counter() - t
    run = {}
    for qi, x in enumerate(queries):
        run[x["_id"]] = {ids[j]: float(s) for s, j in zip(scores[qi].tolist(), top[qi].tolist())}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"})
    per_query = ev.evaluate(run)
    mean = lambda k: sum(v[k] for v in per_query.values()) / len(per_query)
    mrr = 0.0
    for qid, docs_scores in run.items():
        ranked = sorted(docs_scores.items(), key=lambda kv: -kv[1])[:10]
        for rank, (d, _) in enumerate(ranked, 1):
            if qrels[qid].get(d, 0) > 0:
                mrr += 1.0 / rank
                break
    ref = {"ndcg@10": mean("ndcg_cut_10"), "mrr@10": mrr / len(run),
           "recall@100": mean("recall_100"), "map@100": mean("map_cut_100"),
           "index_seconds": index_s, "search_seconds": search_s}

    out = subprocess.run(
        [a.berth, "--threads", str(a.threads), "eval", "--task", "retrieval", "--model", a.model,
         "--corpus", os.path.join(a.data, "corpus.jsonl"),
         "--queries", os.path.join(a.data, "queries.jsonl"),
         "--qrels", os.path.join(a.data, "qrels/test.tsv")],
        check=True, capture_output=True, text=True)
    got = json.loads(out.stdout)
    print(f"{len(docs)} documents, {len(queries)} queries, {a.threads} threads")
    print(f"{'':12} {'pytrec_eval (sentence-transformers)':>36} {'berth':>10} {'difference':>11}")
    for k in ["ndcg@10", "mrr@10", "recall@100", "map@100"]:
        print(f"{k:12} {ref[k]:36.6f} {got[k]:10.6f} {got[k] - ref[k]:11.2e}")
    for k in ["index_seconds", "search_seconds"]:
        print(f"{k:12} {ref[k]:36.1f} {got[k]:10.1f} {ref[k] / got[k]:10.2f}x faster")
    total_ref = ref["index_seconds"] + ref["search_seconds"]
    total = got["index_seconds"] + got["search_seconds"]
    print(f"{'total':12} {total_ref:36.1f} {total:10.1f} {total_ref / total:10.2f}x faster")


if __name__ == "__main__":
    main()
