#!/usr/bin/env python3
"""The Hugging Face Trainer on the same recipe as `berth finetune`, for side-by-side scores
and throughput (same threads, seed, batch size, learning rate, epochs, max length, linear
schedule, AdamW, clip 1.0).

    pip install torch transformers accelerate
    python3 scripts/train_peer.py --task classify --model DIR --train T.tsv --dev D.tsv \
        --epochs 1 --batch-size 32 --lr 5e-5 --max-length 128 --threads 2 [--limit N] \
        [--group-by-length] [--bf16]
    python3 scripts/train_peer.py --task ner --model DIR --train train.txt --dev valid.txt ...

Prints one JSON line: dev metrics, train runtime, examples/s and real (unpadded) tokens/s.
"""
import argparse, json, time

import numpy as np
import torch
from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                          DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer, TrainingArguments)


def read_tsv(path, text_col, label_col, limit):
    rows = [l.rstrip("\n").split("\t") for l in open(path, encoding="utf-8") if l.strip()]
    header, rows = rows[0], rows[1:]
    t, l = header.index(text_col), header.index(label_col)
    rows = rows[:limit] if limit else rows
    return [r[t] for r in rows], [r[l] for r in rows]


def read_conll(path, limit):
    sents, cur = [], ([], [])
    for line in open(path, encoding="utf-8"):
        f = line.split()
        if not f or f[0] == "-DOCSTART-":
            if cur[0]:
                sents.append(cur)
            cur = ([], [])
            continue
        cur[0].append(f[0]); cur[1].append(f[-1])
    if cur[0]:
        sents.append(cur)
    return sents[:limit] if limit else sents


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["classify", "ner"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--text-column", default="sentence")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--group-by-length", action="store_true",
                    help="the Trainer's length grouping (batches of similar lengths, as experts run it)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True on CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    if a.task == "classify":
        tx, ty = read_tsv(a.train, a.text_column, a.label_column, a.limit)
        dx, dy = read_tsv(a.dev, a.text_column, a.label_column, 0)
        labels = sorted(set(ty))
        l2i = {l: i for i, l in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(
            a.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=l2i)
        enc = lambda xs, ys: [dict(tok(x, truncation=True, max_length=a.max_length), labels=l2i[y]) for x, y in zip(xs, ys)]
        train, dev = enc(tx, ty), enc(dx, dy)
        collator = DataCollatorWithPadding(tok)

        def metrics(p):
            pred, gold = p.predictions.argmax(-1), p.label_ids
            f1s = []
            for c in sorted(set(pred.tolist()) | set(gold.tolist())):
                tp = float(((pred == c) & (gold == c)).sum())
                prec = tp / max(1, (pred == c).sum()); rec = tp / max(1, (gold == c).sum())
                f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
            return {"accuracy": float((pred == gold).mean()), "macro_f1": float(np.mean(f1s))}
    else:
        ts, ds = read_conll(a.train, a.limit), read_conll(a.dev, 0)
        labels = sorted({t for _, tags in ts for t in tags})
        l2i = {l: i for i, l in enumerate(labels)}
        model = AutoModelForTokenClassification.from_pretrained(
            a.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=l2i)

        def enc(sents):
            out = []
            for words, tags in sents:
                e = tok(words, is_split_into_words=True, truncation=True, max_length=a.max_length)
                prev, lab = None, []
                for w in e.word_ids():
                    lab.append(-100 if w is None or w == prev else l2i[tags[w]])
                    prev = w
                out.append(dict(e, labels=lab))
            return out
        train, dev = enc(ts), enc(ds)
        collator = DataCollatorForTokenClassification(tok)
        metrics = None
    args = TrainingArguments(output_dir="/tmp/berth-train-peer", per_device_train_batch_size=a.batch_size,
                             per_device_eval_batch_size=64, learning_rate=a.lr, num_train_epochs=a.epochs,
                             seed=a.seed, save_strategy="no", eval_strategy="no", logging_steps=a.log_every, report_to=[],
                             use_cpu=True, dataloader_num_workers=0,
                             group_by_length=a.group_by_length, bf16=a.bf16)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, compute_metrics=metrics)
    t0 = time.time()
    out = trainer.train()
    runtime = time.time() - t0
    tokens = sum(len(x["input_ids"]) for x in train) * a.epochs
    result = {"train_runtime_s": runtime, "examples_per_s": len(train) * a.epochs / runtime,
              "tokens_per_s": tokens / runtime, "train_loss": out.training_loss,
              # Mean training loss of each logging window, as (step, loss).
              "losses": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]}
    if a.task == "classify":
        result.update(trainer.evaluate(dev))
    else:
        pred = trainer.predict(dev).predictions.argmax(-1)
        lines = []
        for (words, tags), p, x in zip(ds, pred, dev):
            seen = {}
            for t, w in enumerate(tok(words, is_split_into_words=True, truncation=True, max_length=a.max_length).word_ids()):
                if w is not None and w not in seen:
                    seen[w] = labels[p[t]]
            lines += [f"{w} {g} {seen.get(i, 'O')}" for i, (w, g) in enumerate(zip(words, tags))] + [""]
        result["conll"] = "\n".join(lines)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
