#!/usr/bin/env python3
"""berth vs PyTorch (transformers, sdpa attention) and ONNX Runtime on a bert-base-sized
ModernBERT with random weights (22 layers, hidden 768, 12 heads, intermediate 1152, global
attention every 3rd layer, local window 128), batch 1, at 512, 2,048 and 8,192 tokens, f32,
same threads.

    pip install torch transformers onnx onnxruntime
    python3 scripts/bench_modernbert.py [--threads 2] [--lengths 512,2048,8192] [--repeat 3]

ONNX Runtime runs the model exported by torch.onnx.export (dynamic length; transformers'
sliding-window mask is part of the graph, checked against PyTorch on a text longer than the
window), all graph optimizations, intra-op threads = --threads, best of --repeat.
berth runs `berth embed --input FILE --batch-tokens N` (one text per batch: batch 1) on 1 + R
copies of the text and on one copy; the time per text is the difference over R, so model
loading and process start are left out (R grows for short texts so the difference dwarfs
that noise). PyTorch
runs ModernBertModel under torch.inference_mode, the best of --repeat. Prints seconds per
text, tokens/s and berth's ratio, and berth's time per token across lengths; then berth
`--dtype int8` the same way (per-channel int8 weights, per-token uint8 activations), its speed
against berth f32 and PyTorch f32 and the cosine of its mean-pooled embedding to f32's.
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lengths", default="512,2048,8192")
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--berth", default=str(ROOT / "target" / "release" / "berth"))
args = ap.parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)

import torch  # noqa: E402
from transformers import ModernBertConfig, ModernBertModel  # noqa: E402

torch.set_num_threads(args.threads)
work = Path(tempfile.mkdtemp())
vocab = ROOT / "fixtures" / "vocab" / "wordpiece"
cfg = ModernBertConfig(vocab_size=2000, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       cls_token_id=2, sep_token_id=3, hidden_size=768, num_hidden_layers=22,
                       num_attention_heads=12, intermediate_size=1152, local_attention=128,
                       global_attn_every_n_layers=3, max_position_embeddings=8192,
                       attn_implementation="sdpa")
torch.manual_seed(0)
model = ModernBertModel(cfg).eval()
model.save_pretrained(work / "model", safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
    shutil.copy(vocab / f, work / "model" / f)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


class Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state


probe = torch.randint(5, 2000, (1, 300))
torch.onnx.export(Hidden(model), (probe,), str(work / "model.onnx"), input_names=["ids"],
                  output_names=["h"], dynamic_axes={"ids": {1: "n"}, "h": {1: "n"}},
                  opset_version=17, dynamo=False)
so = ort.SessionOptions()
so.intra_op_num_threads = args.threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(str(work / "model.onnx"), so, providers=["CPUExecutionProvider"])
with torch.inference_mode():
    gap = np.abs(session.run(None, {"ids": probe.numpy()})[0] - model(probe).last_hidden_state.numpy()).max()
print(f"ONNX export: max abs diff to PyTorch at 300 tokens {gap:.1e}")

words = "the quick brown fox jumps over the lazy dog and runs far away".split()
text = " ".join(words[i % len(words)] for i in range(9000))
print(f"threads {args.threads}; model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
print("tokens | PyTorch s | ONNX Runtime s | berth s | berth / PyTorch | berth / ORT | berth µs per token")
int8_rows = []
for n in [int(x) for x in args.lengths.split(",")]:
    ids = torch.randint(5, 2000, (1, n))
    best = float("inf")
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(args.repeat):
            t = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - t)
    onnx_best = float("inf")
    session.run(None, {"ids": ids.numpy()})  # warm-up
    for _ in range(args.repeat):
        t = time.perf_counter()
        session.run(None, {"ids": ids.numpy()})
        onnx_best = min(onnx_best, time.perf_counter() - t)
    # Enough copies that their compute dwarfs the noise of process start and model loading.
    extra = max(args.repeat, (8192 // n) * args.repeat // 2)

    def berth_run(dtype):
        """Seconds per text, and the mean-pooled embedding of the text."""
        times = {}
        for copies in [1, 1 + extra]:
            f = work / f"in-{copies}.txt"
            f.write_text((text + "\n") * copies)
            t = time.perf_counter()
            subprocess.run([args.berth, "--threads", str(args.threads), "embed", "--model",
                            str(work / "model"), "--max-length", str(n), "--batch-tokens", str(n),
                            "--dtype", dtype, "--pooling", "mean", "--input", str(f),
                            "--output", str(work / f"out-{copies}.jsonl")], check=True,
                           stdout=subprocess.DEVNULL)
            times[copies] = time.perf_counter() - t
        with open(work / "out-1.jsonl") as f:
            vec = np.array(json.loads(f.readline())["embedding"])
        return (times[1 + extra] - times[1]) / extra, vec

    ours, f32_vec = berth_run("f32")
    print(f"{n} | {best:.3f} | {onnx_best:.3f} | {ours:.3f} | {best / ours:.2f}x | "
          f"{onnx_best / ours:.2f}x | {1e6 * ours / n:.1f}")
    q, q_vec = berth_run("int8")
    cos = float(f32_vec @ q_vec / (np.linalg.norm(f32_vec) * np.linalg.norm(q_vec)))
    int8_rows.append(f"{n} | {q:.3f} | {ours / q:.2f}x | {best / q:.2f}x | {cos:.5f}")
print("berth --dtype int8:")
print("tokens | berth int8 s | vs berth f32 | vs PyTorch f32 | cosine to f32")
for row in int8_rows:
    print(row)
shutil.rmtree(work)
