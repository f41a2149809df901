"""The acceptance run's section for the pretrained-causal-LM backbone (models.hf_causal,
`HFCausalLM`) on the GPU, on a tiny random Llama built here (transformers' LlamaConfig and
LlamaForCausalLM; nothing downloaded), checked in this order (a failure keeps the results
before it):

- its FSDP units (the registry's `fsdp_units`, read from the built model): exactly the decoder
  layer class, one unit per layer;
- the 2L pass [x_t ; x_0] (BD3-LM's block-diffusion mask, both clean-stream modes): logits and
  every parameter's gradient, flex attention against SDPA, float32 and bf16 autocast;
- one bf16 training step of the BD3-LM objective through `BackboneNetwork` (the training
  path; flex on the GPU): the loss and the gradients finite, the AdamW step leaves the weights
  finite; then the same step with gradient checkpointing: the same loss and gradients.

--cpu: the same at toy size, flex forward only (flex attention has no CPU backward), the
training step on SDPA. transformers is not in the bundle (the GPU image has its own, which
may be older than requirements.txt's); where it is missing the section is skipped, saying so.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.acceptance_common import (
    Context,
    SectionSkipped,
    check,
    importable,
    masked_diffusion,
)

# Relative tolerances (norm of the difference over the norm). At the GPU shape (on CPU, SDPA)
# bf16 autocast moves the logits by 3e-2 and the gradients by 6e-2 from float32; a wrong mask
# (the other clean-stream mode, K = 2 for 4) moves them by 0.3 to 0.6.
LOGITS_TOL = {"float32": 1e-4, "bfloat16": 5e-2}
GRAD_TOL = {"float32": 1e-3, "bfloat16": 1e-1}
RECOMPUTE_TOL = 1e-3  # gradient checkpointing recomputes the same forward: gradients equal


def hf_shape(ctx: Context) -> dict:
    if ctx.cpu:
        return dict(width=32, layers=2, heads=4, kv_heads=2, vocab=97, L=32, K=4, batch=2)
    return dict(width=256, layers=4, heads=4, kv_heads=2, vocab=4097, L=256, K=4, batch=8)


def tiny_llama(s: dict, seed: int = 0):
    """A random Llama (grouped-query attention, untied head) of shape `s`; weights drawn by
    transformers' own initialisation at std 0.1, so attention is far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["width"], intermediate_size=2 * s["width"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=s["L"],
        initializer_range=0.1, attention_dropout=0.0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def section_hf_causal(ctx: Context) -> dict:
    if not importable("transformers"):
        raise SectionSkipped("transformers is not installed here (models.hf_causal needs it)")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from models.backbone import backbone_spec
    from models.hf_causal import HFCausalLM

    s, device = hf_shape(ctx), ctx.device
    model = tiny_llama(s)
    mask_id = s["vocab"] - 1
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, mask_id, (s["batch"], s["L"]), generator=gen)
    xt = torch.where(torch.rand(s["batch"], s["L"], generator=gen) < 0.5, mask_id, x0)
    x0, xt = x0.to(device), xt.to(device)

    def backbone(**options) -> HFCausalLM:
        return HFCausalLM(copy.deepcopy(model), **options).to(device).train()

    result = {}  # what passed so far stays in the record if a later check fails (err.partial)
    try:
        net = backbone()
        units = backbone_spec("hf_causal").fsdp_units(net)
        check(units == {LlamaDecoderLayer}, f"FSDP units {units}, not {{LlamaDecoderLayer}}")
        count = sum(isinstance(m, LlamaDecoderLayer) for m in net.modules())
        check(count == s["layers"], f"{count} FSDP units for {s['layers']} decoder layers")
        result["fsdp_units"] = {"classes": sorted(c.__name__ for c in units), "count": count}
        result["flex_vs_sdpa"] = two_stream_flex_vs_sdpa(ctx, backbone, x0, xt, s["K"])
        result["train_step_bf16"] = bf16_train_step(ctx, backbone, x0, s, result)
    except Exception as err:
        err.partial = result
        raise
    return result


