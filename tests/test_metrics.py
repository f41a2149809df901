"""metrics.py against hand-computed values: sample entropy, the unigram baseline, the
generative-perplexity judge's windows (a brute force) and the sample summaries."""

from __future__ import annotations

import math

import pytest
import torch

from metrics import (
    GenerativePerplexity,
    sliding_windows,
    summarize_samples,
    unigram_entropy,
    unigram_perplexity,
)


def test_unigram_entropy_and_perplexity_by_hand():
    assert unigram_entropy([7, 7, 3, 9]) == pytest.approx(
        -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    )
    # train counts 0: 3, 1: 1, 2: 0 -> add-one 4, 2, 1 over 7; eval [0, 2]
    ppl = unigram_perplexity(torch.tensor([0, 0, 0, 1]), torch.tensor([[0, 2]]), vocab_size=3)
    assert ppl == pytest.approx(math.exp(-(math.log(4 / 7) + math.log(1 / 7)) / 2))


def brute_force_nll(judge, ids: torch.Tensor, first: int) -> tuple[float, int]:
    """Target i >= first (never the judge's EOS) scored in the one window that covers it from
    its first scored position on, with the preceding tokens of that window as context."""
    window, eos = judge.window, judge._tokenizer.eos_token_id
    spans = sliding_windows(len(ids), window, window // 2)
    total, scored = 0.0, 0
    with torch.no_grad():
        for i in range(max(first, 1), len(ids)):
            if ids[i] == eos:
                continue
            (start, end, _) = next(s for s in spans if s[2] <= i < s[1])
            logits = judge._model(ids[start:end][None]).logits[0, i - 1 - start]
            total -= torch.log_softmax(logits.double(), -1)[ids[i]].item()
            scored += 1
    return total, scored


def test_judge_scores_every_target_once_with_its_window(judge_dir):
    """Brute force over a text longer than the judge's 48 positions: every token of the text
    is scored after the judge's BOS, once, in the window that covers it; the judge's EOS
    (also its pad) is never a target. With GPT-2's BOS <|endoftext|> this is the reference's
    scoring of "<|endoftext|>" + text (an OpenWebText sample with its BOS)."""
    judge = GenerativePerplexity(str(judge_dir), torch.device("cpu"))
    text = " ".join(["Now is the winter of our discontent made glorious summer"] * 9)
    text += " <|endoftext|> by this sun of York"
    total, count = judge.score(text)
    ids = judge._tokenizer("<|endoftext|>" + text, return_tensors="pt")["input_ids"][0]
    eos = judge._tokenizer.eos_token_id
    assert judge._tokenizer.bos_token_id == eos == ids[0]
    assert judge.window == 48 and len(ids) > 2 * judge.window and (ids == eos).sum() == 2
    expected, scored = brute_force_nll(judge, ids, 1)
    assert count == scored == len(ids) - 2  # the BOS and the EOS target are not scored
    assert total == pytest.approx(expected, rel=1e-5)


def test_judge_scores_only_the_text_after_its_context(judge_dir):
    """score(text, context): the context (longer than a window here) conditions the text but
    is not scored; the windows are those of [BOS] + context + text."""
    judge = GenerativePerplexity(str(judge_dir), torch.device("cpu"))
    context = " ".join(["Now is the winter of our discontent"] * 8)
    text = " made glorious summer by this sun of York"
    total, count = judge.score(text, context)
    encode = judge._tokenizer.encode
    ids = torch.tensor([judge._tokenizer.bos_token_id, *encode(context), *encode(text)])
    first = len(ids) - len(encode(text))
    assert first > judge.window
    expected, scored = brute_force_nll(judge, ids, first)
    assert count == scored == len(encode(text))
    assert total == pytest.approx(expected, rel=1e-5)


def test_summaries_are_token_weighted_and_medians_exact():
    records = [
        {"length": 4, "entropy": 1.0, "nfe_denoise": 3, "nfe_total": 3, "gen_ppl": math.e,
         "gen_nll_sum": 2.0, "gen_num_tokens": 2},
        {"length": 10, "entropy": 2.0, "nfe_denoise": 9, "nfe_total": 11, "gen_ppl": math.e**2,
         "gen_nll_sum": 12.0, "gen_num_tokens": 6},
        {"length": 7, "entropy": 3.0, "nfe_denoise": 6, "nfe_total": 6, "gen_ppl": None,
         "gen_nll_sum": None, "gen_num_tokens": None},
    ]  # fmt: skip
    summary = summarize_samples(records, "judge")
    assert summary["gen_ppl_token_weighted"] == pytest.approx(math.exp(14 / 8))
    assert summary["gen_ppl_mean_per_sample"] == pytest.approx((math.e + math.e**2) / 2)
    assert summary["length_median"] == 7 and summary["length_max"] == 10
    assert summary["length_mean"] == 7 and summary["nfe_total_mean"] == pytest.approx(20 / 3)
    assert summarize_samples(records[:2], None)["length_median"] == 7  # (4 + 10) / 2
