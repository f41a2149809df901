"""What the GPU acceptance sections share (benchmarks/acceptance.py runs them): the run's
`Context`, `check` and `SectionSkipped`, `main_py` (one main.py run, in process or as a
subprocess), log capture, checkpoint summaries and the bundle's data that the sections build
once (the tiny judge, the synthetic text8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT8_CHARS = 60_000  # the synthetic text8: 20k characters per split
TEXT8_HELD_OUT = 20_000
TEXT8 = ["data=text8-crop", f"data.held_out_chars={TEXT8_HELD_OUT}", "model.length=32"]


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


class SectionSkipped(Exception):
    """Raised by a section that cannot run on this machine (a package it needs is missing);
    the message, one line, says why and becomes the section's `skipped: ...` status."""


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


def masked_diffusion(seq_len: int, block_size: int, mask_id: int, ignore_bos: bool):
    """The BD3-LM objective (two-stream input, no time conditioning, antithetic t)."""
    from algorithms.masked_diffusion import MaskedDiffusion
    from noise_schedule import LogLinear

    return MaskedDiffusion(
        LogLinear(), mask_id, seq_len, block_size, cross_attn=True, ignore_bos=ignore_bos,
        time_conditioning=False, antithetic=True,
    )  # fmt: skip


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


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
