#!/usr/bin/env python3
"""Fixed-seed tiny training runs of every objective, hashed: proves a refactoring of the
training code leaves what runs write unchanged.

For each run it hashes metrics.jsonl (with the timing field `tokens_per_s` cut out: it is
wall-clock) and every file of the last checkpoint (weights, optimizer state, trainer state,
model config, generator). The run's own config.json is not hashed (its layout may change).

    cargo build --release -p berth-cli
    python3 scripts/unchanged_runs.py --write scripts/unchanged_runs.json   # before a change
    python3 scripts/unchanged_runs.py --check scripts/unchanged_runs.json   # after it

The hashes are bit-level and so belong to one machine kind (the CPU's instruction set
decides the kernels); `--write` records the CPU model beside them.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
WORDS = ["the", "quick", "brown", "fox", "lazy", "dog", "hello", "world", "who", "is",
         "there", "not"]
TINY = os.path.join(ROOT, "fixtures/tiny/bert-base")
CORPUS = os.path.join(ROOT, "fixtures/vocab/corpus.txt")
VOCAB = os.path.join(ROOT, "fixtures/vocab/wordpiece")


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def classify_rows(n, seed, kind):
    lines = ["sentence\tlabel"]
    for i in range(n):
        k = (i * 7 + seed) % 5 + 2
        words = [WORDS[(i * 3 + j * 5 + seed) % len(WORDS)] for j in range(k)]
        if kind == "multi":
            labels = [l for l, w in (("animal", "dog"), ("fox", "fox"), ("greeting", "hello"))
                      if w in words]
            label = ",".join(labels)
        elif kind == "regression":
            label = str(len([w for w in words if w in ("dog", "fox")]) / 3.0)
        else:
            label = "animal" if ("dog" in words or "fox" in words) else "other"
        lines.append(" ".join(words) + "\t" + label)
    return "\n".join(lines) + "\n"


def conll_rows(n, seed):
    out = []
    for i in range(n):
        k = (i * 5 + seed) % 6 + 2
        for j in range(k):
            w = WORDS[(i * 7 + j * 3 + seed) % len(WORDS)]
            tag = "B-ANIMAL" if w in ("dog", "fox") else ("B-GREET" if w == "hello" else "O")
            out.append(f"{w} {tag}")
        out.append("")
    return "\n".join(out) + "\n"


def squad(n):
    subjects = ["the dog", "the fox", "berth", "the world", "café naïve"]
    paras = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        filler = WORDS[(i * 5) % len(WORDS)]
        context = (f"hello {filler} world, this is a tiny corpus. {subject} is there, "
                   f"and {filler} is not.")
        paras.append({"context": context, "qas": [{
            "id": f"q{i}", "question": "who is there?",
            "answers": [{"text": subject, "answer_start": context.index(subject)}]}]})
    return json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]})


def embed_rows(n, seed):
    rows = []
    for i in range(n):
        w = [WORDS[(i * 5 + j * 7 + seed) % len(WORDS)] for j in range(8)]
        rows.append(json.dumps({"anchor": " ".join(w[:4]), "positive": " ".join(w[3::-1]),
                                "negative": " ".join(w[4:])}))
    return "\n".join(rows) + "\n"


def rerank_rows(n, seed):
    lines = ["query\tpassage\tlabel"]
    for i in range(n):
        w = [WORDS[(i * 5 + j * 3 + seed) % len(WORDS)] for j in range(6)]
        q = f"{w[0]} {w[1]}"
        lines.append(f"{q}\t{w[2]} {w[0]} {w[3]}\t1")
        lines.append(f"{q}\t{w[4]} {w[5]}\t0")
    return "\n".join(lines) + "\n"


def runs(tmp):
    """(name, berth arguments) of every run."""
    d = lambda name, text: write(os.path.join(tmp, name), text)
    cls = (d("cls-train.tsv", classify_rows(40, 0, "single")), d("cls-dev.tsv", classify_rows(12, 1, "single")))
    multi = (d("multi-train.tsv", classify_rows(40, 0, "multi")), d("multi-dev.tsv", classify_rows(12, 1, "multi")))
    reg = (d("reg-train.tsv", classify_rows(40, 0, "regression")), d("reg-dev.tsv", classify_rows(12, 1, "regression")))
    ner = (d("ner-train.txt", conll_rows(40, 0)), d("ner-dev.txt", conll_rows(12, 1)))
    qa = (d("qa-train.json", squad(16)), d("qa-dev.json", squad(5)))
    emb = (d("emb-train.jsonl", embed_rows(32, 0)), d("emb-dev.jsonl", embed_rows(8, 3)))
    rr = (d("rr-train.tsv", rerank_rows(20, 0)), d("rr-dev.tsv", rerank_rows(6, 2)))
    ft = ["finetune", "--model", TINY, "--max-length", "64", "--batch-size", "8",
          "--epochs", "2", "--lr", "1e-3", "--warmup", "0.1", "--log-every", "1"]
    data = lambda pair: ["--train", pair[0], "--dev", pair[1]]
    tiny = ["--layers", "2", "--hidden", "64", "--heads", "2", "--intermediate", "128",
            "--max-length", "64", "--batch-size", "16", "--max-steps", "12", "--save-every", "6",
            "--lr", "1e-3", "--log-every", "1"]
    pt = ["pretrain", "--tokenizer", VOCAB, "--data", CORPUS] + tiny
    prepared = os.path.join(tmp, "prepared")
    return [
        ("classify", ft + ["--task", "classify"] + data(cls)),
        ("classify-accum-steps", ft + ["--task", "classify", "--grad-accum", "2",
                                       "--save-every", "3", "--schedule", "cosine",
                                       "--weight-decay", "0.01"] + data(cls)),
        ("classify-no-dev", ft + ["--task", "classify", "--train", cls[0], "--no-dropout"]),
        ("multi-label", ft + ["--task", "classify", "--multi-label"] + data(multi)),
        ("regression", ft + ["--task", "classify", "--regression"] + data(reg)),
        ("ner", ft + ["--task", "ner"] + data(ner)),
        ("qa", ft + ["--task", "qa", "--doc-stride", "16"] + data(qa)),
        ("embed", ft + ["--task", "embed", "--negative-column", "negative"] + data(emb)),
        ("rerank", ft + ["--task", "rerank"] + data(rr)),
        ("mlm", pt),
        ("mlm-whole-word", pt + ["--whole-word", "--mask-rate", "0.3"]),
        ("sop", pt + ["--objective", "sop"]),
        ("nsp", pt + ["--objective", "nsp"]),
        ("rtd", pt + ["--objective", "rtd", "--generator-layers", "1"]),
        ("mlm-shards", ["data", "prepare", "--tokenizer", VOCAB, "--output", prepared,
                        "--max-length", "64", CORPUS],
         # The tiny corpus leaves the prepared held-out split empty, which berth refuses
         # (it used to report loss 0): the text corpus is the dev set.
         ["pretrain", "--tokenizer", VOCAB, "--data", prepared, "--dev", CORPUS] + tiny),
        ("continued", ["pretrain", "--from", os.path.join(ROOT, "fixtures/tiny/bert-mlm"),
                       "--data", CORPUS, "--max-length", "64", "--batch-size", "16",
                       "--max-steps", "6", "--lr", "1e-3", "--log-every", "1"]),
    ]


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def hash_run(run):
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = re.sub(r',?"tokens_per_s":[^,}]*', "", f.read())
    out = {"metrics.jsonl": hashlib.sha256(metrics.encode()).hexdigest()}
    ckpts = os.path.join(run, "checkpoints")
    steps = sorted((int(n[5:]), n) for n in os.listdir(ckpts) if n.startswith("step-"))
    last = os.path.join(ckpts, steps[-1][1])
    out["checkpoints"] = [n for _, n in steps]
    for dirpath, _, files in sorted(os.walk(last)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, last)] = sha(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--berth", default=os.path.join(ROOT, "target/release/berth"))
    ap.add_argument("--write", help="record the hashes in this JSON file")
    ap.add_argument("--check", help="compare with the hashes in this JSON file")
    ap.add_argument("--only", help="comma-separated run names")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, *commands in runs(tmp):
            if a.only and name not in a.only.split(","):
                continue
            run = os.path.join(tmp, "run-" + name)
            for args in commands:
                if args[0] in ("finetune", "pretrain"):
                    args = args + ["--output", run]
                p = subprocess.run([a.berth, "--threads", "2"] + args, capture_output=True,
                                   text=True)
                if p.returncode != 0:
                    sys.exit(f"{name}: berth {' '.join(args)} failed:\n{p.stderr}")
            results[name] = hash_run(run)
            print(f"{name}: {results[name]['metrics.jsonl'][:16]} "
                  f"{results[name].get('model.safetensors', '')[:16]}", flush=True)
    if a.write:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                    if l.startswith("model name")), "unknown")
        with open(a.write, "w") as f:
            json.dump({"cpu": cpu, "runs": results}, f, indent=1, sort_keys=True)
            f.write("\n")
    if a.check:
        with open(a.check) as f:
            want = json.load(f)["runs"]
        bad = 0
        for name, got in results.items():
            for k in sorted(set(got) | set(want.get(name, {}))):
                if got.get(k) != want.get(name, {}).get(k):
                    print(f"DIFFERS {name} {k}: {want.get(name, {}).get(k)} -> {got.get(k)}")
                    bad += 1
        print(f"{len(results)} runs, {bad} differences")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
