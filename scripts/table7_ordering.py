"""Table 7's ordering at demo scale under a real judge: AR, BD3-LM K = 4, K = 16 and MDLM trained
with the same budget, sampled at equal NFE with the same seed, judged by SmolLM2-135M.

    python scripts/table7_ordering.py [RUN] [--samples 64] [--seed 1] [--judge smollm2-135m]
        [--steps N] [--quick]

RUN (default outputs/table7):
  1. RUN/train/NAME: `main.py experiment=demo` with the variant's algo (and block size), the
     same budget for each: the demo's (800 steps of 16 x 128 tokens, its learning rate and
     schedule), or `--steps N` steps; a variant whose final step checkpoint is there is not
     retrained;
  2. RUN/samples/NAME: `main.py experiment=demo mode=sample_eval` from its last.ckpt (EMA
     weights), `--samples` samples of L = 128 tokens in one batch, seed `--seed`, nucleus 0.9,
     one token per model call (exact first-hitting for the diffusion models, so NFE = 127
     for every model: the BOS is given), the KV cache where the objective has one (exact), the
     judge `--judge` (eval.gen_ppl_eval_model_name_or_path); kept when its sample_eval.json
     already has `--samples` samples;
  3. the judge on as many held-out validation rows, scored as samples are
     (scripts/demo.py's real_text_reference);
then a Markdown table (also RUN/table.md, and RUN/table.json): the paper's Table 7 Gen PPL and
NFE (GPT-2 Large judge, OpenWebText, L = 1024, from scripts/paper_numbers.toml) beside ours:
token-weighted Gen PPL with its 95% interval, the mean of the per-sample values with its 95%
interval (the paper's statistic), mean NFE and mean per-sample unigram entropy; and whether the
paper's ordering (AR < K = 4 < K = 16 < MDLM) holds on the per-sample means, and which neighbours
are separated by their intervals. Logs of every subprocess go to RUN/logs/. `--quick` is a
seconds-long smoke version (experiment=smoke: L = 32, 4 training steps; 2 samples; RUN default
outputs/table7_quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import demo  # noqa: E402
import paper_tables  # noqa: E402
import parallel_decoding_study as study  # noqa: E402

# name -> (label, the paper's Table 7 row label, overrides of experiment=demo); paper order
VARIANTS = {
    "ar": ("AR", "AR, L = 1024", ["algo=ar"]),
    "bd3lm4": ("BD3-LM K = 4", "BD3-LM K = 4, L = 1024", ["algo=bd3lm", "block_size=4"]),
    "bd3lm16": ("BD3-LM K = 16", "BD3-LM K = 16, L = 1024", ["algo=bd3lm", "block_size=16"]),
    "mdlm": ("MDLM", "MDLM, L = 1024", ["algo=mdlm"]),
}


def ensure_trained(run: str, name: str, args, timings: dict) -> str:
    """Train variant `name` into RUN/train/NAME unless its final checkpoint is there; ->
    its last.ckpt."""
    experiment, overrides = args.experiment, [*VARIANTS[name][2], *budget(args)]
    run_dir = os.path.join(run, "train", name)
    steps = int(study.compose(experiment, overrides).trainer.max_steps)
    final = os.path.join(run_dir, "checkpoints", f"step_{steps:08d}.ckpt")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if os.path.isfile(final) and os.path.isfile(last):
        print(f"{name}: found {os.path.relpath(final)}; not retraining", flush=True)
    else:
        quiet = ["trainer.log_every_n_steps=200", "callbacks.checkpoint_monitor.verbose=false"]
        cmd = study.main_py(experiment, "train", run_dir, [*overrides, *quiet])
        log = os.path.join(run, "logs", f"train_{name}.log")
        timings[f"train_{name}_s"] = study.run_logged(cmd, log, f"train {name}")
    return last


def budget(args) -> list[str]:
    """Overrides giving every variant `--steps` training steps (checkpoints at the last)."""
    if args.steps is None:
        return []
    every = [f"trainer.val_check_interval={args.steps}"]
    every += [f"callbacks.checkpoint_every_n_steps.every_n_train_steps={args.steps}"]
    return [f"trainer.max_steps={args.steps}", *every]


def ensure_sampled(run: str, name: str, ckpt: str, args, timings: dict) -> str:
    """Sample variant `name` into RUN/samples/NAME unless already there; -> the directory."""
    overrides = VARIANTS[name][2]
    out = os.path.join(run, "samples", name)
    summary = os.path.join(out, "sample_eval.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            if json.load(f).get("num_samples") == args.samples:
                print(f"{name}: found {args.samples} samples; not resampling", flush=True)
                return out
    extra = [
        f"eval.checkpoint_path={ckpt}",
        f"eval.gen_ppl_eval_model_name_or_path={args.judge}",
        f"seed={args.seed}",
        f"loader.eval_global_batch_size={args.samples}",
        "sampling.num_sample_batches=1",
        "sampling.tokens_per_step=1",
        *overrides,
    ]
    extra += demo.cache_overrides(extra)  # the KV cache where the objective has one
    cmd = study.main_py(args.experiment, "sample_eval", out, extra)
    log = os.path.join(run, "logs", f"sample_{name}.log")
    timings[f"sample_{name}_s"] = study.run_logged(cmd, log, f"sample {name}")
    return out


def paper_row(numbers: dict, label: str) -> dict:
    _, rows = paper_tables.table_rows(numbers, "7")
    return next(row for row in rows if row["label"] == label)


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ordering(results: list[dict]) -> tuple[bool, list[str]]:
    """(whether the per-sample means increase in the paper's order, one note per neighbour
    pair: '<' when the 95% intervals are disjoint in the paper's direction, '>' when disjoint
    the other way, '~' when they overlap)."""
    holds, notes = True, []
    for a, b in zip(results, results[1:], strict=False):
        va, vb = a["gen_ppl_mean_per_sample"], b["gen_ppl_mean_per_sample"]
        ha, hb = a["gen_ppl_mean_per_sample_ci95"] or 0.0, b["gen_ppl_mean_per_sample_ci95"] or 0.0
        holds &= va < vb
        if va + ha < vb - hb:
            sign = "<"
        elif vb + hb < va - ha:
            sign = ">"
        else:
            sign = "~"
        notes.append(f"{a['label']} {sign} {b['label']}")
    return holds, notes


def render(results: list[dict], reference: dict, judge: str, args) -> list[str]:
    lines = [
        f"| model | paper Gen PPL (GPT-2 Large, L = 1024) | paper NFE | Gen PPL under {judge}, "
        "token-weighted (95%) | per-sample mean +- 95% | NFE | entropy | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        low, high = r["gen_ppl_token_weighted_ci95"] or (None, None)
        lines.append(
            f"| {r['label']} | {fmt(r['paper'])} | {r['paper_nfe']} | "
            f"{fmt(r['gen_ppl_token_weighted'])} ({fmt(low)}-{fmt(high)}) | "
            f"{fmt(r['gen_ppl_mean_per_sample'])} +- {fmt(r['gen_ppl_mean_per_sample_ci95'])} | "
            f"{fmt(r['nfe_denoise_mean'])} | {fmt(r['entropy_mean'], 3)} | "
            f"{r['num_scored']}/{r['num_samples']} |"
        )
    low, high = reference["gen_ppl_token_weighted_ci95"] or (None, None)
    lines.append(
        f"| real text ({reference['num_scored']} validation rows) | | | "
        f"{fmt(reference['gen_ppl_token_weighted'])} ({fmt(low)}-{fmt(high)}) | "
        f"{fmt(reference['gen_ppl_mean_per_sample'])} +- "
        f"{fmt(reference['gen_ppl_mean_per_sample_ci95'])} | | | |"
    )
    holds, notes = ordering(results)
    paper_order = " < ".join(f"{r['label']} {fmt(r['paper'])}" for r in results)
    lines += [
        "",
        f"Paper (per-sample mean, L = 1024): {paper_order}. Ours (L = {args.length}, "
        f"{args.steps_run} training steps each, {args.samples} "
        f"samples, seed {args.seed}): the ordering {'holds' if holds else 'does NOT hold'}; "
        f"neighbours by their 95% intervals: {', '.join(notes)}.",
    ]
    return lines


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run directory (default outputs/table7)")
    parser.add_argument("--samples", type=int, help="samples per model (default 64; quick 2)")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (every model)")
    parser.add_argument("--judge", default="smollm2-135m", help="the Gen PPL judge")
    parser.add_argument("--steps", type=int, help="training steps per model (default: demo's)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version")
    args = parser.parse_args(argv)
    args.run = args.run or ("outputs/table7_quick" if args.quick else "outputs/table7")
    args.samples = args.samples or (2 if args.quick else 64)
    args.experiment = "smoke" if args.quick else "demo"
    args.length = int(study.compose(args.experiment, []).model.length)
    args.steps_run = args.steps or int(study.compose(args.experiment, []).trainer.max_steps)
    if args.samples < 2:
        parser.error("--samples must be >= 2 (the intervals need two samples)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    run = os.path.abspath(args.run)
    os.makedirs(run, exist_ok=True)
    timings: dict[str, float] = {}
    numbers = paper_tables.load_numbers()
    dirs = {}
    for name in VARIANTS:
        ckpt = ensure_trained(run, name, args, timings)
        dirs[name] = ensure_sampled(run, name, ckpt, args, timings)
    results = []
    for name, directory in dirs.items():
        label, paper_label, _ = VARIANTS[name]
        row = paper_row(numbers, paper_label)
        with open(os.path.join(directory, "sample_eval.json")) as f:
            summary = json.load(f)
        summary.pop("provenance", None)
        results.append(
            {**summary, "label": label, "paper": row["paper"], "paper_nfe": row["paper_nfe"]}
        )
    clock = time.time()
    reference = demo.real_text_reference(args.judge, args.samples, [])
    timings["real_text_s"] = time.time() - clock
    lines = render(results, reference, args.judge, args)
    print("\n".join(lines))
    with open(os.path.join(run, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(run, "table.json"), "w") as f:
        payload = {"models": results, "real_text": reference, "timings_s": timings}
        json.dump({**payload, "seed": args.seed, "judge": args.judge}, f, indent=2)
        f.write("\n")
    print(f"total time: {time.time() - start:.0f} s; outputs: {run}")
    return 0 if all(math.isfinite(r["gen_ppl_mean_per_sample"] or math.nan) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
