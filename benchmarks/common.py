"""Shared pieces of the training and sampling benchmarks.

Imports only torch and the model code (models/, algorithms/, samplers.py, noise_schedule.py),
so the GPU machine (torch only: no Lightning, Hydra or datasets) can run it.
`TorchSamplingModel` mirrors `diffusion.Diffusion.network` and `diffusion.SamplingModel`
(without prompt padding) for that path; on a machine with Lightning the sampling benchmark
uses the shipped `diffusion.SamplingModel` instead.
"""

from __future__ import annotations

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

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from algorithms.ar import Autoregressive, ar_log_probs  # noqa: E402
from algorithms.base import (  # noqa: E402
    process_sigma,
    sigma_from_p,
    subs_log_probs,
    subs_log_probs_reference,
)
from algorithms.masked_diffusion import MaskedDiffusion  # noqa: E402
from models.attention import AttentionMask  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.kv_cache import KVCache  # noqa: E402
from models.network import BackboneNetwork  # noqa: E402
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
    structured: bool = False,
) -> DiT:
    """A DiT with the issue-7 switches on (optimised) or off (baseline). init_std: random
    weights everywhere (zero-initialised layers would make every logit 0)."""
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
        structured_attention=structured,
        prune_last_layer=optimised,
    )
    model = DiT(config)
    if init_std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    return model


def build_algorithm(name: str, seq_len: int, block: int | None, mask_id: int):
    if name == "ar":
        return Autoregressive(mask_id=mask_id, seq_len=seq_len)
    return MaskedDiffusion(
        noise=LogLinear(),
        mask_id=mask_id,
        seq_len=seq_len,
        block_size=seq_len if block is None else block,
        cross_attn=name == "bd3lm",
        ignore_bos=False,
        time_conditioning=False,
        antithetic=True,
    )


class TorchSamplingModel:
    """samplers.SamplingModel over a bare DiT (diffusion.SamplingModel without Lightning and
    without prompt padding). reference_subs: the baseline's SUBS implementation."""

    def __init__(self, backbone: DiT, algorithm, window: int, reference_subs: bool = False):
        self.backbone, self.algorithm, self.window = backbone, algorithm, window
        self.is_ar = isinstance(algorithm, Autoregressive)
        self.network = BackboneNetwork(backbone)
        self.subs = subs_log_probs_reference if reference_subs else subs_log_probs

    def new_cache(self, batch_size: int, block_size: int) -> KVCache:
        window = self.window - self.window % block_size
        device = next(self.backbone.parameters()).device
        return self.backbone.new_kv_cache(batch_size, window, block_size, device)

    def _sigma(self, t: Tensor, batch: int, device) -> Tensor | None:
        if self.is_ar:
            return None
        sigma = sigma_from_p(t[:, None].float(), self.algorithm.noise_sigma_max)
        return process_sigma(sigma, self.algorithm.time_conditioning).to(device)

    def _to_logprobs(self, logits: Tensor, x_last: Tensor) -> Tensor:
        if self.is_ar:
            return ar_log_probs(logits, self.algorithm.mask_id)
        return self.subs(logits, x_last, self.algorithm.mask_id)

    def _run_cached(self, x, t, cache, commit, outputs):
        K, S = cache.block_size, x.shape[1]
        positions = torch.arange(S - K, S, device=x.device)
        return self.backbone(
            x[:, -K:], self._sigma(t, x.shape[0], x.device), positions, AttentionMask(),
            outputs, cache, commit,
        )  # fmt: skip

    def logprobs(self, x, t, num_last, key_valid, cache, commit=False) -> Tensor:
        if key_valid is not None:
            raise ValueError("TorchSamplingModel: prompts with padding are not supported")
        if cache is not None:
            logits = self._run_cached(x, t, cache, commit, None)
            if commit:
                cache.advance()
            return self._to_logprobs(logits[:, -num_last:], x[:, -num_last:])
        S = x.shape[1]
        predicate = self.algorithm.sample_mask(self.window, False)
        mask = self.network.mask(predicate, S, x.device)
        positions = self.network.positions(S, 1, x.device)
        outputs = slice(S - num_last, None)
        logits = self.backbone(x, self._sigma(t, x.shape[0], x.device), positions, mask, outputs)
        return self._to_logprobs(logits, x[:, -num_last:])

    def commit(self, x, key_valid, cache) -> None:
        clean = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self._run_cached(x, clean, cache, True, slice(0, 0))
        cache.advance()


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
