"""Data pipeline throughput on the embedded corpus (no network, no hub).

Prints tokenization throughput (tokens/s) of `get_dataset` with 1 and 2 tokenizing processes
(the corpus is repeated to a few thousand documents so that 2 processes get work), and the
time to load a prepared cache. Usage: python benchmarks/data_speed.py [--repeat N] [--seq-len L]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import dataloader as dl  # noqa: E402
from data.shakespeare import shakespeare_docs  # noqa: E402

datasets.disable_progress_bars()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the corpus")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tokenizer", default="gpt2")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bd3lms-bench-")
    # paragraphs of the 42 works as documents, like a web-text corpus
    texts = [p for _, text in shakespeare_docs() for p in text.split("\n\n") if p.strip()]
    texts = texts * args.repeat
    pq.write_table(pa.table({"text": texts}), os.path.join(work, "train.parquet"))
    base = {
        "train": "local",
        "valid": "local",
        "tokenizer_name_or_path": args.tokenizer,
        "wrap": True,
        "source": work,
    }
    vocab = dl.get_vocab(OmegaConf.create({**base, "cache_dir": os.path.join(work, "tok")}))
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters")
    for procs in (1, 2):
        cfg = OmegaConf.create({**base, "num_proc": procs, "cache_dir": f"{work}/cache{procs}"})
        start = time.perf_counter()
        data = dl.get_dataset(cfg, vocab, "train", args.seq_len)
        seconds = time.perf_counter() - start
        tokens = data.input_ids.numel()
        print(f"tokenize+wrap, {procs} proc: {tokens / seconds:,.0f} tokens/s ({seconds:.2f} s)")
        start = time.perf_counter()
        again = dl.get_dataset(cfg, vocab, "train", args.seq_len)
        _ = again[len(again) - 1]
        print(f"load prepared cache, {procs}: {1e3 * (time.perf_counter() - start):.1f} ms")
    embedded = OmegaConf.create(
        {
            "train": "shakespeare",
            "valid": "shakespeare",
            "wrap": True,
            "tokenizer_name_or_path": "shakespeare-bpe-4096",
            "cache_dir": f"{work}/emb",
        }
    )
    evocab = dl.get_vocab(embedded)
    dl.get_dataset(embedded, evocab, "train", 128)
    start = time.perf_counter()
    dl.get_dataset(embedded, evocab, "train", 128)
    print(
        f"load prepared cache (embedded shakespeare, L=128): "
        f"{1e3 * (time.perf_counter() - start):.1f} ms"
    )


if __name__ == "__main__":
    main()
