"""The GPU acceptance run: every GPU-only path checked in one time-boxed run, correctness first
and benchmarks last. `benchmarks/gpu.sh` installs what the machine lacks from the bundle and
calls this script; the results go to OUT/acceptance.json, rewritten after every section so a
run cut short still reports what finished.

    python benchmarks/acceptance.py [--cpu] [--out DIR] [--bundle DIR] [--only A,B] [--budget S]
    python benchmarks/acceptance.py --prepare DIR    # on a CPU machine: the bundle's data

Sections (GPU: each in a process of its own with its time box; --cpu: in process unless
--isolate, toy sizes, GPU-only sections listed as `skipped: <reason>`):
  environment      versions, the card, bf16 / flex / flash-attn availability
  flex_vs_sdpa     BD3-LM training loss and gradients, flex against sdpa, float32 and bf16
  kv_cache         cached against recomputed log-probabilities (BD3-LM, AR), float32 and bf16
  judge_float32    the generative-perplexity judge scores in float32 under bf16 autocast
  pipeline         train -> ppl_eval -> sample_eval through `python main.py` (precision auto)
  ddp_one_gpu      a few steps with the DDP strategy forced on one GPU; a fine-tuning step
                   from them whose loading sanity check runs on the GPU, on rank 0
  fsdp_one_gpu     FSDP with training.ema=0: wrapping, mixed precision, checkpoint save + load
  fp16             trainer.precision=16-mixed training and evaluation
  compile          training.compile=true (inductor on CUDA)
  text8_crop       data=text8-crop (the crop drawn on the step generator's device)
  bench_train      benchmarks/train.py at the paper's small shape, with --baseline
  bench_sample     benchmarks/sample.py, with --baseline

The bundle (scripts for it: benchmarks/gpu_bundle.sh) holds the wheels the GPU machine may lack
(hydra-core, omegaconf, antlr4) and, under DIR/cache, the tokenizer and token caches these
sections read (so `datasets` is never needed there), a tiny judge and a synthetic text8.
Numbers in the JSON are what each section measured; `ok` is false when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:  # after the project (benchmark script names must not shadow it)
    sys.path.append(HERE)
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

TOTAL_BUDGET_S = 300
OUT_OF_TIME = "out of time"
TEXT8_CHARS = 60_000  # the synthetic text8: 20k characters per split
TEXT8_HELD_OUT = 20_000


@dataclasses.dataclass
class Context:
    cpu: bool  # toy sizes, GPU-only sections skipped
    out: str  # the reports only: acceptance.json and the benchmarks' JSON (few files)
    bundle: str  # holds cache/ (BD3LMS_CACHE), judge/, text8/
    work: str  # run directories, per-section records and logs

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.cpu else "cuda")

    @property
    def cache(self) -> str:
        return os.path.join(self.bundle, "cache")

    def run_dir(self, name: str) -> str:
        path = os.path.join(self.work, "runs", name)
        os.makedirs(path, exist_ok=True)
        return path


class SectionTimeout(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def main_py(ctx: Context, run_dir: str, *overrides: str, subprocess_run: bool = False) -> None:
    """One main.py run: `python main.py` (subprocess_run, on the GPU) or main.run in process.
    A failure raises with the run's last lines."""
    args = ["experiment=smoke", *overrides]
    if not ctx.cpu:  # one GPU: on a multi-GPU node Lightning would otherwise launch more ranks
        args.append("trainer.devices=1")
    if subprocess_run and not ctx.cpu:
        env = {**os.environ, "BD3LMS_CACHE": ctx.cache, "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, os.path.join(ROOT, "main.py"), *args, f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
            raise RuntimeError(f"main.py {' '.join(overrides)} failed:\n{tail}")
        return
    import main

    os.environ["BD3LMS_CACHE"] = ctx.cache
    main.run(main.compose(args, run_dir), run_dir)


@contextlib.contextmanager
def logged(name: str):
    """The messages (INFO and up) that logger `name` emits inside the block, as a list."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def checkpoint_summary(path: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    names = list(ckpt["state_dict"])
    finite = all(
        torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point()
    )
    check(finite, f"{path}: non-finite weights")
    clean = not any("_fsdp_wrapped_module" in n or "_orig_mod" in n for n in names)
    check(clean, f"{path}: wrapper prefixes in parameter names")
    return {"global_step": ckpt["global_step"], "tensors": len(names)}


def random_backbone(width, layers, heads, vocab, backend, causal=False, seed=0):
    from models.dit import DiT, DiTConfig

    torch.manual_seed(seed)
    config = DiTConfig(
        vocab_size=vocab, hidden_size=width, cond_dim=min(128, width), n_blocks=layers,
        n_heads=heads, dropout=0.0, causal=causal, adaln=not causal, attn_backend=backend,
    )  # fmt: skip
    model = DiT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def masked_diffusion(seq_len: int, block_size: int, mask_id: int, ignore_bos: bool):
    """The BD3-LM objective (two-stream input, no time conditioning, antithetic t)."""
    from algorithms.masked_diffusion import MaskedDiffusion
    from noise_schedule import LogLinear

    return MaskedDiffusion(
        LogLinear(), mask_id, seq_len, block_size, cross_attn=True, ignore_bos=ignore_bos,
        time_conditioning=False, antithetic=True,
    )  # fmt: skip


class SameTrajectory:
    """Wraps a cached ModelDenoiser: every denoising call also computes the uncached
    log-probabilities of the same input, and those in float32 (autocast off), so the cache is
    compared with recomputation along one trajectory even where rounding would let two
    sampling runs diverge. `pairs`: (cached, recomputed, float32) per call."""

    def __init__(self, model):
        self.model, self.pairs, self.cache = model, [], None
        self.time_conditioned = getattr(model, "time_conditioned", True)  # DDPM reuse as inside

    def logprobs(self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False,
                 rows=None):  # fmt: skip
        out = self.model.logprobs(x, t, num_last, key_valid, cache, commit, commit_previous, rows)
        fresh = self.model.logprobs(x, t, num_last, key_valid, None, rows=rows)
        with torch.autocast(x.device.type, enabled=False):
            exact = self.model.logprobs(x, t, num_last, key_valid, None, rows=rows)
        self.pairs.append((out, fresh, exact))
        return out

    def commit(self, x, key_valid, cache):
        self.model.commit(x, key_valid, cache)

    def new_cache(self, batch_size, block_size):
        self.cache = self.model.new_cache(batch_size, block_size)
        return self.cache

    def worst(self) -> tuple[float, float]:
        """Largest |cached - recomputed| and |cached - float32| relative to 1 + |log p| over
        finite SUBS entries (the -1e6 carry-over entries must agree exactly)."""
        worst_cache = worst_exact = 0.0
        for cached, fresh, exact in self.pairs:
            finite = exact > -1e3
            check(torch.equal(cached <= -1e3, exact <= -1e3), "carry-over entries differ")
            scale = 1 + exact[finite].abs()
            worst_cache = max(worst_cache, ((cached - fresh)[finite].abs() / scale).max().item())
            worst_exact = max(worst_exact, ((cached - exact)[finite].abs() / scale).max().item())
        return worst_cache, worst_exact


def ensure_judge(ctx: Context) -> str:
    """A tiny random GPT-2 judge with the embedded corpus's tokenizer, saved once."""
    path = os.path.join(ctx.bundle, "judge")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import GPT2Config, GPT2LMHeadModel

    import dataloader
    import main

    os.environ["BD3LMS_CACHE"] = ctx.cache
    vocab = dataloader.get_vocab(main.compose(["experiment=smoke"], ctx.run_dir("judge")).data)
    vocab.tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=vocab.size,
                        bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def ensure_text8(ctx: Context) -> str:
    """A synthetic text8 (random words over 'a'..'z' and space) in the bundle."""
    path = os.path.join(ctx.bundle, "text8")
    target = os.path.join(path, "text8")
    if not os.path.isfile(target):
        os.makedirs(path, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = []
        while sum(len(w) + 1 for w in words) < TEXT8_CHARS:
            n = int(torch.randint(1, 9, (1,), generator=gen))
            idx = torch.randint(0, 26, (n,), generator=gen).tolist()
            words.append("".join(letters[i] for i in idx))
        with open(target, "w") as f:
            f.write(" ".join(words)[:TEXT8_CHARS])
    return os.path.relpath(path, ROOT)  # a relative path: the caches' names hold it


TEXT8 = ["data=text8-crop", f"data.held_out_chars={TEXT8_HELD_OUT}", "model.length=32"]


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
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


def numerics_shape(ctx: Context) -> dict:
    if ctx.cpu:
        return dict(width=32, layers=2, heads=2, L=32, K=4, vocab=97, batch=2)
    return dict(width=256, layers=4, heads=4, L=256, K=4, vocab=4097, batch=8)


def section_flex_vs_sdpa(ctx: Context) -> dict:
    """The same weights, x_0 and noise under sdpa (the structured chunked path) and flex (a
    compiled BlockMask on CUDA): loss and every gradient, float32 and bf16 autocast. CPU: the
    forward loss only (flex attention has no CPU backward)."""
    from models.network import BackboneNetwork

    s, device = numerics_shape(ctx), ctx.device
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, s["vocab"] - 1, (s["batch"], s["L"]), generator=gen).to(device)
    ones = torch.ones(s["batch"], s["L"], device=device)
    eps = (torch.tensor(1e-3, device=device), torch.tensor(1.0, device=device))
    algorithm = masked_diffusion(s["L"], s["K"], s["vocab"] - 1, ignore_bos=False)
    result = {}
    for dtype in ("float32", "bfloat16"):
        losses, grads = {}, {}
        for backend in ("sdpa", "flex"):
            backbone = random_backbone(s["width"], s["layers"], s["heads"], s["vocab"], backend)
            backbone = backbone.to(device)
            network = BackboneNetwork(backbone)
            step_gen = torch.Generator(device=device).manual_seed(1)
            backward = not (ctx.cpu and backend == "flex")
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16")
            with autocast, torch.set_grad_enabled(backward):
                loss = algorithm.loss(network, x0, ones, *eps, train=True, generator=step_gen).loss
            losses[backend] = loss.item()
            if backward:
                loss.backward()
                grads[backend] = torch.cat([p.grad.flatten() for p in backbone.parameters()])
        rel = abs(losses["flex"] - losses["sdpa"]) / abs(losses["sdpa"])
        row = {"loss_sdpa": losses["sdpa"], "loss_flex": losses["flex"], "loss_rel_diff": rel}
        tol = 1e-4 if dtype == "float32" else 2e-2
        check(rel < tol, f"{dtype}: flex loss differs from sdpa by {rel:.2e} (> {tol})")
        if "flex" in grads:
            g_rel = ((grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item()
            row["grad_rel_diff"] = g_rel
            g_tol = 1e-3 if dtype == "float32" else 5e-2
            check(g_rel < g_tol, f"{dtype}: flex gradients differ by {g_rel:.2e} (> {g_tol})")
        else:
            row["grad_rel_diff"] = "skipped: flex attention has no CPU backward"
        result[dtype] = row
    return result


def section_kv_cache(ctx: Context) -> dict:
    """Cached sampling against recomputation along one trajectory, within and beyond the
    window (the ring wraps), BD3-LM K=4 and AR, float32 and bf16 autocast."""
    import sampling
    from algorithms.ar import Autoregressive
    from sampling import ModelDenoiser

    window, vocab, device = (16 if ctx.cpu else 64), 257, ctx.device
    result = {}
    for name, block in (("bd3lm4", 4), ("ar", 1)):
        backbone = random_backbone(64, 2, 4, vocab, "sdpa", causal=block == 1).to(device).eval()
        if block == 1:
            algorithm = Autoregressive(mask_id=vocab - 1, seq_len=window)
        else:
            algorithm = masked_diffusion(window, block, vocab - 1, ignore_bos=True)
        cfg = sampling.SamplerConfig(
            length=int(2.5 * window), block_size=block, num_steps=8, context=window, bos_id=0,
            mask_id=vocab - 1, eos_id=0, kv_cache=True, reject_low_entropy=False,
        )  # fmt: skip
        sampler = sampling.ar_sample if block == 1 else sampling.semi_ar_sample
        for dtype in ("float32", "bfloat16"):
            recorder = SameTrajectory(ModelDenoiser(backbone, algorithm, window))
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16")
            with torch.no_grad(), autocast:
                sampler(recorder, 4, cfg, torch.Generator().manual_seed(0), device)
            worst_cache, worst_exact = recorder.worst()
            tol = 1e-4 if dtype == "float32" else 3e-2
            check(worst_cache < tol, f"{name} {dtype}: cache vs recomputation {worst_cache:.2e}")
            result[f"{name}_{dtype}"] = {
                "calls": len(recorder.pairs),
                "cache_dtype": str(recorder.cache.k.dtype),
                "max_rel_cache_vs_recompute": worst_cache,
                "max_rel_vs_float32": worst_exact,
            }
    return result


def section_judge_float32(ctx: Context) -> dict:
    from metrics import GenerativePerplexity

    judge = GenerativePerplexity(ensure_judge(ctx), ctx.device)
    text = "KING HENRY. Once more unto the breach, dear friends, once more; or close the wall up"
    exact = judge.score(text)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        under_bf16 = judge.score(text)
    check(under_bf16 == exact, f"judge under bf16 autocast {under_bf16} != float32 {exact}")
    dtype = next(judge._model.parameters()).dtype
    check(dtype == torch.float32, f"judge weights in {dtype}")
    return {"nll_sum": exact[0], "tokens": exact[1], "equal_under_bf16_autocast": True}


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
        backends = "sdpa,flex,flash_attn" if _importable("flash_attn") else "sdpa,flex"
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


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    run: object
    seconds: int  # time box on the GPU
    gpu_only: str | None = None  # the reason it is skipped with --cpu


SECTIONS = [  # time boxes (s) summing to TOTAL_BUDGET_S
    Section("environment", section_environment, 10),
    Section("flex_vs_sdpa", section_flex_vs_sdpa, 30),
    Section("kv_cache", section_kv_cache, 15),
    Section("judge_float32", section_judge_float32, 10),
    Section("pipeline", section_pipeline, 45),
    Section("ddp_one_gpu", section_ddp_one_gpu, 25, "DDP forced on one GPU (NCCL)"),
    Section("fsdp_one_gpu", section_fsdp_one_gpu, 25, "Lightning has no FSDP on CPU"),
    Section("fp16", section_fp16, 20, "no float16 autocast training on CPU"),
    Section("compile", section_compile, 35, "inductor on CUDA (CPU compile: test_compile.py)"),
    Section("text8_crop", section_text8_crop, 15),
    Section("bench_train", section_bench_train, 45),
    Section("bench_sample", section_bench_sample, 25),
]


# ----------------------------------------------------------------------------------------------
# Running sections
# ----------------------------------------------------------------------------------------------
def run_in_process(section: Section, ctx: Context, seconds: int) -> dict:
    """Run one section here, time-boxed by SIGALRM; -> its record."""

    def alarm(signum, frame):
        raise SectionTimeout(f"timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, seconds))
    start = time.perf_counter()
    try:
        record = {"status": "ok", "result": section.run(ctx)}
    except SectionTimeout as err:
        record = {"status": "timeout", "error": str(err)}
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the run goes on
        lines = traceback.format_exception(type(err), err, err.__traceback__)
        record = {"status": "failed", "error": "".join(lines)[-4000:]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def run_in_child(section: Section, ctx: Context, seconds: int) -> dict:
    """Run one section in a process of its own (a CUDA fault cannot take the others down)."""
    path = os.path.join(ctx.work, "sections", f"{section.name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--section", section.name, "--out", ctx.out,
           "--work", ctx.work, "--bundle", ctx.bundle, "--seconds", str(seconds)]  # fmt: skip
    start = time.perf_counter()
    log_path = os.path.join(ctx.work, "sections", f"{section.name}.log")
    with open(log_path, "w") as log:
        try:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           timeout=seconds + 15)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"killed after {seconds + 15} s",
                    "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if not os.path.exists(path):
        with open(log_path) as f:
            tail = f.read()[-3000:]
        return {"status": "failed", "error": f"no result; log tail:\n{tail}",
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    return read_json(path)


def write_report(ctx: Context, report: dict) -> None:
    report["ok"] = all(
        r["status"] == "ok" or r["status"].startswith("skipped")
        for r in report["sections"].values()
    )
    path = os.path.join(ctx.out, "acceptance.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


# The CPU dry run's time boxes are the GPU boxes times this: the toy sections are small, but a
# shared 2-core machine (CI, the test suite's parallel workers) can run them several times slower.
CPU_SLACK = 4


def run_all(ctx: Context, only: list[str] | None, budget: int, isolate: bool) -> dict:
    report = {"mode": "cpu dry run" if ctx.cpu else "gpu", "budget_s": budget, "sections": {}}
    scale = CPU_SLACK if ctx.cpu else 1
    deadline = time.monotonic() + budget * scale
    for section in SECTIONS:
        if only and section.name not in only:
            continue
        left = int(deadline - time.monotonic())
        if ctx.cpu and section.gpu_only:
            record = {"status": f"skipped: {section.gpu_only}"}
        elif left < 5:
            record = {"status": f"skipped: {OUT_OF_TIME} (budget {budget} s)"}
        else:
            seconds = min(section.seconds * scale, left)
            runner = run_in_child if isolate else run_in_process
            record = runner(section, ctx, seconds)
        report["sections"][section.name] = record
        print(f"[acceptance] {section.name}: {record['status']} ({record.get('seconds', 0)} s)",
              flush=True)  # fmt: skip
        write_report(ctx, report)
    return report


def prepare(ctx: Context) -> None:
    """On a CPU machine with the full requirements: build the tokenizer and token caches that
    the GPU sections read, the judge and the synthetic text8, under ctx.bundle."""
    import dataloader
    import main

    os.environ["BD3LMS_CACHE"] = ctx.cache
    for overrides in ([], [*TEXT8, f"data.source={ensure_text8(ctx)}"]):
        cfg = main.compose(["experiment=smoke", *overrides], ctx.run_dir("prepare"))
        vocab = dataloader.get_vocab(cfg.data)
        for split in ("train", "valid"):
            dataloader.get_dataset(cfg.data, vocab, split, int(cfg.model.length))
    ensure_judge(ctx)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU at toy sizes")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--bundle", default=os.path.join(ROOT, ".gpu_bundle"))
    parser.add_argument("--work", default=None, help="runs and logs (default: a new temp dir)")
    parser.add_argument("--only", default=None, help="comma-separated section names")
    parser.add_argument("--budget", type=int, default=TOTAL_BUDGET_S, help="seconds in all")
    parser.add_argument(
        "--isolate", action="store_true", help="each section in its own process (GPU default)"
    )
    parser.add_argument("--prepare", default=None, metavar="DIR", help="build the bundle data")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # a child's section
    parser.add_argument("--seconds", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bd3lms-acceptance-"))
    if args.prepare:
        prepare(Context(cpu=True, out=work, bundle=args.prepare, work=work))
        return None
    cpu = args.cpu or not torch.cuda.is_available()
    bundle = os.path.abspath(args.bundle)
    ctx = Context(cpu=cpu, out=os.path.abspath(args.out), bundle=bundle, work=work)
    os.makedirs(ctx.out, exist_ok=True)
    if args.section:  # a child process of run_in_child
        section = next(s for s in SECTIONS if s.name == args.section)
        record = run_in_process(section, ctx, args.seconds or section.seconds)
        path = os.path.join(ctx.work, "sections", f"{section.name}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=2, default=str)
        return record
    only = args.only.split(",") if args.only else None
    with contextlib.suppress(KeyboardInterrupt):
        report = run_all(ctx, only, args.budget, isolate=args.isolate or not cpu)
        print(json.dumps({k: v["status"] for k, v in report["sections"].items()}, indent=1))
        return report
    return None


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result is None or result.get("ok") else 1)
