#!/usr/bin/env python3
"""Make fixtures/train/: one training recipe run in PyTorch + transformers on the tiny
checkpoints of fixtures/tiny (made by make_reference.py), for berth's training parity tests.

    python3 scripts/make_train_reference.py              # every recipe
    python3 scripts/make_train_reference.py modernbert   # only the ModernBERT ones

For each checkpoint: a batch of texts with labels, the loss transformers' head computes
(dropout off: model.eval()), the gradient of every parameter at step 1, then three steps of
torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on all but biases
and LayerNorm weights, as the Trainer groups them) under get_linear_schedule_with_warmup
(1 warmup step of 4) with clip_grad_norm_(1.0): the loss of each step and the weights after
the last. Classification batches are padded (attention mask), which leaves the real tokens'
math unchanged; QA pairs run one at a time (see run()).

Three more recipes use other losses on the same machinery:
- bert-multilabel: bert-seqcls with problem_type multi_label_classification (BCE over labels);
- bert-rerank: a one-logit cross-encoder (BertForSequenceClassification, num_labels=1, head
  initialised here and saved to fixtures/train/bert-rerank/) on (query, passage) pairs with
  sentence-transformers' CrossEncoder loss, BCE with logits against the relevance;
- bert-embed: a sentence-transformers bi-encoder (tiny bert-base + mean pooling) with
  MultipleNegativesRankingLoss over (anchor, positive, hard negative) triples. The pooler
  receives no gradient there (mean pooling never uses it), so AdamW leaves it unchanged.
"""
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny"
OUT = ROOT / "fixtures" / "train"
TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog.",
    "numbers 12345 and accents: café naïve! who is there?",
    "who is there? the dog is there.",
]
CASES = [("bert-seqcls", "seq"), ("roberta-seqcls", "seq"), ("distilbert-seqcls", "seq"),
         ("bert-tokcls", "tok"), ("distilbert-tokcls", "tok"), ("bert-qa", "qa"), ("distilbert-qa", "qa")]
QUESTIONS = ["who is there?", "what jumps?", "hello?", "where is the dog?"]
NEGATIVES = ["a lazy afternoon.", "café au lait", "fox news at 12345", "nobody is there."]
RELEVANCE = [1.0, 0.0, 1.0, 0.25]
MULTI = [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]]


def decay_groups(model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or "layernorm" in name.lower() or "layer_norm" in name.lower()
         else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def train_steps(model, params, loss_fn, groups=None):
    """Three AdamW steps: losses, gradient norms, step-1 gradients (params with a gradient;
    with `groups`, the weight-decay groups given, and every parameter must have one)."""
    opt = torch.optim.AdamW(groups or decay_groups_of(params), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, 4)
    tensors, losses, norms = {}, [], []
    for step in range(3):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.item())
        if step == 1:
            for n, p in params:
                assert groups is None or p.grad is not None, f"{n} has no gradient"
                if p.grad is not None:
                    tensors["grad." + n] = p.grad.detach().clone().contiguous()
        norms.append(torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0).item())
        opt.step()
        sched.step()
    for n, p in params:
        tensors["final." + n] = p.detach().clone().contiguous()
    return tensors, losses, norms


def decay_groups_of(params):
    decay = [p for n, p in params if not (n.endswith(".bias") or "layernorm" in n.lower())]
    no_decay = [p for n, p in params if n.endswith(".bias") or "layernorm" in n.lower()]
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def ids_of(enc):
    return [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]


def run_multilabel():
    torch.manual_seed(0)
    d = TINY / "bert-seqcls"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(
        d, problem_type="multi_label_classification").eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    labels = torch.tensor(MULTI, dtype=torch.float32)
    tensors, losses, norms = train_steps(model, list(model.named_parameters()),
                                         lambda: model(**enc, labels=labels).loss)
    save_file(tensors, str(OUT / "bert-multilabel.safetensors"))
    return {"texts": TEXTS, "labels": MULTI, "input_ids": ids_of(enc), "losses": losses, "grad_norms": norms}


