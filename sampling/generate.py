"""`mode=sample_eval` below the config: batches of samples (optionally continuing prompts),
the low-entropy retries, per-sample metrics, and the files of the run.

Outputs in `out_dir` (the run directory, or `sampling.logdir`): `samples.jsonl` (one line per
sample; `samples.rank{r}.jsonl` per rank when several processes sample), `sample_eval.json`
recomputed from every samples*.jsonl line in the directory, and `lengths.png`. Samples are
written as they are made to a new file beside it (`.samples.jsonl.<random>.partial`), which
only a run that completes puts in place: in the run directory it replaces the previous run's
samples; in a `sampling.logdir` it is appended to the file in one write (samples accumulate
across seeds). A failed run leaves the previous samples as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, TextIO, TypeVar

import torch

from metrics import GenerativePerplexity, plot_lengths, summarize_samples, unigram_entropy
from sampling.config import SampleOutput, SamplerConfig
from sampling.context import encode_prompts
from utils import atomic_path

MAX_RETRIES = 10  # the reference's retries for rejected (low-entropy) samples

Row = TypeVar("Row")  # one sample of a batch, with a `stop_reason`


def redraw_low_entropy(
    samples: list[Row],
    draw: Callable[[list[int]], list[Row]],
    keep: Callable[[Row, Row], Row] = lambda previous, new: new,
) -> list[Row]:
    """The reference's retry rule: the rows of `samples` (a batch's first draw) whose
    stop_reason is "rejected_low_entropy" are drawn again, `draw(indices)` giving one new row
    per index (in the order given), up to MAX_RETRIES times; the last draw is kept, flagged if
    still rejected. keep(previous, new) is what a redrawn row becomes (default: the new draw).
    -> the batch's rows, in place of `samples` (a new list)."""
    samples = list(samples)
    for _ in range(MAX_RETRIES):
        redo = [i for i, s in enumerate(samples) if s.stop_reason == "rejected_low_entropy"]
        if not redo:
            break
        for i, new in zip(redo, draw(redo), strict=True):
            samples[i] = keep(samples[i], new)
    return samples


RANK_SEED_STRIDE = 1_000_003


@dataclasses.dataclass(frozen=True)
class GenerationJob:
    batch_size: int
    num_batches: int
    seed: int
    out_dir: str
    rank: int = 0
    world_size: int = 1
    prompts: list[str] | None = None  # one continuation per prompt when given
    show_progress: bool = True
    append: bool = False  # keep earlier runs' samples in out_dir (sampling.logdir)

    @property
    def file_name(self) -> str:
        return "samples.jsonl" if self.world_size == 1 else f"samples.rank{self.rank}.jsonl"


def _drop_stale_samples(job: GenerationJob) -> None:
    """Rank 0, when not appending, once its samples are in place: remove samples*.jsonl files
    that no rank of this run writes (left by an earlier run with another process count)."""
    current = {dataclasses.replace(job, rank=r).file_name for r in range(job.world_size)}
    for path in glob.glob(os.path.join(job.out_dir, "samples*.jsonl")):
        if os.path.basename(path) not in current:
            os.remove(path)


@contextlib.contextmanager
def _samples_file(job: GenerationJob) -> Iterator[TextIO]:
    """This rank's samples of this run, written to a new file that replaces the rank's file
    (job.append: is appended to it, in one write) only when the block completes; on an
    exception it is removed and the previous samples stay as they were."""
    path = os.path.join(job.out_dir, job.file_name)
    partial = os.path.join(job.out_dir, f".{job.file_name}.{secrets.token_hex(4)}.partial")
    # mode 0666 less the umask, as a plain open() gives the file it replaces
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as out:
            yield out
        if job.append:
            with open(partial, "rb") as new, open(path, "ab") as samples:
                samples.write(new.read())
        else:
            os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _rows(job: GenerationJob) -> list[list[str | None]]:
    """This rank's batches: prompt strings (or None) per row."""
    if job.prompts is None:
        batches = [[None] * job.batch_size for _ in range(job.num_batches)]
    else:
        p = job.prompts
        batches = [p[i : i + job.batch_size] for i in range(0, len(p), job.batch_size)]
    return batches[job.rank :: job.world_size]


class _Sample(NamedTuple):
    """One row of a SampleOutput: ids = [BOS, prompt..., generated...] (padding removed);
    given: how many leading ids the sampler was given (the BOS and the prompt)."""

    ids: list[int]
    given: int
    nfe_denoise: int
    nfe_total: int
    stop_reason: str


def _sample_rows(
    sample_fn, rows, vocab, cfg, generator, device, progress, autocast
) -> list[_Sample]:
    prompt = valid = None
    if rows[0] is not None:
        prompt, valid = encode_prompts(rows, vocab, cfg.block_size, cfg.context)
    with autocast():
        result = sample_fn(len(rows), cfg, generator, device, prompt, valid, progress)
    return _split(result, 1 if prompt is None else prompt.shape[1])


