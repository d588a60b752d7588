#!/usr/bin/env python3
"""Embed a Parquet file with plain multiprocessing (no Ray): one berth encoder per process.

    python examples/mp_embed.py INPUT.parquet OUTPUT.parquet [--column text] [--processes 2]
        [--threads-per-process 1] [--model DIR] [--chunk 4096]

The file is read in chunks; each worker process embeds whole chunks with its own
berth.SentenceEncoder (loaded once, in the pool's initializer) and the chunks are written back
in input order with a float32 fixed-size-list `embedding` column.
"""
import argparse
import multiprocessing as mp

import pyarrow as pa
import pyarrow.parquet as pq

_encoder = None


def _init(model, threads):
    global _encoder
    import berth

    _encoder = berth.SentenceEncoder(model, threads=threads)


def _embed(texts):
    return _encoder.encode(texts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--column", default="text")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads-per-process", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--chunk", type=int, default=4096)
    a = ap.parse_args()
    table = pq.read_table(a.input)
    chunks = [table.slice(i, a.chunk) for i in range(0, table.num_rows, a.chunk)]
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked thread pools
    with ctx.Pool(a.processes, initializer=_init, initargs=(a.model, a.threads_per_process)) as pool:
        vectors = pool.map(_embed, [c[a.column].to_pylist() for c in chunks])
    parts = [
        c.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]))
        for c, v in zip(chunks, vectors)
    ]
    pq.write_table(pa.concat_tables(parts), a.output)
    print(f"{table.num_rows} rows -> {a.output}")


if __name__ == "__main__":
    main()
