#!/usr/bin/env python3
"""Make fixtures/pretrain/: a tiny BERT that `berth pretrain` trained (60 steps on
fixtures/vocab/corpus.txt with the committed WordPiece vocabulary), and the masked-LM logits
transformers' BertForMaskedLM computes from that checkpoint, for berth's export test.

    cargo build --release -p berth-cli && pip install torch transformers
    python3 scripts/make_pretrain_reference.py
"""
import json, shutil, subprocess, tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertForMaskedLM

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "pretrain"
TEXTS = ["the knight rode to the [MASK] of the king.", "it was near the [MASK] of the year.",
         "Hello-girl? Yes, but [MASK] you ask me to explain!"]


def main():
    with tempfile.TemporaryDirectory() as tmp:
        best = subprocess.run(
            [str(ROOT / "target/release/berth"), "pretrain", "--tokenizer", str(ROOT / "fixtures/vocab/wordpiece"),
             "--data", str(ROOT / "fixtures/vocab/corpus.txt"), "--output", f"{tmp}/run", "--layers", "2",
             "--hidden", "64", "--heads", "2", "--intermediate", "128", "--max-length", "64", "--batch-size", "16",
             "--max-steps", "60", "--lr", "2e-3"], check=True, capture_output=True, text=True).stdout.strip()
        dst = OUT / "bert-mlm"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for f in Path(best).iterdir():
            if f.name not in ("optimizer.safetensors", "trainer_state.json"):
                shutil.copy(f, dst / f.name)
    tok = AutoTokenizer.from_pretrained(dst)
    model = BertForMaskedLM.from_pretrained(dst).eval()
    ref = {"transformers": transformers.__version__, "texts": TEXTS, "cases": []}
    with torch.no_grad():
        for t in TEXTS:
            enc = tok(t, return_tensors="pt")
            logits = model(**enc).logits[0]
            ids = enc["input_ids"][0].tolist()
            # Rows at the mask and at the first word (a few rows keep the fixture small).
            rows = [ids.index(tok.mask_token_id), 1]
            ref["cases"].append({"ids": ids, "rows": rows, "logits": [logits[r].tolist() for r in rows]})
    (OUT / "reference.json").write_text(json.dumps(ref))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
