#!/usr/bin/env python3
"""berth finetune --task embed / rerank vs sentence-transformers' trainers on the same data
and recipe, one after the other on the same 2 threads; both trained models are then scored
by the same code (`berth eval --model`), so only the training differs.

    cargo build --release -p berth-cli
    pip install torch transformers sentence-transformers datasets accelerate
    python3 scripts/compare_retrieval.py [--train-rows 1000] [--out /tmp/berth-retrieval]

Data: ../shared/datasets/squad-dev-retrieval (SQuAD dev questions, their paragraphs, qrels).
Paragraphs are split 80/20 (seeded) into train and dev; a question goes with its paragraph.
  embed:  (anchor = question, positive = its paragraph, negative = another paragraph of the
          same article); dev: MRR@10 / nDCG@10 / accuracy@1 of each question retrieving its
          paragraph among all dev paragraphs and negatives.
  rerank: (query, passage, label): the paragraph (1) and one same-article paragraph (0) per
          question; dev: each question's paragraph among 4 candidates, MRR@10 / nDCG@10.
Recipe (both sides): all-MiniLM-L6-v2, 1 epoch, linear schedule, no warmup, weight decay 0,
clip 1.0, seed 42, dropout on; embed: MNRL (scale 20, cosine), batch 32, lr 2e-5, max length
128; rerank: BCE on one logit, batch 16, lr 3e-5, max length 256. Throughput = real
(unpadded) training tokens per second of training time.
"""
import argparse, json, os, random, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "squad-dev-retrieval"
BERTH = ROOT / "target" / "release" / "berth"
MODEL = Path(os.environ.get("BERTH_HOME", Path.home() / ".cache" / "berth")) / "models" / "all-MiniLM-L6-v2"


