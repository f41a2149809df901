"""`generate()` for the HF classes (`hf.BD3LM`, `hf.MDLM`), on the project's own
sampler (`sampling.build_sampler`): the same objective, block structure, random draws and
low-entropy retry rule as `mode=sample_eval` (sampling/generate.py), so the same seed, batch
and prompts give the same samples.

The objective of a checkpoint is read from its HF config (`objective_from_config`, with the
family `checkpoint_kind` finds by the checkpoint loader's rule): a causal BD3LM config is the
AR baseline (K = 1), a cross-attention one BD3-LM with its block size, a time-conditioned
model without cross-attention SEDD (sampled by the analytic sampler), any other MDLM with one
block of its window.
Token ids come from the config's `bos_token_id` / `eos_token_id` / `mask_token_id` (which
`hf.export` writes: scripts/export_hf.py, `loadable`'s temporary exports); a config
without them (the released GPT-2 checkpoints) gets the GPT-2 layout: mask = vocab_size - 1,
BOS = EOS = vocab_size - 2. `pad_token_id` (the tokenizer's, which the export also writes)
marks padding in input_ids given without an attention_mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor


@dataclasses.dataclass
class DiffusionGenerateOutput:
    """sequences (B, P + N): the prompt as given followed by the new tokens (`pad_token_id`
    after a sequence that stopped early); lengths (B,) valid tokens per row of `sequences`;
    nfe_denoise / nfe_total (B,) model calls (see sampling.SampleOutput), summed over redraws;
    stop_reason: per row, "length" | "eos" | "low_entropy" | "rejected_low_entropy"."""

    sequences: Tensor
    lengths: Tensor
    nfe_denoise: Tensor
    nfe_total: Tensor
    stop_reason: list[str]


class _Row(NamedTuple):
    """One row's new tokens and model calls, summed over its draws."""

    ids: list[int]
    nfe_denoise: int
    nfe_total: int
    stop_reason: str


