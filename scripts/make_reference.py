#!/usr/bin/env python3
"""Make the tiny checkpoints and reference outputs under fixtures/ with PyTorch + transformers.

    pip install torch==2.15.0 transformers==4.57.1 sentence-transformers==5.7.0 tokenizers==0.22.2
    python3 scripts/make_reference.py            # tiny checkpoints (no network needed)
    python3 scripts/make_reference.py --minilm   # + all-MiniLM-L6-v2 vectors (needs scripts/fetch-assets)
    python3 scripts/make_reference.py --only electra   # (re)make one architecture's checkpoints

Everything berth's tests compare against comes from here; nothing is computed by berth.
Random weights use a fixed seed and initializer_range 0.1 so that logits are spread enough
for top-k orderings to be meaningful.
"""
import argparse, json, os, shutil, sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer
from transformers import (BertConfig, BertTokenizerFast, DistilBertConfig, ElectraConfig, RobertaConfig,
                          RobertaTokenizerFast, AutoModel, pipeline)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny"

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, this is a tiny corpus for a tiny tokenizer!",
    "numbers like 12345 and 678 appear; so do accents: café, naïve, über.",
    "who is there? the dog is there, and the fox is not.",
    "berth runs bert in rust, end to end, without padding.",
] * 20

TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog.",
    "numbers 12345 and accents: café naïve! who is there?",
]
PAIR = ("who is there?", "the dog is there.")

HEADS = {
    "bert": {"base": "BertModel", "mlm": "BertForMaskedLM", "seqcls": "BertForSequenceClassification",
             "tokcls": "BertForTokenClassification", "qa": "BertForQuestionAnswering"},
    "roberta": {"base": "RobertaModel", "mlm": "RobertaForMaskedLM",
                "seqcls": "RobertaForSequenceClassification",
                "tokcls": "RobertaForTokenClassification", "qa": "RobertaForQuestionAnswering"},
    "distilbert": {"base": "DistilBertModel", "mlm": "DistilBertForMaskedLM",
                   "seqcls": "DistilBertForSequenceClassification",
                   "tokcls": "DistilBertForTokenClassification",
                   "qa": "DistilBertForQuestionAnswering"},
    # ELECTRA with embedding_size == hidden_size (no embeddings_project); "rtd" is the
    # discriminator (ElectraForPreTraining), "mlm" the generator (ElectraForMaskedLM).
    "electra": {"base": "ElectraModel", "mlm": "ElectraForMaskedLM",
                "seqcls": "ElectraForSequenceClassification",
                "tokcls": "ElectraForTokenClassification", "qa": "ElectraForQuestionAnswering",
                "rtd": "ElectraForPreTraining"},
}
LABELS = {"seqcls": ["negative", "neutral", "positive"], "tokcls": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}


def make_tokenizers(tmp: Path):
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(CORPUS, vocab_size=160, min_frequency=1)
    (tmp / "wp").mkdir(parents=True, exist_ok=True)
    wp.save_model(str(tmp / "wp"))
    bert_tok = BertTokenizerFast(vocab_file=str(tmp / "wp" / "vocab.txt"), do_lower_case=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    (tmp / "bpe").mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(tmp / "bpe"))
    rob_tok = RobertaTokenizerFast(vocab_file=str(tmp / "bpe" / "vocab.json"),
                                   merges_file=str(tmp / "bpe" / "merges.txt"))
    distil_tok = transformers.DistilBertTokenizerFast(vocab_file=str(tmp / "wp" / "vocab.txt"),
                                                      do_lower_case=True)
    return bert_tok, distil_tok, rob_tok


def config_for(arch, vocab, head):
    common = dict(vocab_size=vocab, initializer_range=0.1)
    if head in LABELS:
        labels = LABELS[head]
        common.update(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                          hidden_act="gelu", **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2,
                             hidden_act="gelu_new", layer_norm_eps=1e-5, **common)
    if arch == "electra":
        return ElectraConfig(embedding_size=32, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                             type_vocab_size=2, hidden_act="gelu_new", **common)
    return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                            max_position_embeddings=64, activation="gelu", **common)


