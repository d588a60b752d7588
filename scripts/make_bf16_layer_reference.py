#!/usr/bin/env python3
"""Reference for berth's bf16 mixed-precision training: one transformers BertLayer (eager
attention, eval mode: no dropout) run forward and backward under PyTorch's CPU bf16 autocast,
and in f32, on the same random weights, input and upstream gradient. berth-kernels' test
`encoder_layer::tests::bf16_products_match_pytorch_autocast` runs its fused layer with bf16
products on the same numbers and compares.

    pip install torch transformers
    python3 scripts/make_bf16_layer_reference.py   # writes fixtures/train/bf16-layer.json

Two sequences (9 and 14 tokens) run one at a time (berth packs them; no padding either
side). Loss: sum(y * g) with g the given upstream gradient, so every gradient is that of a
training step's backward through this layer. The query, key and value weights are stored
fused in berth's row order (q, k, v).
"""
import json
from pathlib import Path

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "train" / "bf16-layer.json"
H, HEADS, F, LENGTHS = 64, 2, 136, [9, 14]

torch.manual_seed(0)
cfg = BertConfig(hidden_size=H, num_attention_heads=HEADS, intermediate_size=F, hidden_act="gelu",
                 layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
cfg._attn_implementation = "eager"
layer = BertLayer(cfg).eval()
with torch.no_grad():
    for name, p in layer.named_parameters():
        if "LayerNorm.weight" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
n = sum(LENGTHS)
x0 = torch.randn(n, H)
g = torch.randn(n, H)

a, o = layer.attention.self, layer.attention.output
# berth's twelve tensors, in LayerWeights::tensors() order.
PARAMS = [
    ("qkv.weight", [a.query.weight, a.key.weight, a.value.weight]),
    ("qkv.bias", [a.query.bias, a.key.bias, a.value.bias]),
    ("attn_out.weight", [o.dense.weight]), ("attn_out.bias", [o.dense.bias]),
    ("attn_ln.weight", [o.LayerNorm.weight]), ("attn_ln.bias", [o.LayerNorm.bias]),
    ("inter.weight", [layer.intermediate.dense.weight]), ("inter.bias", [layer.intermediate.dense.bias]),
    ("out.weight", [layer.output.dense.weight]), ("out.bias", [layer.output.dense.bias]),
    ("out_ln.weight", [layer.output.LayerNorm.weight]), ("out_ln.bias", [layer.output.LayerNorm.bias]),
]


def run(bf16):
    layer.zero_grad()
    x = x0.clone().requires_grad_(True)
    ys, start = [], 0
    for length in LENGTHS:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x[start:start + length][None])
        y = y[0] if isinstance(y, tuple) else y
        ys.append(y[0].float())
        start += length
    y = torch.cat(ys)
    (y * g).sum().backward()
    grads = {name: torch.cat([t.grad for t in ts]) for name, ts in PARAMS}
    return {"y": y.detach(), "dx": x.grad, **{f"grad.{k}": v for k, v in grads.items()}}


def rows(t):
    """f32 values as JSON numbers of 9 significant digits (they read back exactly)."""
    t = t.detach().float()
    r = lambda v: float(f"{v:.9g}")
    return [[r(v) for v in row] for row in t.tolist()] if t.dim() > 1 else [r(v) for v in t.tolist()]


f32, autocast = run(False), run(True)
out = {
    "hidden": H, "heads": HEADS, "intermediate": F, "layer_norm_eps": 1e-12,
    "cu_seqlens": [0, LENGTHS[0], n],
    "x": rows(x0), "g": rows(g),
    "weights": {name: rows(torch.cat([t for t in ts])) for name, ts in PARAMS},
    "f32": {k: rows(v) for k, v in f32.items()},
    "autocast": {k: rows(v) for k, v in autocast.items()},
    "torch": torch.__version__,
}
OUT.write_text(json.dumps(out, separators=(",", ":")))
for k in f32:
    d = (autocast[k] - f32[k]).norm() / f32[k].norm()
    print(f"{k}: autocast vs f32 relative distance {d:.2e}")
print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")
