"""The low-entropy retry rule (sampling.generate.redraw_low_entropy) that sample_eval and the
HF generate() share: which rows are redrawn, how often, and what a redrawn row keeps."""

from __future__ import annotations

from typing import NamedTuple

from sampling.generate import MAX_RETRIES, redraw_low_entropy


class Row(NamedTuple):
    draw: int  # which draw of this row it is (0: the batch's first)
    nfe: int
    stop_reason: str


def fake_sampler(rejected_draws: dict[int, int]):
    """draw(indices): row i is flagged "rejected_low_entropy" on its first rejected_draws[i]
    draws; each draw costs 10 + i model calls. Records the indices of every call."""
    calls: list[list[int]] = []
    count = dict.fromkeys(rejected_draws, 0)

    def draw(indices: list[int]) -> list[Row]:
        calls.append(list(indices))
        out = []
        for i in indices:
            bad = count[i] < rejected_draws[i]
            out.append(Row(count[i], 10 + i, "rejected_low_entropy" if bad else "length"))
            count[i] += 1
        return out

    return draw, calls


def summed(previous: Row, new: Row) -> Row:
    return new._replace(nfe=previous.nfe + new.nfe)


def test_rejected_rows_alone_are_redrawn_until_accepted_nfe_summed_or_last():
    draw, calls = fake_sampler({0: 0, 1: 2, 2: 1})  # row 1 rejected twice, row 2 once
    rows = redraw_low_entropy(draw([0, 1, 2]), draw, summed)
    assert calls == [[0, 1, 2], [1, 2], [1]]
    assert [r.draw for r in rows] == [0, 2, 1]
    assert [r.stop_reason for r in rows] == ["length"] * 3
    assert [r.nfe for r in rows] == [10, 3 * 11, 2 * 12]  # every draw's calls (the HF rule)
    draw, _ = fake_sampler({0: 0, 1: 2, 2: 1})
    rows = redraw_low_entropy(draw([0, 1, 2]), draw)
    assert [r.nfe for r in rows] == [10, 11, 12]  # the default keeps the last draw's


def test_a_row_rejected_every_time_keeps_its_last_draw_after_max_retries():
    draw, calls = fake_sampler({0: 10**6, 1: 0})
    rows = redraw_low_entropy(draw([0, 1]), draw, summed)
    assert calls[1:] == [[0]] * MAX_RETRIES
    assert rows[0] == Row(MAX_RETRIES, (MAX_RETRIES + 1) * 10, "rejected_low_entropy")
    assert rows[1] == Row(0, 11, "length")


def test_hf_generate_sums_a_redrawn_rows_nfe_over_its_draws(monkeypatch):
    """generate() on the shared rule: the row flagged twice is drawn three times, alone after
    the first, and reports every draw's model calls (sample_eval records the last draw's)."""
    import torch

    import registry
    from hf import BD3LM, BD3LMConfig
    from sampling import SampleOutput

    config = BD3LMConfig(
        block_size=2, vocab_size=11, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1,
        n_heads=2, dropout=0.0, attn_backend="sdpa",
    )  # fmt: skip
    model = BD3LM(config).eval()
    build, sizes = registry.build_sampler, []

    def build_fake(*args, **kwargs):
        cfg, _ = build(*args, **kwargs)

        def sample_fn(batch, cfg, generator, device, prompt, valid, progress):
            sizes.append(batch)
            rejected = len(sizes) <= 2  # the last row, on the first two draws
            return SampleOutput(
                tokens=torch.full((batch, cfg.length), 3),
                lengths=torch.full((batch,), cfg.length),
                nfe_denoise=torch.full((batch,), 5),
                nfe_total=torch.full((batch,), 7),
                stop_reason=["length"] * (batch - 1)
                + ["rejected_low_entropy" if rejected else "length"],
                prompt_pad=torch.zeros(batch, dtype=torch.long),
            )

        return cfg, sample_fn

    monkeypatch.setattr(registry, "build_sampler", build_fake)
    out = model.generate(num_samples=2, max_new_tokens=4, return_dict_in_generate=True)
    assert sizes == [2, 1, 1]
    assert out.nfe_denoise.tolist() == [5, 15] and out.nfe_total.tolist() == [7, 21]
    assert out.stop_reason == ["length", "length"]


def test_sample_eval_records_a_redrawn_rows_last_draw(tmp_path):
    """sample_eval on the shared rule: the row flagged twice is drawn three times, alone after
    the first; its record holds the last draw (tokens and model calls)."""
    import types

    import torch

    from sampling import SampleOutput, SamplerConfig
    from sampling import generate as generation

    class Tokens:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    sizes = []

    def sample_fn(batch, cfg, generator, device, prompt, valid, progress):
        sizes.append(batch)
        rejected = len(sizes) <= 2  # the last row, on the first two draws
        return SampleOutput(
            tokens=torch.full((batch, 4), len(sizes)),
            lengths=torch.full((batch,), 4),
            nfe_denoise=torch.full((batch,), 4 + len(sizes)),
            nfe_total=torch.full((batch,), 4 + len(sizes)),
            stop_reason=["length"] * (batch - 1)
            + ["rejected_low_entropy" if rejected else "length"],
            prompt_pad=torch.zeros(batch, dtype=torch.long),
        )

    vocab = types.SimpleNamespace(bos_id=0, mask_id=9, eos_id=0, tokenizer=Tokens())
    cfg = SamplerConfig(length=4, block_size=4, num_steps=1, context=8, bos_id=0, mask_id=9,
                        eos_id=0, reject_low_entropy=True)  # fmt: skip
    job = generation.GenerationJob(2, 1, 0, str(tmp_path), show_progress=False)
    seconds = []  # the sampler's own time, one entry per draw (sample_eval's tokens/s)
    records = generation.generate(sample_fn, cfg, job, vocab, None, "cpu", sampling_seconds=seconds)
    assert sizes == [2, 1, 1] and len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert [r["token_ids"] for r in records] == [[1] * 4, [3] * 4]
    assert [r["nfe_denoise"] for r in records] == [5, 7]
    assert [r["stop_reason"] for r in records] == ["length", "length"]
