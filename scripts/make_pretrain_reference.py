#!/usr/bin/env python3
"""Make fixtures/pretrain/: a tiny BERT that `berth pretrain` trained (60 steps on
fixtures/vocab/corpus.txt with the committed WordPiece vocabulary), and the masked-LM logits
transformers' BertForMaskedLM computes from that checkpoint, for berth's export test; and a
tinier one trained with `--objective sop` (bert-sop), with the masked-LM and sentence-pair
logits transformers' BertForPreTraining computes from it. `parity`: three AdamW steps of
BertForPreTraining (masked LM + sentence order, dropout off) from bert-sop on fixed masked
pairs — losses, gradient norms, every parameter's gradient at step 2 and the weights after
step 3 (fixtures/pretrain/parity.json + parity.safetensors), for berth's gradient parity test.
`rtd`: ELECTRA's replaced-token detection — a tiny generator (ElectraForMaskedLM, one layer)
sharing the embeddings of a discriminator (ElectraForPreTraining, two layers), saved as
fixtures/pretrain/electra-rtd (+ generator/), and three AdamW steps of generator MLM loss
+ 50 x discriminator loss on fixed masked inputs with fixed replacements
(fixtures/pretrain/rtd.json + rtd.safetensors). `electra`: a tiny ELECTRA that
`berth pretrain --objective rtd` trained (fixtures/pretrain/electra-berth, generator/ inside),
with the discriminator logits ElectraForPreTraining and the masked-LM logits
ElectraForMaskedLM compute from it (reference-rtd.json), for berth's export test.
`modernbert`: a tiny ModernBERT that `berth pretrain --arch modernbert` trained
(fixtures/pretrain/modernbert-berth), what transformers reports loading it into
ModernBertForMaskedLM (missing / unexpected keys) and the masked-LM logits it computes
(reference-modernbert.json), for berth's export test.

    cargo build --release -p berth-cli && pip install torch transformers
    python3 scripts/make_pretrain_reference.py [mlm] [sop] [parity] [rtd] [electra]    # default: all
"""
import json, shutil, subprocess, sys, tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertForMaskedLM, BertForPreTraining

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "pretrain"
PAIRS = [("the knight rode to the castle.", "he came back at [MASK]."),
         ("it was near the end of the year.", "the king was glad."),
         ("Hello-girl?", "Yes, but don't you ask me to explain!")]
TEXTS = ["the knight rode to the [MASK] of the king.", "it was near the [MASK] of the year.",
         "Hello-girl? Yes, but [MASK] you ask me to explain!"]


def pretrain(dst, extra):
    with tempfile.TemporaryDirectory() as tmp:
        best = subprocess.run(
            [str(ROOT / "target/release/berth"), "pretrain", "--tokenizer", str(ROOT / "fixtures/vocab/wordpiece"),
             "--data", str(ROOT / "fixtures/vocab/corpus.txt"), "--output", f"{tmp}/run", "--max-length", "64",
             "--batch-size", "16", "--lr", "2e-3", *extra], check=True, capture_output=True, text=True).stdout.strip()
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for f in Path(best).iterdir():
            if f.is_dir():  # an RTD run's generator/
                shutil.copytree(f, dst / f.name)
            elif f.name not in ("optimizer.safetensors", "trainer_state.json"):
                shutil.copy(f, dst / f.name)


def sop_reference():
    dst = OUT / "bert-sop"
    pretrain(dst, ["--objective", "sop", "--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "64",
                   "--max-steps", "40"])
    tok = AutoTokenizer.from_pretrained(dst)
    model = BertForPreTraining.from_pretrained(dst).eval()
    ref = {"transformers": transformers.__version__, "cases": []}
    with torch.no_grad():
        for a, b in PAIRS:
            enc = tok(a, b, return_tensors="pt")
            out = model(**enc)
            ids = enc["input_ids"][0].tolist()
            ref["cases"].append({"a": a, "b": b, "ids": ids, "type_ids": enc["token_type_ids"][0].tolist(),
                                 "row": 1, "mlm_logits": out.prediction_logits[0][1].tolist(),
                                 "pair_logits": out.seq_relationship_logits[0].tolist()})
    (OUT / "reference-sop.json").write_text(json.dumps(ref))


