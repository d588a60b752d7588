#!/usr/bin/env python3
"""Tiny random ModernBERT checkpoints and transformers' outputs on them, for berth's parity
tests (fixtures/modernbert/).

    pip install torch transformers   # transformers >= 4.48 (made with 4.57.6, torch 2.15)
    python3 scripts/make_modernbert_reference.py

Two masked-LM checkpoints over the fixture WordPiece vocabulary (fixtures/vocab/wordpiece):
  mlm         published-style config (no biases, global_attn_every_n_layers, global/local
              rope theta), GELU;
  mlm-biased  every bias on, tanh-GELU feed-forward, SiLU head, global attention every 2
              layers, other rotary bases, written in the config form transformers 5 writes
              (layer_types, rope_parameters) — transformers 4.57 runs the equivalent config.
Both use a local window of 8 tokens, so every text but the shortest is longer than it, and
one text is over 1,000 tokens. reference.safetensors holds the packed input ids,
cu_seqlens, the last hidden state (every token) and masked-LM logits at `logit_rows`;
fill_mask.json transformers' fill-mask pipeline on a masked text; num_parameters.json the model's
num_parameters() (the tied decoder counted once). Heads: seqcls-mean (mean pooling),
seqcls-cls-biased (first token, every bias), tokcls and qa, with their logits over every
token (sequence logits per text). Nothing is computed by berth.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (BertTokenizerFast, ModernBertConfig, ModernBertForMaskedLM,
                          ModernBertForQuestionAnswering, ModernBertForSequenceClassification,
                          ModernBertForTokenClassification, pipeline)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "modernbert"
VOCAB = ROOT / "fixtures" / "vocab" / "wordpiece"

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, this is a tiny corpus for a tiny tokenizer!",
    "who is there? the dog is there, and the fox is not.",
    "berth runs bert in rust, end to end, without padding.",
]
MASKED = "the quick brown [MASK] jumps over the lazy dog."

tok = BertTokenizerFast(tokenizer_file=str(VOCAB / "tokenizer.json"))
long_text = " ".join(SENTENCES[i % 4] for i in range(90))
texts = ["hello world", SENTENCES[2], long_text, MASKED]


def build(name, cfg, berth_config, cls=ModernBertForMaskedLM):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    config = json.loads((d / "config.json").read_text())
    config.update(berth_config)
    for k in [k for k, v in berth_config.items() if v is None]:
        config.pop(k)
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]:
        shutil.copy(VOCAB / f, d / f)

    enc = [tok(t)["input_ids"] for t in texts]
    assert len(enc[2]) > 1000, len(enc[2])
    cu = [0]
    for ids in enc:
        cu.append(cu[-1] + len(ids))
    ref = {"input_ids": torch.tensor(sum(enc, []), dtype=torch.int64),
           "cu_seqlens": torch.tensor(cu, dtype=torch.int64)}
    hidden, rows, outs = [], [], []
    with torch.no_grad():
        for start, ids in zip(cu, enc):
            x = torch.tensor([ids])
            out = model(x)
            # The base model's last_hidden_state is after final_norm (hidden_states[-1] is
            # the last layer's output before it).
            hidden.append(model.model(x).last_hidden_state[0])
            if cls is ModernBertForMaskedLM:
                picked = sorted({0, len(ids) // 2, len(ids) - 1} | set(range(0, len(ids), 97)))
                rows += [start + i for i in picked]
                outs.append(out.logits[0, picked])
            elif cls is ModernBertForQuestionAnswering:
                outs.append(torch.stack([out.start_logits[0], out.end_logits[0]], dim=1))
            else:
                outs.append(out.logits[0] if cls is ModernBertForTokenClassification else out.logits)
    if cls is ModernBertForMaskedLM:  # (the heads' references keep their logits only)
        ref["last_hidden_state"] = torch.cat(hidden).contiguous()
    if cls is ModernBertForQuestionAnswering:
        both = torch.cat(outs)
        ref["start_logits"] = both[:, 0].contiguous()
        ref["end_logits"] = both[:, 1].contiguous()
    else:
        ref["logits"] = torch.cat(outs).contiguous()
    if rows:
        ref["logit_rows"] = torch.tensor(rows, dtype=torch.int64)
    save_file(ref, d / "reference.safetensors")
    (d / "num_parameters.json").write_text(json.dumps({"num_parameters": model.num_parameters()}) + "\n")
    if cls is ModernBertForMaskedLM:
        fill = pipeline("fill-mask", model=model, tokenizer=tok, top_k=5)(MASKED)
        (d / "fill_mask.json").write_text(json.dumps({"text": MASKED, "predictions": fill}, indent=1) + "\n")
    print(f"{d}: {sum(len(e) for e in enc)} tokens, sequences {[len(e) for e in enc]}")


common = dict(vocab_size=tok.vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3,
              cls_token_id=2, sep_token_id=3, hidden_size=32, num_attention_heads=2,
              num_hidden_layers=4, intermediate_size=48, local_attention=8,
              max_position_embeddings=2048, attn_implementation="eager")
build("mlm", ModernBertConfig(**common, global_attn_every_n_layers=3), {})
biased = ModernBertConfig(**common, global_attn_every_n_layers=2, global_rope_theta=50000.0,
                          local_rope_theta=2000.0, norm_bias=True, attention_bias=True,
                          mlp_bias=True, classifier_bias=True, hidden_activation="gelu_pytorch_tanh",
                          classifier_activation="silu")
layer_types = ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(4)]
build("mlm-biased", biased, {
    "layer_types": layer_types,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 2000.0}},
    "global_attn_every_n_layers": None, "global_rope_theta": None, "local_rope_theta": None,
})

# Heads: sequence classification with mean pooling (and cls pooling on the biased config),
# token classification, question answering.
labels = {"id2label": {0: "negative", 1: "neutral", 2: "positive"},
          "label2id": {"negative": 0, "neutral": 1, "positive": 2}}
build("seqcls-mean", ModernBertConfig(**common, classifier_pooling="mean", **labels), {},
      ModernBertForSequenceClassification)
build("seqcls-cls-biased", ModernBertConfig(**{**common, "attn_implementation": "eager"},
      classifier_pooling="cls", norm_bias=True, attention_bias=True, mlp_bias=True,
      classifier_bias=True, **labels), {}, ModernBertForSequenceClassification)
tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
build("tokcls", ModernBertConfig(**common, id2label=dict(enumerate(tags)),
      label2id={t: i for i, t in enumerate(tags)}), {}, ModernBertForTokenClassification)
build("qa", ModernBertConfig(**common), {}, ModernBertForQuestionAnswering)