def run_rerank():
    torch.manual_seed(0)
    base = TINY / "bert-base"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    ckpt = OUT / "bert-rerank"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    enc = tok(QUESTIONS, TEXTS, padding=True, return_tensors="pt")
    target = torch.tensor(RELEVANCE)

    def loss():  # sentence-transformers' CrossEncoder BinaryCrossEntropyLoss
        return torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits.view(-1), target)
    tensors, losses, norms = train_steps(model, list(model.named_parameters()), loss)
    save_file(tensors, str(OUT / "bert-rerank.safetensors"))
    return {"texts": TEXTS, "questions": QUESTIONS, "labels": RELEVANCE, "input_ids": ids_of(enc),
            "losses": losses, "grad_norms": norms}


def run_embed():
    import sentence_transformers
    from sentence_transformers import SentenceTransformer, losses as st_losses, models
    torch.manual_seed(0)
    transformer = models.Transformer(str(TINY / "bert-base"), max_seq_length=64)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[transformer, pooling], device="cpu").eval()
    mnrl = st_losses.MultipleNegativesRankingLoss(st)  # scale 20, cosine similarity
    feats = [st.tokenize(t) for t in (TEXTS, QUESTIONS, NEGATIVES)]
    # The Transformer module holds the Hugging Face model as `model` (sentence-transformers 5;
    # `auto_model` before): strip that prefix to get the checkpoint names.
    params = [(n.removeprefix("0.model.").removeprefix("0.auto_model."), p) for n, p in st.named_parameters()]
    tensors, losses, norms = train_steps(st, params, lambda: mnrl(feats, None))
    save_file(tensors, str(OUT / "bert-embed.safetensors"))
    return {"texts": TEXTS, "questions": QUESTIONS, "negatives": NEGATIVES, "scale": mnrl.scale,
            "sentence_transformers": sentence_transformers.__version__,
            "input_ids": [ids_of(f) for f in feats], "losses": losses, "grad_norms": norms}


