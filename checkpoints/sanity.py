"""The loading sanity check: a silently mis-loaded checkpoint (wrong tokenizer, block size or
format) gives garbage; its perplexity on a few validation batches says so before any result is
trusted."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from checkpoints.layout import RELEASED
from utils import UserError, get_logger

if TYPE_CHECKING:
    from diffusion import Diffusion

log = get_logger("bd3lms")


def ppl_threshold(path: str, default: float | None = None, factor: float = 2.0) -> float | None:
    """`factor` x the paper's OWT perplexity (checkpoints.layout.RELEASED) for a released
    checkpoint, named by its repository or a local copy's directory name; else `default`."""
    name = path.rstrip("/")
    for repo, released in RELEASED.items():
        if name == repo or name.endswith("/" + repo.split("/")[1]):
            return factor * released.owt_ppl
    return default


# Rows the check reads: enough for a perplexity within a few percent, few enough to take
# seconds even at the paper's 2L = 2048 rows (64 x 2048 tokens)
SANITY_ROWS = 64


@torch.no_grad()
def sanity_check_perplexity(
    module: Diffusion, batches, threshold: float | None, what: str, max_rows: int = SANITY_ROWS
) -> float:
    """Perplexity of `module` (EMA weights when it evaluates with them) on the first `max_rows`
    rows of `batches` (dicts with input_ids and attention_mask), computed as validation does,
    on the module's device; logs a loud warning when it exceeds `threshold`. Returns the
    perplexity."""
    was_training = module.training
    module.eval()
    swap = module.ema is not None and module.use_ema_for_eval
    if swap:
        module.ema.store(module.backbone)
        module.ema.copy_to(module.backbone)
    try:
        eps_min, eps_max = (
            torch.tensor(e, dtype=torch.float32, device=module.device)
            for e in module.algorithm.eval_interval()
        )
        generator = torch.Generator(device=module.device).manual_seed(0)
        nll_sum, count, rows = 0.0, 0.0, 0
        for batch in batches:
            if rows >= max_rows:
                break
            x0 = batch["input_ids"][: max_rows - rows].to(module.device)
            mask = batch["attention_mask"][: max_rows - rows].to(module.device)
            rows += x0.shape[0]
            out = module.algorithm.loss(
                module.network, x0, mask, eps_min, eps_max, train=False, generator=generator
            )
            nll_sum += float(out.nlls.sum())
            count += float(out.token_mask.sum())
    finally:
        if swap:
            module.ema.restore(module.backbone)
        module.train(was_training)
    if count == 0:
        raise UserError(f"{what}: no tokens to measure the loading sanity check on")
    ppl = math.exp(nll_sum / count)
    if threshold is not None and ppl > threshold:
        banner = "!" * 78
        log.warning(
            "\n%s\n%s: perplexity %.2f on %d tokens exceeds the sanity threshold %.2f.\n"
            "The weights may have loaded wrongly (wrong tokenizer, block size or checkpoint "
            "format), or the data differ from the checkpoint's. Check before trusting results.\n"
            "%s",
            banner,
            what,
            ppl,
            int(count),
            threshold,
            banner,
        )
    else:
        log.info(
            "%s: loading sanity check perplexity %.2f over %d rows on %s (threshold %s)",
            what, ppl, rows, module.device, threshold,
        )  # fmt: skip
    return ppl


# ----------------------------------------------------------------------------------------------
