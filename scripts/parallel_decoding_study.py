"""The parallel-decoding study: generative perplexity and entropy against NFE on the demo model.

    python scripts/parallel_decoding_study.py [RUN] [--samples 256] [--batch-size 64]
        [--seed 1] [--points exact,k2,...] [--quick]

RUN (default outputs/parallel_study; outputs/parallel_study_quick with --quick):
  1. RUN/bd3lm: the demo BD3-LM (`main.py experiment=demo mode=train hydra.run.dir=RUN/bd3lm`),
     trained unless its final step checkpoint is there (a partial run resumes);
  2. RUN/judge: a small GPT-2 trained on the same embedded data with the same tokenizer
     (scripts/train_judge.py), unless present;
  3. RUN/points/NAME: one `main.py experiment=demo mode=sample_eval` per decoding point, all
     from RUN/bd3lm/checkpoints/last.ckpt (EMA weights), the same seed, `--samples` samples
     (batches of `--batch-size`), the KV cache on and
     `eval.gen_ppl_eval_model_name_or_path=RUN/judge` (nfe_total adds the cache-commit passes;
     the sampler's fused commits, `sampling.fuse_commit`, make it equal nfe_denoise). A point
     whose sample_eval.json already has the requested number of samples is kept; any other is
     redrawn from scratch;
  4. scripts/sample_stats.py over the points -> RUN/summary.json and RUN/genppl_vs_nfe.png
     (and RUN/entropy_vs_nfe.png);
     then a markdown table (also RUN/table.md): mean NFE (denoising calls; total with the cache
     commits), mean per-sample Gen PPL with its 95% CI, mean entropy, and the ratio of Gen PPL
     to the exact point's (with a 95% CI from the two independent CIs), a last row with the
     judge's numbers on as many real validation rows (RUN/data_reference.json), and which
     points meet the target: NFE <= L/2 with Gen PPL within 10% of exact one-token-per-step
     decoding, and which of those also keep the mean entropy within 5% of exact (a Gen PPL
     lowered by repetitive, low-entropy text is not a real pass).

Points (all with nucleus_p 0.9 of the demo config): exact (tokens_per_step=1), k2, k3, k4
(tokens_per_step=k; with block size 4, k2 gives NFE = L/2), conf0.9 / conf0.7 / conf0.5 /
conf0.3 / conf0.2 / conf0.1 / conf0.05 (confidence_threshold p with one uniform token per call),
k2_conf0.9 (both), order_k1 / order_k2 (sampling.unmask_order=confidence with k = 1, 2),
eb0.5 / eb1 / eb2 / eb4 (sampling.entropy_bound in nats: our entropy budget) and order_eb1 /
order_eb2 (the budget with unmask_order=confidence; stricter than the EB-sampler, whose own rule
is sampling.eb_gamma).
Logs of every subprocess go to RUN/logs/. `--quick` is a seconds-long smoke version
(experiment=smoke model, a few judge steps, 4 samples per point, three points).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
sys.path.insert(0, ROOT)
TARGET_RATIO = 1.10
ENTROPY_TOLERANCE = 0.05  # a passing point's mean entropy within 5% of the exact point's

# name -> sampling overrides
POINTS = {
    "exact": {"tokens_per_step": 1},
    "k2": {"tokens_per_step": 2},
    "k3": {"tokens_per_step": 3},
    "k4": {"tokens_per_step": 4},
    "conf0.9": {"tokens_per_step": 1, "confidence_threshold": 0.9},
    "conf0.7": {"tokens_per_step": 1, "confidence_threshold": 0.7},
    "conf0.5": {"tokens_per_step": 1, "confidence_threshold": 0.5},
    "conf0.3": {"tokens_per_step": 1, "confidence_threshold": 0.3},
    "conf0.2": {"tokens_per_step": 1, "confidence_threshold": 0.2},
    "conf0.1": {"tokens_per_step": 1, "confidence_threshold": 0.1},
    "conf0.05": {"tokens_per_step": 1, "confidence_threshold": 0.05},
    "k2_conf0.9": {"tokens_per_step": 2, "confidence_threshold": 0.9},
    # sampling.unmask_order=confidence: the most confident masked positions first
    "order_k1": {"tokens_per_step": 1, "unmask_order": "confidence"},
    "order_k2": {"tokens_per_step": 2, "unmask_order": "confidence"},
    # sampling.entropy_bound=g: also the lowest-entropy positions, entropies summing <= g nats
    "eb0.5": {"tokens_per_step": 1, "entropy_bound": 0.5},
    "eb1": {"tokens_per_step": 1, "entropy_bound": 1.0},
    "eb2": {"tokens_per_step": 1, "entropy_bound": 2.0},
    "eb4": {"tokens_per_step": 1, "entropy_bound": 4.0},
    "order_eb1": {"tokens_per_step": 1, "entropy_bound": 1.0, "unmask_order": "confidence"},
    "order_eb2": {"tokens_per_step": 1, "entropy_bound": 2.0, "unmask_order": "confidence"},
}
DEFAULT_POINTS = list(POINTS)
QUICK_POINTS = ["exact", "k2", "conf0.5"]
# the smoke model (context 32) on the demo's data and tokenizer, trained for a few steps
QUICK_EXPERIMENT = "smoke"
QUICK_JUDGE = ["--steps", "4", "--layers", "1", "--width", "32", "--heads", "2"]  # fmt: skip
QUICK_JUDGE += ["--context", "128", "--positions", "128"]  # fmt: skip


def run_logged(cmd: list[str], log_path: str, what: str) -> float:
    """Run `cmd` in the repository root with its output in `log_path`; -> seconds.
    Exits with the command's code (and the log's tail) when it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}
        )
    seconds = time.time() - start
    if proc.returncode:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        print(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}", file=sys.stderr)
        sys.exit(proc.returncode)
    print(f"    done in {seconds:.0f} s (log: {log_path})", flush=True)
    return seconds


