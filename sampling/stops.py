"""Stop rules, per sequence: the first generated EOS and low entropy of the last 256 tokens."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from sampling.config import SamplerConfig

STOP_ENTROPY = 4.0  # nats: the reference's low-entropy stop threshold


ENTROPY_WINDOW = 256  # tokens the entropy rule looks at


def window_entropy(tokens: Tensor) -> Tensor:
    """(B, W) ids -> (B,) entropy (nats) of each row's unigram distribution."""
    counts = torch.zeros(tokens.shape[0], int(tokens.max()) + 1, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=counts.dtype))
    p = counts / tokens.shape[1]
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)


def apply_stop_rules(
    x: Tensor, gen_start: int, new_start: int, state: SequenceState, cfg: SamplerConfig
) -> None:
    """Check the active sequences after tokens [new_start, S) were added.

    var_length: the first generated EOS ends a sequence (kept); entropy of the last 256 tokens
    below 4 ends it and drops those 256 tokens. Fixed length: low entropy marks the sequence for
    resampling when reject_low_entropy (the reference resamples the whole batch)."""
    S = x.shape[1]
    if cfg.var_length:
        is_eos = x[:, new_start:] == cfg.eos_id
        first_eligible = gen_start if gen_start else 1  # the BOS is not a stop
        if new_start < first_eligible:
            is_eos[:, : first_eligible - new_start] = False
        hit = is_eos.any(-1) & state.active
        if hit.any():
            first = is_eos.int().argmax(-1) + new_start
            for b in hit.nonzero().flatten().tolist():
                state.stop(b, int(first[b]) + 1, "eos")
    if S - gen_start > ENTROPY_WINDOW and (cfg.var_length or cfg.reject_low_entropy):
        low = (window_entropy(x[:, -ENTROPY_WINDOW:]) < STOP_ENTROPY) & state.active
        for b in low.nonzero().flatten().tolist():
            if cfg.var_length:
                state.stop(b, S - ENTROPY_WINDOW, "low_entropy")
            else:
                state.stop(b, S, "rejected_low_entropy")


@dataclasses.dataclass
class SequenceState:
    active: Tensor  # (B,) bool
    lengths: Tensor  # (B,) int64
    reasons: list[str]

    def stop(self, b: int, length: int, reason: str) -> None:
        self.active[b] = False
        self.lengths[b] = length
        self.reasons[b] = reason
