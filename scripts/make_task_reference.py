#!/usr/bin/env python3
"""Make the task-pipeline checkpoints and reference outputs under fixtures/tasks/ with
PyTorch + transformers + sentence-transformers (versions as in make_reference.py).

    python3 scripts/make_task_reference.py            # tiny task checkpoints + pipeline outputs
    python3 scripts/make_task_reference.py --minilm   # + long-document / similarity vectors (needs scripts/fetch-assets)

The checkpoints reuse the tiny tokenizers of fixtures/tiny (made by make_reference.py).
Head weights are scaled up so that softmax outputs are far from uniform and entity / answer
choices are decided by clear margins. Every output is what transformers.pipeline(...) or
sentence-transformers returns; berth's code is not involved.
"""
import argparse, json, os, shutil, sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference import config_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny"
OUT = ROOT / "fixtures" / "tasks"

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
CLS_TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog.",
    "café naïve über — 東京 🚀 numbers 12345!",
    "who is there? the dog is there, and the fox is not.",
]
PAIRS = [["who is there?", "the dog is there."], ["hello world", "the fox is not, so do accents."]]
NER_TEXTS = [
    "the quick brown fox jumps over the lazy dog in tokyo.",
    "café naïve über: 東京 and 🚀 emoji, who is there?",
    "numbers like 12345 and 678 appear; so do accents: café, naïve, über.",
    "berth runs bert in rust, end to end, without padding.",
]
LONG = ("the quick brown fox jumps over the lazy dog. hello world, this is a tiny corpus for a tiny "
        "tokenizer! numbers like 12345 and 678 appear; so do accents: café, naïve, über. who is there? "
        "the dog is there, and the fox is not. berth runs bert in rust, end to end, without padding.")
QA = [
    {"question": "who is there?", "context": "the dog is there, and the fox is not. hello world, this is a tiny corpus."},
    {"question": "what runs bert?", "context": "berth runs bert in rust, end to end, without padding. café naïve über — 東京 🚀."},
    {"question": "where is the fox?", "context": LONG},
]


def to_py(x):
    if isinstance(x, dict):
        return {k: to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_py(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def make_model(cls_name, arch, labels, scale, problem_type=None, seed=0):
    torch.manual_seed(seed)
    # The tiny tokenizers carry no model_max_length; give them the position table's 64.
    tok = AutoTokenizer.from_pretrained(TINY / f"{arch}-base", model_max_length=64)
    cfg = config_for(arch, len(tok), "base")
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {l: i for i, l in enumerate(labels)}
    cfg.num_labels = len(labels)
    if problem_type:
        cfg.problem_type = problem_type
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("classifier", "qa_outputs")):
                p.mul_(scale)
    return model, tok


def save(model, tok, name):
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def classification(cases):
    for arch in ("bert", "roberta"):
        model, tok = make_model(f"{arch.capitalize() if arch == 'bert' else 'Roberta'}ForSequenceClassification",
                                arch, ["negative", "neutral", "positive"], 4.0)
        d = save(model, tok, f"{arch}-classify")
        pipe = pipeline("text-classification", model=d, device="cpu")
        cases.append({"task": "classify", "model": f"{arch}-classify", "params": {}, "inputs": CLS_TEXTS,
                      "outputs": [pipe(t) for t in CLS_TEXTS]})
        for k in (None, 2):
            cases.append({"task": "classify", "model": f"{arch}-classify", "params": {"top_k": k},
                          "inputs": CLS_TEXTS, "outputs": [pipe(t, top_k=k) for t in CLS_TEXTS]})
        if arch == "bert":
            cases.append({"task": "classify", "model": "bert-classify", "params": {"top_k": None, "pair": True},
                          "inputs": PAIRS,
                          "outputs": [pipe({"text": a, "text_pair": b}, top_k=None) for a, b in PAIRS]})
            for fn in ("sigmoid", "none"):
                cases.append({"task": "classify", "model": "bert-classify",
                              "params": {"top_k": None, "function_to_apply": fn}, "inputs": CLS_TEXTS,
                              "outputs": [pipe(t, top_k=None, function_to_apply=fn) for t in CLS_TEXTS]})
            # Long documents: windows of 24 tokens sharing 6, window logits pooled, then softmax.
            enc = tok(LONG, truncation=True, max_length=24, stride=6, return_overflowing_tokens=True)
            with torch.no_grad():
                logits = torch.stack([model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt])).logits[0]
                                      for ids, tt in zip(enc["input_ids"], enc["token_type_ids"])])
            for pool in ("mean", "max", "first"):
                pooled = {"mean": logits.mean(0), "max": logits.max(0).values, "first": logits[0]}[pool]
                probs = torch.softmax(pooled, -1)
                labels = sorted(({"label": model.config.id2label[i], "score": probs[i].item()} for i in range(3)),
                                key=lambda x: x["score"], reverse=True)
                cases.append({"task": "classify", "model": "bert-classify",
                              "params": {"top_k": None, "max_length": 24, "stride": 6, "long_pool": pool},
                              "inputs": [LONG], "windows": len(enc["input_ids"]), "outputs": [labels]})
    model, tok = make_model("BertForSequenceClassification", "bert", ["sports", "politics", "tech", "food"], 4.0,
                            "multi_label_classification", seed=1)
    d = save(model, tok, "bert-multilabel")
    pipe = pipeline("text-classification", model=d, device="cpu")
    cases.append({"task": "classify", "model": "bert-multilabel", "params": {"top_k": None}, "inputs": CLS_TEXTS,
                  "outputs": [pipe(t, top_k=None) for t in CLS_TEXTS]})
    model, tok = make_model("BertForSequenceClassification", "bert", ["LABEL_0"], 4.0, "regression", seed=2)
    d = save(model, tok, "bert-regression")
    pipe = pipeline("text-classification", model=d, device="cpu")
    cases.append({"task": "classify", "model": "bert-regression", "params": {}, "inputs": CLS_TEXTS,
                  "outputs": [pipe(t) for t in CLS_TEXTS]})


