"""The DiT backbone of BD3-LM / MDLM / AR.

A plain ``nn.Module`` with a small typed config, registered as the `dit` backbone
(models.backbone, whose `Backbone` contract it implements). It maps tokens (B, S) and a noise
level sigma (B,) to logits (B, S, V), given integer rotary positions (S,) and a materialised
attention mask, or, with a KV cache installed, the newest block at absolute positions. It knows
nothing of blocks, x_t/x_0 halves or samplers: callers pass the positions (both halves of the
training input share 0..L-1) and the mask.

Its records (`DiTConfig`, `Conditioning`, `InferenceSnapshot`) live in models.dit_types;
callers import them from here.

Parameter names follow the released checkpoints and modules are registered in the
reference's order (vocab_embed, sigma_map, rotary_emb, blocks, output_layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import AttentionMask, Rotary, apply_rotary, attend
from models.backbone import InferenceScope
from models.dit_types import Conditioning, DiTConfig, InferenceSnapshot
from models.kv_cache import KVCache

FREQ_EMBED_DIM = 256  # sinusoidal features fed to sigma_map


class LayerNorm(nn.Module):
    """Non-affine layer norm computed in float32 (autocast off), times a learned weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight[None, None, :]


def modulate(x: Tensor, shift: Tensor, one_plus_scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with 1 + scale formed once in Conditioning."""
    return x * one_plus_scale + shift


class EmbeddingLayer(nn.Module):
    """Token embedding as a raw (V, D) parameter, Kaiming-uniform initialised (a = sqrt 5)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding[x]


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> (B, C): 256 sinusoidal features [cos | sin], then Linear-SiLU-Linear."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQ_EMBED_DIM, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )

    @staticmethod
    def features(sigma: Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = 10_000.0):
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period)
            * torch.arange(0, half, dtype=torch.float32, device=sigma.device)
            / half
        )
        args = sigma[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(self.features(sigma))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with optional adaLN modulation.

    Without adaLN (AR) it is a plain pre-LN block: gates are 1 and modulation is skipped.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.n_heads
        self.backend = config.attn_backend
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * dim, dim, bias=True),
        )
        self.dropout = nn.Dropout(config.dropout)
        if config.adaln:
            self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * dim, bias=True)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)
        else:
            self.adaLN_modulation = None

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """c: (B, C) -> the block's six (B, 1, D) adaLN vectors (see Conditioning)."""
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        return shift_msa, 1 + scale_msa, gate_msa, shift_mlp, 1 + scale_mlp, gate_mlp

    def forward(
        self,
        h: Tensor,
        mod: tuple[Tensor, ...] | None,
        cos: Tensor,
        sin: Tensor,
        mask: AttentionMask,
        cache: tuple | None = None,
        num_queries: int | None = None,
    ) -> Tensor:
        """h: (B, S, D), mod: this block's Conditioning entry, or the conditioning vector c
        (B, C) it is computed from here (None without adaLN) ->
        (B, S, D). cache: (kv_cache, layer, commit, block_valid) to attend over cached keys
        instead of applying `mask`. num_queries: only the first n positions are needed
        downstream: keys/values are computed for all S, the rest of the block for those n
        only, and the result is (B, n, D)."""
        if isinstance(mod, Tensor):
            mod = self.modulation(mod)
        if mod is not None:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
            a = modulate(self.norm1(h), shift_msa, scale_msa)
        else:
            a = self.norm1(h)
        n = num_queries
        if n is None or n >= h.shape[1]:
            qkv = rearrange(
                self.attn_qkv(a), "b s (three h d) -> b s three h d", three=3, h=self.n_heads
            )
            q, k, v = qkv.unbind(dim=2)
            cos_q, sin_q = cos, sin
        else:  # Q for the first n positions, K/V for all (the weight rows are [Q | K | V])
            dim = h.shape[-1]
            weight = self.attn_qkv.weight
            q = F.linear(a[:, :n], weight[:dim]).unflatten(-1, (self.n_heads, -1))
            kv = F.linear(a, weight[dim:])
            k, v = rearrange(kv, "b s (two h d) -> b s two h d", two=2, h=self.n_heads).unbind(2)
            cos_q, sin_q = cos[:, :n], sin[:, :n]
            h = h[:, :n]
        with torch.autocast(device_type=h.device.type, enabled=False):
            q = apply_rotary(q, cos_q.to(q.dtype), sin_q.to(q.dtype))
            k = apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        q, k, v = (rearrange(x, "b s h d -> b h s d") for x in (q, k, v))
        if cache is None:
            att = attend(q, k, v, mask, self.backend)
        else:
            kv_cache, layer, commit, block_valid = cache
            att = kv_cache.attend(layer, q, k, v, commit, block_valid)
        att = rearrange(att, "b h s d -> b s (h d)")
        if mod is None:
            h = h + self.dropout(self.attn_out(att))
            return h + self.dropout(self.mlp(self.norm2(h)))
        h = h + gate_msa * self.dropout(self.attn_out(att))
        return h + gate_mlp * self.dropout(self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp)))