def compose(experiment: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        return hydra_compose("config", overrides=[f"experiment={experiment}", *overrides])


def main_py(experiment: str, mode: str, run_dir: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"experiment={experiment}"]
    return [*cmd, f"mode={mode}", f"hydra.run.dir={run_dir}", *overrides]


def ensure_bd3lm(run: str, experiment: str, overrides: list[str], timings: dict) -> str:
    """Train (or finish training) the BD3-LM in RUN/bd3lm; -> its last.ckpt."""
    run_dir = os.path.join(run, "bd3lm")
    max_steps = int(compose(experiment, overrides).trainer.max_steps)
    final = os.path.join(run_dir, "checkpoints", f"step_{max_steps:08d}.ckpt")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    if os.path.isfile(final) and os.path.isfile(last):
        print(f"BD3-LM: found {os.path.relpath(final)}; not retraining", flush=True)
    else:
        cmd = main_py(experiment, "train", run_dir, overrides)
        log = os.path.join(run, "logs", "bd3lm_train.log")
        timings["bd3lm_train_s"] = run_logged(cmd, log, "train BD3-LM")
    return last


def ensure_judge(run: str, judge_args: list[str], timings: dict) -> dict:
    """Train the judge into RUN/judge unless present; -> its judge_train.json."""
    out = os.path.join(run, "judge")
    info = os.path.join(out, "judge_train.json")
    if os.path.isfile(info):
        print(f"judge: found {os.path.relpath(out)}; not retraining", flush=True)
    else:
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "train_judge.py"), out, *judge_args]
        log = os.path.join(run, "logs", "judge_train.log")
        timings["judge_train_s"] = run_logged(cmd, log, "train judge")
    with open(info) as f:
        return json.load(f)


def point_overrides(settings: dict) -> list[str]:
    threshold = settings.get("confidence_threshold")
    bound = settings.get("entropy_bound")
    return [
        f"sampling.tokens_per_step={settings['tokens_per_step']}",
        f"sampling.confidence_threshold={'null' if threshold is None else threshold}",
        f"sampling.entropy_bound={'null' if bound is None else bound}",
        f"sampling.unmask_order={settings.get('unmask_order', 'random')}",
    ]


