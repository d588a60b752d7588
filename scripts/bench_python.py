#!/usr/bin/env python3
"""The berth Python package against sentence-transformers (and fastembed when installed) on
the same real mixed-length texts, and against the `berth embed` CLI on the same texts:

    python scripts/bench_python.py [--data ../shared/datasets] [--sizes 2000,10000] [--threads 2]

Texts: berth bench's workload (c) — every 8th a SQuAD paragraph, else alternately a SQuAD
question and an SST-2 sentence. sentence-transformers runs as its users run it (encode,
batch_size 32, which sorts the texts by length before batching), torch with the same thread
count; berth's SentenceEncoder.encode with its defaults. Each number is the best of 2 timed
passes after a warm-up. Needs: pip install berth (this repository), sentence-transformers.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np


def texts(data: Path, n: int):
    paragraphs = [json.loads(l)["text"] for l in open(data / "squad-dev-retrieval/corpus.jsonl")]
    questions = [json.loads(l)["text"] for l in open(data / "squad-dev-retrieval/queries.jsonl")]
    sst = [l.split("\t")[0].strip() for l in open(data / "sst2/dev.tsv").read().splitlines()[1:]]
    out, ip, iq, isst = [], 0, 0, 0
    for i in range(n):
        if i % 8 == 7:
            out.append(paragraphs[ip % len(paragraphs)]); ip += 1
        elif i % 2 == 0:
            out.append(questions[iq % len(questions)]); iq += 1
        else:
            out.append(sst[isst % len(sst)]); isst += 1
    return out


def best(fn, runs=2):
    fn(texts_warm)
    t = []
    for _ in range(runs):
        s = time.perf_counter(); r = fn(None); t.append(time.perf_counter() - s)
    return min(t), r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("BERTH_DATASETS", "../shared/datasets"))
    ap.add_argument("--sizes", default="2000,10000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/berth/models/all-MiniLM-L6-v2"))
    ap.add_argument("--berth-bin", default=str(Path(__file__).resolve().parents[1] / "target/release/berth"))
    a = ap.parse_args()
    import berth

    global texts_warm
    sizes = [int(s) for s in a.sizes.split(",")]
    all_texts = texts(Path(a.data), max(sizes))
    texts_warm = all_texts[:256]
    enc = berth.SentenceEncoder(a.model, threads=a.threads)
    peers = {}
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(a.threads)
        st = SentenceTransformer(a.model, device="cpu")
        peers["sentence-transformers"] = lambda xs: st.encode(xs, batch_size=32, convert_to_numpy=True)
    except ImportError:
        print("sentence-transformers not installed: skipped", file=sys.stderr)
    try:
        from fastembed import TextEmbedding

        fe = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", threads=a.threads)
        peers["fastembed"] = lambda xs: np.array(list(fe.embed(xs, batch_size=32)))
    except Exception as e:  # not installed, or its model download is unreachable
        print(f"fastembed: skipped ({type(e).__name__}: {e})"[:200], file=sys.stderr)
    print(f"model {a.model}, {a.threads} threads; texts/s (best of 2 passes), ratios to sentence-transformers")
    for n in sizes:
        xs = all_texts[:n]
        t_berth, v = best(lambda w: enc.encode(w if w is not None else xs))
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(x.replace("\n", " ") for x in xs) + "\n")
        def cli(w):
            if w is not None:
                return None
            subprocess.run([a.berth_bin, "--threads", str(a.threads), "embed", "--model", a.model,
                            "--input", f.name, "--output", f.name + ".npy"], check=True, capture_output=True)
        t_cli, _ = best(cli)
        os.unlink(f.name); os.unlink(f.name + ".npy")
        row = {"berth (Python)": n / t_berth, "berth embed CLI (incl. start-up)": n / t_cli}
        agree = {}
        for name, fn in peers.items():
            t, pv = best(lambda w: fn(w if w is not None else xs))
            row[name] = n / t
            agree[name] = float(np.min(np.sum(v * pv, axis=1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(pv, axis=1))))
        base = row.get("sentence-transformers")
        print(f"{n} texts:")
        for name, r in row.items():
            ratio = f"  x{r / base:.2f}" if base else ""
            print(f"  {name:<36} {r:8.1f} texts/s{ratio}")
        print(f"  berth Python / CLI: {row['berth (Python)'] / row['berth embed CLI (incl. start-up)']:.3f}")
        for name, c in agree.items():
            print(f"  min cosine berth vs {name}: {c:.6f}")


if __name__ == "__main__":
    main()
