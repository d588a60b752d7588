#!/usr/bin/env python3
"""Make fixtures/train/distill.json and fixtures/train/distill-*.safetensors: knowledge
distillation (Hinton et al.; DistilBERT's loss) run in PyTorch + transformers on the tiny
checkpoints, for berth's distillation parity test.

    python3 scripts/make_distill_reference.py      # needs torch, transformers 4.57

Teacher: the tiny two-layer checkpoint (fixtures/tiny/bert-seqcls, bert-tokcls), eval mode,
no gradient. Student: the same checkpoint loaded with num_hidden_layers=1, which keeps layer
0 — what `berth finetune --student-layers 1` takes (layer floor(i * 2 / 1) = 0). Loss, with
alpha 0.5 and temperature 2:

    alpha * T^2 * KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T))
        + (1 - alpha) * cross_entropy(s, labels)

over sequences (classification) or over the labelled tokens (token classification). Then
three AdamW steps as scripts/make_train_reference.py runs them: the loss of each step, each
gradient at step 1, the gradient norms and the weights after the last step.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

import make_train_reference as mtr

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny"
OUT = ROOT / "fixtures" / "train"
ALPHA, TEMPERATURE = 0.5, 2.0


def soft(s, t):
    return F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.softmax(t / TEMPERATURE, -1),
                    reduction="batchmean") * TEMPERATURE ** 2


def run(name, kind):
    torch.manual_seed(0)
    d = TINY / name
    tok = AutoTokenizer.from_pretrained(d)
    cls = AutoModelForSequenceClassification if kind == "seq" else AutoModelForTokenClassification
    teacher = cls.from_pretrained(d).eval()
    student = cls.from_pretrained(d, num_hidden_layers=1).eval()
    enc = tok(mtr.TEXTS, padding=True, return_tensors="pt")
    n_labels = student.config.num_labels
    if kind == "seq":
        labels = torch.tensor([i % n_labels for i in range(len(mtr.TEXTS))])
        label_list = labels.tolist()
    else:
        labels = torch.full(enc["input_ids"].shape, -100)
        special = [tok.get_special_tokens_mask(ids, already_has_special_tokens=True)
                   for ids in enc["input_ids"].tolist()]
        for s in range(len(mtr.TEXTS)):
            for t in range(enc["input_ids"].shape[1]):
                if enc["attention_mask"][s, t] and not special[s][t] and (s + t) % 3 != 2:
                    labels[s, t] = (s * 5 + t * 3) % n_labels
        label_list = [labels[s][enc["attention_mask"][s].bool()].tolist() for s in range(len(mtr.TEXTS))]
    with torch.no_grad():
        taught = teacher(**enc).logits

    def loss_fn():
        s = student(**enc).logits
        if kind == "seq":
            return ALPHA * soft(s, taught) + (1 - ALPHA) * F.cross_entropy(s, labels)
        keep = labels != -100
        return ALPHA * soft(s[keep], taught[keep]) + (1 - ALPHA) * F.cross_entropy(s[keep], labels[keep])

    params = list(student.named_parameters())
    tensors, losses, norms = mtr.train_steps(student, params, loss_fn)
    save_file(tensors, str(OUT / f"distill-{name}.safetensors"))
    return {"texts": mtr.TEXTS, "questions": None, "labels": label_list,
            "input_ids": mtr.ids_of(enc), "losses": losses, "grad_norms": norms}


def main():
    out = {"alpha": ALPHA, "temperature": TEMPERATURE,
           "bert-seqcls": run("bert-seqcls", "seq"), "bert-tokcls": run("bert-tokcls", "tok")}
    (OUT / "distill.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print({k: v["losses"] for k, v in out.items() if isinstance(v, dict)})


if __name__ == "__main__":
    main()