def parity_reference():
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_train_reference import train_steps
    from safetensors.torch import save_file
    src = OUT / "bert-sop"
    tok = AutoTokenizer.from_pretrained(src)
    model = BertForPreTraining.from_pretrained(src).eval()
    g = torch.Generator().manual_seed(7)
    special = set(tok.all_special_ids)
    cases = []
    # In order (label 0) and swapped (label 1), as the sentence-order objective builds them.
    for label, pairs in ((0, PAIRS), (1, [(b, a) for a, b in PAIRS])):
        for a, b in pairs:
            enc = tok(a, b)
            ids, masked, labels = enc["input_ids"], list(enc["input_ids"]), [-100] * len(enc["input_ids"])
            for j, t in enumerate(ids):
                if t in special or torch.rand(1, generator=g).item() >= 0.3:
                    continue
                labels[j] = t
                r = torch.rand(1, generator=g).item()  # 80 / 10 / 10
                masked[j] = tok.mask_token_id if r < 0.8 else (
                    int(torch.randint(5, len(tok), (1,), generator=g)) if r < 0.9 else t)
            cases.append({"ids": masked, "type_ids": enc["token_type_ids"], "labels": labels, "pair_label": label})
    width = max(len(c["ids"]) for c in cases)
    pad = lambda key, v: torch.tensor([c[key] + [v] * (width - len(c[key])) for c in cases])
    batch = {"input_ids": pad("ids", tok.pad_token_id), "token_type_ids": pad("type_ids", 0),
             "attention_mask": torch.tensor([[1] * len(c["ids"]) + [0] * (width - len(c["ids"])) for c in cases]),
             "labels": pad("labels", -100), "next_sentence_label": torch.tensor([c["pair_label"] for c in cases])}
    params = list(model.named_parameters())
    tensors, losses, norms = train_steps(model, params, lambda: model(**batch).loss)
    save_file(tensors, str(OUT / "parity.safetensors"))
    (OUT / "parity.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases,
         "losses": losses, "grad_norms": norms}, indent=1))
    print("parity losses", losses)


def rtd_reference():
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_train_reference import train_steps
    from safetensors.torch import save_file
    from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining
    tok = AutoTokenizer.from_pretrained(ROOT / "fixtures" / "tiny" / "electra-rtd")
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), embedding_size=32, hidden_size=32, num_attention_heads=4,
                  max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                  initializer_range=0.1)
    disc = ElectraForPreTraining(ElectraConfig(num_hidden_layers=2, intermediate_size=64, **common)).eval()
    gen = ElectraForMaskedLM(ElectraConfig(num_hidden_layers=1, intermediate_size=32, **common)).eval()
    # ELECTRA shares the embeddings; the generator's decoder is their word matrix.
    gen.electra.embeddings = disc.electra.embeddings
    gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
    dst = OUT / "electra-rtd"
    shutil.rmtree(dst, ignore_errors=True)
    disc.save_pretrained(dst)
    gen.save_pretrained(dst / "generator")
    tok.save_pretrained(dst)
    tok.save_pretrained(dst / "generator")
    g = torch.Generator().manual_seed(11)
    special = set(tok.all_special_ids)
    cases = []
    for a, b in PAIRS:
        enc = tok(a, b)
        ids = enc["input_ids"]
        masked, labels, replaced = list(ids), [-100] * len(ids), list(ids)
        for j, t in enumerate(ids):
            if t in special or torch.rand(1, generator=g).item() >= 0.3:
                continue
            labels[j] = t
            masked[j] = tok.mask_token_id
            # The generator's "sample": the original a third of the time (not replaced).
            replaced[j] = t if torch.rand(1, generator=g).item() < 0.33 else int(
                torch.randint(5, len(tok), (1,), generator=g))
        cases.append({"ids": masked, "type_ids": enc["token_type_ids"], "labels": labels,
                      "replaced": replaced})
    width = max(len(c["ids"]) for c in cases)
    pad = lambda key, v: torch.tensor([c[key] + [v] * (width - len(c[key])) for c in cases])
    mask = torch.tensor([[1] * len(c["ids"]) + [0] * (width - len(c["ids"])) for c in cases])
    gen_batch = {"input_ids": pad("ids", tok.pad_token_id), "token_type_ids": pad("type_ids", 0),
                 "attention_mask": mask, "labels": pad("labels", -100)}
    flags = [[int(r != o) for r, o in zip(c["replaced"], tok(a, b)["input_ids"])] for c, (a, b) in zip(cases, PAIRS)]
    disc_batch = {"input_ids": pad("replaced", tok.pad_token_id), "token_type_ids": pad("type_ids", 0),
                  "attention_mask": mask,
                  "labels": torch.tensor([f + [0] * (width - len(f)) for f in flags])}
    seen = {id(p) for p in disc.parameters()}
    params = list(disc.named_parameters()) + [
        ("generator/" + n, p) for n, p in gen.named_parameters() if id(p) not in seen]
    tensors, losses, norms = train_steps(
        disc, params, lambda: gen(**gen_batch).loss + 50.0 * disc(**disc_batch).loss)
    # The shared embeddings under the generator's names too (berth lists them there).
    for n, p in gen.named_parameters():
        if id(p) in seen:
            dn = next(d for d, q in disc.named_parameters() if q is p)
            tensors["grad.generator/" + n] = tensors["grad." + dn].clone()
            tensors["final.generator/" + n] = tensors["final." + dn].clone()
    save_file(tensors, str(OUT / "rtd.safetensors"))
    (OUT / "rtd.json").write_text(json.dumps(
        {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases,
         "replaced_flags": flags, "weight": 50.0, "losses": losses, "grad_norms": norms}, indent=1))
    print("rtd losses", losses)