def encode_all(tok, arch):
    encs = [tok(t) for t in TEXTS]
    if arch in ("bert", "electra"):
        encs.append(tok(*PAIR))
    ids, types, cu = [], [], [0]
    for e in encs:
        ids += e["input_ids"]
        types += e.get("token_type_ids", [0] * len(e["input_ids"]))
        cu.append(len(ids))
    return ids, types, cu


def run_reference(model, arch, head, ids, types, cu):
    """Runs each sequence alone (no padding) and concatenates the outputs along tokens."""
    out = {"input_ids": torch.tensor(ids), "token_type_ids": torch.tensor(types),
           "cu_seqlens": torch.tensor(cu)}
    per = {}
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        kw = {"input_ids": torch.tensor([ids[a:b]])}
        if arch in ("bert", "electra"):
            kw["token_type_ids"] = torch.tensor([types[a:b]])
        with torch.no_grad():
            o = model(**kw, output_hidden_states=True)
        items = {"last_hidden_state": o.hidden_states[-1][0] if head != "base" else o.last_hidden_state[0]}
        if head == "base" and getattr(o, "pooler_output", None) is not None:
            items["pooler_output"] = o.pooler_output[0]
        if head in ("mlm", "tokcls", "rtd"):
            items["logits"] = o.logits[0]
        if head == "seqcls":
            items["logits"] = o.logits[0]
        if head == "qa":
            items["start_logits"] = o.start_logits[0]
            items["end_logits"] = o.end_logits[0]
        for k, v in items.items():
            per.setdefault(k, []).append(v)
    for k, vs in per.items():
        out[k] = torch.stack(vs) if vs[0].dim() == 1 and k in ("pooler_output", "logits") and head in ("base", "seqcls") else torch.cat(vs)
    return {k: v.contiguous() for k, v in out.items()}


def grads_reference(model, ids, types, cu, path):
    """Sum of per-sequence cross-entropy losses and the gradient of every parameter."""
    labels = [0, 2, 1, 2]
    model.eval()  # dropout off; gradients still flow
    model.zero_grad()
    total = 0.0
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        o = model(input_ids=torch.tensor([ids[a:b]]), token_type_ids=torch.tensor([types[a:b]]),
                  labels=torch.tensor([labels[s]]))
        o.loss.backward()
        total += o.loss.item()
    tensors = {"labels": torch.tensor(labels), "loss": torch.tensor([total], dtype=torch.float64)}
    missing = []
    for name, p in model.named_parameters():
        if p.grad is None:
            missing.append(name)
        else:
            tensors["grad." + name] = p.grad.detach().clone().contiguous()
    assert not missing, f"PyTorch left parameters without gradient: {missing}"
    save_file(tensors, str(path))


def tiny(tmp: Path, only=None):
    torch.manual_seed(0)
    bert_tok, distil_tok, rob_tok = make_tokenizers(tmp)
    toks = {"bert": bert_tok, "distilbert": distil_tok, "roberta": rob_tok, "electra": bert_tok}
    old = lambda name: json.loads((TINY / name).read_text()) if only else {}
    tokenization = old("tokenization.json")
    fill_mask = old("fill_mask.json")
    param_counts = old("param_counts.json")
    for arch, heads in HEADS.items():
        if only and arch not in only:
            continue
        tok = toks[arch]
        ids, types, cu = encode_all(tok, arch)
        tokenization[arch] = {"texts": TEXTS, "pair": PAIR if arch in ("bert", "electra") else None,
                              "input_ids": ids, "token_type_ids": types, "cu_seqlens": cu}
        for head, cls in heads.items():
            d = TINY / f"{arch}-{head}"
            shutil.rmtree(d, ignore_errors=True)
            cfg = config_for(arch, len(tok), head)
            model = getattr(transformers, cls)(cfg).eval()
            model.save_pretrained(d)
            tok.save_pretrained(d)
            param_counts[f"{arch}-{head}"] = sum(p.numel() for p in model.parameters())
            if arch == "distilbert":  # exercise building from vocab.txt + tokenizer_config.json
                (d / "tokenizer.json").unlink()
            if arch == "roberta" and head == "mlm":  # exercise vocab.json + merges.txt
                (d / "tokenizer.json").unlink()
            save_file(run_reference(model, arch, head, ids, types, cu), str(d / "reference.safetensors"))
            if arch == "bert" and head == "seqcls":
                grads_reference(model, ids, types, cu, d / "grads.safetensors")
            if arch == "bert" and head == "base":
                model.save_pretrained(TINY / "bert-base-bin", safe_serialization=False)
                model.save_pretrained(TINY / "bert-base-sharded", max_shard_size="40KB")
            if head == "mlm":
                m = tok.mask_token
                texts = [f"the quick brown {m} jumps over the lazy dog.", f"hello {m}, who is {m}?"]
                pipe = pipeline("fill-mask", model=str(d), top_k=5, device="cpu")
                fill_mask[arch] = {"texts": texts, "top_k": 5, "outputs": [pipe(t) for t in texts]}
    (TINY / "tokenization.json").write_text(json.dumps(tokenization, indent=1, ensure_ascii=False))
    (TINY / "param_counts.json").write_text(json.dumps(param_counts, indent=1))
    (TINY / "fill_mask.json").write_text(json.dumps(fill_mask, indent=1, ensure_ascii=False))


