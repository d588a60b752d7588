#!/usr/bin/env python3
"""Load a checkpoint berth saved with transformers, unchanged, and compare its predictions with
berth's on the same texts.

    berth classify --model CKPT --top-k 0 --input texts.txt > berth.jsonl
    python3 scripts/check_checkpoint.py CKPT texts.txt berth.jsonl

Prints how many top labels agree and the largest score difference.
"""
import json, sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ckpt, texts_path, berth_path = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
texts = [l.rstrip("\n") for l in open(texts_path, encoding="utf-8") if l.strip()]
berth = [json.loads(l) for l in open(berth_path, encoding="utf-8")]
agree, worst = 0, 0.0
with torch.no_grad():
    for text, b in zip(texts, berth):
        probs = torch.softmax(model(**tok(text, return_tensors="pt", truncation=True)).logits[0], -1)
        scores = {model.config.id2label[i]: p.item() for i, p in enumerate(probs)}
        agree += max(scores, key=scores.get) == b["labels"][0]["label"]
        worst = max(worst, max(abs(scores[x["label"]] - x["score"]) for x in b["labels"]))
print(json.dumps({"texts": len(texts), "same_top_label": agree, "max_score_diff": worst}))