def electra_reference():
    from transformers import ElectraForMaskedLM, ElectraForPreTraining
    dst = OUT / "electra-berth"
    pretrain(dst, ["--objective", "rtd", "--layers", "2", "--hidden", "32", "--heads", "2",
                   "--intermediate", "64", "--generator-layers", "1", "--max-steps", "40"])
    tok = AutoTokenizer.from_pretrained(dst)
    disc, info = ElectraForPreTraining.from_pretrained(dst, output_loading_info=True)
    assert not any(info.values()), info
    gen, info = ElectraForMaskedLM.from_pretrained(dst / "generator", output_loading_info=True)
    assert not any(info.values()), info
    disc.eval(), gen.eval()
    ref = {"transformers": transformers.__version__, "texts": TEXTS, "cases": []}
    with torch.no_grad():
        for t in TEXTS:
            enc = tok(t, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            mlm = gen(**enc).logits[0]
            rows = [ids.index(tok.mask_token_id), 1]
            ref["cases"].append({"ids": ids, "rtd_logits": disc(**enc).logits[0].tolist(), "rows": rows,
                                 "mlm_logits": [mlm[r].tolist() for r in rows]})
    (OUT / "reference-rtd.json").write_text(json.dumps(ref))
    print("wrote", dst)


def main():
    which = sys.argv[1:] or ["mlm", "sop", "parity", "rtd", "electra", "modernbert"]
    if "modernbert" in which:
        modernbert_reference()
    if "rtd" in which:
        rtd_reference()
    if "electra" in which:
        electra_reference()
    if "sop" in which:
        sop_reference()
    if "parity" in which:  # after sop: it starts from bert-sop
        parity_reference()
    if "mlm" in which:
        mlm_reference()


def modernbert_reference():
    from transformers import ModernBertForMaskedLM
    dst = OUT / "modernbert-berth"
    pretrain(dst, ["--arch", "modernbert", "--layers", "2", "--hidden", "32", "--heads", "2", "--max-steps", "40"])
    tok = AutoTokenizer.from_pretrained(dst)
    model, info = ModernBertForMaskedLM.from_pretrained(dst, output_loading_info=True)
    model.eval()
    ref = {"transformers": transformers.__version__, "texts": TEXTS, "class": type(model).__name__,
           "loading_info": {k: sorted(map(str, v)) for k, v in info.items()}, "cases": []}
    with torch.no_grad():
        for t in TEXTS:
            enc = tok(t, return_tensors="pt", return_token_type_ids=False)
            logits = model(**enc).logits[0]
            ids = enc["input_ids"][0].tolist()
            rows = [ids.index(tok.mask_token_id), 1]
            ref["cases"].append({"ids": ids, "rows": rows, "logits": [logits[r].tolist() for r in rows]})
    (OUT / "reference-modernbert.json").write_text(json.dumps(ref))
    print("wrote", dst, info)


def mlm_reference():
    dst = OUT / "bert-mlm"
    pretrain(dst, ["--layers", "2", "--hidden", "64", "--heads", "2", "--intermediate", "128", "--max-steps", "60"])
    tok = AutoTokenizer.from_pretrained(dst)
    model = BertForMaskedLM.from_pretrained(dst).eval()
    ref = {"transformers": transformers.__version__, "texts": TEXTS, "cases": []}
    with torch.no_grad():
        for t in TEXTS:
            enc = tok(t, return_tensors="pt")
            logits = model(**enc).logits[0]
            ids = enc["input_ids"][0].tolist()
            # Rows at the mask and at the first word (a few rows keep the fixture small).
            rows = [ids.index(tok.mask_token_id), 1]
            ref["cases"].append({"ids": ids, "rows": rows, "logits": [logits[r].tolist() for r in rows]})
    (OUT / "reference.json").write_text(json.dumps(ref))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
