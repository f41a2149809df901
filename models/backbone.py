"""The backbone contract and the registry of backbones, keyed by `model.backbone`.

A backbone is the network behind an objective: an `nn.Module` with the weights. What the rest
of the framework sees of it is declared here, so that a new network is one module and one
`BACKBONES` entry.

A token backbone (`BackboneSpec.token_network`; the DiT, `models/dit.py`) maps token ids to
logits and is called by `models.network.BackboneNetwork` (training, validation, ppl_eval,
lm-eval), by `sampling.denoiser.ModelDenoiser` (the samplers) and by the HF classes
(`hf/modeling.py`). It implements `Backbone`:

  forward(tokens (B, S), *, positions (S,), mask, sigma=None, outputs=None, commit=False,
          block_valid=None) -> logits
      Keyword-only after the tokens. positions: integer positions of the S tokens (both halves
      of a [x_t ; x_0] input share 0..L-1; absolute positions with a KV cache). mask: the
      models.attention.AttentionMask over the S tokens, materialised by a MaskCache for the
      backbone's `attn_backend`; None only with a KV cache installed (the cache decides what
      each token sees). sigma: (B,) noise level for a time-conditioned backbone; None is
      sigma = 0 (no time input), which a backbone without time conditioning always gets.
      outputs: where logits are needed: None (all, (B, S, V)), a slice ((B, S', V)), a
      boolean (B, S) selection ((N, V), row-major; (B, S') with S' < S selects among the
      first S') or a long (B, k) tensor of positions ((B * k, V), row-major).
      With a KV cache installed (set_kv_cache / inference) tokens are the newest block (B, K)
      at absolute positions, attending over the cache's committed tokens and themselves;
      commit=True stores their keys/values (with 2K tokens: the first K are a clean block
      committed in the same call, the last K the block being denoised); the caller then calls
      cache.advance(). block_valid: (B, K) bool, False at prompt padding (KVCache.attend).
      commit and block_valid without an installed cache are refused (ValueError).
  vocab_size: int (V, the logits' last dimension); time_conditioned: bool (sigma reaches the
      network; False: every sigma gives the same logits); attn_backend: str (the MaskCache
      backend its masks are materialised for, models.attention.BACKENDS).
  new_kv_cache(batch_size, window, block_size, device) -> models.kv_cache.KVCache sized for
      the network, `window` tokens visible (committed + current block).
  set_kv_cache(cache | None): install (litgpt's set_kv_cache) or remove the cache that
      forward attends over. The cache stays installed until removed: callers that install one
      for a call remove it afterwards, or use `inference(...)`, which does both.
  prepare_inference() -> snapshot | None: take the inference-only caches derived from the
      current weights (the DiT: its output projection transposed on CPU, the constant adaLN
      modulation of sigma = 0). A snapshot belongs to whoever took it (the denoiser): it is
      read only by calls inside `inference(kv_cache, snapshot)` with autograd off, and goes
      stale when the weights change (take a new one).
  inference(kv_cache=None, snapshot=None): a context in which calls attend over kv_cache and
      read the snapshot; both are removed on exit (also on error).
`InferenceScope` implements the last two and `set_kv_cache`; a backbone mixes it in.

Other backbones (`token_network=False`) keep the call contract their objective declares:
SSD-LM's RoBERTa (`models/ssdlm.py`, SSDLMNetwork) reads (context, simplex, t).

A `BackboneSpec` says how to build a backbone from the `model` config group (`build`) and which
module classes are its FSDP units (`fsdp_units`, one unit per transformer layer). The builds
import their module on demand, so this registry costs nothing to import.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from models.attention import AttentionMask
from models.kv_cache import KVCache


@runtime_checkable
class Backbone(Protocol):
    """The token-level network contract (module docstring)."""

    vocab_size: int
    time_conditioned: bool
    attn_backend: str

    def __call__(
        self,
        tokens: Tensor,
        *,
        positions: Tensor,
        mask: AttentionMask | None,
        sigma: Tensor | None = None,
        outputs: slice | Tensor | None = None,
        commit: bool = False,
        block_valid: Tensor | None = None,
    ) -> Tensor: ...

    def new_kv_cache(
        self, batch_size: int, window: int, block_size: int, device: torch.device
    ) -> KVCache: ...

    def set_kv_cache(self, cache: KVCache | None) -> None: ...

    def prepare_inference(self) -> Any: ...

    def inference(
        self, kv_cache: KVCache | None = None, snapshot: Any = None
    ) -> contextlib.AbstractContextManager: ...


class InferenceScope:
    """The installed state of a token backbone (mixed into its nn.Module): `kv_cache`, the
    cache forward attends over (None: none), and `snapshot`, what prepare_inference() took,
    readable by calls inside `inference()` (None outside)."""

    kv_cache: KVCache | None = None
    snapshot: Any = None

    def set_kv_cache(self, cache: KVCache | None) -> None:
        """Install `cache` for the following calls (None removes it)."""
        self.kv_cache = cache

    def prepare_inference(self) -> Any:
        """No inference-only caches: None (a backbone with some overrides this)."""
        return None

    @contextlib.contextmanager
    def inference(self, kv_cache: KVCache | None = None, snapshot: Any = None) -> Iterator[None]:
        """Calls inside attend over kv_cache (if any) and read snapshot (if any); the state
        before is restored on exit."""
        before = self.kv_cache, self.snapshot
        self.kv_cache, self.snapshot = kv_cache, snapshot
        try:
            yield
        finally:
            self.kv_cache, self.snapshot = before


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone.

    name: its `model.backbone` value. build(model_cfg, vocab_size, seq_len, causal) -> the
    nn.Module for the `model` config group (keys checked by settings), vocab_size ids, training
    rows of seq_len tokens, token-causal attention (AR) or not: randomly initialised, or a
    pretrained model's weights (hf_causal); raises ValueError on shapes it cannot take.
    fsdp_units(backbone) -> the module classes of the built `backbone` that FSDP wraps one unit
    each (builders.fsdp_wrap_policy). token_network: it implements `Backbone`.
    time_conditioned: it can read sigma (a time-conditioned objective needs it).
    vocab_rows(state) -> V of a checkpoint's backbone-level state dict (embedding rows), None
    when the names do not say. vocab(model_cfg, cache_dir) -> data.vocab.Vocab: the tokenizer
    a pretrained backbone brings (its mask token and V as `build` makes them); None: the data
    tokenizer (data.tokenizer_name_or_path) decides V.
    """

    name: str
    build: Callable[[Mapping[str, Any], int, int, bool], nn.Module]
    fsdp_units: Callable[[nn.Module], set[type]]
    token_network: bool
    time_conditioned: bool = True
    vocab_rows: Callable[[Mapping[str, Tensor]], int | None] = lambda state: None
    vocab: Callable[[Mapping[str, Any], str], Any] | None = None


