#!/usr/bin/env python3
"""Self-distillation in continued pretraining (the seed's further-pretraining recipe), end
to end from the CLI:

1. a general model: an 8k WordPiece vocabulary and a 4-layer, 128-hidden BERT pretrained on
   the first public-domain books of ../shared/datasets/pd-books (masked-LM, 30 % masking);
2. continued pretraining on a domain corpus (State of the Union addresses,
   scripts/fetch-sotu) for the same number of steps, with the same seed, twice: plain
   masked-LM, and with the general model as a frozen teacher (`--teacher`, its
   masked-token distribution as a soft target at the masked positions);
3. held-out domain masked-LM loss and accuracy after each (the domain's own held-out
   split, fixed masking), and the held-out loss on books (what the teacher keeps).

    cargo build --release -p berth-cli && scripts/fetch-sotu
    python3 scripts/self_distill.py [--out /tmp/berth-selfdistill] [--base-steps 1500]
                                    [--steps 400] [--alpha 0.5] [--temperature 2]
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOKS = ROOT.parent / "shared" / "datasets" / "pd-books"
BERTH = str(ROOT / "target" / "release" / "berth")
CACHE = Path(os.environ.get("BERTH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "berth")


def sh(*cmd):
    p = subprocess.run([BERTH, *map(str, cmd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"berth {' '.join(map(str, cmd))}:\n{p.stderr[-2000:]}")
    return p.stdout.strip()


def last_eval(run):
    evals = [json.loads(l)["eval"] for l in open(Path(run) / "metrics.jsonl") if '"eval"' in l]
    return evals[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/berth-selfdistill")
    ap.add_argument("--books", type=int, default=2)
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sotu = CACHE / "data" / "sotu"
    if not sotu.is_dir():
        sys.exit("run scripts/fetch-sotu first")
    books = sorted(BOOKS.glob("train-*.txt.gz"))[: a.books]
    vocab, books_data, sotu_data = out / "vocab", out / "books-data", out / "sotu-data"
    if not (vocab / "tokenizer.json").is_file():
        sh("tokenizer", "train", "--kind", "wordpiece", "--lowercase", "--vocab-size", 8000,
           "--output", vocab, *books)
    if not (books_data / "manifest.json").is_file():
        sh("data", "prepare", "--tokenizer", vocab, "--output", books_data, "--max-length", 128, *books)
    if not (sotu_data / "manifest.json").is_file():
        sh("data", "prepare", "--tokenizer", vocab, "--output", sotu_data, "--max-length", 128,
           "--val-fraction", 0.05, sotu)
    base = out / "base"
    recipe = ["--mask-rate", 0.3, "--no-dropout", "--batch-size", 32, "--max-length", 128, "--seed", 42]
    if not (base / "done").is_file():
        best = sh("pretrain", "--tokenizer", vocab, "--data", books_data, "--output", base, "--overwrite",
                  "--layers", 4, "--hidden", 128, "--heads", 2, "--intermediate", 512,
                  "--position-init", "sinusoidal", "--lr", "1.5e-3", "--max-steps", a.base_steps,
                  "--save-every", a.base_steps, *recipe)
        (base / "done").write_text(best)
    general = (base / "done").read_text().strip()
    print(f"general model: {general}; books held-out {last_eval(base)}", flush=True)
    rows = {}
    for name, extra in [("plain", []),
                        ("self-distilled", ["--teacher", general, "--distill-alpha", a.alpha,
                                            "--temperature", a.temperature])]:
        run = out / name
        best = sh("pretrain", "--from", general, "--data", sotu_data, "--output", run, "--overwrite", "--lr", "5e-4",
                  "--max-steps", a.steps, "--save-every", a.steps, *recipe, *extra)
        domain = last_eval(run)
        general_eval = json.loads(sh("eval", "--task", "pretrain", "--model", best, "--data",
                                     books_data, "--max-length", 128, "--mask-rate", 0.3))
        rows[name] = (domain, general_eval)
        print(f"{name}: domain {domain}; books {general_eval}", flush=True)
    start_domain = json.loads(sh("eval", "--task", "pretrain", "--model", general, "--data", sotu_data,
                                 "--max-length", 128, "--mask-rate", 0.3))
    print("\n| start | domain held-out loss | domain masked acc | books held-out loss |")
    print("|---|---|---|---|")
    print(f"| general model (no domain steps) | {start_domain['loss']:.4f} | "
          f"{100 * start_domain['masked_accuracy']:.2f} % | {last_eval(base)['loss']:.4f} |")
    for name, (d, g) in rows.items():
        print(f"| {name}, {a.steps} steps | {d['loss']:.4f} | {100 * d['masked_accuracy']:.2f} % | {g['loss']:.4f} |")


if __name__ == "__main__":
    main()
