#!/usr/bin/env python3
"""Make fixtures/vocab/: vocabularies trained by `berth tokenizer train` on
fixtures/vocab/corpus.txt, and what transformers' fast tokenizers make of them.

    cargo build --release -p berth-cli
    pip install transformers
    python3 scripts/make_vocab_reference.py

For each kind (wordpiece lowercased, bpe, unigram; 2,000 tokens): the trained folder is
committed under fixtures/vocab/KIND/, then AutoTokenizer.from_pretrained loads it unchanged and
encodes sample texts (singles and pairs); ids, tokens and decoded text go to reference.json.
berth's test re-trains (it must reproduce the folder) and encodes the same texts with berth's
tokenizer loader (it must reproduce transformers' ids).
"""
import json, subprocess
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "vocab"
BERTH = ROOT / "target" / "release" / "berth"
KINDS = {"wordpiece": ["--lowercase"], "bpe": [], "unigram": []}
TEXTS = [
    "It was near the close of the year 1780.",
    "Hello-girl? Yes, but don't you ask me to explain!",
    "Café naïve résumé — ÉCOLE; 42 × 7 = 294.",
    "Unseen words: zyxwvut, Qwertyuiop, 東京, emoji 🙂.",
    "  leading and   repeated   spaces  ",
]
PAIRS = [("Who was the knight?", "The knight was Sir Sagramor.")]


def main():
    ref = {"transformers": transformers.__version__, "texts": TEXTS, "pairs": PAIRS, "kinds": {}}
    for kind, extra in KINDS.items():
        d = OUT / kind
        subprocess.run([str(BERTH), "tokenizer", "train", "--kind", kind, "--vocab-size", "2000",
                        "--output", str(d), *extra, str(OUT / "corpus.txt")], check=True)
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.is_fast, kind
        enc = [tok(t) for t in TEXTS] + [tok(a, b) for a, b in PAIRS]
        ref["kinds"][kind] = {
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "ids": [e["input_ids"] for e in enc],
            "tokens": [tok.convert_ids_to_tokens(e["input_ids"]) for e in enc],
            "decoded": [tok.decode(e["input_ids"], skip_special_tokens=True) for e in enc[:len(TEXTS)]],
            "mask_token_id": tok.mask_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        print(kind, type(tok).__name__, len(tok), ref["kinds"][kind]["tokens"][1])
    (OUT / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