def _build_dit(model_cfg: Mapping[str, Any], vocab_size: int, seq_len: int, causal: bool):
    from models import dit_config
    from models.dit import DiT

    return DiT(dit_config(model_cfg, vocab_size, causal))


def _dit_units(backbone: nn.Module | None = None) -> set[type]:
    from models.dit import DiTBlock

    return {DiTBlock}


def _rows_of(*names: str, dim: int = 0) -> Callable[[Mapping[str, Tensor]], int | None]:
    """vocab_rows reading dimension `dim` of the first tensor whose name ends with one of
    `names`."""

    def rows(state: Mapping[str, Tensor]) -> int | None:
        return next((int(t.shape[dim]) for k, t in state.items() if k.endswith(names)), None)

    return rows


def _build_roberta(model_cfg: Mapping[str, Any], vocab_size: int, seq_len: int, causal: bool):
    from models.ssdlm import build_network

    return build_network(model_cfg, vocab_size, seq_len)


def _roberta_units(backbone: nn.Module | None = None) -> set[type]:
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    return {RobertaLayer}


def _build_hf_causal(model_cfg: Mapping[str, Any], vocab_size: int, seq_len: int, causal: bool):
    """The pretrained model `model.pretrained` (models.pretrained.load_causal_lm) with its mask
    token row, run through the project's layouts (models.hf_causal); AR reads plain
    next-token logits (no token shift). V must be the vocab's (`_hf_causal_vocab`)."""
    from models.hf_causal import from_pretrained

    backbone, _, _ = from_pretrained(
        model_cfg["pretrained"],
        token_shift=model_cfg["token_shift"] and not causal,
        clean_attention=model_cfg["clean_attention"],
        attn_backend=model_cfg["attn_backend"],
        gradient_checkpointing=model_cfg["gradient_checkpointing"],
    )
    if backbone.vocab_size != vocab_size:
        raise ValueError(
            f"model.pretrained={model_cfg['pretrained']}: {backbone.vocab_size} embedding rows, "
            f"but the run's vocabulary has {vocab_size}"
        )
    backbone.check_length(seq_len)
    return backbone


def _hf_causal_units(backbone: nn.Module | None = None) -> set[type]:
    if backbone is None:
        raise ValueError("model.backbone=hf_causal: its FSDP units are read from the built model")
    return backbone.fsdp_units()


def _hf_causal_vocab(model_cfg: Mapping[str, Any], cache_dir: str):
    from models.hf_causal import pretrained_vocab

    return pretrained_vocab(model_cfg["pretrained"], cache_dir)


BACKBONES: dict[str, BackboneSpec] = {
    "dit": BackboneSpec(
        "dit", _build_dit, _dit_units, token_network=True,
        vocab_rows=_rows_of("vocab_embed.embedding"),
    ),
    "roberta": BackboneSpec(
        "roberta", _build_roberta, _roberta_units, token_network=False,
        vocab_rows=_rows_of("embed_sum_layer.weight", dim=1),  # (hidden, V)
    ),
    "hf_causal": BackboneSpec(
        "hf_causal", _build_hf_causal, _hf_causal_units, token_network=True,
        time_conditioned=False, vocab_rows=_rows_of("embed_tokens.weight", "wte.weight"),
        vocab=_hf_causal_vocab,
    ),
}  # fmt: skip


def backbone_spec(name: str) -> BackboneSpec:
    """The registered backbone `name` (model.backbone); ValueError naming the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"model.backbone={name!r}: valid are {sorted(BACKBONES)}")
    return BACKBONES[name]
