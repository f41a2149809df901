"""The SSD-LM network (Han, Kumar, Tsvetkov, ACL 2023, Sec. 3): a RoBERTa masked LM that reads
clean context tokens and a noisy block of "simplex logits", and returns the block's logits.
Registered as the `roberta` backbone (models.backbone.BACKBONES: `build_network`, FSDP units
RobertaLayer); not a token backbone: its call contract is SSDLMNetwork.forward below.

Inputs, as the public xhan77/ssd-lm code builds them (ssd_model_train.py, training loop;
ssd_model_decode_alt.py, `decode`):

  context (B, C) token ids      -> RoBERTa's own word embeddings
  x_t (B, K, V) simplex logits  -> softmax over V, then `embed_sum_layer`, a bias-free
                                   nn.Linear(V, hidden) initialised with the word embeddings
                                   transposed
  t / T (B,)                    -> `timestep_layer`, nn.Linear(1, hidden) with bias

The timestep embedding is added to the noisy block's positions ONLY: the code computes
`diffusion_embeds = perturbed_inputs_embeds + timestep_embeds` for the K block positions and
then concatenates `context_inputs_embeds` in front (no timestep term on the context). The
sequence [context ; block] goes through RoBERTa with `inputs_embeds=` (full bidirectional
attention, no attention mask, RoBERTa's own position and token-type embeddings) and the
logits at the last K positions are kept.

Released checkpoint layout (ssd_model_train.py saves it; the Hub copy `xhan77/ssdlm` is read
the same way by the authors' demo): one directory holding

  config.json + weights + tokenizer   a RoBERTa MLM (`save_pretrained`, roberta-large base)
  embed_sum_layer.pt                  state dict of embed_sum_layer: key "weight" (hidden, V)
  timestep_layer.pt                   state dict of timestep_layer: keys "weight" (hidden, 1),
                                      "bias" (hidden,)

Keys may carry the "module." prefix of a DataParallel/DDP wrapper; every loader of the public
code strips it (`_k[7:] if _k.startswith("module.")`), and so does `load_ssdlm`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import RobertaConfig, RobertaForMaskedLM

EMBED_SUM_FILE = "embed_sum_layer.pt"
TIMESTEP_FILE = "timestep_layer.pt"
MODULE_PREFIX = "module."


class SSDLMNetwork(nn.Module):
    """network(context, x_t, t_frac) -> logits (B, K, V) of the noisy block.

    mlm: a RobertaForMaskedLM whose word embeddings already have the tokenizer's size V.
    init_from_embeddings: copy the word embeddings (transposed) into embed_sum_layer, as the
    training script does before any checkpoint is loaded.
    """

    def __init__(self, mlm: RobertaForMaskedLM, init_from_embeddings: bool = True):
        super().__init__()
        self.mlm = mlm
        vocab_size, hidden = mlm.get_input_embeddings().weight.shape
        self.embed_sum_layer = nn.Linear(vocab_size, hidden, bias=False)
        self.timestep_layer = nn.Linear(1, hidden, bias=True)
        if init_from_embeddings:
            with torch.no_grad():
                self.embed_sum_layer.weight.copy_(mlm.get_input_embeddings().weight.t())

    @property
    def vocab_size(self) -> int:
        return self.embed_sum_layer.in_features

    @property
    def max_tokens(self) -> int:
        """Longest [context ; block] RoBERTa can position: position ids start at pad_id + 1."""
        config = self.mlm.config
        return config.max_position_embeddings - config.pad_token_id - 1

    def forward(self, context: Tensor | None, xt: Tensor, t_frac: Tensor) -> Tensor:
        """context: (B, C) int64 clean tokens (C may be 0, or None); xt: (B, K, V) simplex
        logits in +-K space; t_frac: (B,) diffusion time t / T in [0, 1].
        Returns float logits (B, K, V) at the block's positions (in the weights' dtype)."""
        batch, block, vocab = xt.shape
        if vocab != self.vocab_size:
            raise ValueError(f"x_t has {vocab} vocabulary columns, the network {self.vocab_size}")
        weight = self.embed_sum_layer.weight
        simplex = F.softmax(xt.float(), dim=-1).to(weight.dtype)
        noisy = self.embed_sum_layer(simplex)  # (B, K, H)
        t_in = t_frac.to(device=weight.device, dtype=weight.dtype).view(batch, 1, 1)
        noisy = noisy + self.timestep_layer(t_in)  # timestep on the block positions only
        n_context = 0 if context is None else context.shape[1]
        if n_context:
            words = self.mlm.get_input_embeddings()(context)
            noisy = torch.cat([words.to(noisy.dtype), noisy], dim=1)
        if n_context + block > self.max_tokens:
            raise ValueError(
                f"context {n_context} + block {block} tokens exceed the {self.max_tokens} "
                "positions of the encoder"
            )
        hidden = self.mlm.roberta(inputs_embeds=noisy).last_hidden_state
        return self.mlm.lm_head(hidden[:, n_context:])


def roberta_config(
    vocab_size: int,
    hidden_size: int,
    n_blocks: int,
    n_heads: int,
    length: int,
    dropout: float = 0.1,
) -> RobertaConfig:
    """A RoBERTa of the given shape for rows of `length` tokens ([context ; block] never
    exceeds a training row): intermediate size 4 x hidden, one token type, and RoBERTa's
    position convention (pad id 1, positions from 2, so max_position_embeddings = length + 2
    and `SSDLMNetwork.max_tokens` = length). roberta-large is (1024, 24, 16, 512)."""
    return RobertaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_blocks,
        num_attention_heads=n_heads, intermediate_size=4 * hidden_size,
        max_position_embeddings=length + 2, type_vocab_size=1, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip


def build_network(model_cfg, vocab_size: int, length: int) -> SSDLMNetwork:
    """A randomly initialised SSD-LM network from the `model` config keys (hidden_size,
    n_blocks, n_heads, dropout) for rows of `length` tokens over `vocab_size` ids (training
    from scratch with the project's tokenizer). The word embeddings get no padding row: the
    pad id 1 only offsets RoBERTa's positions, and id 1 is an ordinary token of the
    project's tokenizers."""
    config = roberta_config(
        vocab_size,
        model_cfg["hidden_size"],
        model_cfg["n_blocks"],
        model_cfg["n_heads"],
        length,
        model_cfg["dropout"],
    )
    mlm = RobertaForMaskedLM(config)
    mlm.get_input_embeddings().padding_idx = None
    return SSDLMNetwork(mlm)


def is_released_layout(path: str) -> bool:
    """`path` is a directory holding the released layout's two layer files (module docstring)."""
    return os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, name)) for name in (EMBED_SUM_FILE, TIMESTEP_FILE)
    )


