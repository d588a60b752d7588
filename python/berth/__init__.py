"""berth: BERT-family encoders on berth's packed CPU engine, from Python.

Three entry points, shaped as the libraries people already use:

* :class:`SentenceEncoder` — sentence-transformers' ``SentenceTransformer.encode``.
* :class:`CrossEncoder` — sentence-transformers' ``CrossEncoder.predict`` / ``.rank``.
* :func:`pipeline` — transformers' ``pipeline(task)`` for text classification, token
  classification (NER), question answering, fill-mask and feature extraction.

Models are directories in the Hugging Face layout, names in berth's cache
(``~/.cache/berth/models``; ``scripts/fetch-assets`` installs all-MiniLM-L6-v2 there) or hub
ids already downloaded by transformers. The work runs in Rust with the GIL released, so
several Python threads can call one object at once.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _berth

__version__: str = _berth.__version__

__all__ = ["SentenceEncoder", "CrossEncoder", "Pipeline", "pipeline", "__version__"]

Texts = Union[str, Iterable[str], Any]  # Any: a pyarrow Array / ChunkedArray of strings


def _texts(texts: Texts) -> Tuple[List[str], bool]:
    """A list of strings from a string, an iterable or a pyarrow (chunked) array, and whether
    the input was one string."""
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, bytes):
        raise TypeError("texts must be str, not bytes: decode them first")
    if type(texts).__module__.startswith("pyarrow"):
        if texts.null_count:
            raise ValueError(f"{texts.null_count} of the {len(texts)} texts are null")
        texts = texts.to_pylist()
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"input {i}: expected str, got {type(t).__name__}")
    return out, False


def _progress(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore

        return tqdm(total=total, unit="texts")
    except ImportError:
        return _StderrBar(total)


class _StderrBar:
    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self, k: int) -> None:
        self.n += k
        print(f"\r{self.n}/{self.total} texts", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


class SentenceEncoder:
    """Sentence embeddings as sentence-transformers computes them (the model's pooling and
    normalisation from its ``modules.json``; CLS pooling for a plain transformers model).

    >>> enc = SentenceEncoder()  # all-MiniLM-L6-v2 from berth's cache
    >>> enc.encode(["A cat sits.", "A man plays guitar."]).shape
    (2, 384)

    Args:
        model: model directory or name (default: all-MiniLM-L6-v2 in berth's cache).
        dtype: "f32", or "bf16" / "int8" for the encoder's matrix products (bf16 needs AMX or AVX-512 BF16).
        max_length: token limit per text (default: the model's ``max_seq_length``); longer
            texts are truncated.
        threads: threads for this encoder's work (default: all cores).
    """

    def __init__(
        self,
        model: Optional[str] = None,
        dtype: str = "f32",
        max_length: Optional[int] = None,
        threads: Optional[int] = None,
    ) -> None:
        self._e = _berth.Encoder(model, dtype, max_length, threads)

    @property
    def dimension(self) -> int:
        """The vector size."""
        return self._e.dimension

    def get_sentence_embedding_dimension(self) -> int:
        """The vector size (sentence-transformers' name)."""
        return self._e.dimension

    @property
    def max_length(self) -> int:
        """The token limit per text."""
        return self._e.max_length

    @property
    def model_dir(self) -> str:
        """The model directory."""
        return self._e.model_dir

    def encode(
        self,
        texts: Texts,
        batch_tokens: int = 8192,
        normalize_embeddings: Optional[bool] = None,
        show_progress_bar: bool = False,
        output: str = "numpy",
    ) -> Any:
        """Embeds ``texts``.

        Args:
            texts: a string, a list or any iterable of strings, or a pyarrow Array /
                ChunkedArray of strings.
            batch_tokens: real tokens per packed batch (no padding).
            normalize_embeddings: ``None`` follows the model (all-MiniLM-L6-v2 normalises);
                ``True`` / ``False`` force unit vectors / the raw pooled vectors.
            show_progress_bar: a progress bar on stderr (tqdm when installed).
            output: ``"numpy"`` → float32 array ``(n, d)`` (``(d,)`` for one string);
                ``"arrow"`` → ``pyarrow.FixedSizeListArray`` of float32 (zero-copy from the
                array).
        """
        if output not in ("numpy", "arrow"):
            raise ValueError(f'output {output!r}: use "numpy" or "arrow"')
        items, single = _texts(texts)
        bar = _progress(len(items), show_progress_bar)
        if bar is None:
            parts = [self._encode(items, batch_tokens, normalize_embeddings)]
        else:
            parts = []
            for start in range(0, len(items), 4096):
                chunk = items[start : start + 4096]
                parts.append(self._encode(chunk, batch_tokens, normalize_embeddings))
                bar.update(len(chunk))
            bar.close()
        vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if output == "arrow":
            import pyarrow as pa

            return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dimension)
        return vectors[0] if single else vectors

    def _encode(self, items: List[str], batch_tokens: int, normalize: Optional[bool]) -> np.ndarray:
        buf, n, d = self._e.encode(items, batch_tokens, normalize)
        return np.frombuffer(buf, dtype="<f4").reshape(n, d)

    def tokenize(self, texts: Texts) -> List[Dict[str, Any]]:
        """Per text: ``input_ids``, ``token_type_ids``, ``tokens``, character ``offsets`` and
        whether it was ``truncated`` (special tokens included, cut to ``max_length``)."""
        import json

        items, _ = _texts(texts)
        return json.loads(self._e.tokenize(items))


class CrossEncoder:
    """A cross-encoder reranker, as sentence-transformers' ``CrossEncoder``.

    Args:
        model: directory or name of a sequence-classification model with one output.
        dtype, max_length, threads: as for :class:`SentenceEncoder`.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "f32",
        max_length: Optional[int] = None,
        threads: Optional[int] = None,
    ) -> None:
        self._e = _berth.CrossEncoder(model, dtype, max_length, threads)

    def predict(
        self,
        sentences: Union[Tuple[str, str], Sequence[Tuple[str, str]]],
        batch_tokens: int = 8192,
        raw_scores: bool = False,
    ) -> Any:
        """Scores of sentence pairs: the model's activation (sigmoid unless its config names
        another), or the logits with ``raw_scores``. One pair gives a float, a list an array."""
        # As sentence-transformers: two strings are one pair, else a list of pairs.
        single = isinstance(sentences, (tuple, list)) and len(sentences) == 2 and all(
            isinstance(s, str) for s in sentences
        )
        pairs = [sentences] if single else list(sentences)
        checked = []
        for i, p in enumerate(pairs):
            if isinstance(p, str) or len(p) != 2 or not all(isinstance(s, str) for s in p):
                raise TypeError(f"pair {i}: expected two strings")
            checked.append((p[0], p[1]))
        scores = np.asarray(self._e.predict(checked, raw_scores, batch_tokens), dtype=np.float32)
        return float(scores[0]) if single else scores

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: Optional[int] = None,
        return_documents: bool = False,
        batch_tokens: int = 8192,
    ) -> List[Dict[str, Any]]:
        """Documents sorted by score, best first: ``[{"corpus_id", "score", "text"?}]`` (ties
        in input order)."""
        docs, _ = _texts(documents)
        scores = self.predict([(query, d) for d in docs], batch_tokens=batch_tokens)
        order = sorted(range(len(docs)), key=lambda i: -float(scores[i]))
        out = []
        for i in order[: top_k if top_k is not None else len(order)]:
            r: Dict[str, Any] = {"corpus_id": i, "score": float(scores[i])}
            if return_documents:
                r["text"] = docs[i]
            out.append(r)
        return out


_TASKS = {
    "text-classification": "text-classification",
    "sentiment-analysis": "text-classification",
    "token-classification": "token-classification",
    "ner": "token-classification",
    "question-answering": "question-answering",
    "fill-mask": "fill-mask",
    "feature-extraction": "feature-extraction",
}


class Pipeline:
    """What :func:`pipeline` returns: call it on inputs as a transformers pipeline."""

    def __init__(self, task: str, model: Optional[str], dtype: str, max_length: Optional[int],
                 threads: Optional[int], options: Dict[str, Any]) -> None:
        if task not in _TASKS:
            raise ValueError(f"unknown task {task!r}; berth has {sorted(_TASKS)}")
        self.task = _TASKS[task]
        self._options = options
        self._p = _berth.TaskPipeline(model, dtype, max_length, threads, False)

    @property
    def model_dir(self) -> str:
        """The model directory."""
        return self._p.model_dir

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import json

        opts = {**self._options, **kwargs}
        if self.task == "question-answering":
            return self._qa(args, opts)
        if len(args) != 1:
            raise TypeError(f"{self.task} takes one input (a string or a list of strings)")
        items, single = _texts(args[0])
        if self.task == "text-classification":
            top_k = opts.pop("top_k", 1)
            pairs = opts.pop("text_pair", None)
            if pairs is not None:
                pairs, _ = _texts(pairs)
            fn = opts.pop("function_to_apply", None)
            _no_more(opts)
            res = json.loads(self._p.classify(items, pairs, top_k, fn))
            # transformers: top_k=1 gives one dict per input; otherwise a list per input
            res = [r[0] if top_k == 1 else r for r in res]
            return [res[0]] if (single and top_k == 1) else (res[0] if single else res)
        if self.task == "token-classification":
            agg = opts.pop("aggregation_strategy", "none")
            ignore = opts.pop("ignore_labels", None)
            stride = opts.pop("stride", None)
            _no_more(opts)
            res = json.loads(self._p.ner(items, agg, ignore, stride))
        elif self.task == "fill-mask":
            top_k = opts.pop("top_k", 5)
            _no_more(opts)
            # transformers' keys: "token" is the id, "token_str" the text
            res = [
                [[{"score": p["score"], "token": p["token_id"], "token_str": p["token"],
                   "sequence": p["sequence"]} for p in mask] for mask in masks]
                for masks in json.loads(self._p.fill_mask(items, top_k))
            ]
            res = [r[0] if len(r) == 1 else r for r in res]
        else:  # feature-extraction
            _no_more(opts)
            res = [[r] for r in json.loads(self._p.features(items))]
        return res[0] if single else res

    def _qa(self, args: Tuple[Any, ...], opts: Dict[str, Any]) -> Any:
        import json

        question = opts.pop("question", None)
        context = opts.pop("context", None)
        if args:
            if len(args) == 1 and isinstance(args[0], dict):
                question, context = args[0].get("question"), args[0].get("context")
            elif len(args) == 1 and isinstance(args[0], (list, tuple)):
                question = [a["question"] for a in args[0]]
                context = [a["context"] for a in args[0]]
            elif len(args) == 2:
                question, context = args
            else:
                raise TypeError("question-answering takes question=..., context=... (or a dict, or a list of dicts)")
        if question is None or context is None:
            raise TypeError("question-answering needs a question and a context")
        single = isinstance(question, str)
        qs = [question] if single else list(question)
        cs = [context] * len(qs) if isinstance(context, str) else list(context)
        top_k = opts.pop("top_k", 1)
        known = {k: opts.pop(k) for k in ["max_answer_len", "max_seq_len", "doc_stride", "max_question_len",
                                          "handle_impossible_answer", "align_to_words"] if k in opts}
        _no_more(opts)
        res = json.loads(self._p.qa(qs, cs, top_k, **known))
        res = [r[0] if (top_k == 1 and len(r) == 1) else r for r in res]
        return res[0] if single else res


def _no_more(opts: Dict[str, Any]) -> None:
    if opts:
        raise TypeError(f"unknown option(s) {sorted(opts)}")


def pipeline(
    task: str,
    model: Optional[str] = None,
    dtype: str = "f32",
    max_length: Optional[int] = None,
    threads: Optional[int] = None,
    **options: Any,
) -> Pipeline:
    """A transformers-style pipeline: ``"text-classification"`` (``"sentiment-analysis"``),
    ``"token-classification"`` (``"ner"``; ``aggregation_strategy``), ``"question-answering"``,
    ``"fill-mask"`` or ``"feature-extraction"``. ``options`` are the call options the
    pipeline takes (``top_k``, ``aggregation_strategy``, ``function_to_apply``, ...), used as
    defaults for every call. Results have transformers' shapes and keys.

    >>> ner = pipeline("ner", model="path/to/bert-ner", aggregation_strategy="simple")
    >>> ner("George Washington lived in Virginia")
    [{'entity_group': 'PER', 'score': ..., 'word': 'George Washington', 'start': 0, 'end': 17}, ...]
    """
    return Pipeline(task, model, dtype, max_length, threads, options)