def run_point(
    run: str,
    name: str,
    experiment: str,
    ckpt: str,
    judge: str,
    samples: int,
    batch: int,
    seed: int,
    overrides: list[str],
    timings: dict,
) -> str:
    """Sample one decoding point into RUN/points/NAME; -> the directory."""
    out = os.path.join(run, "points", name)
    summary = os.path.join(out, "sample_eval.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            if json.load(f).get("num_samples") == samples:
                print(f"point {name}: found {samples} samples; not resampling", flush=True)
                return out
    batch = min(batch, samples)
    cmd = main_py(
        experiment,
        "sample_eval",
        out,
        [
            f"eval.checkpoint_path={ckpt}",
            f"eval.gen_ppl_eval_model_name_or_path={judge}",
            f"seed={seed}",
            f"loader.eval_batch_size={batch}",
            f"sampling.num_sample_batches={math.ceil(samples / batch)}",
            "sampling.kv_cache=true",
            *point_overrides(POINTS[name]),
            *overrides,
        ],
    )
    log = os.path.join(run, "logs", f"sample_{name}.log")
    timings[f"sample_{name}_s"] = run_logged(cmd, log, f"point {name}")
    return out


def ratio_ci(value: float, ci: float | None, ref: float, ref_ci: float | None) -> tuple:
    """value / ref and a 95% half-width by the delta method (independent estimates)."""
    ratio = value / ref
    if ci is None or ref_ci is None:
        return ratio, None
    return ratio, ratio * math.sqrt((ci / value) ** 2 + (ref_ci / ref) ** 2)


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(
    runs: dict[str, dict],
    names: list[str],
    dirs: list[str],
    length: int,
    data_ref: dict | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """Markdown rows (and a last row for real validation text when `data_ref` is given); the
    points that meet the target (NFE <= L/2, Gen PPL <= 1.1 x exact); and those of them whose
    mean entropy is also within ENTROPY_TOLERANCE of the exact point's (a lower Gen PPL bought
    with repetitive, low-entropy text is not a pass)."""
    by_name = {name: runs[os.path.normpath(d)] for name, d in zip(names, dirs, strict=True)}
    ref = by_name.get("exact")
    lines = [
        "| point | NFE denoise | NFE total | Gen PPL +- 95% CI | entropy | ratio to exact "
        "+- 95% CI | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    meets, genuine = [], []
    for name, s in by_name.items():
        ppl, ci = s["gen_ppl_mean_per_sample"], s["gen_ppl_ci95"]
        ratio = ratio_text = None
        if ref is not None and ppl is not None and ref["gen_ppl_mean_per_sample"]:
            ratio, half = ratio_ci(ppl, ci, ref["gen_ppl_mean_per_sample"], ref["gen_ppl_ci95"])
            ratio_text = "1 (reference)" if s is ref else f"{ratio:.3f} +- {fmt(half, 3)}"
        lines.append(
            f"| {name} | {fmt(s['nfe_denoise_mean'], 1)} | {fmt(s['nfe_total_mean'], 1)} | "
            f"{fmt(ppl)} +- {fmt(ci)} | {fmt(s['entropy_mean'], 3)} | {ratio_text or '-'} | "
            f"{s['num_scored']}/{s['num_samples']} |"
        )
        if (
            name != "exact"
            and ratio is not None
            and s["nfe_denoise_mean"] <= length / 2
            and ratio <= TARGET_RATIO
        ):
            meets.append(name)
            drop = 1 - s["entropy_mean"] / ref["entropy_mean"]
            if abs(drop) <= ENTROPY_TOLERANCE:
                genuine.append(name)
    if data_ref is not None:
        lines.append(
            f"| data (valid rows) | - | - | {fmt(data_ref['gen_ppl_mean'])} +- "
            f"{fmt(data_ref['gen_ppl_ci95'])} | {fmt(data_ref['entropy_mean'], 3)} | - | "
            f"{data_ref['num_rows']}/{data_ref['num_rows']} |"
        )
    return lines, meets, genuine


def data_reference(run: str, experiment: str, judge: str, rows: int) -> dict:
    """The judge on `rows` evenly spaced rows of the valid split (L tokens each, [BOS] first,
    decoded and rescored exactly as samples are): mean per-row Gen PPL, its 95% CI and the mean
    unigram entropy, the real-text counterparts of the points' numbers. Cached in
    RUN/data_reference.json."""
    path = os.path.join(run, "data_reference.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("num_rows") == rows and cached.get("judge") == judge:
            return cached
    import torch

    import dataloader
    from metrics import GenerativePerplexity, unigram_entropy

    cfg = compose(experiment, [])
    vocab = dataloader.get_vocab(cfg.data)
    valid = dataloader.get_dataset(cfg.data, vocab, "valid", cfg.model.length).input_ids
    count = min(rows, valid.shape[0])
    picks = [round(i * (valid.shape[0] - 1) / max(1, count - 1)) for i in range(count)]
    scorer = GenerativePerplexity(judge, torch.device("cpu"))
    ppls, entropies = [], []
    for i in picks:
        ids = [int(t) for t in valid[i]]
        text = ids[1:] if ids[:1] == [vocab.bos_id] else ids  # scored as samples are: no BOS
        nll, scored = scorer.score(dataloader.decode(vocab, text))
        ppls.append(math.exp(nll / scored))
        entropies.append(unigram_entropy(ids))
    mean = sum(ppls) / count
    std = math.sqrt(sum((p - mean) ** 2 for p in ppls) / (count - 1)) if count > 1 else None
    result = {
        "num_rows": count,
        "judge": judge,
        "gen_ppl_mean": mean,
        "gen_ppl_ci95": 1.959964 * std / math.sqrt(count) if std is not None else None,
        "entropy_mean": sum(entropies) / count,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


def plot_entropy(runs: dict[str, dict], names: list[str], dirs: list[str], path: str) -> None:
    """Mean entropy against mean NFE (denoise), one labelled point per decoding point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in zip(names, dirs, strict=True):
        s = runs[os.path.normpath(d)]
        ax.plot([s["nfe_denoise_mean"]], [s["entropy_mean"]], "o")
        ax.annotate(
            name,
            (s["nfe_denoise_mean"], s["entropy_mean"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.margins(x=0.25, y=0.2)
    ax.set_xlabel("mean NFE (denoise)")
    ax.set_ylabel("mean per-sample unigram entropy (nats)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run directory (default outputs/parallel_study)")
    parser.add_argument("--samples", type=int, help="samples per point (default 256; quick 4)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed (every point)")
    parser.add_argument("--points", help=f"comma-separated subset of {','.join(POINTS)}")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke version")
    args = parser.parse_args(argv)
    if args.run is None:
        args.run = "outputs/parallel_study_quick" if args.quick else "outputs/parallel_study"
    if args.samples is None:
        args.samples = 4 if args.quick else 256
    names = (args.points.split(",") if args.points else None) or (
        QUICK_POINTS if args.quick else DEFAULT_POINTS
    )
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        parser.error(f"unknown point(s) {', '.join(unknown)}; choose from {', '.join(POINTS)}")
    if "exact" not in names:
        names.insert(0, "exact")  # the reference of the ratio
    if args.samples < 1 or args.batch_size < 1:
        parser.error("--samples and --batch-size must be >= 1")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    run = os.path.abspath(args.run)
    os.makedirs(run, exist_ok=True)
    experiment = QUICK_EXPERIMENT if args.quick else "demo"
    judge_args = QUICK_JUDGE if args.quick else []
    timings: dict[str, float] = {}
    ckpt = ensure_bd3lm(run, experiment, [], timings)
    judge_info = ensure_judge(run, judge_args, timings)
    judge = os.path.join(run, "judge")
    length = int(compose(experiment, []).model.length)
    dirs = [
        run_point(
            run,
            name,
            experiment,
            ckpt,
            judge,
            args.samples,
            args.batch_size,
            args.seed,
            [],
            timings,
        )
        for name in args.names
    ]
    summary_path = os.path.join(run, "summary.json")
    plot_path = os.path.join(run, "genppl_vs_nfe.png")
    stats = [sys.executable, os.path.join(ROOT, "scripts", "sample_stats.py"), *dirs]
    stats += ["--out", summary_path, "--plot", plot_path]
    run_logged(stats, os.path.join(run, "logs", "sample_stats.log"), "sample_stats")
    with open(summary_path) as f:
        runs = json.load(f)["runs"]
    data_ref = data_reference(run, experiment, judge, args.samples)
    lines, meets, genuine = table(runs, args.names, dirs, length, data_ref)
    plot_entropy(runs, args.names, dirs, os.path.join(run, "entropy_vs_nfe.png"))
    judge_line = (
        f"Judge: GPT-2, {judge_info['num_parameters'] / 1e6:.2f}M parameters, validation "
        f"perplexity {judge_info['valid_ppl']:.2f} on {judge_info['valid_tokens']} tokens of the "
        f"valid split (EOS targets skipped), {judge_info['train_seconds']:.0f} s of training."
    )
    target = (
        f"Target (NFE <= L/2 = {length // 2} with Gen PPL within {TARGET_RATIO - 1:.0%} of "
        f"exact): {'met by ' + ', '.join(meets) if meets else 'NOT met'}"
    )
    if meets:
        kept = ", ".join(genuine) if genuine else "none"
        target += (
            f"; of these, with mean entropy within {ENTROPY_TOLERANCE:.0%} of exact (no "
            f"collapse into repetitive text): {kept}"
        )
    target += "."
    setup = (
        f"L = {length}, {args.samples} samples per point, seed {args.seed}, kv_cache on; "
        "Gen PPL = mean of per-sample perplexities, entropy = mean per-sample unigram entropy "
        "(nats)."
    )
    text = "\n".join([*lines, "", setup, judge_line, target, ""])
    with open(os.path.join(run, "table.md"), "w") as f:
        f.write(text)
    total = time.time() - start
    timings_path = os.path.join(run, "timings.json")
    previous = {}
    if os.path.isfile(timings_path):  # keep the times of steps this invocation skipped
        with open(timings_path) as f:
            previous = json.load(f)
    timings = {**previous, **timings}
    timings["invocations_s"] = [*previous.get("invocations_s", []), total]
    with open(timings_path, "w") as f:
        json.dump(timings, f, indent=2)
        f.write("\n")
    print("\n" + text)
    print(f"summary: {summary_path}\nplot: {plot_path}\nthis invocation: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
