#!/usr/bin/env python3
"""Embed a Parquet dataset with Ray Data, berth inside each worker.

    pip install "ray[data]" pyarrow && pip install .     # berth from this repository
    python examples/ray_embed.py INPUT.parquet OUTPUT_DIR [--column text] [--workers 2]
        [--threads-per-worker 1] [--model DIR] [--batch-size 1024] [--check]

Each Ray actor loads one berth.SentenceEncoder (once) and embeds Arrow batches with
`map_batches`; the vectors are appended as a fixed-size-list float32 column and written as
Parquet. Every other column (an id, say) is kept. With `--check`, the script also embeds the
file in this one process and compares: every row's vector must equal the single-process
one, and it prints rows/s of both. `--make-input N` writes an N-row input from the shared
datasets first (SST-2 sentences and SQuAD paragraphs, with an `id` column).
"""
import argparse
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class Embedder:
    """One encoder per actor: loading happens once, not per batch."""

    def __init__(self, model, threads, column):
        import berth

        self.encoder = berth.SentenceEncoder(model, threads=threads)
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encoder.encode(batch[self.column], output="arrow")
        return batch.append_column("embedding", vectors)


def make_input(path, n, data):
    import json

    sst = [l.split("\t")[0] for l in open(os.path.join(data, "sst2/train.tsv")).read().splitlines()[1:]]
    paragraphs = [json.loads(l)["text"] for l in open(os.path.join(data, "squad-dev-retrieval/corpus.jsonl"))]
    texts = [paragraphs[i // 8 % len(paragraphs)] if i % 8 == 7 else sst[i % len(sst)] for i in range(n)]
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": texts}), path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--column", default="text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--make-input", type=int, metavar="N")
    ap.add_argument("--data", default=os.environ.get("BERTH_DATASETS", "../shared/datasets"))
    a = ap.parse_args()
    if a.make_input:
        make_input(a.input, a.make_input, a.data)

    import ray

    # One CPU slot beyond the encoders' for Ray Data's own read / write tasks: with every
    # slot held by an actor the reads would wait forever.
    ray.init(num_cpus=a.workers * a.threads_per_worker + 1, include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    ds = ray.data.read_parquet(a.input).map_batches(
        Embedder,
        fn_constructor_args=(a.model, a.threads_per_worker, a.column),
        batch_format="pyarrow",
        batch_size=a.batch_size,
        concurrency=a.workers,
        num_cpus=a.threads_per_worker,
    )
    ds.write_parquet(a.output)
    ray_secs = time.perf_counter() - start
    rows = pq.read_table(a.output).num_rows
    print(f"ray: {rows} rows in {ray_secs:.1f} s = {rows / ray_secs:.1f} rows/s "
          f"({a.workers} workers x {a.threads_per_worker} threads, start-up and writing included)")
    if a.check:
        import berth

        table = pq.read_table(a.input)
        start = time.perf_counter()
        single = berth.SentenceEncoder(a.model, threads=a.workers * a.threads_per_worker).encode(table[a.column])
        one_secs = time.perf_counter() - start
        out = pq.read_table(a.output)
        key = "id" if "id" in table.column_names else None
        if key:
            order = np.argsort(out[key].to_numpy())
            got = np.stack(out["embedding"].to_numpy(zero_copy_only=False))[order]
            assert np.array_equal(np.sort(out[key].to_numpy()), table[key].to_numpy()), "rows lost or duplicated"
        else:
            got = np.stack(out["embedding"].to_numpy(zero_copy_only=False))
        diff = float(np.abs(got - single).max())
        print(f"one process: {table.num_rows} rows in {one_secs:.1f} s = {table.num_rows / one_secs:.1f} rows/s "
              f"({a.workers * a.threads_per_worker} threads)")
        print(f"max |ray - one process| over {got.size} values: {diff:.2e}")
        assert diff <= 1e-5, "the Ray vectors differ from the single-process ones"


if __name__ == "__main__":
    main()
