"""The acceptance run's numerical sections on random weights, in process (no main.py): flex
attention against SDPA on the BD3-LM training loss and gradients, the KV cache against
recomputation along one sampling trajectory, the judge in float32 under bf16 autocast.
"""

from __future__ import annotations

import torch

from benchmarks.acceptance_common import Context, check, ensure_judge, masked_diffusion


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
