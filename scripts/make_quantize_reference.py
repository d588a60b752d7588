#!/usr/bin/env python3
"""Reference for berth's output quantization (`berth embed --output-dtype`):
sentence-transformers' `quantize_embeddings` (int8, uint8, binary, ubinary; ranges = each
dimension's min / max over the embeddings) applied to fixed-seed float32 vectors, plus numpy's
float16 rounding. Writes fixtures/quantize/reference.json.

    pip install sentence-transformers numpy
    python3 scripts/make_quantize_reference.py
"""
import json
import os

import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

rng = np.random.default_rng(7)
# 40 vectors of 37 dimensions (not a multiple of 8: packbits pads the last byte), some
# exact zeros (binary: not > 0), one constant dimension (step 0).
e = rng.normal(size=(40, 37)).astype(np.float32)
e[3, :5] = 0.0
e[:, 10] = 0.25
out = {"embeddings": e.tolist(), "float16": e.astype(np.float16).astype(np.float32).tolist()}
for p in ["int8", "uint8", "binary", "ubinary"]:
    out[p] = quantize_embeddings(e, precision=p).astype(np.int64).tolist()
out["ranges"] = np.vstack((e.min(axis=0), e.max(axis=0))).tolist()
path = os.path.join(ROOT, "fixtures/quantize/reference.json")
with open(path, "w") as f:
    json.dump(out, f)
print(path)