def generate(
    sample_fn,
    cfg: SamplerConfig,
    job: GenerationJob,
    vocab,
    evaluator: GenerativePerplexity | None,
    device: torch.device,
    autocast=contextlib.nullcontext,
    sampling_seconds: list[float] | None = None,
) -> list[dict]:
    """Run this rank's batches; every sample is written at once, to the file that replaces (or
    is appended to) the rank's jsonl file when all are done (`_samples_file`).

    sample_fn(batch_size, cfg, generator, device, prompt, prompt_valid, progress) is
    a sampler of sampling.build_sampler. Fixed-length samples flagged low-entropy are redrawn
    (`redraw_low_entropy`); a redrawn sample records its last draw's NFEs only (the HF
    generate() sums them over the draws). autocast: a context manager factory for the
    sampler's precision (e.g. Fabric.autocast); the judge always scores outside it, in
    float32 (the paper's protocol). sampling_seconds: when given, the wall time of every draw
    (the sampler alone: no judging, no writing) is appended to it."""
    generator = torch.Generator().manual_seed(job.seed + RANK_SEED_STRIDE * job.rank)
    os.makedirs(job.out_dir, exist_ok=True)
    records: list[dict] = []
    bar = _progress_bar(job, cfg)
    with _samples_file(job) as out:
        for batch_index, rows in enumerate(_rows(job)):
            progress = None if bar is None else (lambda n, committed=None: bar.update(n))

            def draw(subset, rows=rows, progress=None):  # redraws advance no progress bar
                picked = [rows[i] for i in subset]
                args = (vocab, cfg, generator, device, progress, autocast)
                start = time.perf_counter()
                samples = _sample_rows(sample_fn, picked, *args)  # tolist(): synchronised
                if sampling_seconds is not None:
                    sampling_seconds.append(time.perf_counter() - start)
                return samples

            samples = redraw_low_entropy(draw(range(len(rows)), progress=progress), draw)
            for row, sample in enumerate(samples):
                index = (batch_index * job.world_size + job.rank) * job.batch_size + row
                record = _record(sample, vocab, evaluator, rows[row], index, job)
                out.write(json.dumps(record) + "\n")
                out.flush()
                records.append(record)
    if not job.append and job.rank == 0:
        _drop_stale_samples(job)
    if bar is not None:
        bar.close()
    return records


def _split(result: SampleOutput, width: int) -> list[_Sample]:
    """width: the sampler's starting columns (the BOS, or the left-padded prompts)."""
    out = []
    for b in range(result.tokens.shape[0]):
        start, end = int(result.prompt_pad[b]), int(result.lengths[b])
        out.append(
            _Sample(
                result.tokens[b, start:end].tolist(),
                width - start,
                int(result.nfe_denoise[b]),
                int(result.nfe_total[b]),
                result.stop_reason[b],
            )  # fmt: skip
        )
    return out


def _record(sample: _Sample, vocab, evaluator, prompt, index, job) -> dict:
    """The samples.jsonl line of one sample: `text` and `token_ids` are the whole row (the
    BOS and the prompt included); the judge scores the generated tokens only, decoded on their
    own, with the decoded prompt as unscored context (GenerativePerplexity.score)."""
    from dataloader import decode

    ids = sample.ids
    record = {
        "index": index,
        "seed": job.seed,
        "rank": job.rank,
        "prompt": prompt,
        "text": decode(vocab, ids),
        "token_ids": ids,
        "length": len(ids),
        "stop_reason": sample.stop_reason,
        "entropy": unigram_entropy(ids),
        "gen_ppl": None,
        "gen_nll_sum": None,
        "gen_num_tokens": None,
        "nfe_denoise": sample.nfe_denoise,
        "nfe_total": sample.nfe_total,
    }
    if evaluator is not None:
        context = decode(vocab, ids[1 : sample.given])  # the prompt, without the BOS
        nll, count = evaluator.score(decode(vocab, ids[sample.given :]), context)
        record.update(
            gen_ppl=math.exp(nll / count) if count else None,
            gen_nll_sum=nll if count else None,
            gen_num_tokens=count if count else None,
        )
    return record


def _progress_bar(job: GenerationJob, cfg: SamplerConfig):
    if not job.show_progress or job.rank != 0:
        return None
    from tqdm import tqdm

    batches = len(_rows(job))
    return tqdm(total=batches * cfg.length, unit="tok", desc="sampling", leave=False)


def write_summary(out_dir: str, evaluator: str | None, extra: dict | None = None) -> dict:
    """Recompute sample_eval.json and lengths.png from every samples*.jsonl line in out_dir;
    `extra` keys (main.py: this run's "provenance") are added to the summary."""
    records = []
    for path in sorted(glob.glob(os.path.join(out_dir, "samples*.jsonl"))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    summary = {**summarize_samples(records, evaluator), **(extra or {})}
    with atomic_path(os.path.join(out_dir, "sample_eval.json")) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    if records:
        with atomic_path(os.path.join(out_dir, "lengths.png")) as tmp:
            plot_lengths([r["length"] for r in records], tmp + ".png")
            os.replace(tmp + ".png", tmp)
    return summary
