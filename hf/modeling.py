"""HF models that are drop-in replacements for the released checkpoints' own classes
: same config fields, same state-dict keys (`backbone.` + our DiT's names, plus the
`sampling_eps_min/max` buffers when `var_min`), a compatible forward. The network is our
`models.dit.DiT`; these classes only choose positions and masks and load weights strictly.

Loading needs no `trust_remote_code` and no flash-attn and works on CPU: a config that says
`flex` builds its flex masks lazily on the input's device (flex forward runs on CPU);
`attn_backend='sdpa'` may be given as an override.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from checkpoints.layout import (
    BACKBONE_PREFIX,
    INV_FREQ,
    CheckpointError,
    check_inv_freq,
    read_config_json,
    read_weights,
    resolve_pretrained,
    strict_state_check,
    strip_prefixes,
)
from hf.configuration import BD3LMConfig, MDLMConfig, resolve_device, resolve_dtype
from models.attention import (
    BlockCausalMask,
    BlockDiffusionMask,
    CausalMask,
    MaskCache,
    flash_available,
)
from models.backbone import BACKBONES
from models.dit import DiT, DiTConfig
from models.kv_cache import KVCache

# config.json keys written by transformers itself (never compared or overridden by name)
_STANDARD_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "dtype"}


class _DiTWrapper(PreTrainedModel):
    """Shared machinery: our DiT as `self.backbone`, strict `from_pretrained`, mask cache."""

    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = sorted(cls.__name__ for cls in BACKBONES["dit"].fsdp_units())

    def __init__(self, config):
        super().__init__(config)
        self.backbone = DiT(self.dit_config(config))
        self._masks = MaskCache(self.backbone.config.attn_backend)
        self._dense_masks = MaskCache("sdpa")  # flex on CPU with autograd: same mask, dense
        self._positions: dict[tuple, Tensor] = {}
        self.post_init()

    # The DiT initialises itself (zero-initialised adaLN and output layer).
    def _init_weights(self, module) -> None:
        return None

    @classmethod
    def dit_config(cls, config) -> DiTConfig:
        """The DiT shape of an HF config. MDLM configs have no causal/adaln/attn_backend
        fields: a non-causal adaLN DiT with sdpa."""
        return DiTConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_dim,
            cond_dim=config.cond_dim,
            n_blocks=config.n_blocks,
            n_heads=config.n_heads,
            dropout=config.dropout,
            causal=getattr(config, "causal", False),
            adaln=getattr(config, "adaln", True),
            attn_backend=cls.resolve_backend(getattr(config, "attn_backend", "sdpa")),
        )

    @staticmethod
    def resolve_backend(backend: str) -> str:
        """flash_attn without CUDA + flash-attn falls back to sdpa (the same function)."""
        return "sdpa" if backend == "flash_attn" and not flash_available() else backend

    # ------------------------------------------------------------------------------------------
    # Forward helpers
    # ------------------------------------------------------------------------------------------
    def _sigma(self, timesteps: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """The DiT's sigma (B,) for `timesteps`, or None (sigma = 0): no timesteps, a config
        without time_conditioning (adaLN stays on with sigma zeroed) or a DiT without adaLN."""
        conditioned = self.config.time_conditioning and self.backbone.time_conditioned
        if timesteps is None or not conditioned:
            return None
        sigma = torch.as_tensor(timesteps, device=device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        elif sigma.ndim == 2:
            sigma = sigma.mean(-1)
        return sigma

    def _positions_for(self, length: int, halves: int, device: torch.device) -> Tensor:
        key = (length, halves, str(device))
        if key not in self._positions:
            self._positions[key] = torch.arange(length // halves, device=device).repeat(halves)
        return self._positions[key]

    def _run(
        self,
        input_ids: Tensor,
        timesteps: Tensor | None,
        mask: Any,
        halves: int,
        outputs: slice | None,
        output_hidden_states: bool,
        return_dict: bool | None,
    ):
        S = input_ids.shape[1]
        device = input_ids.device
        sigma = self._sigma(timesteps, input_ids.shape[0], device)
        positions = self._positions_for(S, halves, device)
        masks = self._masks
        if masks.backend == "flex" and device.type == "cpu" and torch.is_grad_enabled():
            masks = self._dense_masks  # flex attention has no CPU backward
        attention = masks.get(mask, S, S, device)
        hidden: list[Tensor] = []
        hooks = []
        if output_hidden_states:
            modules = [self.backbone.vocab_embed, *self.backbone.blocks]
            hooks = [
                m.register_forward_hook(lambda _m, _i, out: hidden.append(out)) for m in modules
            ]
        try:
            logits = self.backbone(
                input_ids, positions=positions, mask=attention, sigma=sigma, outputs=outputs
            )
        finally:
            for hook in hooks:
                hook.remove()
        if return_dict is None:
            return_dict = self.config.return_dict
        hidden_states = tuple(hidden) if output_hidden_states else None
        if return_dict:
            return MaskedLMOutput(logits=logits, hidden_states=hidden_states)
        if output_hidden_states:
            return logits, hidden_states
        return logits

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def config_from_pretrained(cls, directory: str, **overrides):
        """config.json -> config, with overrides of known fields only (others raise)."""
        raw = read_config_json(directory)
        model_type = raw.get("model_type")
        if model_type != cls.config_class.model_type:
            raise CheckpointError(
                f"{directory}/config.json has model_type={model_type!r}; "
                f"{cls.__name__} loads model_type={cls.config_class.model_type!r}"
            )
        allowed = set(cls.config_class.FIELDS) | {"return_dict", "attn_backend"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise CheckpointError(
                f"{cls.__name__}.from_pretrained: unknown config overrides {unknown}; "
                f"valid are {sorted(allowed)}"
            )
        fields = {k: v for k, v in raw.items() if k not in _STANDARD_KEYS - {"auto_map"}}
        fields.update(overrides)
        return cls.config_class(**fields)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *model_args,
        config=None,
        cache_dir: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool | None = None,  # accepted for drop-in use; never needed
        dtype: Any = None,
        device_map: Any = None,
        torch_dtype: Any = None,
        **overrides,
    ):
        """Load a local HF directory or a hub id strictly by name.

        overrides: config fields to change (e.g. block_size=8 for fine-tuning,
        attn_backend='sdpa'). Missing or unexpected keys, or a shape that disagrees with the
        config (e.g. vocab_size), raise CheckpointError naming them; only
        `backbone.rotary_emb.inv_freq` may be absent (it is recomputed and, if stored, checked).
        dtype (or the older torch_dtype): a torch dtype, its name ("bfloat16"), or "auto" (the
        stored weights' dtype); device_map: a device ("cpu", "cuda:0", torch.device) or "auto"
        (the one available device: cuda:0 when CUDA is available, else cpu); no sharding.
        Loading keywords that AutoModelForMaskedLM passes through (`_from_auto`, `token`, ...)
        are ignored when it also passes the config.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model args")
        target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype)
        device = resolve_device(device_map)
        directory = resolve_pretrained(str(pretrained_model_name_or_path), cache_dir, revision)
        if config is None:
            config = cls.config_from_pretrained(directory, **overrides)
        model = cls(config)
        weights = read_weights(directory)
        model.load_strict(weights, what=str(pretrained_model_name_or_path))
        # as transformers does; generation.checkpoint_kind reads a released repository's name
        model.config._name_or_path = str(pretrained_model_name_or_path)
        if target_dtype == "auto":
            stored = [v.dtype for k, v in weights.items() if v.is_floating_point()]
            target_dtype = stored[0] if stored else None
        if target_dtype is not None:
            model.to(target_dtype)
        if device is not None:
            model.to(device)
        return model.eval()

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int | None = None,
        **kwargs,
    ):
        """Sample with the project's sampler (`hf.generation`), as `mode=sample_eval` does.

        input_ids (B, P): prompts without special tokens (`tokenizer(..., add_special_tokens=
        False)`; a row that starts with the BOS id, as the rows of a tokenizer that adds
        [CLS] ... [SEP] or <s> ... </s> do, is refused: generate prepends the BOS itself),
        padded on either side: `attention_mask` (B, P) marks the real tokens (1) and padding
        (0); without it, the runs of config.pad_token_id (the tokenizer's pad id, which
        scripts/export_hf.py records) at either end of a row are its padding, and a pad id
        between prompt tokens is refused, as is a prompt token equal to the mask id. Each row
        is re-laid out as sample_eval lays out prompts ([BOS] + ids, left-padded to a multiple
        of the block size), so any prompt length works and padding never conditions the model.
        Returns (B, P + max_new_tokens): input_ids as given (their padding included, so decode
        with skip_special_tokens=True) followed by the new tokens (`pad_token_id`, default
        EOS, after a row that stopped early under var_length). With input_ids None,
        `num_samples=N` unconditional samples of max_new_tokens tokens whose first token is the
        BOS (sample_eval's unconditional samples).

        Keywords (sample_eval's `sampling.*` keys): seed (default 0: the same seed, batch and
        prompts give sample_eval's samples) or generator (a CPU torch.Generator, not with seed:
        the draws continue its stream, so calls that share one generator give the samples of
        sample_eval's successive batches, as scripts/generate.py does), nucleus_p, kv_cache,
        first_hitting, var_length, reject_low_entropy (fixed length: rows whose last 256 tokens
        have entropy < 4 are redrawn up to 10 times, sample_eval's rule), num_steps (algo.T,
        DDPM only), reencode_context, tokens_per_step, confidence_threshold, entropy_bound,
        eb_gamma, unmask_order, fuse_commit; streamer: an object with put(ids) / end()
        (transformers.TextStreamer, TextDiffusionStreamer) that receives the prompt (one row:
        without its padding), then the tokens of each committed block;
        return_dict_in_generate=True returns a DiffusionGenerateOutput (sequences, lengths,
        nfe_denoise, nfe_total, stop_reason).
        A max_new_tokens that is not a whole number of blocks is sampled to the next block
        boundary and cut. ValueError on options the sampler cannot honour.
        """
        from hf.generation import diffusion_generate

        return diffusion_generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def load_strict(self, state: dict[str, Tensor], what: str = "checkpoint") -> None:
        state = strip_prefixes(state)
        own = self.state_dict()
        inv_freq = BACKBONE_PREFIX + INV_FREQ
        try:
            strict_state_check(own, state, what, optional=(inv_freq,))
        except CheckpointError as err:
            raise CheckpointError(f"{err} (config: {self._shape_summary()})") from None
        check_inv_freq(state, own[inv_freq], inv_freq)
        state = {k: v for k, v in state.items() if k != inv_freq}
        self.load_state_dict(state, strict=False)

    def _shape_summary(self) -> str:
        c = self.config
        return (
            f"vocab_size={c.vocab_size} hidden_dim={c.hidden_dim} cond_dim={c.cond_dim} "
            f"n_blocks={c.n_blocks} n_heads={c.n_heads}"
        )

    def reset_kv_cache(self, eval_batch_size: int = 1) -> KVCache:
        """A fresh KV cache (window = model_length) that sample_mode forwards use by default;
        also returned, to be passed explicitly as `kv_cache=`."""
        config = self.config
        block = getattr(config, "block_size", 1) if not getattr(config, "causal", False) else 1
        device = next(self.parameters()).device
        self._kv_cache = self.backbone.new_kv_cache(
            eval_batch_size, config.model_length, block, device
        )
        return self._kv_cache

    def _run_cached(self, input_ids, timesteps, cache: KVCache, store_kv: bool, return_dict):
        """input_ids: the current block (B, K), placed after the cache's committed tokens."""
        K = cache.block_size
        if input_ids.shape[1] != K:
            raise ValueError(f"with a KV cache the input is one block of {K} tokens")
        start = cache.num_committed * K
        positions = torch.arange(start, start + K, device=input_ids.device)
        sigma = self._sigma(timesteps, input_ids.shape[0], input_ids.device)
        with self.backbone.inference(cache):
            logits = self.backbone(
                input_ids, positions=positions, mask=None, sigma=sigma, commit=store_kv
            )
        if store_kv:
            cache.advance()
        if return_dict if return_dict is not None else self.config.return_dict:
            return MaskedLMOutput(logits=logits, hidden_states=None)
        return logits


