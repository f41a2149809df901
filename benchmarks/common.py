"""Shared pieces of the training and sampling benchmarks.

Imports only torch and the model code (models/, algorithms/, sampling/, registry/,
noise_schedule.py), so the GPU machine (torch only: no Lightning, Hydra or datasets) can run it.
Sampling goes through `sampling.denoiser.ModelDenoiser` (torch only as well).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import baselines  # noqa: E402
import torch  # noqa: E402

import registry  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from noise_schedule import LogLinear  # noqa: E402

# variant -> (algorithm name, block size or None for MDLM/AR)
TRAIN_VARIANTS = {"ar": ("ar", 1), "mdlm": ("mdlm", None), "bd3lm4": ("bd3lm", 4)}
TRAIN_VARIANTS["bd3lm16"] = ("bd3lm", 16)


def build_dit(
    vocab: int,
    width: int,
    layers: int,
    heads: int,
    causal: bool,
    backend: str = "sdpa",
    optimised: bool = True,
    seed: int = 0,
    init_std: float | None = None,
) -> DiT:
    """A DiT; optimised=False: the last block unpruned (baselines.unpruned; pair it with
    baselines.DenseAttentionNetwork for the dense SDPA mask). init_std: random weights everywhere
    (zero-initialised layers would make every logit 0)."""
    torch.manual_seed(seed)
    config = DiTConfig(
        vocab_size=vocab,
        hidden_size=width,
        cond_dim=min(128, width),
        n_blocks=layers,
        n_heads=heads,
        dropout=0.0,
        causal=causal,
        adaln=not causal,
        attn_backend=backend,
    )
    model = DiT(config) if optimised else baselines.unpruned(DiT(config))
    if init_std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    return model


def build_algorithm(
    name: str, seq_len: int, block: int | None, mask_id: int, optimised: bool = True
):
    """The objective `name` (ar, mdlm or bd3lm with K = block) by its registry entry, without
    BOS handling or time conditioning. optimised=False: the masked-diffusion loss computes
    logits and SUBS at every position (the reference's dense path, baselines.DenseNELBO)
    instead of at the masked x_t positions only."""
    algo = {"name": name, "cross_attn": name == "bd3lm"}
    training = {"antithetic_sampling": True, "resample": False, "eval_nll": True}
    objective = registry.build_objective(
        algo, training, LogLinear(), mask_id, seq_len, seq_len if block is None else block
    )
    if optimised or name == "ar":
        return objective
    fields = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)}
    return baselines.DenseNELBO(**fields)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def now() -> float:
    return time.perf_counter()


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
        print(f"wrote {path}")


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss it is reset by exec, so a
    spawned worker does not report its parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
