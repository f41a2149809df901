"""The lm-eval model's conditional NELBO: its spread over seeds for mc_samples 1, 4 and 16 and
the time per request, on one checkpoint and a multiple-choice task file (JSONL with
question / choices / answer, as tests/data/lm_eval_tasks/toy_mc.jsonl).

    python benchmarks/harness_spread.py outputs/demo/checkpoints/best.ckpt \\
        --task tests/data/lm_eval_tasks/toy_mc.jsonl --seeds 20

Prints, per mc_samples: the standard deviation over seeds of each request's log-likelihood
(mean over requests), that of each question's margin (the answer's log-likelihood minus the
best other option's, which decides the answer; mean over questions), the mean log-likelihood,
the accuracy over seeds and the wall time per request (one loglikelihood call, the is_greedy
forward included). --independent-noise gives every request its own noise instead of sharing
it among the options of a question (the harness's common random numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class _Request:
    def __init__(self, *args):
        self.args = args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("checkpoint")
    parser.add_argument(
        "--task", default=os.path.join(ROOT, "tests/data/lm_eval_tasks/toy_mc.jsonl")
    )
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--mc-samples", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-size", type=int, default=1, help="requests per forward")
    parser.add_argument(
        "--independent-noise",
        action="store_true",
        help="every request its own noise (not shared by the options of a question)",
    )
    args = parser.parse_args(argv)
    from evaluation.lm_harness import BD3LMHarness

    with open(args.task) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    requests = [_Request(d["question"], c) for d in docs for c in d["choices"]]
    harness = BD3LMHarness(checkpoint=args.checkpoint, mc_samples=1, batch_size=args.batch_size)
    if args.independent_noise:
        import itertools

        import torch

        counter = itertools.count()
        harness._generator = lambda *keys: torch.Generator().manual_seed(
            harness.seed * 1_000_003 + next(counter)
        )
    print(
        f"{args.checkpoint}: {harness.kind}, window {harness.window}, K {harness.block}, "
        f"interval {harness.interval}; {len(docs)} questions, {len(requests)} requests, "
        f"{args.seeds} seeds, batch size {args.batch_size}"
    )
    for m in args.mc_samples:
        harness.mc_samples = m
        values, start = [], time.perf_counter()
        for seed in range(args.seeds):
            harness.seed = seed
            values.append([v for v, _ in harness.loglikelihood(requests)])
        per_request = (time.perf_counter() - start) / (args.seeds * len(requests))
        columns = list(zip(*values, strict=True))
        std = statistics.mean(statistics.stdev(c) for c in columns) if args.seeds > 1 else 0.0
        mean = statistics.mean(statistics.mean(c) for c in columns)
        correct, margins = [], [[] for _ in docs]
        for row in values:
            offset = 0
            for q, d in enumerate(docs):
                scores = row[offset : offset + len(d["choices"])]
                correct.append(float(scores.index(max(scores)) == int(d["answer"])))
                answer = scores[int(d["answer"])]
                margins[q].append(
                    answer - max(v for i, v in enumerate(scores) if i != int(d["answer"]))
                )
                offset += len(d["choices"])
        margin_std = (
            statistics.mean(statistics.stdev(m) for m in margins) if args.seeds > 1 else 0.0
        )
        print(
            f"mc_samples={m:3d}  std {std:7.3f} nats  margin std {margin_std:7.3f}  "
            f"mean log-likelihood {mean:8.2f}  accuracy {statistics.mean(correct):.3f}  "
            f"{per_request * 1000:7.1f} ms/request"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
