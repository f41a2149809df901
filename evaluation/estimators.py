"""The log-likelihood estimates of the lm-eval model `bd3lm` (evaluation.lm_harness, whose
module docstring states them): the conditional NELBO of a continuation given its clean context
from the objective's own loss, the exact AR log-likelihood, and is_greedy.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


class Estimators:
    """`score` / `score_batch` for evaluation.lm_harness.BD3LMHarness, which mixes this class
    in and sets what it reads: network (models.network.BackboneNetwork), objective and kind
    (its family), is_ar, block (K), window (L), mc_samples, interval (the objective's
    evaluation interval of t), the bos / mask / eos ids and device."""

    @torch.no_grad()
    def score(
        self, ids: list[int], start: int, generator: torch.Generator
    ) -> tuple[float, bool, Tensor]:
        """Log-likelihood estimate of ids[start:] given ids[:start] (evaluation.lm_harness):
        -> (mean over draws, is_greedy, per-draw values (mc_samples,) float64 on the CPU)."""
        return self.score_batch([(ids, start)], generator)[0]

    @torch.no_grad()
    def score_batch(
        self,
        items: list[tuple[list[int], int]],
        generator: torch.Generator | list[torch.Generator],
    ) -> list[tuple[float, bool, Tensor]]:
        """`score` for several (ids, start) in one forward (mc_samples rows each, plus one
        forward for is_greedy). generator: one per item, or one whose draws the items take in
        order; either way the estimates do not depend on how requests are batched."""
        if self.is_ar:
            return self._score_ar(items)
        generators = generator if isinstance(generator, list) else [generator] * len(items)
        K, M, S, device = self.block, self.mc_samples, self.window, self.device
        lo, hi = self.interval
        x0s, xts, times, conts, hidden = [], [], [], [], []
        for (ids, start), generator in zip(items, generators, strict=True):
            N = len(ids)
            x0 = torch.full((S,), self.eos, dtype=torch.long)
            x0[:N] = torch.tensor(ids, dtype=torch.long)
            x0 = x0.to(device)
            cont = torch.zeros(S, dtype=torch.bool, device=device)
            cont[start:N] = True
            unknown = torch.zeros(S, dtype=torch.bool, device=device)
            unknown[N:] = True
            u = torch.rand(S // K, generator=generator, dtype=torch.float64)
            strata = (u[None, :] + torch.arange(M, dtype=torch.float64)[:, None] / M) % 1
            t = (lo + (hi - lo) * strata).to(device).repeat_interleave(K, dim=1)  # (M, S)
            draw = torch.rand(M, S, generator=generator, dtype=torch.float64).to(device)
            masked = ((draw <= t) & cont) | unknown
            x0s.append(x0.expand(M, S))
            xts.append(torch.where(masked, self.mask, x0))
            times.append(t)
            conts.append(cont)
            hidden.append(cont | unknown)
        x0 = torch.cat(x0s)
        nlls = self._nelbo_terms(x0, torch.cat(xts), torch.cat(times)).view(len(items), M, S)
        cont = torch.stack(conts)  # (n, S)
        per_draw = -(nlls.double() * cont[:, None]).sum(-1)  # (n, M)
        greedy = self._greedy(x0[::M], torch.stack(hidden), cont)
        return [(float(row.mean()), g, row.cpu()) for row, g in zip(per_draw, greedy, strict=True)]

    def _score_ar(self, items: list[tuple[list[int], int]]) -> list[tuple[float, bool, Tensor]]:
        """Exact: the AR log-probabilities (mask token excluded) of the continuation tokens,
        rows padded after their end (causal attention: padding is never seen)."""
        width = max(len(ids) for ids, _ in items)
        x0 = torch.full((len(items), width), self.eos, dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            x0[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        x0 = x0.to(self.device)
        logits = self.network(x0[:, :-1], None, self.objective.train_layout)
        log_p = self.objective.log_probs(logits, x0[:, :-1])  # (n, width - 1, V)
        target = x0[:, 1:]
        token_lp = log_p.gather(-1, target[..., None])[..., 0].double()
        argmax = log_p.argmax(-1)
        out = []
        for row, (ids, start) in enumerate(items):
            span = slice(start - 1, len(ids) - 1)
            value = float(token_lp[row, span].sum())
            greedy = bool((argmax[row, span] == target[row, span]).all())
            out.append((value, greedy, torch.tensor([value], dtype=torch.float64)))
        return out

    def _nelbo_terms(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """(M, S) per-token NELBO terms of x_t (only masked positions are non-zero), from the
        objective's own loss with the per-token times t (M, S)."""
        ones = torch.ones_like(x0)
        return self.objective.nelbo_at(self.network, x0, xt, t.float(), ones).nlls

    def _greedy(self, x0: Tensor, hidden: Tensor, cont: Tensor) -> list[bool]:
        """Per row of x0 (n, S): whether every continuation token (cont, (n, S)) is the argmax
        (mask token excluded) with all of `hidden` (n, S) masked."""
        from algorithms.base import NEG_INF

        xt = torch.where(hidden, self.mask, x0)
        capabilities = self.objective.capabilities
        tokens = torch.cat([xt, x0], dim=1) if capabilities.two_stream else xt
        layout = dataclasses.replace(self.objective.train_layout, outputs=cont)
        level = self.objective.noise_sigma_max if capabilities.time_conditioned else 0.0
        sigma = torch.full((x0.shape[0],), level, device=x0.device)  # t = 1: hidden masked
        logits = self.network(tokens, sigma, layout).float()  # (cont.sum(), V), row-major
        logits[:, self.mask] = NEG_INF
        hits = (logits.argmax(-1) == x0[cont]).cpu()
        counts = cont.sum(-1).tolist()
        return [bool(h.all()) for h in torch.split(hits, counts)]