class BD3LM(_DiTWrapper):
    """Drop-in for the reference's `BD3LM` (`kuleshov-group/bd3lm-owt-*`)."""

    config_class = BD3LMConfig

    def __init__(self, config: BD3LMConfig):
        super().__init__(config)
        if config.var_min:
            eps_min = torch.tensor(float(config.sampling_eps_min), dtype=torch.float32)
            eps_max = torch.tensor(float(config.sampling_eps_max), dtype=torch.float32)
            self.register_buffer("sampling_eps_min", eps_min)
            self.register_buffer("sampling_eps_max", eps_max)

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Tensor | None = None,
        sample_mode: bool = False,
        store_kv: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        kv_cache: Any = None,
    ):
        """input_ids (B, S); timesteps: processed sigma (B,) (zeroed unless time_conditioning).

        - cross_attn, training/eval: S = 2 * model_length, [x_t ; x_0] under the block-diffusion
          mask, both halves at rotary positions 0..L-1; returns the logits of the x_t half.
        - cross_attn with sample_mode (no cache): [clean blocks ; current block] under the
          block-causal mask, positions 0..S-1; logits for all S positions.
        - causal (AR): token-causal; otherwise full attention (MDLM-style), positions 0..S-1.
        Returns the logits tensor when return_dict is false (config.return_dict by default).
        """
        cache = kv_cache if kv_cache is not None else getattr(self, "_kv_cache", None)
        if cache is not None and (sample_mode or kv_cache is not None):
            return self._run_cached(input_ids, timesteps, cache, store_kv, return_dict)
        if store_kv:
            raise ValueError("store_kv=True needs a KV cache: call reset_kv_cache() first")
        config = self.config
        S = input_ids.shape[1]
        if config.causal:
            mask, halves, outputs = CausalMask(), 1, None
        elif not config.cross_attn:
            mask, halves, outputs = None, 1, None
        elif sample_mode:
            mask, halves, outputs = BlockCausalMask(config.block_size), 1, None
        else:
            L = config.model_length
            if S != 2 * L:
                raise ValueError(
                    f"BD3LM with cross_attn expects the training input [x_t ; x_0] of length "
                    f"2 * model_length = {2 * L}, got {S} (override model_length= to change L; "
                    "use sample_mode=True for sampling)"
                )
            if L % config.block_size:
                raise ValueError(f"block_size={config.block_size} must divide model_length={L}")
            mask, halves, outputs = BlockDiffusionMask(L, config.block_size), 2, slice(0, L)
        return self._run(
            input_ids, timesteps, mask, halves, outputs, output_hidden_states, return_dict
        )


class MDLM(_DiTWrapper):
    """Drop-in for the reference's `MDLM` (`kuleshov-group/mdlm-owt`): adaLN, full attention,
    no cross-attention and no clip buffers."""

    config_class = MDLMConfig

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
    ):
        """input_ids (B, S), timesteps (B,) -> logits (B, S, V) under full attention."""
        return self._run(input_ids, timesteps, None, 1, None, output_hidden_states, return_dict)