class DiTFinalLayer(nn.Module):
    """LayerNorm, optional adaLN (shift first, then scale), zero-initialised linear to V."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, config.vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if config.adaln:
            self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * dim, bias=True)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)
        else:
            self.adaLN_modulation = None

    def modulation(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """c: (B, C) -> (shift, 1 + scale), each (B, 1, D)."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return shift, 1 + scale

    def forward(
        self,
        h: Tensor,
        mod: tuple[Tensor, Tensor] | None,
        outputs: Tensor | slice | None,
        head_t: Tensor | None = None,
    ) -> Tensor:
        """h: (B, S, D), mod: (shift, 1 + scale) or None without adaLN -> logits (B, S', V) for a
        slice of positions, (N, V) for the N positions of a boolean (B, S) selection, or
        (B * k, V) for a long (B, k) tensor of positions (see DiT.forward). head_t: see
        DiT.transposed_head."""
        h = self.norm_final(h)
        if mod is not None:
            h = modulate(h, *mod)
        if isinstance(outputs, slice):
            h = h[:, outputs]
        elif outputs is not None and outputs.dtype == torch.bool:
            h = h[:, : outputs.shape[1]][outputs]
        elif outputs is not None:  # (B, k) positions: a gather, no host sync
            h = h.gather(1, outputs[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)
        return self._project(h, head_t)

    def _project(self, h: Tensor, head_t: Tensor | None) -> Tensor:
        """The vocabulary projection h (..., D) -> (..., V).

        With head_t (a (D, V) copy of the (V, D) weight, DiT.transposed_head), on CPU without
        autograd or autocast, it multiplies by that copy: the same products, and at 4 or more
        rows the same GEMM result bit for bit, while a one-row GEMV reads the transposed
        layout several times faster on CPU (see BENCHMARKS.md)."""
        weight, bias = self.linear.weight, self.linear.bias
        if (
            head_t is None
            or h.device != head_t.device
            or h.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            or h.dtype != head_t.dtype
        ):
            return self.linear(h)
        flat = h.reshape(-1, h.shape[-1])
        return torch.addmm(bias, flat, head_t).view(*h.shape[:-1], weight.shape[0])


class DiT(InferenceScope, nn.Module):
    """Diffusion transformer: a token backbone (models.backbone.Backbone). See the module
    docstring for what it computes."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = EmbeddingLayer(config.hidden_size, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim) if config.adaln else None
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = DiTFinalLayer(config)
        self._compiled_blocks: list | None = None  # see compile_blocks

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def time_conditioned(self) -> bool:
        """sigma reaches the logits: the adaLN modulation exists (not for AR without adaLN)."""
        return self.sigma_map is not None

    @property
    def attn_backend(self) -> str:
        return self.config.attn_backend

    def new_kv_cache(self, batch_size: int, window: int, block_size: int, device) -> KVCache:
        """A cache sized for this network: `window` tokens visible (committed + current block)."""
        c = self.config
        return KVCache(c.n_blocks, batch_size, c.n_heads, c.head_dim, window, block_size, device)

    def prepare_inference(self) -> InferenceSnapshot:
        """The inference-only caches of the current weights (InferenceSnapshot), for
        `inference(kv_cache, snapshot)`."""
        return InferenceSnapshot(self.transposed_head())

    def compile_blocks(self, **options) -> None:
        """torch.compile every DiTBlock (`options` go to torch.compile). The compiled blocks
        serve calls with autograd on (training steps), whose shapes are fixed; calls without
        autograd (validation, sampling, whose cached attention grows block by block) run the
        eager blocks, so sampling never recompiles. Parameter names are unchanged."""
        self._compiled_blocks = [torch.compile(block, **options) for block in self.blocks]

    def forward(
        self,
        tokens: Tensor,
        *,
        positions: Tensor,
        mask: AttentionMask | None,
        sigma: Tensor | None = None,
        outputs: slice | Tensor | None = None,
        commit: bool = False,
        block_valid: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, S) -> logits; the contract of models.backbone.Backbone. sigma: (B,)
        processed noise level, None for 0 (ignored without adaLN). The output projection runs
        only where `outputs` asks (and, for a prefix of positions, the last block)."""
        kv_cache = self.kv_cache
        if kv_cache is None and (mask is None or commit or block_valid is not None):
            raise ValueError(
                "DiT.forward: mask=None, commit and block_valid need an installed KV cache "
                "(set_kv_cache or inference)"
            )
        snapshot = None if torch.is_grad_enabled() else self.snapshot
        h = self.vocab_embed(tokens)
        c, conditioning = None, None
        if self.sigma_map is not None and sigma is None and snapshot is not None:
            conditioning = self._constant(snapshot, tokens)
        elif self.sigma_map is not None:
            if sigma is None:
                sigma = torch.zeros(tokens.shape[0], device=tokens.device)
            # each block turns c into its modulation inside its own forward (so that a block
            # sharded as an FSDP unit has its weights gathered when it needs them)
            c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(positions, h.dtype)
        last = len(self.blocks) - 1
        needed = self._needed_prefix(outputs, tokens.shape[1], mask, kv_cache)
        blocks = self.blocks
        if self._compiled_blocks is not None and kv_cache is None and torch.is_grad_enabled():
            blocks = self._compiled_blocks
        for layer, block in enumerate(blocks):
            cache = None if kv_cache is None else (kv_cache, layer, commit, block_valid)
            mod = c if conditioning is None else conditioning.blocks[layer]
            h = block(h, mod, cos, sin, mask, cache, needed if layer == last else None)
        final = conditioning.final if conditioning is not None else None
        if c is not None:
            final = self.output_layer.modulation(c)
        head_t = None if snapshot is None else snapshot.head_t
        return self.output_layer(h, final, outputs, head_t)

    def transposed_head(self) -> Tensor | None:
        """A (D, V) contiguous copy of the vocabulary projection's weight for CPU inference
        (InferenceSnapshot.head_t), or None off CPU. A copy of the current weight."""
        weight = self.output_layer.linear.weight
        if weight.device.type != "cpu":
            return None
        return weight.detach().t().contiguous()

    def condition(self, sigma: Tensor) -> Conditioning | None:
        """sigma (B,) -> the adaLN modulation of every block and the output layer; None for a
        backbone without adaLN (AR)."""
        if self.sigma_map is None:
            return None
        c = F.silu(self.sigma_map(sigma))
        mods = tuple(block.modulation(c) for block in self.blocks)
        return Conditioning(mods, self.output_layer.modulation(c))

    def _constant(self, snapshot: InferenceSnapshot, tokens: Tensor) -> Conditioning:
        """The modulation at sigma = 0 for this batch size, device and autocast mode, computed
        once per snapshot (it is the same at every call while the weights stay)."""
        device = tokens.device
        mode = (tokens.shape[0], str(device), torch.is_autocast_enabled(device.type))
        if mode not in snapshot.constant:
            zeros = torch.zeros(tokens.shape[0], dtype=torch.float32, device=device)
            snapshot.constant[mode] = self.condition(zeros)
        return snapshot.constant[mode]

    def _needed_prefix(self, outputs, S: int, mask: AttentionMask | None, kv_cache) -> int | None:
        """The number of leading positions whose logits are asked for, when the last block may
        stop there (decided on the host from shapes alone: no device sync)."""
        if kv_cache is not None or mask.block_mask is not None:
            return None
        if isinstance(outputs, slice):
            start, stop, step = outputs.indices(S)
            if start == 0 and step == 1 and 0 < stop < S:
                return stop
            return None
        boolean = isinstance(outputs, Tensor) and outputs.dtype == torch.bool
        if boolean and outputs.dim() == 2 and outputs.shape[1] < S:
            return outputs.shape[1]
        return None
