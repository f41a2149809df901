"""The acceptance run's environment record and its sections that go through `main.py` (the
pipeline, the DDP / FSDP strategies on one GPU, fp16, compile, text8-crop) or the benchmark
scripts (benchmarks/train.py, benchmarks/sample.py).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from benchmarks.acceptance_common import (
    TEXT8,
    Context,
    check,
    checkpoint_summary,
    ensure_judge,
    ensure_text8,
    importable,
    logged,
    main_py,
    read_json,
)


def section_environment(ctx: Context) -> dict:
    from importlib import metadata

    from models.attention import flash_available, flex_available

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flex_attention": flex_available(),
        "flash_attn": flash_available(),
    }
    if not ctx.cpu:
        props = torch.cuda.get_device_properties(0)
        info.update(
            card=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
            gpus=torch.cuda.device_count(),
        )
    for name in ("lightning", "transformers", "tokenizers", "hydra-core", "omegaconf",
                 "datasets", "wandb", "einops", "matplotlib"):  # fmt: skip
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    check(info["hydra-core"] and info["omegaconf"], "hydra-core / omegaconf missing")
    info["token_caches"] = token_caches(ctx)
    missing = [name for name, present in info["token_caches"].items() if not present]
    check(info["datasets"] is not None or not missing,
          f"no datasets package and the bundle lacks the token caches {missing} (another "
          "tokenizers version names them differently?): rebuild the bundle")  # fmt: skip
    return info


def token_caches(ctx: Context) -> dict[str, bool]:
    """The token caches the sections read -> whether the bundle has them."""
    import dataloader
    import main
    from data.options import PipelineOptions, cache_name

    os.environ["BD3LMS_CACHE"] = ctx.cache
    found = {}
    for overrides in ([], [*TEXT8, f"data.source={ensure_text8(ctx)}"]):
        cfg = main.compose(["experiment=smoke", *overrides], ctx.run_dir("caches"))
        vocab = dataloader.get_vocab(cfg.data)
        for split in ("train", "valid"):
            name = cache_name(PipelineOptions.from_cfg(cfg.data, split, 32), vocab)
            found[name] = os.path.isfile(os.path.join(ctx.cache, name, "meta.json"))
    return found


def section_pipeline(ctx: Context) -> dict:
    """train -> ppl_eval -> sample_eval through `python main.py` (CPU: in process, bf16-mixed
    set explicitly since auto is float32 there); the judge scores the samples in float32."""
    run = ctx.run_dir("pipeline")
    precision = ["trainer.precision=bf16-mixed"] if ctx.cpu else []
    steps = "trainer.max_steps=4" if ctx.cpu else "trainer.max_steps=20"
    start = time.perf_counter()
    main_py(ctx, run, *precision, steps, subprocess_run=True)
    train_s = time.perf_counter() - start
    ckpt = f"eval.checkpoint_path={run}/checkpoints/last.ckpt"
    main_py(ctx, run, *precision, "mode=ppl_eval", ckpt, subprocess_run=True)
    ppl = read_json(os.path.join(run, "ppl_eval.json"))
    expected = "bf16-mixed" if ctx.cpu or torch.cuda.is_bf16_supported(False) else "16-mixed"
    check(ppl["precision"] == expected, f"ppl_eval ran in {ppl['precision']}, not {expected}")
    judge = f"eval.gen_ppl_eval_model_name_or_path={ensure_judge(ctx)}"
    main_py(ctx, run, *precision, "mode=sample_eval", ckpt, judge, "sampling.kv_cache=true",
            "loader.eval_batch_size=4", "model.length=64", subprocess_run=True)  # fmt: skip
    summary = read_json(os.path.join(run, "sample_eval.json"))
    check(summary["num_samples"] == 4 and summary["length_median"] == 64, str(summary))
    check(summary["gen_ppl_token_weighted"] is not None, "no generative perplexity")
    return {"train_s": round(train_s, 1), "ppl_eval": ppl, "sample_eval": summary,
            "checkpoint": checkpoint_summary(f"{run}/checkpoints/last.ckpt")}  # fmt: skip


def section_ddp_one_gpu(ctx: Context) -> dict:
    """A few DDP steps, then a fine-tuning step from them: its loading sanity check runs once,
    on global rank 0, on the training device (not the CPU), its verdict broadcast over NCCL."""
    run = ctx.run_dir("ddp")
    ddp = ["strategy=ddp", "strategy.force=true"]
    main_py(ctx, run, *ddp, "trainer.max_steps=4")
    pretrained = f"training.from_pretrained={run}/checkpoints/last.ckpt"
    with logged("bd3lms") as lines:
        main_py(ctx, ctx.run_dir("ddp_finetune"), *ddp, "trainer.max_steps=1", pretrained)
    sanity = [line for line in lines if "loading sanity check" in line]
    on_device = len(sanity) == 1 and f" on {ctx.device.type}" in sanity[0]
    check(on_device, f"finetune_sanity_on_device: not one check on {ctx.device.type}: {sanity}")
    return {"checkpoint": checkpoint_summary(f"{run}/checkpoints/last.ckpt"),
            "finetune_sanity_on_device": sanity[0]}  # fmt: skip


def section_fsdp_one_gpu(ctx: Context) -> dict:
    run = ctx.run_dir("fsdp")
    main_py(ctx, run, "strategy=fsdp", "training.ema=0", "trainer.max_steps=4")
    summary = checkpoint_summary(f"{run}/checkpoints/last.ckpt")
    check(summary["global_step"] == 4, str(summary))
    main_py(ctx, run, "mode=ppl_eval", "training.ema=0",
            f"eval.checkpoint_path={run}/checkpoints/last.ckpt")  # fmt: skip
    return {"checkpoint": summary, "ppl_eval": read_json(os.path.join(run, "ppl_eval.json"))}


def section_fp16(ctx: Context) -> dict:
    run = ctx.run_dir("fp16")
    fp16 = "trainer.precision=16-mixed"
    main_py(ctx, run, fp16, "trainer.max_steps=4")
    summary = checkpoint_summary(f"{run}/checkpoints/last.ckpt")
    main_py(ctx, run, fp16, "mode=ppl_eval", f"eval.checkpoint_path={run}/checkpoints/last.ckpt")
    ppl = read_json(os.path.join(run, "ppl_eval.json"))
    check(ppl["precision"] == "16-mixed" and ppl["nll"] == ppl["nll"], str(ppl))
    return {"checkpoint": summary, "ppl_eval": ppl}


def section_compile(ctx: Context) -> dict:
    run = ctx.run_dir("compile")
    start = time.perf_counter()
    main_py(ctx, run, "training.compile=true", "trainer.max_steps=4")
    return {"train_with_compile_s": round(time.perf_counter() - start, 1),
            "checkpoint": checkpoint_summary(f"{run}/checkpoints/last.ckpt")}  # fmt: skip


def section_text8_crop(ctx: Context) -> dict:
    run = ctx.run_dir("text8_crop")
    source = ensure_text8(ctx)
    main_py(ctx, run, *TEXT8, f"data.source={source}", "trainer.max_steps=2")
    return {"checkpoint": checkpoint_summary(f"{run}/checkpoints/last.ckpt")}


def section_bench_train(ctx: Context) -> dict:
    import train as train_benchmark

    out = os.path.join(ctx.out, "train_gpu.json" if not ctx.cpu else "train_cpu.json")
    if ctx.cpu:
        args = ["--device", "cpu", "--shapes", "toy", "--variants", "mdlm,bd3lm4", "--reps",
                "1", "--baseline", "--no-memory"]  # fmt: skip
    else:
        backends = "sdpa,flex,flash_attn" if importable("flash_attn") else "sdpa,flex"
        args = ["--device", "cuda", "--shapes", "small_L1024", "--backends", backends,
                "--variants", "mdlm,bd3lm4", "--bf16", "--baseline", "--reps", "3"]  # fmt: skip
    train_benchmark.main([*args, "--json", out])
    return read_json(out)


def section_bench_sample(ctx: Context) -> dict:
    import sample as sample_benchmark

    out = os.path.join(ctx.out, "sample_gpu.json" if not ctx.cpu else "sample_cpu.json")
    if ctx.cpu:
        only = "bd3lm4_kv_b1_n64,bd3lm4_nokv_b1_n64,ar_kv_b1_n64"
        args = ["--device", "cpu", "--toy", "--baseline", "--only", only]
    else:
        only = "bd3lm4_kv_b1_n1024,bd3lm4_kv_b16_n1024,bd3lm4_nokv_b1_n1024,ar_kv_b1_n1024"
        args = ["--device", "cuda", "--baseline", "--only", only]
    sample_benchmark.main([*args, "--json", out])
    return read_json(out)
