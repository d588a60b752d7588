#!/usr/bin/env python3
"""Continued pretraining of all-MiniLM-L6-v2 on a domain corpus (the BioBERT / AD-BERT
workflow), all through the berth CLI, scored on held-out domain text.

    cargo build --release -p berth-cli && scripts/fetch-assets && scripts/fetch-sotu
    python3 scripts/continued_pretraining.py [--steps 100] [--out DIR]

all-MiniLM-L6-v2 ships without a masked-LM head, so its held-out MLM loss is undefined until
a head exists. Stage 1 fits a fresh head (and lets the encoder move) on general text —
public-domain books (../shared/datasets/pd-books, train-00) — giving the "before" model G.
From G, the same number of steps then continues either on the domain corpus (the State of
the Union, every 10th address held out, the rest trained on) or, as a control for "more
steps of any text", on more general text (pd-books train-01). All three models are scored by
`berth eval --task pretrain` (the same fixed seeded masking) on the held-out addresses and on
held-out books (the first 1 MB of pd-books valid). Recipe for every stage: batch 16, up to
128 tokens, 15 % masking, AdamW lr 1e-4, 6 % warmup + linear decay, seed 42, 2 threads.
"""
import argparse, gzip, json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOKS = ROOT.parent / "shared" / "datasets" / "pd-books"
BERTH = ROOT / "target" / "release" / "berth"


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="/tmp/berth-continued")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("BERTH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "berth")
    minilm = cache / "models" / "all-MiniLM-L6-v2"
    sotu = sorted((cache / "data" / "sotu").glob("*.txt"))
    if not sotu or not minilm.exists():
        sys.exit("run scripts/fetch-assets and scripts/fetch-sotu first")
    domain, held_domain, held_books = out / "sotu-train", out / "sotu-held.txt", out / "books-held.txt"
    if not domain.exists():
        domain.mkdir()
        for i, f in enumerate(sotu):
            if i % 10 != 9:
                (domain / f.name).write_bytes(f.read_bytes())
        held_domain.write_text("\n\n".join(f.read_text(encoding="utf-8").strip()
                                           for i, f in enumerate(sotu) if i % 10 == 9) + "\n", encoding="utf-8")
        with gzip.open(BOOKS / "valid.txt.gz", "rt", encoding="utf-8") as f:
            held_books.write_text(f.read(1_000_000), encoding="utf-8")

    def pretrain(start, data, name):
        run = out / name
        if not (run / "done").exists():
            best = sh(BERTH, "--threads", "2", "pretrain", "--from", start, "--data", data, "--output", run,
                      "--max-steps", a.steps, "--batch-size", "16", "--max-length", "128", "--lr", "1e-4",
                      "--val-fraction", "0.01", "--seed", "42")
            (run / "done").write_text(best)
        return Path((run / "done").read_text())

    def score(model):
        return {held.stem: json.loads(sh(BERTH, "--threads", "2", "eval", "--task", "pretrain", "--model", model,
                                         "--data", held, "--max-length", "128"))
                for held in (held_domain, held_books)}

    general = pretrain(minilm, BOOKS / "train-00.txt.gz", "general")
    continued = pretrain(general, domain, "domain")
    control = pretrain(general, BOOKS / "train-01.txt.gz", "control")
    rows = [("G: MiniLM + head fitted on books (before)", general),
            (f"G + {a.steps} steps on State of the Union", continued),
            (f"G + {a.steps} steps on more books (control)", control)]
    print("| model | held-out SOTU loss | SOTU masked acc | held-out books loss | books masked acc |")
    print("|---|---|---|---|---|")
    for label, model in rows:
        s = score(model)
        d, b = s["sotu-held"], s["books-held"]
        print(f"| {label} | {d['loss']:.3f} | {100 * d['masked_accuracy']:.2f} % | {b['loss']:.3f} | {100 * b['masked_accuracy']:.2f} % |")


if __name__ == "__main__":
    main()
