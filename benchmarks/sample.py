"""Sampling benchmark: BD3-LM K=4 / K=16 with and without the KV cache at batch 1
and 16, and AR with its cache, on the width-128 / 4-layer DiT with random weights (vocab
30523, a 1024-token window, nucleus 1.0, first-hitting).

Reported per variant: tokens/s (generated tokens x batch / wall time), NFE per sequence
(denoising calls; separate commit passes in parentheses) and peak memory (CUDA
max_memory_allocated, or on CPU the growth of the peak RSS (VmHWM) over the RSS before the
run -- a lower bound once an earlier run of the same process peaked higher). Through the
shipped sampling_model.ModelDenoiser (torch only, as on the GPU machine).

--baseline runs each variant again as first written (benchmarks/baselines.py), alternating with
the optimised run: baselines.reference_draws() (a Gumbel race over every position of the
block, Gumbel-max AR tokens); SamplerConfig.fuse_commit=False (a forward pass of its own per
committed block); baselines.BaselineDenoiser (the reference SUBS, the output layer on its
(V, D) weight, the adaLN modulation recomputed at every call).
--parallel adds parallel decoding rows (tokens_per_step 2/4, confidence_threshold 0.9).

Usage: python benchmarks/sample.py [--quick] [--baseline] [--parallel] [--json PATH]
       [--only NAME,...] [--profile NAME] [--threads N] [--reps N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from common import baselines, build_algorithm, build_dit  # noqa: E402

import sampling  # noqa: E402
from sampling import ModelDenoiser  # noqa: E402

# the benchmark's DiT (random weights) and its window; --toy: a seconds-long CPU check
MODEL = dict(vocab=30523, width=128, layers=4, heads=4, window=1024)
TOY = dict(vocab=513, width=32, layers=2, heads=2, window=64)
BOS = 0


def build_sampling_model(variant: dict, device, baseline: bool) -> ModelDenoiser:
    algo_name, block, m = variant["algo"], variant["block"], variant["model"]
    ar, fast = algo_name == "ar", not baseline
    backbone = build_dit(
        m["vocab"], m["width"], m["layers"], m["heads"], ar, optimised=fast, init_std=0.05
    )
    algorithm = build_algorithm(algo_name, m["window"], block, m["vocab"] - 1)
    backbone = backbone.to(device).eval()
    denoiser = baselines.BaselineDenoiser if baseline else ModelDenoiser
    return denoiser(backbone, algorithm, m["window"])


def run_once(variant: dict, device, baseline: bool):
    """-> (seconds, output, peak MB)."""
    algo_name, block = variant["algo"], variant["block"]
    model = build_sampling_model(variant, device, baseline)
    cfg = sampling.SamplerConfig(
        length=variant["length"],
        block_size=block,
        num_steps=5000,
        context=variant["model"]["window"],
        bos_id=BOS,
        mask_id=variant["model"]["vocab"] - 1,
        eos_id=BOS,
        nucleus_p=1.0,
        kv_cache=variant["kv"],
        reject_low_entropy=False,
        fuse_commit=not baseline,
        tokens_per_step=variant.get("tokens_per_step", 1),
        confidence_threshold=variant.get("threshold"),
    )
    sampler = sampling.ar_sample if algo_name == "ar" else sampling.semi_ar_sample
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = common.current_rss_mb()
    common.sync(device)
    start = common.now()
    draws = baselines.reference_draws() if baseline else contextlib.nullcontext()
    with torch.no_grad(), draws:
        out = sampler(model, variant["batch"], cfg, gen, device)
    common.sync(device)
    seconds = common.now() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = max(0.0, common.peak_rss_mb() - rss0)
    return seconds, out, peak


def lengths(quick: bool, toy: bool = False) -> tuple[int, int, int]:
    """Tokens per sample: batch 1; batch 16 cached; batch 16 uncached (it re-reads the whole
    prefix every call). --quick keeps every variant under about 15 s, --toy about 1 s."""
    if toy:
        return (64, 32, 32)
    return (256, 64, 64) if quick else (1024, 1024, 256)


def variants(quick: bool, parallel: bool, toy: bool = False) -> dict[str, dict]:
    long, b16, b16_uncached = lengths(quick, toy)
    model = TOY if toy else MODEL
    table = {}
    for K in (4, 16):
        for batch in (1, 16):
            n = long if batch == 1 else b16
            table[f"bd3lm{K}_kv_b{batch}_n{n}"] = dict(
                algo="bd3lm", block=K, kv=True, batch=batch, length=n
            )
            n = long if batch == 1 else b16_uncached
            table[f"bd3lm{K}_nokv_b{batch}_n{n}"] = dict(
                algo="bd3lm", block=K, kv=False, batch=batch, length=n
            )
    table[f"ar_kv_b1_n{long}"] = dict(algo="ar", block=1, kv=True, batch=1, length=long)
    table[f"ar_kv_b16_n{b16}"] = dict(algo="ar", block=1, kv=True, batch=16, length=b16)
    if parallel:
        for k in (2, 4):
            table[f"bd3lm4_kv_b1_n{long}_tps{k}"] = dict(
                algo="bd3lm", block=4, kv=True, batch=1, length=long, tokens_per_step=k
            )
        table[f"bd3lm16_kv_b1_n{long}_conf0.9"] = dict(
            algo="bd3lm", block=16, kv=True, batch=1, length=long, threshold=0.9
        )
    for spec in table.values():
        spec["model"] = model
    return table


def profile(name: str, variant: dict, device) -> None:
    """Per-call profile of one variant (torch.profiler): the ops that take the time, in
    microseconds per model call (denoising calls + separate commits)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run_once(dict(variant, length=2 * variant["block"]), device, False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        seconds, out, _ = run_once(variant, device, False)
    calls = int(out.nfe_total.float().mean())
    print(f"\nprofile of {name}: {seconds / calls * 1e6:.0f} us per model call ({calls} calls)")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [
        [e.key[:48], e.count // calls, round(e.self_cpu_time_total / calls),
         f"{100 * e.self_cpu_time_total / total:.1f}%"]
        for e in events[:14]
    ]  # fmt: skip
    print(common.table(rows, ["op", "per call", "self us per call", "share"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 / 64 tokens (< 3 min CPU)")
    parser.add_argument("--toy", action="store_true", help="a width-32 DiT, 64 / 32 tokens")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--parallel", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--profile", default=None, help="print a per-call profile of a variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--reps", type=int, default=1, help="timed runs per variant (median)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    table = variants(args.quick, args.parallel, args.toy)
    if args.profile:
        return profile(args.profile, table[args.profile], device)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    tok_s, nfe, memory, rows = {}, {}, {}, []
    parallel = ("_tps", "_conf")  # parallel-decoding rows have no baseline
    runs = [
        (name, baseline)
        for name in table
        for baseline in (False, True)
        if not baseline or (args.baseline and not any(p in name for p in parallel))
    ]
    seconds = {run: [] for run in runs}
    for rep in range(args.reps):  # rounds over every run, so drifts hit all of them alike
        for name, baseline in runs:
            variant = table[name]
            if rep == 0:  # first calls: allocator, kernels
                warm = dict(variant, length=2 * variant["block"] if variant["algo"] != "ar" else 8)
                run_once(warm, device, baseline)
            took, out, peak = run_once(variant, device, baseline)
            seconds[(name, baseline)].append(took)
            key = name + ("_baseline" if baseline else "")
            if rep == 0:
                nfe[key] = [int(out.nfe_denoise.float().mean()), int(out.nfe_total.float().mean())]
                memory[key] = round(peak)
            if rep == args.reps - 1:
                median = statistics.median(seconds[(name, baseline)])
                tok_s[key] = round(variant["length"] * variant["batch"] / median, 1)
                commits = nfe[key][1] - nfe[key][0]
                print(
                    f"{key}: {tok_s[key]} tokens/s (median of {args.reps}), NFE {nfe[key][0]} "
                    f"(+{commits} commits), peak {memory[key]} MB",
                    flush=True,
                )
    for name in table:
        base = tok_s.get(name + "_baseline")
        rows.append([name, tok_s[name], base or "", f"{tok_s[name] / base:.2f}x" if base else "",
                     f"{nfe[name][0]} (+{nfe[name][1] - nfe[name][0]})", memory[name]])  # fmt: skip
    print(common.table(rows, ["variant", "tokens/s", "baseline", "speed-up", "NFE", "peak MB"]))
    long = lengths(args.quick, args.toy)[0]
    ratios = {}

    def ratio(name, num, den):
        if num in tok_s and den in tok_s:
            ratios[name] = round(tok_s[num] / tok_s[den], 2)
            print(f"{name} = {tok_s[num]} / {tok_s[den]} tokens/s = {ratios[name]}")

    ratio("kv_speedup_1024", f"bd3lm4_kv_b1_n{long}", f"bd3lm4_nokv_b1_n{long}")
    ratio(
        "batch16_over_batch1",
        f"bd3lm4_kv_b16_n{lengths(args.quick, args.toy)[1]}",
        f"bd3lm4_kv_b1_n{long}",
    )
    ratio("bd3lm4_over_ar_kv", f"bd3lm4_kv_b1_n{long}", f"ar_kv_b1_n{long}")
    common.write_json(
        args.json,
        {
            "device": str(device),
            "length": long,
            "tokens_per_s": tok_s,
            "nfe_denoise_and_total": nfe,
            "peak_memory_mb": memory,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
            "memory_measure": "cuda max_memory_allocated"
            if device.type == "cuda"
            else "peak RSS (VmHWM) growth (lower bound after the first run)",
            **ratios,
        },
    )


if __name__ == "__main__":
    main()