def released_shape(directory: str) -> tuple[int, int]:
    """(V, max_tokens) of a released-layout directory, from its config.json: the vocabulary
    size and the longest [context ; block] its positions hold (512 for roberta-large)."""
    config = RobertaConfig.from_pretrained(directory)
    return int(config.vocab_size), config.max_position_embeddings - config.pad_token_id - 1


def _strip_prefix(state: dict) -> dict:
    return {
        k[len(MODULE_PREFIX) :] if k.startswith(MODULE_PREFIX) else k: v for k, v in state.items()
    }


def load_layer_state(layer: nn.Module, path: str) -> None:
    """Load `path` (a torch.save'd state dict, "module." prefixes allowed) into `layer`
    strictly by name. Raises ValueError, one line naming the file, on missing, unexpected
    or mis-shaped keys; FileNotFoundError when the file is absent."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: SSD-LM layer state dict not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = _strip_prefix(state)
    expected = layer.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise ValueError(f"{path}: shape mismatch (file vs model): {'; '.join(shapes)}")
    layer.load_state_dict(state, strict=True)


def load_ssdlm(
    directory: str, vocab_size: int | None = None, dtype: torch.dtype | None = None
) -> SSDLMNetwork:
    """The released layout in `directory` -> SSDLMNetwork (on the CPU, eval mode).

    vocab_size: the tokenizer's size (len(tokenizer)); the MLM's embeddings are resized to it
    before the two layers are built and loaded (as the public scripts do; for roberta-large
    50265 = len(tokenizer), a no-op). dtype: cast the whole network afterwards.
    """
    mlm = RobertaForMaskedLM.from_pretrained(directory)
    if vocab_size is not None and vocab_size != mlm.get_input_embeddings().weight.shape[0]:
        mlm.resize_token_embeddings(vocab_size)
    network = SSDLMNetwork(mlm, init_from_embeddings=False)
    load_layer_state(network.embed_sum_layer, os.path.join(directory, EMBED_SUM_FILE))
    load_layer_state(network.timestep_layer, os.path.join(directory, TIMESTEP_FILE))
    if dtype is not None:
        network = network.to(dtype)
    return network.eval()
