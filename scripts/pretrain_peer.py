#!/usr/bin/env python3
"""berth pretrain vs transformers' BertForMaskedLM on the same recipe, one after the other on
the same 2 threads; both models are then scored by the same code (`berth eval --task
pretrain`, a fixed seeded masking of the held-out text), so only the training differs.

    cargo build --release -p berth-cli
    pip install torch transformers
    scripts/fetch-sotu                # for --corpus sotu (the default)
    python3 scripts/pretrain_peer.py [--corpus sotu|books] [--steps 300] [--arch bert|modernbert] [--out DIR] \
        [--head sparse|full] [--bf16]

Corpus: the State of the Union addresses 1790-2021 (scripts/fetch-sotu; every 10th address
held out for the score, the rest tokenized by `berth data prepare` into shards that berth
pretrains from) or ../shared/datasets/pd-books (public-domain books; train-00 for training,
the first 1 MB of valid for the held-out score). Vocabulary: a 16k lowercased WordPiece that
`berth tokenizer train` builds on the training text. Model: BERT, 4 layers, 256 hidden, 4 heads, 1024
feed-forward, initialised by berth (OUTPUT/init, loaded by both sides). Recipe: batch 32,
sequences of up to 128 tokens packed from each document's paragraphs (berth's sequences, in
berth's training order: `--dump-order`), 15 % masking 80/10/10 (berth: its own draw;
PyTorch: DataCollatorForLanguageModeling), AdamW lr 5e-4, weight decay 0.01, 6 % warmup then
linear decay, clip 1.0, dropout 0.1, seed 42. Throughput: real (unpadded) tokens per second
of training time (PyTorch pads each batch to its longest sequence).

PyTorch runs as an expert runs it: by default (--head sparse) BertForMaskedLM's prediction
head (transform, LayerNorm, 16k-way decoder) runs only at the masked positions, as berth's
does, and the loss is the same mean over them; --head full is the stock model (head at every
position). --bf16 runs both sides in bf16: berth with --dtype bf16 (bf16 products, f32 weights), PyTorch's
forward under bf16 autocast.

--arch modernbert: the same recipe on a ModernBERT of the same size (`berth pretrain --arch
modernbert`: 4 layers, 256 hidden, 4 heads, GeGLU width 384, global attention every third
layer, a 128-token window elsewhere, no dropout) against transformers' ModernBertForMaskedLM
with `sparse_prediction` on (the head only at masked positions, as ModernBERT's own recipe
trains) and sdpa attention; weight decay as the Trainer groups it (biases and norms none).
"""
import argparse, gzip, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "datasets" / "pd-books"
BERTH = ROOT / "target" / "release" / "berth"