WORDS = [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
         ["Peter", "Blackburn"], ["café", "naïve", "12345", "über-cool", "!"]]


def split_words():
    """Pre-split words (CoNLL sentences) as transformers encodes them for token
    classification: `is_split_into_words=True`, and for byte-level BPE `add_prefix_space=True`
    (which transformers requires there), with each token's word index."""
    from transformers import AutoTokenizer
    out = {}
    for name, kw in (("bert-tokcls", {}), ("roberta-tokcls", {"add_prefix_space": True})):
        tok = AutoTokenizer.from_pretrained(TINY / name, **kw)
        out[name] = [{"words": w, "input_ids": (e := tok(w, is_split_into_words=True))["input_ids"],
                      "word_ids": e.word_ids()} for w in WORDS]
    (TINY / "split_words.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))


MINILM_SENTENCES = [
    "Hello!",
    "A",
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is awesome!!!",
    "Café au lait, crème brûlée et naïveté — très français.",
    "Ünïcödé àccents everywhere: São Paulo, Zürich, Kraków, Ångström.",
    "In 2023, revenue grew 12.5% to $4,200,000 (up from $3.7M).",
    "Call 555-0199 or email info@example.com before 9:30am on 03/14/2025.",
    "What?! No way... really?? Yes — really.",
    "东京是日本的首都。",
    "Emoji test 🚀🔥 with text 👍.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "semicolons; colons: dashes - and (parentheses) [brackets] {braces}",
    "It's a well-known fact that e-mail isn't spam-free.",
    "BERT (Bidirectional Encoder Representations from Transformers) is a language model.",
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "A quick movement of the enemy will jeopardize six gunboats.",
    " ".join(["Sentence embeddings map text to dense vectors for search, clustering and similarity."] * 11),
    " ".join(["The committee reviewed 17 proposals, approved 9, and deferred the remaining 8 to March;"
              " several members noted the budget (roughly €2.3 million) was tight."] * 5),
    "Mixed   whitespace\tand\ttabs   between   words.",
    "ok",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 10000 3.14159 2.71828",
    "Rust is a systems programming language focused on safety, speed, and concurrency.",
]


def minilm(model_dir: Path):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(model_dir), device="cpu")
    emb = st.encode(MINILM_SENTENCES, convert_to_tensor=True, normalize_embeddings=False, batch_size=4)
    lens = [len(st.tokenizer(s)["input_ids"]) for s in MINILM_SENTENCES]
    out = ROOT / "fixtures" / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb.float().contiguous()}, str(out / "reference.safetensors"))
    (out / "sentences.json").write_text(json.dumps({"sentences": MINILM_SENTENCES, "token_counts": lens},
                                                   indent=1, ensure_ascii=False))
    print("MiniLM token counts:", lens)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--words", action="store_true", help="only the pre-split-words encodings")
    ap.add_argument("--only", nargs="*", choices=sorted(HEADS), help="remake only these architectures")
    ap.add_argument("--minilm-dir", default=os.path.expanduser("~/.cache/berth/models/all-MiniLM-L6-v2"))
    args = ap.parse_args()
    print("torch", torch.__version__, "transformers", transformers.__version__)
    import tempfile
    if args.words:
        split_words()
        sys.exit()
    with tempfile.TemporaryDirectory() as tmp:
        tiny(Path(tmp), args.only)
    if args.minilm:
        minilm(Path(args.minilm_dir))