def rerank(cases):
    from sentence_transformers import CrossEncoder
    model, tok = make_model("BertForSequenceClassification", "bert", ["LABEL_0"], 4.0, seed=3)
    d = save(model, tok, "bert-rerank")
    ce = CrossEncoder(d, device="cpu")
    query = "who is there?"
    docs = ["the dog is there.", "hello world", "the fox is not there.", "café naïve über 🚀", "berth runs bert in rust."]
    cases.append({"task": "rerank", "model": "bert-rerank", "params": {}, "query": query, "inputs": docs,
                  "outputs": ce.rank(query, docs)})


def ner(cases):
    for arch, cls in (("bert", "BertForTokenClassification"), ("roberta", "RobertaForTokenClassification")):
        model, tok = make_model(cls, arch, NER_LABELS, 6.0, seed=4)
        d = save(model, tok, f"{arch}-ner")
        for agg in ("none", "simple", "first", "average", "max"):
            pipe = pipeline("token-classification", model=d, aggregation_strategy=agg, device="cpu")
            cases.append({"task": "ner", "model": f"{arch}-ner", "params": {"aggregation": agg},
                          "inputs": NER_TEXTS, "outputs": [pipe(t) for t in NER_TEXTS]})
        pipe = pipeline("token-classification", model=d, aggregation_strategy="simple", device="cpu")
        cases.append({"task": "ner", "model": f"{arch}-ner", "params": {"aggregation": "simple", "ignore_labels": []},
                      "inputs": NER_TEXTS[:2], "outputs": [pipe(t, ignore_labels=[]) for t in NER_TEXTS[:2]]})
        # Long text in windows of 24 tokens sharing 6.
        short_tok = AutoTokenizer.from_pretrained(d, model_max_length=24)
        for agg in ("simple", "first", "max"):
            pipe = pipeline("token-classification", model=d, tokenizer=short_tok, aggregation_strategy=agg,
                            stride=6, device="cpu")
            cases.append({"task": "ner", "model": f"{arch}-ner",
                          "params": {"aggregation": agg, "stride": 6, "max_length": 24},
                          "inputs": [LONG], "outputs": [pipe(LONG)]})


def qa(cases):
    for arch, cls in (("bert", "BertForQuestionAnswering"), ("roberta", "RobertaForQuestionAnswering")):
        model, tok = make_model(cls, arch, ["LABEL_0", "LABEL_1"], 6.0, seed=5)
        d = save(model, tok, f"{arch}-qa")
        pipe = pipeline("question-answering", model=d, device="cpu")
        settings = [
            {},
            {"top_k": 3},
            {"top_k": 3, "max_answer_len": 4},
            {"handle_impossible_answer": True, "top_k": 2},
            {"max_seq_len": 32, "doc_stride": 8, "top_k": 3},
            {"max_seq_len": 32, "doc_stride": 8, "handle_impossible_answer": True, "top_k": 3},
            {"top_k": 2, "align_to_words": False},
        ]
        for params in settings:
            outs = []
            for ex in QA:
                o = pipe(question=ex["question"], context=ex["context"], **params)
                outs.append(o if isinstance(o, list) else [o])
            cases.append({"task": "qa", "model": f"{arch}-qa", "params": params, "inputs": QA, "outputs": outs})


MINILM_LONG = " ".join([
    "Sentence embeddings map text to dense vectors for search, clustering and similarity.",
    "The committee reviewed 17 proposals, approved 9, and deferred the remaining 8 to March.",
    "Café au lait, crème brûlée et naïveté — très français. 东京是日本的首都。 🚀🔥",
] * 12)
SIM_TEXTS = ["A man is playing guitar.", "Someone plays an instrument.", "The stock market fell sharply.",
             "Café au lait, crème brûlée — très français."]


def minilm(model_dir: Path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    st = SentenceTransformer(str(model_dir), device="cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(MINILM_LONG, truncation=True, max_length=128, stride=32, return_overflowing_tokens=True)
    with torch.no_grad():
        vecs = torch.stack([model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]))
                            .last_hidden_state[0].mean(0) for ids, tt in zip(enc["input_ids"], enc["token_type_ids"])])
    long = {}
    for pool in ("mean", "max", "first"):
        v = {"mean": vecs.mean(0), "max": vecs.max(0).values, "first": vecs[0]}[pool]
        long[pool] = torch.nn.functional.normalize(v, dim=0).tolist()
    emb = st.encode(SIM_TEXTS, convert_to_tensor=True)
    sim = st.similarity(emb, emb)
    out = {"long_text": MINILM_LONG, "max_length": 128, "stride": 32, "windows": len(enc["input_ids"]),
           "long_embeddings": long, "similarity_texts": SIM_TEXTS, "similarity": sim.tolist()}
    (OUT / "minilm.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--minilm-dir", default=os.path.expanduser("~/.cache/berth/models/all-MiniLM-L6-v2"))
    args = ap.parse_args()
    print("torch", torch.__version__, "transformers", transformers.__version__)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    classification(cases)
    rerank(cases)
    ner(cases)
    qa(cases)
    (OUT / "pipelines.json").write_text(json.dumps(to_py(cases), indent=1, ensure_ascii=False))
    print(len(cases), "cases")
    if args.minilm:
        minilm(Path(args.minilm_dir))