def make_data(out: Path, train_rows: int):
    q = {}
    for l in open(DATA / "queries.jsonl"):
        j = json.loads(l)
        q[j["_id"]] = j["text"]
    c, titles = {}, {}
    for l in open(DATA / "corpus.jsonl"):
        j = json.loads(l)
        c[j["_id"]] = j["text"]
        titles.setdefault(j["title"], []).append(j["_id"])
    title_of = {p: t for t, ps in titles.items() for p in ps}
    rows = [l.rstrip("\n").split("\t") for l in open(DATA / "qrels" / "test.tsv")][1:]
    rng = random.Random(42)
    pids = sorted(c)
    dev_p = set(rng.sample(pids, len(pids) // 5))
    tr = [(a, b) for a, b, _ in rows if b not in dev_p]
    dv = [(a, b) for a, b, _ in rows if b in dev_p]
    rng.shuffle(tr)
    rng.shuffle(dv)

    def neg(pid):
        sib = [p for p in titles[title_of[pid]] if p != pid]
        return rng.choice(sib) if sib else rng.choice(pids)

    def write(name, items):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)

    write("embed-train.jsonl", [{"anchor": q[a], "positive": c[b], "negative": c[neg(b)]} for a, b in tr[:train_rows]])
    write("embed-dev.jsonl", [{"anchor": q[a], "positive": c[b], "negative": c[neg(b)]} for a, b in dv[:300]])
    rr_train, rr_dev = [], []
    for a, b in tr[:train_rows]:
        rr_train += [{"query": q[a], "passage": c[b], "label": 1.0}, {"query": q[a], "passage": c[neg(b)], "label": 0.0}]
    for a, b in dv[:200]:
        rr_dev.append({"query": q[a], "passage": c[b], "label": 1.0})
        rr_dev += [{"query": q[a], "passage": c[neg(b)], "label": 0.0} for _ in range(3)]
    write("rerank-train.jsonl", rr_train)
    write("rerank-dev.jsonl", rr_dev)


RECIPES = {
    "embed": {"batch": 32, "lr": 2e-5, "max_length": 128, "extra": ["--negative-column", "negative"]},
    "rerank": {"batch": 16, "lr": 3e-5, "max_length": 256, "extra": []},
}


def berth_eval(task, model_dir, dev):
    r = RECIPES[task]
    cmd = [str(BERTH), "--threads", "2", "eval", "--task", task, "--model", str(model_dir), "--data", str(dev),
           "--max-length", str(r["max_length"])] + r["extra"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def run_berth(task, out):
    r = RECIPES[task]
    run = out / f"berth-{task}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = [str(BERTH), "--threads", "2", "finetune", "--task", task, "--model", str(MODEL),
           "--train", str(out / f"{task}-train.jsonl"), "--dev", str(out / f"{task}-dev.jsonl"), "--output", str(run),
           "--epochs", "1", "--batch-size", str(r["batch"]), "--lr", str(r["lr"]), "--max-length", str(r["max_length"]),
           "--seed", "42", "--log-every", "1000000"] + r["extra"]
    best = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
    steps = [l for l in lines if "loss" in l and "eval" not in l]
    return {"tokens_per_s": steps[-1]["tokens_per_s"], "train_loss": steps[-1]["loss"],
            "eval": berth_eval(task, best, out / f"{task}-dev.jsonl")}


def run_st(task, out):
    import torch
    from datasets import Dataset
    torch.set_num_threads(2)
    r = RECIPES[task]
    rows = [json.loads(l) for l in open(out / f"{task}-train.jsonl")]
    common = dict(output_dir=str(out / "st-tmp"), num_train_epochs=1, per_device_train_batch_size=r["batch"],
                  learning_rate=r["lr"], warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                  lr_scheduler_type="linear", seed=42, save_strategy="no", logging_steps=10, report_to=[],
                  use_cpu=True, dataloader_num_workers=0)
    save = out / f"st-{task}"
    if task == "embed":
        from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                           SentenceTransformerTrainingArguments, losses)
        model = SentenceTransformer(str(MODEL), device="cpu")
        model.max_seq_length = r["max_length"]
        tok = model.tokenizer
        texts = [t for row in rows for t in (row["anchor"], row["positive"], row["negative"])]
        trainer = SentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(**common),
                                             train_dataset=Dataset.from_list(rows),
                                             loss=losses.MultipleNegativesRankingLoss(model))
    else:
        from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                         CrossEncoderTrainingArguments)
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
        model = CrossEncoder(str(MODEL), num_labels=1, max_length=r["max_length"], device="cpu")
        tok = model.tokenizer
        trainer = CrossEncoderTrainer(model=model, args=CrossEncoderTrainingArguments(**common),
                                      train_dataset=Dataset.from_list(rows), loss=BinaryCrossEntropyLoss(model))
    t0 = time.time()
    result = trainer.train()
    runtime = time.time() - t0
    if task == "embed":
        tokens = sum(min(len(tok(t)["input_ids"]), r["max_length"]) for t in texts)
    else:
        tokens = sum(len(tok(row["query"], row["passage"], truncation=True, max_length=r["max_length"])["input_ids"])
                     for row in rows)
    model.save(str(save)) if task == "embed" else model.save_pretrained(str(save))
    return {"tokens_per_s": tokens / runtime, "train_loss": result.training_loss,
            "eval": berth_eval(task, save, out / f"{task}-dev.jsonl")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", nargs="*", default=["embed", "rerank"])
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--out", default="/tmp/berth-retrieval")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    make_data(out, a.train_rows)
    print("| task | metric | berth | sentence-transformers | berth tokens/s | ST tokens/s | speed ratio |")
    print("|---|---|---|---|---|---|---|")
    for task in a.tasks:
        base = berth_eval(task, MODEL, out / f"{task}-dev.jsonl") if task == "embed" else None
        b = run_berth(task, out)
        s = run_st(task, out)
        for i, m in enumerate(["mrr@10", "ndcg@10"]):
            speed = (f"{b['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | {b['tokens_per_s'] / s['tokens_per_s']:.2f}x"
                     if i == 0 else " | | ")
            print(f"| {task} | {m} | {100 * b['eval'][m]:.2f} | {100 * s['eval'][m]:.2f} | {speed} |", flush=True)
        if base:
            print(f"(embed before fine-tuning: mrr@10 {100 * base['mrr@10']:.2f}, ndcg@10 {100 * base['ndcg@10']:.2f})")


if __name__ == "__main__":
    main()