def sh(*cmd):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--corpus", choices=["sotu", "books"], default="sotu")
    ap.add_argument("--arch", choices=["bert", "modernbert"], default="bert")
    ap.add_argument("--out", default=None)
    ap.add_argument("--head", choices=["sparse", "full"], default="sparse",
                    help="PyTorch BERT: prediction head at masked positions only (sparse) or everywhere")
    ap.add_argument("--bf16", action="store_true",
                    help="both sides in bf16: berth --dtype bf16, PyTorch's forward under bf16 autocast")
    ap.add_argument("--peak", type=float, default=None,
                    help="berth's measured matmul peak (GFLOP/s) in the run's precision: also print "
                         "each side's useful GFLOP/s and berth's fraction of the peak (BERT only)")
    a = ap.parse_args()
    modern = a.arch == "modernbert"
    out = Path(a.out or f"/tmp/berth-pretrain-{a.corpus}" + ("-modernbert" if modern else ""))
    out.mkdir(parents=True, exist_ok=True)
    held = out / "held.txt"
    if a.corpus == "books":
        train = out / "train.txt.gz"
        if not train.exists():
            train.write_bytes((DATA / "train-00.txt.gz").read_bytes())
            with gzip.open(DATA / "valid.txt.gz", "rt", encoding="utf-8") as f:
                held.write_text(f.read(1_000_000), encoding="utf-8")
    else:
        cache = Path(os.environ.get("BERTH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "berth")
        sotu = sorted((cache / "data" / "sotu").glob("*.txt"))
        if not sotu:
            sys.exit("run scripts/fetch-sotu first")
        train = out / "train"
        if not train.exists():
            train.mkdir()
            for i, f in enumerate(sotu):
                if i % 10 != 9:
                    (train / f.name).write_bytes(f.read_bytes())
            held.write_text("\n\n".join(f.read_text(encoding="utf-8").strip() for i, f in enumerate(sotu) if i % 10 == 9) + "\n",
                            encoding="utf-8")
    vocab = out / "vocab"
    if not (vocab / "tokenizer.json").exists():
        sh(BERTH, "tokenizer", "train", "--kind", "wordpiece", "--lowercase", "--vocab-size", "16000",
           "--output", vocab, train)
    if a.corpus == "sotu":
        prepared = out / "prepared"
        if not (prepared / "manifest.json").exists():
            sh(BERTH, "data", "prepare", "--tokenizer", vocab, "--output", prepared, "--max-length", "128",
               "--val-fraction", "0.02", "--seed", "42", train)
        train = prepared
    run = out / "berth"
    sh("rm", "-rf", run)
    order = out / "order.jsonl"
    order.unlink(missing_ok=True)
    recipe = ["--max-length", "128", "--batch-size", "32", "--lr", "5e-4", "--warmup", "0.06",
              "--weight-decay", "0.01", "--seed", "42", "--max-steps", str(a.steps)]
    best = sh(BERTH, "--threads", "2", "pretrain", "--tokenizer", vocab, "--data", train, "--output", run,
              "--layers", "4", "--hidden", "256", "--heads", "4", "--intermediate", "384" if modern else "1024",
              *(["--arch", "modernbert"] if modern else []),
              "--val-fraction", "0.001", "--log-every", "10", "--dump-order", order, *recipe,
              *(["--dtype", "bf16"] if a.bf16 else [])).strip()
    # (A prepared folder brings its own held-out split; --val-fraction applies to text.)
    steps = [json.loads(l) for l in open(run / "metrics.jsonl") if '"tokens_per_s"' in l]
    berth_tps = sum(s["tokens_per_s"] for s in steps) / len(steps)
    berth_losses = [(s["step"], s["loss"]) for s in steps]

    import torch
    import transformers
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, AutoTokenizer
    torch.set_num_threads(2)
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(vocab)
    init = run / "init"
    # berth's initial encoder; the MLM head is initialised by each side alike in distribution
    # (normal 0.02, LayerNorm 1 / 0, bias 0) from its own generator.
    if modern:
        from transformers import ModernBertForMaskedLM
        model = ModernBertForMaskedLM.from_pretrained(init, attn_implementation="sdpa")
        model.config.sparse_prediction = True
        model.sparse_prediction = True
    else:
        model = BertForMaskedLM.from_pretrained(init)
    seqs = [json.loads(l)["ids"] for l in open(order)]
    n = a.steps * 32
    seqs = seqs[:n]
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    decay = [p for nm, p in model.named_parameters() if nm in decay_names]
    no_decay = [p for nm, p in model.named_parameters() if nm not in decay_names]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
    warm = int(-(-0.06 * a.steps // 1))
    sched = transformers.get_linear_schedule_with_warmup(opt, warm, a.steps)
    model.train()
    sparse = a.head == "sparse" and not modern  # ModernBERT: sparse_prediction above

    def mlm_loss(batch):
        if not sparse:
            return model(**batch).loss
        labels = batch.pop("labels")
        hidden = model.bert(**batch).last_hidden_state
        at = labels != -100
        logits = model.cls(hidden[at])
        return torch.nn.functional.cross_entropy(logits.float(), labels[at])

    torch_losses, tokens, masked = [], 0, 0
    t0 = time.time()
    for step in range(a.steps):
        batch = collator([{"input_ids": s} for s in seqs[step * 32:(step + 1) * 32]])
        tokens += sum(len(s) for s in seqs[step * 32:(step + 1) * 32])
        masked += int((batch["labels"] != -100).sum())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = mlm_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        torch_losses.append(loss.item())
    runtime = time.time() - t0
    peer = out / "torch"
    model.save_pretrained(peer)
    tok.save_pretrained(peer)

    def held_out(model_dir):
        return json.loads(sh(BERTH, "--threads", "2", "eval", "--task", "pretrain", "--model", model_dir,
                             "--data", held, "--max-length", "128"))

    b, p = held_out(best), held_out(peer)
    print("| side | held-out MLM loss | perplexity | masked accuracy | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| berth{' bf16' if a.bf16 else ''} | {b['loss']:.4f} | {b['perplexity']:.1f} | {100 * b['masked_accuracy']:.2f} | {berth_tps:.0f} |")
    how = ("sparse_prediction" if modern else f"{a.head} head") + (", bf16 autocast" if a.bf16 else "")
    print(f"| PyTorch {torch.__version__} ({how}) | {p['loss']:.4f} | {p['perplexity']:.1f} | {100 * p['masked_accuracy']:.2f} | {tokens / runtime:.0f} |")
    print(f"loss ratio berth / PyTorch {b['loss'] / p['loss']:.4f}; speed ratio {berth_tps / (tokens / runtime):.2f}x")
    if a.peak and not modern:
        # Useful work: three times the forward's products (the backward computes two per
        # forward one) over real tokens: the encoder's linears and attention per sequence,
        # and the head (transform + decoder) at the masked positions PyTorch drew (berth draws
        # its own at the same 15 %). Embeddings, LayerNorm, softmax and padding not counted.
        c = model.config
        h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
        enc = sum(c.num_hidden_layers * (2 * len(s) * h * (4 * h + 2 * i) + 4 * len(s) ** 2 * h) for s in seqs)
        per_token = 3 * (enc + masked * (2 * h * h + 2 * h * v)) / tokens
        side = "berth bf16" if a.bf16 else "berth f32"
        gb, gp = berth_tps * per_token / 1e9, tokens / runtime * per_token / 1e9
        print(f"useful work {per_token / 1e6:.2f} MFLOP per real token: {side} {gb:.1f} GFLOP/s "
              f"({100 * gb / a.peak:.0f} % of berth's matmul peak, {a.peak:.0f}); PyTorch {gp:.1f} GFLOP/s")
    # Training-loss curves in windows of 50 steps (each side's own masking and dropout draws).
    w = 50
    for i in range(0, a.steps, w):
        bl = [l for s, l in berth_losses if i < s <= i + w]
        tl = torch_losses[i:i + w]
        print(f"steps {i + 1}-{i + w}: berth {sum(bl) / max(1, len(bl)):.3f}  PyTorch {sum(tl) / len(tl):.3f}")


if __name__ == "__main__":
    main()
