#!/usr/bin/env python3
"""Distillation on SST-2 (DistilBERT's recipe in miniature), end to end from the CLI:

1. teacher: all-MiniLM-L6-v2 (6 layers) fine-tuned on SST-2;
2. plain student: 3 of MiniLM's layers (--student-layers 3: layers 0, 2, 4) fine-tuned on
   the hard labels alone;
3. distilled student: the same 3-layer start, same data, steps and seed, trained on
   alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy (--teacher);
4. the dev accuracy of each (best evaluation; the last in the log too) and the inference
   speed of teacher and student (`berth bench --no-peers` on the same mixed texts).

    cargo build --release -p berth-cli
    python3 scripts/distill_sst2.py [--out /tmp/berth-distill] [--alpha 0.5] [--temperature 2]
    # the few-label row of the README: students on the first 8,000 rows, the same teacher
    python3 scripts/distill_sst2.py --out /tmp/berth-distill-8k --train-rows 8000 --epochs 3 \
        --alpha 0.9 --save-every 125 --teacher /tmp/berth-distill/teacher/checkpoints/step-2000

SST-2 comes from ../shared/datasets/sst2 (research-only: read from there, never copied).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "sst2"
BERTH = str(ROOT / "target" / "release" / "berth")


def run(args, log):
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run([BERTH] + args, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        sys.exit(f"berth {' '.join(args)} failed; see {log}")
    return p.stdout.strip(), time.time() - t0


def evals(run_dir):
    out = []
    for line in open(Path(run_dir) / "metrics.jsonl"):
        v = json.loads(line)
        if "eval" in v:
            out.append((v["step"], v["eval"]["accuracy"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/berth-distill")
    ap.add_argument("--train-rows", type=int, default=0, help="first N training rows (0: all)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--lr", default="5e-5")
    ap.add_argument("--save-every", default="500")
    ap.add_argument("--teacher", help="an existing teacher checkpoint (default: train one on the same rows)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train = DATA / "train.tsv"
    if a.train_rows:
        lines = open(train, encoding="utf-8").read().splitlines()
        train = out / f"train-{a.train_rows}.tsv"
        train.write_text("\n".join(lines[: a.train_rows + 1]) + "\n", encoding="utf-8")
    common = ["finetune", "--task", "classify", "--train", str(train), "--dev", str(DATA / "dev.tsv"),
              "--max-length", "64", "--batch-size", "32", "--lr", a.lr, "--epochs", str(a.epochs),
              "--seed", "42", "--save-every", a.save_every, "--keep-checkpoints", "1"]
    results = {}
    teacher_dir = out / "teacher"
    if a.teacher:
        teacher_dir.mkdir(exist_ok=True)
        (teacher_dir / "done").write_text(a.teacher)
    if (teacher_dir / "done").exists():
        teacher = (teacher_dir / "done").read_text().strip()
    else:
        teacher, secs = run(common + ["--output", str(teacher_dir), "--overwrite"], out / "teacher.log")
        print(f"teacher: {secs / 60:.1f} min", flush=True)
        (teacher_dir / "done").write_text(teacher)
    if (teacher_dir / "metrics.jsonl").exists():
        results["teacher (6 layers)"] = (teacher, evals(teacher_dir))
    for name, extra in [("plain student (3 layers)", []),
                        ("distilled student (3 layers)", ["--teacher", teacher, "--distill-alpha", str(a.alpha),
                                                           "--temperature", str(a.temperature)])]:
        d = out / re.sub(r"\W+", "-", name.split(" (")[0])
        best, secs = run(common + ["--output", str(d), "--overwrite", "--student-layers", "3"] + extra,
                         out / f"{d.name}.log")
        results[name] = (best, evals(d))
        print(f"{name}: {secs / 60:.1f} min", flush=True)
    print("\n| model | best dev accuracy | last dev accuracy | evaluations |")
    print("|---|---|---|---|")
    for name, (best, ev) in results.items():
        accs = [acc for _, acc in ev]
        print(f"| {name} | {100 * max(accs):.2f} | {100 * accs[-1]:.2f} | {len(accs)} |")
    # Inference speed of teacher and distilled student on the same texts.
    speeds = {}
    for name, model in [("teacher (6 layers)", teacher),
                        ("distilled student (3 layers)", results["distilled student (3 layers)"][0])]:
        report, _ = run(["bench", "--model", model, "--no-peers", "--sentences", "4000"],
                        out / "bench.log")
        speeds[name] = report
        print(f"\n{name}: berth bench\n{report}")


if __name__ == "__main__":
    main()
