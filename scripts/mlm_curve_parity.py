#!/usr/bin/env python3
"""Masked-LM training curves of berth and PyTorch on identical batches: the same starting
weights (the encoder and the head transformers initialises, saved once and loaded by both),
the same sequences masked once here by DataCollatorForLanguageModeling, the same AdamW recipe
(lr, warmup then linear decay, weight decay as the Trainer groups it, clip 1.0, no dropout).
Only the implementations differ, so the per-step losses must agree to rounding — a longer
check than the three-step parity tests, on real text at real lengths (local attention
windows, several query blocks).

    cargo build --release -p berth-train --example mlm_replay
    pip install torch transformers
    python3 scripts/mlm_curve_parity.py --init RUN/init --order ORDER.jsonl [--steps 150]

RUN/init and ORDER.jsonl come from `berth pretrain ... --dump-order ORDER.jsonl` (e.g.
scripts/pretrain_peer.py, which leaves them under /tmp/berth-pretrain-*/).
"""
import argparse, json, shutil, subprocess, tempfile, time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--order", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.init)
    model = AutoModelForMaskedLM.from_pretrained(a.init)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    tmp = Path(tempfile.mkdtemp())
    start = tmp / "start"
    model.save_pretrained(start)
    for f in Path(a.init).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, start / f.name)
    model = AutoModelForMaskedLM.from_pretrained(start, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
        if model.config.model_type != "modernbert" else AutoModelForMaskedLM.from_pretrained(start)
    seqs = [json.loads(l)["ids"] for l in open(a.order)][: a.steps * a.batch]
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    batches = []
    with open(tmp / "batches.jsonl", "w") as f:
        for s in range(a.steps):
            b = collator([{"input_ids": x} for x in seqs[s * a.batch:(s + 1) * a.batch]])
            mask = b["attention_mask"].bool()
            ids = [r[m].tolist() for r, m in zip(b["input_ids"], mask)]
            labels = [r[m].tolist() for r, m in zip(b["labels"], mask)]
            f.write(json.dumps({"ids": ids, "labels": labels}) + "\n")
            batches.append(b)
    warmup = int(-(-0.06 * a.steps // 1))
    names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    opt = torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n not in names], "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, a.steps)
    model.train()
    torch_losses = []
    t0 = time.time()
    for b in batches:
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        torch_losses.append(loss.item())
    t_torch = time.time() - t0
    t0 = time.time()
    out = subprocess.run([str(ROOT / "target/release/examples/mlm_replay"), str(start), str(tmp / "batches.jsonl"),
                          str(a.lr), str(warmup), "0.01"], check=True, capture_output=True, text=True).stdout
    t_berth = time.time() - t0
    berth_losses = [json.loads(l)["loss"] for l in out.splitlines()]
    diffs = [abs(x - y) for x, y in zip(berth_losses, torch_losses)]
    print(f"{model.config.model_type}: {a.steps} steps of {a.batch} sequences; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    w = max(1, a.steps // 6)
    for i in range(0, a.steps, w):
        bl, tl = berth_losses[i:i + w], torch_losses[i:i + w]
        print(f"steps {i + 1}-{i + len(bl)}: berth {sum(bl) / len(bl):.4f}  PyTorch {sum(tl) / len(tl):.4f}")
    print(f"max |loss difference| {max(diffs):.2e} (step {diffs.index(max(diffs)) + 1}); "
          f"last step {berth_losses[-1]:.4f} vs {torch_losses[-1]:.4f}; "
          f"wall time berth {t_berth:.0f} s (incl. loading), PyTorch {t_torch:.0f} s")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
