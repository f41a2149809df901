"""The text sample_eval hands to the generative-perplexity judge (sampling/generate.py): the
generated tokens only, for every model, never the BOS string (RoBERTa's `<s>`, BERT's `[CLS]`,
which a GPT-2 judge scores as several tokens of text) nor the prompt, which conditions the
judge unscored; samples.jsonl keeps the whole row in `text` and `token_ids`."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

import sampling
from metrics import GenerativePerplexity
from sampling import generate as generation


def bert_vocab(data_cache):
    import dataloader

    cfg = OmegaConf.create({"tokenizer_name_or_path": "bert-base-uncased", "cache_dir": data_cache})
    return dataloader.get_vocab(cfg)


def fake_sampler(length: int, bos: int):
    """A sampler with the samplers' layout: [BOS] + `length` - 1 generated ids without a
    prompt, the left-padded prompt then `length` generated ids with one (ids 2000..2999 of
    the BERT vocabulary: whole words)."""

    def sample_fn(batch_size, cfg, generator, device, prompt, valid, progress):
        if prompt is None:
            start, pad = torch.full((batch_size, 1), bos), torch.zeros(batch_size, dtype=torch.long)
            new = length - 1
        else:
            start, pad, new = prompt, (~valid).sum(-1), length
        tokens = torch.cat([start, torch.randint(2000, 3000, (batch_size, new))], dim=1)
        lengths = torch.full((batch_size,), tokens.shape[1])
        reasons = ["length"] * batch_size
        return sampling.SampleOutput(tokens, lengths, lengths, lengths, reasons, pad)

    return sample_fn


def run(tmp_path, vocab, judge, prompts=None):
    ids = {"bos_id": vocab.bos_id, "mask_id": vocab.mask_id, "eos_id": vocab.eos_id}
    cfg = sampling.SamplerConfig(length=12, block_size=4, num_steps=1, context=32, **ids)
    job = generation.GenerationJob(2, 1, 0, str(tmp_path), prompts=prompts, show_progress=False)
    return generation.generate(fake_sampler(12, vocab.bos_id), cfg, job, vocab, judge, "cpu")


def test_judge_scores_the_generated_tokens_without_the_bos(tmp_path, data_cache, judge_dir):
    """BERT's BOS decodes to "[CLS]", four GPT-2 tokens: none of them is scored, and every
    generated token is (after the judge's own BOS)."""
    vocab = bert_vocab(data_cache)
    judge = GenerativePerplexity(str(judge_dir), torch.device("cpu"))
    records = run(tmp_path, vocab, judge)
    encode = judge._tokenizer.encode
    for record in records:
        ids = record["token_ids"]
        assert ids[0] == vocab.bos_id and record["text"].startswith("[CLS]")  # the whole row
        generated = vocab.tokenizer.decode(ids[1:])
        assert record["gen_num_tokens"] == len(encode(generated)) < len(encode(record["text"]))
        assert record["gen_nll_sum"] == judge.score(generated)[0]


class RecordingJudge:
    def __init__(self):
        self.calls = []

    def score(self, text: str, context: str = "") -> tuple[float, int]:
        self.calls.append((text, context))
        return 1.0, 1


def test_prompts_condition_the_judge_unscored(tmp_path, data_cache):
    """With (left-padded) prompts the judge gets the generated ids' text and, as context, the
    prompt's, neither with the BOS nor the padding."""
    vocab = bert_vocab(data_cache)
    judge = RecordingJudge()
    prompts = ["the king", "o romeo , wherefore art thou"]
    records = run(tmp_path, vocab, judge, prompts)
    for record, (text, context), prompt in zip(records, judge.calls, prompts, strict=True):
        ids = record["token_ids"]
        prompt_ids = vocab.tokenizer.encode(prompt, add_special_tokens=False)
        given = 1 + len(prompt_ids)
        assert ids[:given] == [vocab.bos_id, *prompt_ids] and len(ids) == given + 12
        assert context == vocab.tokenizer.decode(prompt_ids)
        assert text == vocab.tokenizer.decode(ids[given:])
