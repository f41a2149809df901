"""The CPU demo: train a tiny BD3-LM (block size 4) on the embedded Shakespeare corpus, measure
its validation perplexity, draw samples, and compare with a unigram baseline.

    python scripts/demo.py [RUN_DIR] [extra Hydra overrides...]

Runs `main.py experiment=demo` in the three modes with the same run directory (default
outputs/demo), then prints the model's perplexity (a NELBO bound), the perplexity of an
add-one-smoothed unigram model fitted on the training split over the same validation tokens
(BOS excluded, as the model's number), and their ratio. Exits 1 if the ratio exceeds 0.5.
Training logs progress every 200 steps when stdout is not a terminal; sampling uses the KV
cache where the objective supports it (exact: same logits as recomputation) and main.py prints
its tokens/s and two samples without the BOS. The resolved configs are in the run directory
(`verbose=true` prints them too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MAX_RATIO = 0.5


def run_mode(run_dir: str, mode: str, overrides: list[str]) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "experiment=demo", f"mode={mode}"]
    cmd += [f"hydra.run.dir={run_dir}", *overrides]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def demo_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        return compose("config", overrides=["experiment=demo", *overrides])


def cache_overrides(overrides: list[str]) -> list[str]:
    """sampling.kv_cache=true when the demo's objective supports the cache and the command
    line does not choose."""
    if any(o.lstrip("+").startswith("sampling.kv_cache=") for o in overrides):
        return []
    from settings import build_objective

    cfg = demo_config(overrides)
    objective = build_objective(cfg, int(cfg.model.length))
    return ["sampling.kv_cache=true"] if objective.supports_kv_cache else []


def unigram_baseline(overrides: list[str]) -> float:
    import dataloader
    from metrics import unigram_perplexity

    cfg = demo_config(overrides)
    vocab = dataloader.get_vocab(cfg.data)
    length = int(cfg.model.length)
    train = dataloader.get_dataset(cfg.data, vocab, "train", length).input_ids
    valid = dataloader.get_dataset(cfg.data, vocab, "valid", length).input_ids
    return unigram_perplexity(train, valid[:, 1:], vocab.size)


def main() -> int:
    args = sys.argv[1:]
    run_dir = os.path.abspath(args.pop(0) if args and "=" not in args[0] else "outputs/demo")
    start = time.time()
    quiet = ["trainer.log_every_n_steps=200", "callbacks.checkpoint_monitor.verbose=false"]
    run_mode(run_dir, "train", [*quiet, *args])
    run_mode(run_dir, "ppl_eval", ["trainer.limit_val_batches=1.0", *args])  # every token
    run_mode(run_dir, "sample_eval", [*cache_overrides(args), *args])
    with open(os.path.join(run_dir, "ppl_eval.json")) as f:
        ppl = json.load(f)["ppl"]
    unigram = unigram_baseline(args)
    ratio = ppl / unigram
    print(f"\nvalidation perplexity (NELBO bound): {ppl:.1f}")
    print(f"unigram perplexity (add-one, same tokens): {unigram:.1f}")
    print(f"ratio: {ratio:.3f} (must be <= {MAX_RATIO})   total time: {time.time() - start:.0f} s")
    print(f"outputs: {run_dir}")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