def two_stream_flex_vs_sdpa(ctx: Context, backbone, x0, xt, K: int) -> dict:
    """The x_t logits of the 2L pass (the block-diffusion mask, both clean-stream modes) and
    the gradients of their cross-entropy against x_0, flex against SDPA."""
    result = {}
    for clean_attention in ("causal", "block"):
        for dtype in ("float32", "bfloat16"):
            runs = {
                backend: _two_stream(ctx, backbone(clean_attention=clean_attention,
                                                   attn_backend=backend), x0, xt, K, dtype)
                for backend in ("sdpa", "flex")
            }  # fmt: skip
            what = f"{clean_attention} {dtype}"
            rel = _rel(runs["flex"][0], runs["sdpa"][0])
            check(rel < LOGITS_TOL[dtype], f"{what}: flex logits differ from sdpa by {rel:.2e}")
            row = {"logits_rel_diff": rel}
            if ctx.cpu:
                row["grad_rel_diff"] = "skipped: flex attention has no CPU backward"
            else:
                g_rel = _rel(runs["flex"][1], runs["sdpa"][1])
                check(g_rel < GRAD_TOL[dtype], f"{what}: flex gradients differ by {g_rel:.2e}")
                row["grad_rel_diff"] = g_rel
            result[f"{clean_attention}_{dtype}"] = row
    return result


def _two_stream(ctx: Context, net, x0, xt, K: int, dtype: str):
    """(x_t logits (B, L, V) in float32, every parameter's gradient flattened, None on CPU)."""
    from models.attention import BlockDiffusionMask

    L, device = x0.shape[1], x0.device
    backward = not ctx.cpu  # flex attention has no CPU backward: forward only there
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype != "float32")
    with autocast, torch.set_grad_enabled(backward):
        logits = net(
            torch.cat([xt, x0], dim=1), positions=torch.arange(L, device=device).repeat(2),
            mask=BlockDiffusionMask(L, K), outputs=slice(0, L),
        ).float()  # fmt: skip
    if not backward:
        return logits, None
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x0.flatten()).backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


def bf16_train_step(ctx: Context, backbone, x0, s: dict, result: dict) -> dict:
    """One BD3-LM training step under bf16 autocast through BackboneNetwork (flex on the GPU,
    SDPA on CPU): finite loss and gradients, a finite AdamW step; then the same step from the
    same weights and draws with gradient checkpointing (model.gradient_checkpointing): the same
    loss and gradients. The record grows in result["train_step_bf16"] as checks pass."""
    from models.network import BackboneNetwork

    device = x0.device
    backend = "sdpa" if ctx.cpu else "flex"
    algorithm = masked_diffusion(s["L"], s["K"], s["vocab"] - 1, ignore_bos=True)
    ones = torch.ones(x0.shape, device=device)
    eps = (torch.tensor(1e-3, device=device), torch.tensor(1.0, device=device))

    def step(net) -> tuple[float, torch.Tensor]:
        step_gen = torch.Generator(device=device).manual_seed(1)
        with torch.autocast(device.type, torch.bfloat16):
            loss = algorithm.loss(BackboneNetwork(net), x0, ones, *eps, train=True,
                                  generator=step_gen).loss  # fmt: skip
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        check(torch.isfinite(loss).item(), f"bf16 training loss {loss.item()}")
        check(torch.isfinite(grads).all().item(), "non-finite gradients in the bf16 step")
        return loss.item(), grads

    net = backbone(attn_backend=backend)
    loss, grads = step(net)
    before = [p.detach().clone() for p in net.parameters()]
    torch.optim.AdamW(net.parameters(), lr=1e-3).step()
    moved = any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    finite = all(torch.isfinite(p).all().item() for p in net.parameters())
    check(moved and finite, f"after the AdamW step: moved={moved}, finite={finite}")
    record = result["train_step_bf16"] = {
        "backend": backend, "loss": loss, "grad_norm": grads.norm().item(),
    }  # fmt: skip
    loss_ckpt, grads_ckpt = step(backbone(attn_backend=backend, gradient_checkpointing=True))
    loss_rel, g_rel = abs(loss_ckpt - loss) / abs(loss), _rel(grads_ckpt, grads)
    check(loss_rel < RECOMPUTE_TOL, f"checkpointing changed the loss: {loss_ckpt} != {loss}")
    check(g_rel < RECOMPUTE_TOL, f"checkpointing changed the gradients by {g_rel:.2e}")
    record["checkpointing_grad_rel_diff"] = g_rel
    return record