def trainer_decay_groups(model):
    names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    return [{"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if n not in names], "weight_decay": 0.0}]


MODERN = ROOT / "fixtures" / "modernbert"
MODERN_CASES = [("modernbert-seqcls-mean", "seq"), ("modernbert-seqcls-cls-biased", "seq"),
                ("modernbert-tokcls", "tok"), ("modernbert-qa", "qa")]


def run(name, kind):
    torch.manual_seed(0)
    modern = name.startswith("modernbert-")
    d = MODERN / name.removeprefix("modernbert-") if modern else TINY / name
    tok = AutoTokenizer.from_pretrained(d)
    if modern:  # ModernBERT takes no token type ids
        tok.model_input_names = ["input_ids", "attention_mask"]
    cls = {"seq": AutoModelForSequenceClassification, "tok": AutoModelForTokenClassification,
           "qa": AutoModelForQuestionAnswering}[kind]
    model = cls.from_pretrained(d).eval()
    if kind == "qa":
        enc = tok(QUESTIONS, TEXTS, padding=True, return_tensors="pt")
    else:
        enc = tok(TEXTS, padding=True, return_tensors="pt")
    n_labels = model.config.num_labels
    extra = {}
    if kind == "qa":
        # Start / end token positions inside each context; the last pair points at [CLS].
        lens = enc["attention_mask"].sum(1).tolist()
        starts = [lens[0] - 4, lens[1] - 6, lens[2] - 3, 0]
        ends = [lens[0] - 2, lens[1] - 5, lens[2] - 2, 0]
        extra = {"start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}
        labels = None
        label_list = [[s_, e_] for s_, e_ in zip(starts, ends)]
    elif kind == "seq":
        labels = torch.tensor([i % n_labels for i in range(len(TEXTS))])
        label_list = labels.tolist()
    else:
        labels = torch.full(enc["input_ids"].shape, -100)
        special = [tok.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in enc["input_ids"].tolist()]
        for s in range(len(TEXTS)):
            for t in range(enc["input_ids"].shape[1]):
                if enc["attention_mask"][s, t] and not special[s][t] and (s + t) % 3 != 2:
                    labels[s, t] = (s * 5 + t * 3) % n_labels
        # Per text, the real tokens' labels (-100 = ignored), unpadded.
        label_list = [labels[s][enc["attention_mask"][s].bool()].tolist() for s in range(len(TEXTS))]
    groups = trainer_decay_groups(model) if modern else decay_groups(model)
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, 4)
    tensors, losses, norms = {}, [], []
    for step in range(3):
        opt.zero_grad()
        if kind == "qa":
            # Each pair alone, losses averaged: a padded batch would put the pad positions'
            # logits into the start / end softmax (transformers does not mask them), which a
            # packed batch has no counterpart for.
            loss = sum(model(**tok(QUESTIONS[i], TEXTS[i], return_tensors="pt"),
                             start_positions=extra["start_positions"][i:i + 1],
                             end_positions=extra["end_positions"][i:i + 1]).loss for i in range(len(TEXTS))) / len(TEXTS)
        else:
            loss = model(**enc, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        if step == 1:  # the first step runs at lr 0 (warmup): step 2 is the first real update's gradient
            for n, p in model.named_parameters():
                assert p.grad is not None, f"{name}: {n} has no gradient"
                tensors["grad." + n] = p.grad.detach().clone().contiguous()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        sched.step()
    for n, p in model.named_parameters():
        tensors["final." + n] = p.detach().clone().contiguous()
    # The trained model's predictions, each text run alone: berth must load the
    # PyTorch-trained weights and reproduce them.
    with torch.no_grad():
        for s, text in enumerate(TEXTS):
            if kind == "qa":
                o = model(**tok(QUESTIONS[s], text, return_tensors="pt"))
                tensors[f"logits.{s}"] = torch.stack([o.start_logits[0], o.end_logits[0]], 1).contiguous()
            else:
                tensors[f"logits.{s}"] = model(**tok(text, return_tensors="pt")).logits[0].contiguous()
    save_file(tensors, str(OUT / f"{name}.safetensors"))
    return {"texts": TEXTS, "questions": QUESTIONS if kind == "qa" else None, "labels": label_list, "input_ids": [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])],
            "losses": losses, "grad_norms": norms, "lr": 1e-3, "weight_decay": 0.01, "warmup": 1, "total": 4, "max_grad_norm": 1.0}


def run_modern_mlm():
    """ModernBertForMaskedLM (fixtures/modernbert/mlm) on the texts with every token at
    (text + position) % 4 == 1 that is not special replaced by [MASK]."""
    torch.manual_seed(0)
    d = MODERN / "mlm"
    tok = AutoTokenizer.from_pretrained(d)
    model = transformers.ModernBertForMaskedLM.from_pretrained(d).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    ids, mask = enc["input_ids"].clone(), enc["attention_mask"]
    labels = torch.full(ids.shape, -100)
    for s in range(len(TEXTS)):
        special = tok.get_special_tokens_mask(ids[s].tolist(), already_has_special_tokens=True)
        for t in range(ids.shape[1]):
            if mask[s, t] and not special[t] and (s + t) % 4 == 1:
                labels[s, t] = ids[s, t]
                ids[s, t] = tok.mask_token_id
    tensors, losses, norms = train_steps(
        model, list(model.named_parameters()),
        lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss, trainer_decay_groups(model))
    save_file(tensors, str(OUT / "modernbert-mlm.safetensors"))
    return {"texts": TEXTS, "input_ids": [i[m.bool()].tolist() for i, m in zip(ids, mask)],
            "labels": [l[m.bool()].tolist() for l, m in zip(labels, mask)],
            "losses": losses, "grad_norms": norms}


if __name__ == "__main__":
    import sys
    print("torch", torch.__version__, "transformers", transformers.__version__)
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["modernbert"]:
        ref = json.loads((OUT / "recipe.json").read_text())
    else:
        ref = {name: run(name, kind) for name, kind in CASES}
        ref["bert-multilabel"] = run_multilabel()
        ref["bert-rerank"] = run_rerank()
        ref["bert-embed"] = run_embed()
    for name, kind in MODERN_CASES:
        ref[name] = run(name, kind)
    ref["modernbert-mlm"] = run_modern_mlm()
    (OUT / "recipe.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False))
    for k, v in ref.items():
        print(k, v["losses"])
