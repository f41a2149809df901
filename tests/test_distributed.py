"""Two-process DDP on CPU (gloo) equals one process with the same global batch: the noise is
drawn for the global batch and sliced by rank, the data loaders interleave rows by rank;
evaluation drops the rows that pad the ranks and draws its noise per global row. The ranks
decide together on SIGTERM, and the fine-tuning sanity check runs on rank 0 alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import OFFLINE, ROOT, run_inprocess, run_main

pytestmark = pytest.mark.e2e
COMMON = ["trainer.max_steps=4", "trainer.val_check_interval=100", "loader.global_batch_size=8"]


def test_two_process_ddp_matches_one_process(tmp_path, data_cache):
    """Through Lightning's own launcher (main.py re-run per rank), as a single-node user runs
    it; the other two-process checks share one torchrun launch below."""
    run_inprocess(tmp_path / "one", *COMMON, "loader.batch_size=8")
    run_main(
        tmp_path / "two",
        *COMMON,
        "loader.batch_size=4",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
    )
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert one["global_step"] == two["global_step"] == 4
    for name, tensor in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], tensor, rtol=1e-6, atol=1e-7)
    for name, tensor in one["ema"]["shadow"].items():
        torch.testing.assert_close(two["ema"]["shadow"][name], tensor, rtol=1e-6, atol=1e-7)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(jobs: list[list[str]], data_cache: str) -> None:
    """Run main.run jobs in 2 processes launched by torchrun (gloo on CPU)."""
    argv = [a for job in jobs for a in ("---", *job)][1:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        os.path.join(ROOT, "tests", "torchrun_main.py"),
        *argv,
    ]
    env = {**os.environ, **OFFLINE, "BD3LMS_CACHE": data_cache, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.e2e
def test_two_process_ppl_eval_equals_one_process_and_sampling_shards(
    tmp_path, data_cache, smoke_checkpoint
):
    """A validation set of an odd number of rows over 2 processes (the distributed sampler pads
    one rank with a repeated row): num_tokens, the AR NLL and the BD3-LM NELBO equal one
    process's, with the same global batch of 4. In the same launch, two sampling processes
    take alternate batches with rank-dependent seeds, torch FSDP runs the wrap policy and
    mixed precision of strategy=fsdp over gloo (Lightning has no FSDP on CPU), streaming
    training over shards of unequal size reaches max_steps on both ranks, and a fine-tuning
    run checks its loading on rank 0 alone (the verdict broadcast), then stops on both ranks
    at the same micro-batch with one last.ckpt when only rank 1 receives SIGTERM."""
    words = [
        "the",
        "king",
        "queen",
        "crown",
        "sword",
        "night",
        "day",
        "love",
        "death",
        "and",
        "of",
        "to",
        "a",
        "is",
        "my",
    ]
    gen = torch.Generator().manual_seed(0)
    docs = [
        " ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=gen))
        for _ in range(40)
    ]  # fmt: skip (55 rows)
    (tmp_path / "src").mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "src" / "validation.jsonl").write_text(lines)
    data = ["data.valid=local", f"+data.valid_source={tmp_path / 'src'}"]
    run_inprocess(tmp_path / "ar", "algo=ar", "block_size=1", "trainer.max_steps=2")
    checkpoints = {"bd3lm": smoke_checkpoint, "ar": tmp_path / "ar" / "checkpoints" / "last.ckpt"}
    jobs, single = [], {}
    for algo, ckpt in checkpoints.items():
        common = [*data, f"algo={algo}", "mode=ppl_eval",
                  f"eval.checkpoint_path={ckpt}", "trainer.limit_val_batches=1.0",
                  "loader.eval_global_batch_size=4"]  # fmt: skip
        if algo == "ar":
            common.append("block_size=1")
        run_inprocess(tmp_path / f"{algo}1", *common, "loader.eval_batch_size=4")
        single[algo] = json.loads((tmp_path / f"{algo}1" / "ppl_eval.json").read_text())
        jobs.append([str(tmp_path / f"{algo}2"), "experiment=smoke", *common,
                     "loader.eval_batch_size=2",
                     "trainer.devices=2", "trainer.accelerator=cpu"])  # fmt: skip
    samples_dir = tmp_path / "samples"
    jobs.append([str(samples_dir), "experiment=smoke", "mode=sample_eval",
                 f"eval.checkpoint_path={smoke_checkpoint}", "loader.eval_batch_size=2",
                 "sampling.num_sample_batches=2", "trainer.devices=2",
                 "trainer.accelerator=cpu"])  # fmt: skip
    jobs.append([str(tmp_path / "fsdp.json"), "fsdp"])  # torch FSDP over gloo (torchrun_main)
    # streaming training over 2 shards of unequal size (one rank per shard): the small rank
    # ends its pass after 2 steps and restarts it alone; no epoch-end collective may hang it
    import pyarrow as pa
    import pyarrow.parquet as pq

    stream_src = tmp_path / "stream"
    stream_src.mkdir()
    for index, count in ((0, 40), (1, 3)):
        table = pa.table({"text": docs[:count]})
        pq.write_table(table, stream_src / f"train-{index:05d}-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[:4]}), stream_src / "validation.parquet")
    jobs.append([str(tmp_path / "stream_run"), "experiment=smoke", "data=local",
                 f"data.source={stream_src}", "data.streaming=true", "trainer.max_steps=8",
                 "trainer.val_check_interval=100", "loader.global_batch_size=8",
                 "loader.batch_size=4", "trainer.devices=2",
                 "trainer.accelerator=cpu"])  # fmt: skip
    # fine-tuning from the smoke checkpoint, accumulation 2; rank 1 alone gets SIGTERM at the
    # start of micro-batch 2 (the first half of optimizer step 2)
    preempted = tmp_path / "preempted"
    jobs.append([str(preempted), "experiment=smoke", f"training.from_pretrained={smoke_checkpoint}",
                 "trainer.max_steps=100", "trainer.val_check_interval=100",
                 "loader.global_batch_size=8", "loader.batch_size=2", "trainer.devices=2",
                 "trainer.accelerator=cpu", f"+callbacks.probe._target_={__name__}.RankProbe",
                 f"+callbacks.probe.out={preempted}", "+callbacks.probe.signal_rank=1",
                 "+callbacks.probe.signal_batch=2"])  # fmt: skip
    rows = single["ar"]["num_tokens"] / 31  # every row: 31 targets (32 tokens, BOS excluded)
    assert rows == int(rows) and int(rows) % 2 == 1, "the row count must not split over 2"
    torchrun(jobs, data_cache)
    for algo in checkpoints:
        double = json.loads((tmp_path / f"{algo}2" / "ppl_eval.json").read_text())
        assert double["num_tokens"] == single[algo]["num_tokens"]
        assert double["nll"] == pytest.approx(single[algo]["nll"], rel=1e-6)
        # padding rows count nowhere in the error bars either (metrics.row_statistics)
        assert double["nll_stderr"] == pytest.approx(single[algo]["nll_stderr"], rel=1e-6)
    assert (single["ar"]["nll_stderr"], single["ar"]["nll_stderr_method"]) == (0.0, "exact")
    ranks = {}
    for rank in (0, 1):
        lines = (samples_dir / f"samples.rank{rank}.jsonl").read_text().splitlines()
        ranks[rank] = [json.loads(line) for line in lines]
    assert [r["index"] for r in ranks[0]] == [0, 1] and [r["index"] for r in ranks[1]] == [2, 3]
    texts = [r["token_ids"] for rank in ranks for r in ranks[rank]]
    assert len({tuple(t) for t in texts}) == 4, "ranks must not repeat each other's samples"
    assert json.loads((samples_dir / "sample_eval.json").read_text())["num_samples"] == 4
    # FSDP with each DiT block a unit (the adaLN modulation computed inside the unit): float32
    # equals the unsharded module; bf16-mixed keeps the rotary buffer in float32
    streamed = torch.load(tmp_path / "stream_run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert streamed["global_step"] == 8
    fsdp = json.loads((tmp_path / "fsdp.json").read_text())
    exact, bf16 = fsdp["32-true"], fsdp["bf16-mixed"]
    assert exact["units"] == 3 and exact["loss"] == pytest.approx(exact["plain_loss"], rel=1e-6)
    assert exact["max_grad_diff"] < 1e-6
    assert bf16["inv_freq_dtype"] == "torch.float32" and bf16["max_grad_diff"] < 0.05
    assert bf16["loss"] == pytest.approx(bf16["plain_loss"], rel=0.01)
    probes = [json.loads((preempted / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert probes[0]["sanity_device"] == "cpu" and probes[1]["sanity_device"] is None
    assert probes[0]["sanity_ppl"] == probes[1]["sanity_ppl"] > 1, "rank 0's verdict, shared"
    for probe in probes:  # both stopped after micro-batch 2, in step 2, and raised together,
        # with SIGTERM's exit code (128 + 15) on every rank
        assert (probe["global_step"], probe["exception"]) == (1, "SIGTERMException"), probe
        assert probe["exit_code"] == 143, probe
    last = torch.load(preempted / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
    ssdlm = fsdp["ssdlm"]  # SSD-LM's RoBERTa: a unit per layer plus the root
    assert ssdlm["units"] == ssdlm["layers"] + 1
    assert ssdlm["loss"] == pytest.approx(ssdlm["plain_loss"], rel=1e-6)
    assert ssdlm["max_grad_diff"] < 1e-6


class RankProbe(L.Callback):
    """Test callback for the torchrun jobs: sends SIGTERM to this process at the start of
    micro-batch `signal_batch` on global rank `signal_rank` only, and writes OUT/rank{r}.json
    when the fit ends: the step, the exception that ended it (and its exit code), and what
    this rank's loading sanity check (training_callbacks.LoadingSanityCheck) holds."""

    def __init__(self, out: str, signal_rank: int = -1, signal_batch: int = -1):
        self.out, self.signal_rank, self.signal_batch = out, signal_rank, signal_batch
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        from training_callbacks import LoadingSanityCheck

        for callback in trainer.callbacks:
            if isinstance(callback, LoadingSanityCheck):
                device = None if callback.device is None else callback.device.type
                self.record.update(sanity_device=device, sanity_ppl=callback.perplexity)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.signal_rank and batch_idx == self.signal_batch:
            os.kill(os.getpid(), signal.SIGTERM)

    def _write(self, trainer, exception=None) -> None:
        self.record.update(global_step=trainer.global_step, rank=trainer.global_rank)
        self.record["exception"] = None if exception is None else type(exception).__name__
        self.record["exit_code"] = getattr(exception, "code", None)  # a SystemExit's
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.record, f)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer, exception)
