"""Reference outputs and gradients of ModernBERT's rotary embeddings and GeGLU feed-forward,
from transformers' own modules (modeling_modernbert), for berth-kernels' rope and geglu tests.

    pip install torch transformers   # transformers >= 4.48
    python scripts/make_modernbert_kernel_reference.py  # writes fixtures/modernbert/kernels.json
"""
import json
import math
from pathlib import Path

import torch
from transformers import ModernBertConfig
from transformers.models.modernbert.modeling_modernbert import (
    ModernBertMLP,
    ModernBertRotaryEmbedding,
    apply_rotary_pos_emb,
)

torch.manual_seed(0)
out = {}


def rotate(qkv, cu, heads, theta):
    """transformers' rotary embedding of the q and k heads of a packed [N, 3H] tensor."""
    n, three_h = qkv.shape
    h = three_h // 3
    hd = h // heads
    cfg = ModernBertConfig(hidden_size=h, num_attention_heads=heads, global_rope_theta=theta,
                           max_position_embeddings=8192)
    cfg.rope_theta = theta
    rope = ModernBertRotaryEmbedding(cfg)
    rows = []
    for s in range(len(cu) - 1):
        part = qkv[cu[s]:cu[s + 1]]
        length = part.shape[0]
        q = part[:, :h].reshape(1, length, heads, hd).transpose(1, 2)
        k = part[:, h:2 * h].reshape(1, length, heads, hd).transpose(1, 2)
        pos = torch.arange(length)[None, :]
        cos, sin = rope(q, pos)
        qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
        qe = qe.transpose(1, 2).reshape(length, h)
        ke = ke.transpose(1, 2).reshape(length, h)
        rows.append(torch.cat([qe, ke, part[:, 2 * h:]], dim=1))
    return torch.cat(rows, dim=0)


# Two packed sequences (5 and 9 tokens), 2 heads of 8, both of ModernBERT's bases.
cu = [0, 5, 14]
for theta in [10000.0, 160000.0]:
    x = torch.randn(14, 48, requires_grad=True)
    y = rotate(x, cu, 2, theta)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    out[f"rope_{int(theta)}"] = {
        "theta": theta, "heads": 2, "cu_seqlens": cu,
        "qkv": x.detach().tolist(), "out": y.detach().tolist(),
        "dy": dy.tolist(), "dqkv": x.grad.tolist(),
    }

# Far positions of one 8,192-token sequence, head dim 64 (where f32 angles lose precision,
# berth must compute the angles as transformers does): q rows at those positions.
positions = [0, 1, 100, 1000, 4095, 8191]
hd = 64
cfg = ModernBertConfig(hidden_size=hd, num_attention_heads=1, global_rope_theta=160000.0,
                       max_position_embeddings=8192)
cfg.rope_theta = 160000.0
rope = ModernBertRotaryEmbedding(cfg)
q = torch.randn(len(positions), hd)
cos, sin = rope(q, torch.tensor([positions]))
qe, _ = apply_rotary_pos_emb(q[None, None], q[None, None], cos, sin)
out["rope_far"] = {"theta": 160000.0, "head_dim": hd, "positions": positions,
                   "q": q.tolist(), "out": qe[0, 0].tolist()}

# GeGLU: Wi's output split in two halves, act(input) * gate, through ModernBertMLP with
# identity projections so the block's own code computes it.
inter = 10
mcfg = ModernBertConfig(hidden_size=2 * inter, intermediate_size=inter, mlp_bias=False,
                        hidden_activation="gelu", mlp_dropout=0.0)
mlp = ModernBertMLP(mcfg).eval()
with torch.no_grad():
    mlp.Wi.weight.copy_(torch.eye(2 * inter))
    mlp.Wo.weight.zero_()
x = torch.randn(6, 2 * inter, requires_grad=True)
inp, gate = mlp.Wi(x).chunk(2, dim=-1)
y = mlp.act(inp) * gate
dy = torch.randn_like(y)
(y * dy).sum().backward()
out["geglu"] = {"activation": "gelu", "x": x.detach().tolist(), "out": y.detach().tolist(),
                "dy": dy.tolist(), "dx": x.grad.tolist()}

path = Path(__file__).resolve().parent.parent / "fixtures" / "modernbert" / "kernels.json"
path.write_text(json.dumps(out))
print(f"wrote {path} ({path.stat().st_size} bytes)")
