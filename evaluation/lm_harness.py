"""The lm-evaluation-harness model `bd3lm`: likelihoods and generations of our checkpoints.

    BD3LMHarness(checkpoint=PATH, mc_samples=8, seed=0, device="cpu", batch_size=1)

PATH: an HF directory (scripts/export_hf.py; the released format) with its tokenizer, or one
of our Lightning .ckpt files (exported to a temporary directory). The objective comes from the
config (models.hf.generation.objective_from_config): AR (causal), BD3-LM (cross_attn, block
size K) or MDLM (one block of the window).

loglikelihood(context, continuation): the two are encoded together and split at the context's
end (as lm-eval's HF model does), BOS at position 0 as in training; the sequence is cut from
the left to the trained window (BOS kept), and the block grid is counted from position 0.
- AR: the exact log-likelihood of the continuation.
- BD3-LM / MDLM: minus a conditional NELBO (paper Sec. 3, Eq. 8 with the context clean):
  every continuation token is masked with probability t of its block and weighted 1/t
  (log-linear schedule), context tokens are never masked (also in the block that straddles
  the boundary), later blocks condition on the clean x_0 of earlier ones. t is drawn per
  block in the objective's evaluation interval (eval_interval: t = 1 for K = 1, where the
  bound is the exact NLL) with antithetic strata over the `mc_samples` draws, which are
  averaged. A lower bound on log p(continuation | context).
  is_greedy: for each block, every continuation token of it is the argmax given the clean
  context and the block's continuation tokens all masked (one call per block).
loglikelihood_rolling(text): the same bound over windows of the trained context (each window
  [BOS] + up to window - 1 tokens, every token noised), summed.
generate_until(context, gen_kwargs): `model.generate` (the sample_eval sampler, KV cache when
  the model allows it) with `max_gen_toks` (default 256), cut at the first `until` string;
  MDLM checkpoints (their sampler takes no prompt) are refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch
from torch import Tensor

from utils import UserError

try:
    from lm_eval.api.model import LM
except ImportError as err:  # pragma: no cover - requirements-eval.txt
    raise ImportError(
        "evaluation.lm_harness needs lm-eval: pip install -r requirements-eval.txt"
    ) from err


def _load(checkpoint: str, stack: contextlib.ExitStack):
    """(model, tokenizer) for an HF directory / hub id, or our .ckpt via a temporary export."""
    from transformers import AutoTokenizer

    from checkpoints.layout import read_config_json, resolve_pretrained
    from models.hf import BD3LM, MDLM

    path = str(checkpoint)
    if path.endswith(".ckpt"):
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, root)
        from scripts.export_hf import main as export_main

        out = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "hf")
        if export_main([path, out]) != 0:
            raise UserError(f"checkpoint={path} cannot be exported to an HF directory")
        path = out
    try:
        local = resolve_pretrained(path)
        model_type = read_config_json(local).get("model_type")
        cls = {"bd3lm": BD3LM, "mdlm": MDLM}.get(model_type)
        if cls is None:
            raise UserError(
                f"checkpoint={checkpoint}: model_type={model_type!r}; valid: bd3lm, mdlm"
            )
        return cls.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"checkpoint={checkpoint}: {reason[:200]}") from None


class BD3LMHarness(LM):
    """lm-eval's LM over our checkpoints; see the module docstring for the estimators."""

    def __init__(
        self,
        checkpoint: str,
        mc_samples: int = 8,
        seed: int = 0,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        dtype: str | None = None,
        kv_cache: bool | None = None,
        nucleus_p: float = 1.0,
        **_ignored,
    ):
        super().__init__()
        from models.hf.generation import objective_from_config, token_ids

        if int(mc_samples) < 1:
            raise UserError(f"mc_samples={mc_samples} must be >= 1")
        self._stack = contextlib.ExitStack()
        self.model, self.tokenizer = _load(checkpoint, self._stack)
        if dtype is not None or device is not None:
            from models.hf.configuration import resolve_device, resolve_dtype

            target = resolve_dtype(dtype)
            if target not in (None, "auto"):
                self.model.to(target)
            if device is not None:
                self.model.to(resolve_device("auto" if device == "auto" else device))
        self.model.eval()
        self.config = self.model.config
        self.bos, self.mask, self.eos = token_ids(self.config)
        self.objective = objective_from_config(self.config, self.mask)
        self.window = int(self.config.model_length)
        self.is_ar = bool(getattr(self.config, "causal", False))
        self.cross_attn = bool(getattr(self.config, "cross_attn", False)) and not self.is_ar
        self.block = 1 if self.is_ar else int(self.objective.block_size)
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.kv_cache = self.objective.supports_kv_cache if kv_cache is None else bool(kv_cache)
        self.nucleus_p = float(nucleus_p)
        self.interval = (1.0, 1.0) if self.is_ar else self.objective.eval_interval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's HF split: trailing spaces of the context move to the continuation, both
        encoded together and split at the context's token count."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self._encode(context + continuation)
        n_ctx = len(self._encode(context))
        return whole[:n_ctx], whole[n_ctx:]

    def _sequence(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """[BOS] + ctx + cont cut from the left to the window (BOS kept) -> (ids, start of the
        continuation)."""
        if len(cont) + 1 > self.window:
            cont = cont[-(self.window - 1) :]  # the harness's own rule: keep the tail
        keep = self.window - 1 - len(cont)
        ctx = ctx[len(ctx) - keep :] if keep < len(ctx) else ctx
        if keep <= 0:
            ctx = []
        return [self.bos, *ctx, *cont], 1 + len(ctx)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self, ids: list[int], start: int, generator: torch.Generator
    ) -> tuple[float, bool, Tensor]:
        """Log-likelihood estimate of ids[start:] given ids[:start] (the module docstring):
        -> (mean over draws, is_greedy, per-draw values (mc_samples,))."""
        N = len(ids)
        x0 = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self.is_ar:
            logits = self.model(x0[None], return_dict=False)
            from algorithms.ar import ar_log_probs

            logp = ar_log_probs(logits, self.mask)[0, :-1]
            target = x0[1:]
            token_lp = logp.gather(-1, target[:, None])[:, 0][start - 1 :]
            greedy = bool((logp.argmax(-1)[start - 1 :] == target[start - 1 :]).all())
            value = float(token_lp.sum())
            return value, greedy, torch.tensor([value])
        L = self.window
        K = self.block
        M = self.mc_samples
        pad = torch.full((L - N,), self.eos, dtype=torch.long, device=self.device)
        clean = torch.cat([x0, pad])  # (L,) padding after the continuation: never noised
        cont = torch.zeros(L, dtype=torch.bool, device=self.device)
        cont[start:N] = True
        blocks = L // K
        lo, hi = self.interval
        u = torch.rand(blocks, generator=generator).to(self.device)
        strata = (u[None, :] + torch.arange(M, device=self.device)[:, None] / M) % 1  # (M, nb)
        t = (lo + (hi - lo) * strata).double() if (lo, hi) != (1.0, 1.0) else strata * 0 + 1
        t_tok = t.repeat_interleave(K, dim=1)  # (M, L)
        draw = torch.rand(M, L, generator=generator, dtype=torch.float64).to(self.device)
        masked = (draw < t_tok) & cont
        xt = torch.where(masked, torch.full_like(clean, self.mask), clean.expand(M, L))
        logp = self._subs_logprobs(xt, clean.expand(M, L))  # (M, L, V)
        token_lp = logp.gather(-1, clean.expand(M, L)[..., None])[..., 0]
        per_draw = (token_lp * masked / t_tok).sum(-1)  # (M,) minus the NELBO of each draw
        all_masked = cont[None].expand(1, L)
        xt_g = torch.where(all_masked, torch.full_like(clean, self.mask), clean[None])
        argmax = self._subs_logprobs(xt_g, clean[None]).argmax(-1)[0]
        greedy = bool((argmax[cont] == clean[cont]).all())
        return float(per_draw.float().mean()), greedy, per_draw.float().cpu()

    def _subs_logprobs(self, xt: Tensor, x0: Tensor) -> Tensor:
        from algorithms.base import subs_log_probs

        if self.cross_attn:
            logits = self.model(torch.cat([xt, x0], dim=1), return_dict=False)
        else:
            logits = self.model(xt, return_dict=False)
        return subs_log_probs(logits, xt, self.mask)

    # ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = self._split(context, continuation)
            ids, start = self._sequence(ctx, cont)
            value, greedy, _ = self.score(ids, start, generator)
            out.append((value, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        step = self.window - 1
        for request in requests:
            (text,) = request.args
            tokens = self._encode(text)
            total = 0.0
            for begin in range(0, max(len(tokens), 1), step):
                chunk = tokens[begin : begin + step]
                total += self.score([self.bos, *chunk], 1, generator)[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        if not self.objective.supports_prompts:
            raise UserError(
                "generate_until: this checkpoint (MDLM) samples without a prompt; use an AR or "
                "BD3-LM checkpoint for generation tasks"
            )
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self._encode(context)
            keep = self.window - 1 - self.block
            ids = ids[len(ids) - keep :] if len(ids) > keep else ids
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            result = self.model.generate(
                input_ids, max_new_tokens=max_new, seed=self.seed, kv_cache=self.kv_cache,
                nucleus_p=self.nucleus_p, var_length=False, reject_low_entropy=False,
            )  # fmt: skip
            text = self.tokenizer.decode(result[0, len(ids) :], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def register() -> None:
    """Register BD3LMHarness with lm-eval's model registry as `bd3lm` (idempotent)."""
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model("bd3lm") is BD3LMHarness:
            return
    except (KeyError, ValueError):
        pass
    register_model("bd3lm")(BD3LMHarness)
