"""The berth package against the berth CLI on the committed fixtures (same engine: equal to
1e-6), Arrow in and out, thread safety, and the exception types of bad inputs."""
import json
import threading

import numpy as np
import pytest

import berth
from conftest import cli, minilm, task_model, tiny, ROOT

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "berth embeds text from Python",
    "A longer sentence, with commas, numbers like 12345 and accents: café naïve.",
]


def close(got, want, tol=1e-6, what=""):
    """Nested numbers equal within `tol`, everything else equal."""
    if isinstance(want, float) or isinstance(got, float):
        assert abs(got - want) <= tol, f"{what}: {got} vs {want}"
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{what}: {got} vs {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, tol, f"{what}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{what}: {got} vs {want}"
        for k in want:
            close(got[k], want[k], tol, f"{what}.{k}")
    else:
        assert got == want, f"{what}: {got!r} vs {want!r}"


# ---- SentenceEncoder ----------------------------------------------------------------------


def test_encode_matches_the_cli():
    enc = berth.SentenceEncoder(minilm())
    got = enc.encode(TEXTS)
    assert got.shape == (3, enc.dimension) == (3, 384) and got.dtype == np.float32
    want = np.array([line["embedding"] for line in cli("embed", "--model", minilm(), *TEXTS)], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # one string gives one vector; any iterable works
    np.testing.assert_allclose(enc.encode(TEXTS[1]), want[1], atol=1e-6)
    np.testing.assert_allclose(enc.encode(t for t in TEXTS), want, atol=1e-6)
    # the model normalises; normalize_embeddings=False gives the raw mean-pooled vectors
    raw = enc.encode(TEXTS, normalize_embeddings=False)
    want_raw = [line["embedding"] for line in cli("embed", "--model", minilm(), "--pooling", "mean", *TEXTS)]
    np.testing.assert_allclose(raw, want_raw, atol=1e-6)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    # a small token budget (many batches) and the progress bar give the same vectors
    np.testing.assert_allclose(enc.encode(TEXTS, batch_tokens=16, show_progress_bar=True), want, atol=1e-6)
    assert enc.encode([]).shape == (0, 384)
    assert enc.max_length == 256 and enc.get_sentence_embedding_dimension() == 384


def test_cls_pooling_and_max_length_of_a_plain_model():
    enc = berth.SentenceEncoder(tiny("bert-base"), max_length=8)
    want = [line["embedding"] for line in cli("embed", "--model", tiny("bert-base"), "--max-length", "8", *TEXTS)]
    np.testing.assert_allclose(enc.encode(TEXTS), want, atol=1e-6)
    assert all(t["truncated"] for t in enc.tokenize(TEXTS[:1]))


def test_tokenize_matches_transformers():
    refs = json.loads((ROOT / "fixtures/tiny/tokenization.json").read_text())["bert"]
    enc = berth.SentenceEncoder(tiny("bert-base"))
    got = enc.tokenize(refs["texts"])
    cu = refs["cu_seqlens"]
    for i, t in enumerate(got):
        assert t["input_ids"] == refs["input_ids"][cu[i] : cu[i + 1]], f"text {i}"
        assert len(t["tokens"]) == len(t["offsets"]) == len(t["input_ids"])


def test_arrow_in_and_out():
    pa = pytest.importorskip("pyarrow")
    enc = berth.SentenceEncoder(minilm())
    want = enc.encode(TEXTS)
    np.testing.assert_allclose(enc.encode(pa.array(TEXTS)), want, atol=0)
    np.testing.assert_allclose(enc.encode(pa.chunked_array([TEXTS[:1], TEXTS[1:]])), want, atol=0)
    np.testing.assert_allclose(enc.encode(pa.array(TEXTS, type=pa.large_string())), want, atol=0)
    out = enc.encode(TEXTS, output="arrow")
    assert isinstance(out, pa.FixedSizeListArray) and out.type.list_size == 384
    assert out.type.value_type == pa.float32() and len(out) == 3
    np.testing.assert_array_equal(out.flatten().to_numpy().reshape(3, 384), want)
    with pytest.raises(ValueError, match="null"):
        enc.encode(pa.array(["a", None]))


def test_threads_share_an_encoder():
    enc = berth.SentenceEncoder(minilm())
    batches = [[f"{t} (thread {k})" for t in TEXTS * 8] for k in range(4)]
    sequential = [enc.encode(b) for b in batches]
    results = [None] * 4

    def work(k):
        for _ in range(3):
            results[k] = enc.encode(batches[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, s in zip(results, sequential):
        np.testing.assert_array_equal(r, s)


def test_own_thread_count_gives_the_same_vectors():
    one = berth.SentenceEncoder(minilm(), threads=1)
    np.testing.assert_allclose(one.encode(TEXTS), berth.SentenceEncoder(minilm()).encode(TEXTS), atol=1e-6)


# ---- CrossEncoder ----------------------------------------------------------------------------


def test_cross_encoder_matches_berth_rerank():
    model = task_model("bert-rerank")
    ce = berth.CrossEncoder(model)
    query = "what is a fox"
    want = cli("rerank", "--model", model, "--query", query, *TEXTS)
    ranked = ce.rank(query, TEXTS, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == [w["index"] for w in want]
    for r, w in zip(ranked, want):
        assert abs(r["score"] - w["score"]) <= 1e-6 and r["text"] == w["text"]
    assert len(ce.rank(query, TEXTS, top_k=2)) == 2 and "text" not in ce.rank(query, TEXTS)[0]
    scores = ce.predict([(query, t) for t in TEXTS])
    assert scores.shape == (3,)
    for w in want:
        assert abs(scores[w["index"]] - w["score"]) <= 1e-6
    one = ce.predict((query, TEXTS[0]))
    assert isinstance(one, float) and abs(one - scores[0]) <= 1e-6
    assert ce.predict([query, TEXTS[0]]) == one  # two strings are one pair, as sentence-transformers
    with pytest.raises(TypeError, match="pair 1"):
        ce.predict([(query, TEXTS[0]), "xy"])  # a string is not a pair, even of length 2
    raw = ce.predict([(query, TEXTS[0])], raw_scores=True)
    assert abs(1 / (1 + np.exp(-raw[0])) - scores[0]) <= 1e-6


# ---- pipelines -------------------------------------------------------------------------------


def test_text_classification_pipeline():
    model = task_model("bert-classify")
    clf = berth.pipeline("text-classification", model=model)
    every = [line["labels"] for line in cli("classify", "--model", model, "--top-k", "0", *TEXTS)]
    close(clf(TEXTS), [labels[0] for labels in every])  # top_k=1: one dict per input
    close(clf(TEXTS[0]), [every[0][0]])  # one string: a list of one dict, as transformers
    close(clf(TEXTS, top_k=None), every)
    close(clf(TEXTS[0], top_k=2), every[0][:2])
    pair = [line["labels"] for line in cli("classify", "--model", model, "--top-k", "0", "--pair", TEXTS[0], TEXTS[1])]
    close(clf(TEXTS[0], text_pair=TEXTS[1], top_k=None), pair[0])
    raw = [line["labels"] for line in cli("classify", "--model", model, "--top-k", "0", "--function", "none", TEXTS[0])]
    close(clf(TEXTS[0], top_k=None, function_to_apply="none"), raw[0])


def test_ner_pipeline():
    model = task_model("bert-ner")
    ner = berth.pipeline("ner", model=model)  # transformers' default: no aggregation
    want = [line["entities"] for line in cli("ner", "--model", model, "--aggregation", "none", *TEXTS)]
    close(ner(TEXTS), want)
    close(ner(TEXTS[1]), want[1])
    grouped = berth.pipeline("token-classification", model=model, aggregation_strategy="simple")
    close(grouped(TEXTS), [line["entities"] for line in cli("ner", "--model", model, *TEXTS)])


def test_question_answering_pipeline():
    model = task_model("bert-qa")
    qa = berth.pipeline("question-answering", model=model)
    q, c = "Who jumps?", TEXTS[0]
    want = cli("qa", "--model", model, "--question", q, "--context", c, "--top-k", "2")[0]["answers"]
    close(qa(question=q, context=c), want[0])
    close(qa({"question": q, "context": c}), want[0])
    close(qa(q, c, top_k=2), want)
    close(qa([{"question": q, "context": c}] * 2), [want[0], want[0]])


def test_fill_mask_pipeline():
    model = tiny("bert-mlm")
    fm = berth.pipeline("fill-mask", model=model, top_k=3)
    masked = ["paris is the [MASK] of france.", "the [MASK] sat on the [MASK]."]
    lines = cli("fill-mask", "--model", model, "--top-k", "3", *masked)
    # the CLI's token / token_id are transformers' token_str / token
    rename = lambda p: {"score": p["score"], "token": p["token_id"], "token_str": p["token"], "sequence": p["sequence"]}
    want = [[rename(p) for p in l["predictions"]] if isinstance(l["predictions"][0], dict)
            else [[rename(p) for p in m] for m in l["predictions"]] for l in lines]
    close(fm(masked), want)  # one mask: its list; two masks: a list per mask
    close(fm(masked[0]), want[0])


def test_feature_extraction_pipeline():
    model = tiny("bert-base")
    fe = berth.pipeline("feature-extraction", model=model)
    want = [line["hidden"] for line in cli("embed", "--model", model, "--pooling", "none", *TEXTS)]
    close(fe(TEXTS), [[w] for w in want], tol=1e-5)  # transformers nests each input once more
    close(fe(TEXTS[0]), [want[0]], tol=1e-5)


def test_modernbert_models():
    """ModernBERT checkpoints (fixtures/modernbert) through the same entry points: fill-mask as
    transformers' pipeline gave it, mean pooling and a mean-pooled classifier as the CLI."""
    mlm = str(ROOT / "fixtures/modernbert/mlm")
    ref = json.loads((ROOT / "fixtures/modernbert/mlm/fill_mask.json").read_text())
    got = berth.pipeline("fill-mask", model=mlm, top_k=5)(ref["text"])
    assert [p["token"] for p in got] == [p["token"] for p in ref["predictions"]]
    close([p["score"] for p in got], [p["score"] for p in ref["predictions"]])
    long = " ".join(["the quick brown fox jumps over the lazy dog."] * 100)
    enc = berth.SentenceEncoder(mlm, max_length=2048)
    want = [line["embedding"] for line in cli("embed", "--model", mlm, "--max-length", "2048", TEXTS[0], long)]
    np.testing.assert_allclose(enc.encode([TEXTS[0], long]), want, atol=1e-6)
    cls = str(ROOT / "fixtures/modernbert/seqcls-mean")
    every = [line["labels"] for line in cli("classify", "--model", cls, "--top-k", "0", *TEXTS)]
    close(berth.pipeline("text-classification", model=cls)(TEXTS, top_k=None), every)


# ---- errors ----------------------------------------------------------------------------------


def test_bad_inputs_raise_the_right_exceptions(tmp_path):
    enc = berth.SentenceEncoder(tiny("bert-base"))
    with pytest.raises(TypeError, match="input 1"):
        enc.encode(["ok", None])
    with pytest.raises(TypeError, match="bytes"):
        enc.encode(b"bytes")
    with pytest.raises(ValueError, match="input 1: empty text"):
        enc.encode(["ok", "   "])
    with pytest.raises(ValueError, match="output"):
        enc.encode(["ok"], output="torch")
    with pytest.raises(ValueError, match="batch_tokens"):
        enc.encode(["ok"], batch_tokens=0)
    with pytest.raises(FileNotFoundError, match="not a model directory|no-such-model"):
        berth.SentenceEncoder(str(tmp_path / "no-such-model"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        berth.SentenceEncoder(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        berth.SentenceEncoder(tiny("bert-base"), dtype="fp64")
    with pytest.raises(ValueError, match="threads"):
        berth.SentenceEncoder(tiny("bert-base"), threads=0)
    with pytest.raises(ValueError, match="sequence-classification|sequence classification"):
        berth.CrossEncoder(task_model("bert-ner"))
    with pytest.raises(ValueError, match="unknown task"):
        berth.pipeline("translation", model=tiny("bert-base"))
    with pytest.raises(TypeError, match="unknown option"):
        berth.pipeline("ner", model=task_model("bert-ner"), colour="red")("x")
    with pytest.raises(ValueError, match="aggregation_strategy"):
        berth.pipeline("ner", model=task_model("bert-ner"), aggregation_strategy="mean")("x")
    with pytest.raises(ValueError, match="no \\[MASK\\] token"):
        berth.pipeline("fill-mask", model=tiny("bert-mlm"))("no mask here")
    with pytest.raises(ValueError, match="token-classification|token classification"):
        berth.pipeline("ner", model=task_model("bert-classify"))("x")


# ---- The CLI's Parquet files, read and written by pyarrow ---------------------------------


def test_cli_parquet_files_round_trip_through_pyarrow(tmp_path):
    """`berth embed --output X.parquet` as pyarrow reads it (the JSON Lines output's ids and
    vectors, float32 bit for bit), and a pyarrow-written Parquet `--input` (pandas-style
    dictionary strings, zstd) read as the same rows."""
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import berth_bin

    table = pa.table({
        "doc": pa.array(["d1", "d2", "d3"]).dictionary_encode(),
        "body": TEXTS,
        "year": [2001, 2002, None],
    })
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, compression="zstd")
    args = ["embed", "--model", minilm(), "--input", str(src), "--text-column", "body",
            "--id-column", "doc", "--keep-columns", "year"]
    lines = cli(*args)
    assert [l["id"] for l in lines] == ["d1", "d2", "d3"]
    assert [l["year"] for l in lines] == [2001, 2002, None]
    out = tmp_path / "out.parquet"
    run = subprocess.run([berth_bin(), *args, "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = pq.read_table(out)
    assert got.column_names == ["index", "id", "year", "embedding"]
    assert pa.types.is_fixed_size_list(got.schema.field("embedding").type)
    assert got.column("index").to_pylist() == [0, 1, 2]
    assert got.column("id").to_pylist() == ["d1", "d2", "d3"]
    assert got.column("year").to_pylist() == [2001, 2002, None]
    vectors = np.array(got.column("embedding").to_pylist(), dtype=np.float32)
    want = np.array([l["embedding"] for l in lines], dtype=np.float32)
    assert vectors.shape == (3, 384) and np.array_equal(vectors, want)
