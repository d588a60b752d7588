"""berth's Python API against sentence-transformers and transformers' pipelines on the same
models (skipped where they are not installed: `pip install torch transformers
sentence-transformers`). Same labels, entities and answers; scores within 1e-4."""
import numpy as np
import pytest

import berth
from conftest import minilm, task_model, tiny
from test_berth import TEXTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)


def same(got, want, what=""):
    """Equal structure and strings; numbers within 1e-4."""
    if isinstance(want, (float, np.floating)):
        assert abs(float(got) - float(want)) <= 1e-4, f"{what}: {got} vs {want}"
    elif isinstance(want, (int, np.integer)) and not isinstance(want, bool):
        assert int(got) == int(want), f"{what}: {got} vs {want}"
    elif isinstance(want, list):
        assert len(got) == len(want), f"{what}: {got} vs {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{what}[{i}]")
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{what}: {sorted(got)} vs {sorted(want)}"
        for k in want:
            same(got[k], want[k], f"{what}.{k}")
    else:
        assert got == want, f"{what}: {got!r} vs {want!r}"


def test_sentence_transformers_encode_and_cross_encoder():
    st = pytest.importorskip("sentence_transformers")
    want = st.SentenceTransformer(minilm(), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(berth.SentenceEncoder(minilm()).encode(TEXTS), want, atol=1e-4)
    ce = st.CrossEncoder(task_model("bert-rerank"), device="cpu")
    query = "what is a fox"
    pairs = [(query, t) for t in TEXTS]
    np.testing.assert_allclose(berth.CrossEncoder(task_model("bert-rerank")).predict(pairs), ce.predict(pairs), atol=1e-4)
    ranked = berth.CrossEncoder(task_model("bert-rerank")).rank(query, TEXTS)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in ce.rank(query, TEXTS)]


@pytest.mark.parametrize(
    "task, model, call",
    [
        ("text-classification", task_model("bert-classify"), {"top_k": None}),
        ("text-classification", task_model("bert-classify"), {}),
        ("ner", task_model("bert-ner"), {}),
        ("ner", task_model("bert-ner"), {"aggregation_strategy": "simple"}),
        ("ner", task_model("roberta-ner"), {"aggregation_strategy": "first"}),
        ("fill-mask", tiny("bert-mlm"), {"top_k": 3}),
    ],
)
def test_pipelines_match_transformers(task, model, call):
    peer = transformers.pipeline(task, model=model, device="cpu")
    mine = berth.pipeline(task, model=model)
    inputs = ["paris is the [MASK] of france.", "the [MASK] sat on the mat."] if task == "fill-mask" else TEXTS
    same(mine(inputs, **call), peer(inputs, **call), task)
    same(mine(inputs[0], **call), peer(inputs[0], **call), task)


def test_question_answering_matches_transformers():
    model = task_model("bert-qa")
    peer = transformers.pipeline("question-answering", model=model, device="cpu")
    mine = berth.pipeline("question-answering", model=model)
    for q, c in [("Who jumps?", TEXTS[0]), ("What does berth embed?", TEXTS[1])]:
        same(mine(question=q, context=c), peer(question=q, context=c), "qa")
        same(mine(question=q, context=c, top_k=3), peer(question=q, context=c, top_k=3), "qa top 3")


def test_feature_extraction_matches_transformers():
    model = tiny("bert-base")
    peer = transformers.pipeline("feature-extraction", model=model, device="cpu")
    same(berth.pipeline("feature-extraction", model=model)(TEXTS), peer(TEXTS), "features")
