"""Evaluation numbers that are not a model's own loss: per-sample entropy and the unigram
baseline the demo compares its perplexity against."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample."""
    counts = torch.tensor(list(Counter(tokens).values()), dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def unigram_perplexity(train_ids: Tensor, eval_ids: Tensor, vocab_size: int) -> float:
    """Perplexity of `eval_ids` under a unigram model fitted on `train_ids` with add-one
    (Laplace) smoothing over `vocab_size` symbols. Both are integer tensors of any shape."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return math.exp(-log_p[eval_ids.flatten()].mean().item())


# ----------------------------------------------------------------------------------------------
# Error bars of a Monte-Carlo NELBO (docs/error_bars.md)
# ----------------------------------------------------------------------------------------------
Z_95 = 1.959963984540054  # the two-sided 95% normal quantile
ROW_STATISTICS = 5  # length of `row_statistics`


def row_statistics(draws: Tensor, tokens: Tensor) -> Tensor:
    """Sums over rows that `nll_stderr` needs, float64 (5,), additive over batches and ranks.

    draws: (D, B) per-row NELBO sums (nats, already token-weighted) of D independent draws;
    tokens: (B,) per-row token weights (0 for padding rows, which then count nowhere).
    Returns [sum m^2, sum m n, sum n^2, rows with n > 0, sum var_d / D], m the mean of a row's
    draws and var_d their unbiased variance (0 when D = 1).
    """
    draws, tokens = draws.double(), tokens.double()
    mean = draws.mean(0)
    within = draws.var(0, unbiased=True) / draws.shape[0] if draws.shape[0] > 1 else 0 * mean
    return torch.stack(
        [
            (mean * mean).sum(),
            (mean * tokens).sum(),
            (tokens * tokens).sum(),
            (tokens > 0).sum().double(),
            within.sum(),
        ]
    )


def nll_stderr(nll: float, num_tokens: float, stats: Tensor, draws: int, exact: bool):
    """(standard error of the per-token NELBO estimate `nll`, how it was obtained); the error
    is None ("none") when it cannot be estimated (no tokens, or one draw of a single row).

    The estimate is sum_i m_i / N over rows i (N tokens). Its Monte-Carlo error, given the
    data, is sqrt(sum_i Var(m_i)) / N:
      "exact": the objective is deterministic (AR, K = 1 at t = 1): 0;
      "between_draws" (draws >= 2): Var(m_i) estimated from row i's own draws; shrinks as
        1/sqrt(draws);
      "between_rows" (one draw): the delta-method error of the ratio estimator from the spread
        of the rows' residuals m_i - nll n_i, R/(R-1) corrected. It also counts the spread of
        the data (and of the rows' antithetic strata), so it bounds the Monte-Carlo error from
        above.
    stats: `row_statistics` summed over every batch and rank.
    """
    if exact:
        return 0.0, "exact"
    if num_tokens <= 0:
        return None, "none"
    sq, cross, tok_sq, rows, within = (float(v) for v in stats)
    if draws > 1:
        return math.sqrt(max(within, 0.0)) / num_tokens, "between_draws"
    if rows < 2:
        return None, "none"
    residual = max(sq - 2 * nll * cross + nll * nll * tok_sq, 0.0)
    return math.sqrt(rows / (rows - 1) * residual) / num_tokens, "between_rows"


def ppl_interval(nll: float, stderr: float | None, z: float = Z_95) -> list[float] | None:
    """[low, high] perplexity interval exp(nll -+ z stderr) (95% for the default z); None
    when there is no error estimate."""
    if stderr is None:
        return None
    return [math.exp(nll - z * stderr), math.exp(nll + z * stderr)]


# ----------------------------------------------------------------------------------------------
# Generative perplexity
# ----------------------------------------------------------------------------------------------
JUDGE_KEY = "eval.gen_ppl_eval_model_name_or_path"  # the setting that names the judge (messages)


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window: window 0 scores targets 1..end-1, window j >= 1
    covers [j stride, j stride + window) and scores targets from j stride + window - stride,
    so every position 1..length-1 is scored exactly once."""
    count = max(math.ceil((length - window + stride) / stride), 1)
    spans = []
    for j in range(count):
        start = j * stride
        end = min(start + window, length)
        spans.append((start, end, 1 if j == 0 else start + window - stride))
    return spans


class GenerativePerplexity:
    """A causal LM judge, loaded on first use (never at training time) by
    models.pretrained.load_causal_lm: a hub id, a local directory, a `.gguf` file or the packaged
    `smollm2-135m` (a GGUF model is rebuilt once as a float32 model and cached under `cache_dir`,
    default the data cache directory). `score` retokenises a generated text with the judge's
    tokenizer and scores it after the judge's own BOS (when its tokenizer has one) and an
    optional context; targets that are one of the judge's special tokens (BOS, EOS, UNK, PAD
    and the added special tokens; GPT-2 has only <|endoftext|>) are not scored."""

    def __init__(
        self,
        name_or_path: str,
        device: torch.device,
        window: int = 1024,
        cache_dir: str | None = None,
    ):
        self.name_or_path = name_or_path
        self.device = device
        self.max_window = window
        self.cache_dir = cache_dir
        self._model = None
        self._tokenizer = None
        self._unscored = None

    def check(self) -> None:
        """Fail early (before sampling) if the judge cannot be loaded: UserError naming the key
        for a packaged model or GGUF file that is missing (or a missing `gguf` package),
        OSError / ValueError for a directory or hub id whose config transformers cannot read."""
        from models.pretrained import resolve

        source = resolve(self.name_or_path, key=JUDGE_KEY)
        if source.kind in ("directory", "hub"):
            from transformers import AutoConfig

            AutoConfig.from_pretrained(source.location)

    def _load(self) -> None:
        from models.pretrained import load_causal_lm

        model, self._tokenizer = load_causal_lm(
            self.name_or_path, cache_dir=self.cache_dir, dtype=torch.float32, key=JUDGE_KEY
        )
        self._model = model.to(self.device).eval()
        tokenizer = self._tokenizer
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self._unscored = torch.tensor(
            sorted(special | set(tokenizer.all_special_ids)), dtype=torch.long, device=self.device
        )
        limit = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", self.max_window
        )
        self.window = min(self.max_window, int(limit))

    @torch.no_grad()
    def score(self, text: str, context: str = "") -> tuple[float, int]:
        """-> (sum of NLL over the scored targets, their number) for one generated `text`, in
        float32 whatever autocast the caller runs under (the paper's protocol).

        The judge reads [its BOS] + context + text, each part retokenised on its own without
        special tokens, and scores the tokens of `text` only (not its special tokens): `text` is
        what a model generated, without the model's own BOS, whose string the judge would
        otherwise score as text; `context` (a prompt) conditions it unscored. With the GPT-2
        judge the BOS is <|endoftext|>, so an OpenWebText sample scores as the reference
        scores "<|endoftext|>" + text; `smollm2-135m` reads <|endoftext|> first too (its
        pretraining separator, models.pretrained.PACKAGED). Special tokens inside `text` (a
        document boundary of a sample) condition the judge where they occur and are not scored.
        A judge without a BOS and no context leaves the first token of `text` unscored (it has
        nothing to condition on)."""
        if self._model is None:
            self._load()
        ids, first = self._encode(text, context)
        with torch.autocast(device_type=torch.device(self.device).type, enabled=False):
            return self._score(ids, first)

    def _encode(self, text: str, context: str) -> tuple[Tensor, int]:
        """-> the judge's ids (N,) and the index of the first token of `text` that is scored."""
        tokenizer = self._tokenizer
        bos = tokenizer.bos_token_id
        prefix = [] if bos is None else [bos]
        if context:
            prefix += tokenizer.encode(context, add_special_tokens=False)
        ids = prefix + tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor(ids, dtype=torch.long, device=self.device), max(len(prefix), 1)

    def _score(self, ids: Tensor, first_target: int) -> tuple[float, int]:
        total, count = 0.0, 0
        for start, end, first in sliding_windows(len(ids), self.window, self.window // 2):
            chunk = ids[start:end]
            if len(chunk) < 2 or end <= first_target:  # nothing of `text` to score here
                continue
            logits = self._model(chunk[None]).logits[0, :-1].float()
            targets = chunk[1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            positions = torch.arange(start + 1, end, device=self.device)
            keep = (positions >= max(first, first_target)) & ~torch.isin(targets, self._unscored)
            total += float(nll[keep].sum())
            count += int(keep.sum())
        return total, count


# ----------------------------------------------------------------------------------------------
# Summaries of samples.jsonl records
# ----------------------------------------------------------------------------------------------
def gen_ppl_statistics(records: list[dict]) -> dict:
    """Generative perplexity of scored texts, with 95% intervals over the texts.

    records: dicts with `gen_nll_sum` (nats), `gen_num_tokens` and `gen_ppl` (= exp(sum /
    count); None for a text nothing of which was scored, left out). Returns num_scored;
    gen_ppl_token_weighted = exp(sum of NLL / sum of tokens) and its interval [lo, hi] =
    exp(nll -+ 1.96 se), se the delta-method error of that ratio over the texts (nll_stderr's
    "between_rows"); gen_ppl_mean_per_sample = the mean of the texts' gen_ppl and the half-width
    1.96 sd / sqrt(n) of its interval. Intervals are None below two scored texts."""
    scored = [r for r in records if r.get("gen_ppl") is not None]
    n = len(scored)
    total = sum(r["gen_num_tokens"] for r in scored)
    nll = sum(r["gen_nll_sum"] for r in scored) / total if total else None
    token_interval = per_sample_half = None
    if n > 1:
        sums = torch.tensor([r["gen_nll_sum"] for r in scored], dtype=torch.float64)
        counts = torch.tensor([r["gen_num_tokens"] for r in scored], dtype=torch.float64)
        stderr, _ = nll_stderr(nll, total, row_statistics(sums[None], counts), 1, exact=False)
        token_interval = ppl_interval(nll, stderr)
        ppls = torch.tensor([r["gen_ppl"] for r in scored], dtype=torch.float64)
        per_sample_half = Z_95 * float(ppls.std()) / math.sqrt(n)
    return {
        "num_scored": n,
        "gen_ppl_token_weighted": math.exp(nll) if nll is not None else None,
        "gen_ppl_token_weighted_ci95": token_interval,
        "gen_ppl_mean_per_sample": sum(r["gen_ppl"] for r in scored) / n if n else None,
        "gen_ppl_mean_per_sample_ci95": per_sample_half,
    }


def summarize_samples(records: list[dict], evaluator: str | None) -> dict:
    """The sample_eval.json fields from per-sample records (see sampling/generate.py); the
    generative perplexity fields are `gen_ppl_statistics`'."""
    n = len(records)
    lengths = sorted(r["length"] for r in records)

    def mean(key: str) -> float | None:
        return sum(r[key] for r in records) / n if n else None

    return {
        "num_samples": n,
        **gen_ppl_statistics(records),
        "entropy_mean": mean("entropy"),
        "length_mean": mean("length"),
        "length_median": (lengths[(n - 1) // 2] + lengths[n // 2]) / 2 if n else None,
        "length_max": lengths[-1] if n else None,
        "nfe_denoise_mean": mean("nfe_denoise"),
        "nfe_total_mean": mean("nfe_total"),
        "evaluator": evaluator,
    }


def plot_lengths(lengths: list[int], path: str) -> None:
    """A histogram of sample lengths, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(lengths, bins=min(30, max(1, len(set(lengths)))))
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