def token_ids(config) -> tuple[int, int, int]:
    """(bos, mask, eos) of an HF config (see the module docstring for the fallback)."""
    vocab = int(config.vocab_size)
    mask = getattr(config, "mask_token_id", None)
    bos = getattr(config, "bos_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    mask = vocab - 1 if mask is None else int(mask)
    bos = vocab - 2 if bos is None else int(bos)
    eos = bos if eos is None else int(eos)
    return bos, mask, eos


def checkpoint_kind(model) -> str:
    """The backbone family ("ar", "bd3lm", "mdlm" or "sedd") of an HF model, by the rule the
    checkpoint loader applies (checkpoints.layout.detect_kind): a released repository's name,
    then config.json's model_type and flags (a time-conditioned model without cross-attention
    is SEDD), then the weights' keys."""
    from checkpoints.layout import detect_kind

    config = model.config
    fields = config.to_dict()
    keys = dict.fromkeys(name for name, _ in model.named_parameters())
    return detect_kind(fields, keys, hint=getattr(config, "_name_or_path", None) or None)


def objective_from_config(config, mask_id: int, kind: str):
    """The objective of family `kind` (checkpoint_kind's answer: "ar", "bd3lm", "mdlm" or
    "sedd") for an HF config's trained window `model_length`, under the log-linear schedule,
    built by its registry entry with the settings the config records (block size, time
    conditioning, learned clip interval) and the training defaults."""
    from noise_schedule import build_noise
    from registry import build_objective

    algo = {
        "name": kind,
        "cross_attn": kind == "bd3lm",
        "ignore_bos": kind != "ar",
        # SEDD's score needs t: its released configs may not say so
        "time_conditioning": kind == "sedd" or bool(getattr(config, "time_conditioning", False)),
        "var_min": bool(getattr(config, "var_min", False)),
    }
    training = {"antithetic_sampling": True, "resample": False, "eval_nll": True}
    window = int(config.model_length)
    block_size = int(getattr(config, "block_size", window) or window)
    return build_objective(algo, training, build_noise("loglinear"), mask_id, window, block_size)


class BlockStream:
    """The sampler's `progress` hook turned into streamer calls: after each committed block of
    n tokens, `streamer.put(ids)` with those ids (CPU, (B, n), or (n,) for one row), cut at
    `limit` new tokens in all (the samplers call `progress(n, committed)` with the (B, n)
    tokens they just committed). A streamer with `put_draft` (transformers'
    TextDiffusionStreamer) also gets `put_draft(ids)` after each denoising step of a block
    with the block's current state, still-masked positions as the mask id (the block sampler
    calls `draft`)."""

    def __init__(self, streamer, limit: int):
        self.streamer, self.remaining = streamer, limit
        if hasattr(streamer, "put_draft"):
            self.draft = self._draft

    def _draft(self, block: Tensor) -> None:
        if self.remaining <= 0:
            return
        state = block[:, : self.remaining].cpu()
        self.streamer.put_draft(state[0] if state.shape[0] == 1 else state)

    def __call__(self, n: int, committed: Tensor | None = None) -> None:
        if committed is None or self.remaining <= 0:
            return
        new = committed[:, : self.remaining].cpu()
        self.remaining -= new.shape[1]
        self.streamer.put(new[0] if new.shape[0] == 1 else new)


def _prompt_rows(
    input_ids: Tensor, attention_mask: Tensor | None, bos: int, mask: int, pad: int | None
) -> list[list[int]]:
    """Each row's prompt ids: the tokens `attention_mask` marks, or, without it, the row less
    the runs of the pad id `pad` (config.pad_token_id, the id `tokenizer(..., padding=True)`
    writes) at either end, whichever side the tokenizer pads on. ValueError, one line, for a
    pad id between prompt tokens (without attention_mask it cannot be told from a token), a
    prompt that holds the mask id (the model would be conditioned on a masked position, which
    sample_eval's prompts never hold; the [PAD] that data.vocab adds has the mask id), or a row
    that starts with the BOS id: generate lays out [BOS] + prompt itself, and a tokenizer that
    adds special tokens (BERT's [CLS] ... [SEP], RoBERTa's <s> ... </s>) starts every row with
    the BOS id (data.vocab takes BOS as the first id its tokenizer adds), so such rows would
    carry a second BOS and the tokenizer's end token, unlike sample_eval's."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if attention_mask is not None:
        keep = attention_mask.bool().cpu()
        rows = [row[m].tolist() for row, m in zip(input_ids.cpu(), keep, strict=True)]
    else:
        rows = [_strip_padding(row, pad, i) for i, row in enumerate(input_ids.tolist())]
    for i, row in enumerate(rows):
        if mask in row:
            raise ValueError(
                f"input_ids row {i}: prompt position {row.index(mask)} holds the mask id {mask}; "
                "mark padding 0 in attention_mask (a prompt token must not be masked)"
            )
        if row[:1] == [bos]:
            raise ValueError(
                f"input_ids row {i} starts with the BOS id {bos}: generate() prepends the BOS "
                "itself; encode prompts without special tokens "
                "(tokenizer(..., add_special_tokens=False))"
            )
    return rows


def _strip_padding(row: list[int], pad: int | None, index: int) -> list[int]:
    """`row` less the runs of `pad` at its two ends (see _prompt_rows)."""
    if pad is None:
        return row
    real = [j for j, token in enumerate(row) if token != pad]
    if not real:
        return []
    first, last = real[0], real[-1] + 1
    if last - first != len(real):
        raise ValueError(
            f"input_ids row {index} has the pad id {pad} between prompt tokens; pass "
            "attention_mask (1 at prompt tokens, 0 at padding) to say which are the prompt"
        )
    return row[first:last]


def _streamed_prompt(input_ids: Tensor | None, rows: list, subset: list[int]) -> Tensor:
    """What a streamer's first put gets: one row's prompt without its padding (1, P') (so
    TextStreamer prints no [PAD]), several rows as given (B, P), or (B, 0) without prompts."""
    if input_ids is None:
        return torch.zeros(len(subset), 0, dtype=torch.long)
    if len(subset) == 1:
        return torch.tensor([rows[subset[0]]], dtype=torch.long)
    return input_ids[subset].cpu()


def diffusion_generate(
    model,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    max_new_tokens: int | None = None,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    nucleus_p: float = 1.0,
    kv_cache: bool = False,
    first_hitting: bool = True,
    var_length: bool = False,
    reject_low_entropy: bool = True,
    num_steps: int = 1000,
    reencode_context: bool = False,
    streamer=None,
    pad_token_id: int | None = None,
    return_dict_in_generate: bool = False,
    **sampler_options: Any,
):
    """Sample continuations of `input_ids` (B, P) (or, with input_ids None, `num_samples`
    unconditional samples) with the project's sampler. See `_DiTWrapper.generate`."""
    if seed is not None and generator is not None:
        raise ValueError(
            "seed and generator: give one (seed=S draws from a new generator seeded with S, "
            "generator= continues that generator's stream)"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator on {generator.device}: the samplers draw from a CPU torch.Generator "
            "(torch.Generator().manual_seed(S)), as sample_eval does"
        )
    from registry import build_sampler, objective_spec
    from sampling import TokenIds
    from sampling.context import left_pad_prompts
    from sampling.generate import redraw_low_entropy

    if max_new_tokens is None or int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: give a number of tokens >= 1")
    max_new = int(max_new_tokens)
    config = model.config
    bos, mask, eos = token_ids(config)
    kind = checkpoint_kind(model)
    objective = objective_from_config(config, mask, kind)
    window = int(config.model_length)
    if input_ids is not None:
        if not objective.capabilities.prompts:
            raise ValueError(
                f"input_ids: {type(model).__name__} with cross_attn=False (MDLM) samples without "
                "a prompt; call generate(num_samples=N, max_new_tokens=...)"
            )
        pad = getattr(config, "pad_token_id", None)
        rows: list[list[int] | None] = _prompt_rows(input_ids, attention_mask, bos, mask, pad)
    else:
        if num_samples is None or int(num_samples) < 1:
            raise ValueError(f"num_samples={num_samples}: without input_ids give num_samples >= 1")
        rows = [None] * int(num_samples)
    block, stride = objective.sampling_blocks(window, max_new)
    step = stride or block
    length = max_new if max_new < block else block + -(-(max_new - block) // step) * step
    options = dict(
        num_steps=int(num_steps), first_hitting=bool(first_hitting), nucleus_p=float(nucleus_p),
        kv_cache=bool(kv_cache), var_length=bool(var_length),
        reject_low_entropy=bool(reject_low_entropy), **sampler_options,
    )  # fmt: skip
    length = max(length, block)
    cfg, sample_fn = build_sampler(
        objective_spec(kind), objective, model.backbone, window, length,
        TokenIds(bos, mask, eos), options, reencode=bool(reencode_context),
    )  # fmt: skip
    device = next(model.parameters()).device
    if generator is None:  # sample_eval's rank-0 generator
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))

    def draw(subset: list[int]) -> list[_Row]:
        prompt = valid = None
        if rows[0] is not None:
            ids = [[bos, *rows[i]] for i in subset]
            try:
                prompt, valid = left_pad_prompts(ids, bos, cfg.block_size, window)
            except ValueError as err:
                raise ValueError(f"input_ids: {err}") from None
        progress = None
        if streamer is not None:
            streamer.put(_streamed_prompt(input_ids, rows, subset))
            progress = BlockStream(streamer, max_new)
        result = sample_fn(len(subset), cfg, generator, device, prompt, valid, progress)
        if streamer is not None:
            streamer.end()
        start = result.tokens.shape[1] - cfg.length if rows[0] is not None else 0
        return [
            _Row(
                result.tokens[j, start : int(result.lengths[j])][:max_new].tolist(),
                int(result.nfe_denoise[j]),
                int(result.nfe_total[j]),
                result.stop_reason[j],
            )
            for j in range(len(subset))
        ]

    def summed(previous: _Row, new: _Row) -> _Row:  # a redrawn row's NFEs count every draw
        return new._replace(
            nfe_denoise=previous.nfe_denoise + new.nfe_denoise,
            nfe_total=previous.nfe_total + new.nfe_total,
        )

    B = len(rows)
    was_training = model.training
    model.eval()
    try:
        samples = redraw_low_entropy(draw(list(range(B))), draw, summed)
    finally:
        model.train(was_training)
    pad = eos if pad_token_id is None else int(pad_token_id)
    prefix = input_ids.shape[1] if input_ids is not None else 0
    out = torch.full((B, prefix + max_new), pad, dtype=torch.long)
    if input_ids is not None:
        out[:, :prefix] = input_ids.cpu()
    lengths = torch.zeros(B, dtype=torch.long)
    for i, (ids, *_rest) in enumerate(samples):
        out[i, prefix : prefix + len(ids)] = torch.tensor(ids, dtype=torch.long)
        lengths[i] = prefix + len(ids)
    out = out.to(input_ids.device if input_ids is not None else device)
    if not return_dict_in_generate:
        return out
    return DiffusionGenerateOutput(
        sequences=out,
        lengths=lengths,
        nfe_denoise=torch.tensor([s.nfe_denoise for s in samples]),
        nfe_total=torch.tensor([s.nfe_total for s in samples]),
        stop_reason=[s.stop_reason for s in samples],
    )
