#!/usr/bin/env python3
"""Peer baselines for `berth bench`: PyTorch eager (f32 and bf16 autocast), ONNX Runtime
fp32, and ONNX Runtime dynamic int8 with per-channel weights (onnxruntime.quantization's
quantize_dynamic, per_channel=True, QInt8 weights) on the workloads berth writes to --spec (JSON: "a", "b", "d" = lists of equal-length id
lists, "c" = texts in file order, "c_sorted" = the same texts longest first, as
sentence-transformers' encode orders them, so each batch of 32 pads little, "d_model" = the
bert-base-shaped checkpoint for "d", "max_length", "seconds", "threads"). Prints one JSON
line: {"torch": {...}, "torch_bf16": {...}, "ort": {...}, "ort_int8": {...},
"ort_int8_cosine": {"mean", "min"}} with sequences/s per workload ("c" and "c_sorted" are
timed over one pass after a warm-up on their first 256 texts) and the cosine of ORT int8's
(c) embeddings to ORT fp32's; a peer that is not installed is left out.

    pip install torch transformers onnxruntime onnx
"""
import argparse, json, os, sys, tempfile, time


def rate(seconds, fn):
    """Runs/s of the best window (>= 0.25 s and 3 runs) within `seconds`, after a warm-up:
    the same rule as berth's side of the benchmark."""
    fn()
    start, best = time.perf_counter(), 0.0
    while best == 0.0 or time.perf_counter() - start < seconds:
        w, runs = time.perf_counter(), 0
        while runs < 3 or time.perf_counter() - w < 0.25:
            fn()
            runs += 1
        best = max(best, runs / (time.perf_counter() - w))
    return best


def once(warm, fn):
    warm()
    start = time.perf_counter()
    fn()
    return 1 / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    threads, seconds, max_len = spec["threads"], spec["seconds"], spec["max_length"]
    out = {}
    try:
        import numpy as np
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        print(f"peers: PyTorch not available ({e})", file=sys.stderr)
        print(json.dumps(out))
        return
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}

    def pooled(hidden, mask):
        m = mask[..., None].astype(np.float32)
        v = (hidden * m).sum(1) / m.sum(1)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    base = AutoModel.from_pretrained(spec["d_model"]).eval()

    def autocast(bf16):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def torch_ids(m, batch, bf16=False):
        ids = torch.tensor(batch)
        with torch.inference_mode(), autocast(bf16):
            m(input_ids=ids, attention_mask=torch.ones_like(ids))

    def torch_texts(bf16=False, texts=spec["c"]):
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            with torch.inference_mode(), autocast(bf16):
                h = model(**enc).last_hidden_state.float().numpy()
            pooled(h, enc["attention_mask"].numpy())

    n_c = len(spec["c"])
    # bf16 autocast only when berth runs bf16 (a CPU without a bf16 product emulates it).
    for name, bf16 in [("torch", False), ("torch_bf16", True)][:2 if spec.get("bf16", True) else 1]:
        out[name] = {"a": 32 * rate(seconds, lambda: torch_ids(model, spec["a"], bf16)),
                     "b": rate(seconds, lambda: torch_ids(model, spec["b"], bf16)),
                     "c": n_c * once(lambda: torch_texts(bf16, spec["c"][:256]), lambda: torch_texts(bf16)),
                     "c_sorted": n_c * once(lambda: torch_texts(bf16, spec["c_sorted"][:256]),
                                            lambda: torch_texts(bf16, spec["c_sorted"])),
                     "d": 8 * rate(seconds, lambda: torch_ids(base, spec["d"], bf16))}
        print(f"peers: PyTorch {'bf16 autocast' if bf16 else 'f32'} {out[name]}", file=sys.stderr)
    try:
        import onnxruntime as ort
    except ImportError as e:
        print(f"peers: ONNX Runtime not available ({e})", file=sys.stderr)
        print(json.dumps(out))
        return
    out["versions"]["onnxruntime"] = ort.__version__
    if int(transformers.__version__.split(".")[0]) >= 5:
        # Seen with 5.25: the traced graph is wrong at sequence lengths other than the
        # export's (max difference 1.4); 4.57 exports correctly.
        print(f"peers: ONNX Runtime skipped: transformers {transformers.__version__} exports "
              "BertModel wrongly for other lengths (pip install 'transformers<5')", file=sys.stderr)
        print(json.dumps(out))
        return

    def session(m, int8=False):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            ids = torch.tensor(spec["a"][:2])
            class Named(torch.nn.Module):
                """The encoder called by keyword (transformers 5 changed its positional
                parameters), returning the last hidden state."""

                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state

            torch.onnx.export(Named(m), (ids, torch.ones_like(ids), torch.zeros_like(ids)), path,
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["last_hidden_state"],
                              dynamic_axes={k: {0: "batch", 1: "seq"} for k in
                                            ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
                              opset_version=17, dynamo=False)
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic
                qpath = os.path.join(tmp, "model-int8.onnx")
                quantize_dynamic(path, qpath, per_channel=True, weight_type=QuantType.QInt8)
                path = qpath
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def ort_ids(s, batch):
        a = np.array(batch, dtype=np.int64)
        s.run(None, {"input_ids": a, "attention_mask": np.ones_like(a), "token_type_ids": np.zeros_like(a)})

    def ort_texts(s, texts, keep=None):
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=max_len, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]}
            v = pooled(s.run(None, feed)[0], enc["attention_mask"])
            if keep is not None:
                keep.append(v)

    embeddings = {}
    for name, int8 in [("ort", False), ("ort_int8", True)]:
        sess, base_sess = session(model, int8), session(base, int8)
        keep = embeddings.setdefault(name, [])
        out[name] = {"a": 32 * rate(seconds, lambda: ort_ids(sess, spec["a"])),
                     "b": rate(seconds, lambda: ort_ids(sess, spec["b"])),
                     "c": n_c * once(lambda: ort_texts(sess, spec["c"][:256]), lambda: ort_texts(sess, spec["c"], keep)),
                     "c_sorted": n_c * once(lambda: ort_texts(sess, spec["c_sorted"][:256]),
                                            lambda: ort_texts(sess, spec["c_sorted"])),
                     "d": 8 * rate(seconds, lambda: ort_ids(base_sess, spec["d"]))}
        print(f"peers: ONNX Runtime {'int8 per-channel' if int8 else 'fp32'} {out[name]}", file=sys.stderr)
    cos = (np.concatenate(embeddings["ort"]) * np.concatenate(embeddings["ort_int8"])).sum(1)
    out["ort_int8_cosine"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
