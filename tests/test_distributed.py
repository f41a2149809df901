"""Two-process DDP on CPU (gloo) equals one process with the same global batch: the noise is
drawn for the global batch and sliced by rank, the data loaders interleave rows by rank."""

from __future__ import annotations

import torch
from test_main import data_cache, run_main  # noqa: F401 - the session fixture

COMMON = ["trainer.max_steps=4", "trainer.val_check_interval=100", "loader.global_batch_size=8"]


def test_two_process_ddp_matches_one_process(tmp_path, data_cache):  # noqa: F811
    run_main(tmp_path / "one", *COMMON, "loader.batch_size=8", cache=data_cache)
    run_main(
        tmp_path / "two",
        *COMMON,
        "loader.batch_size=4",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        cache=data_cache,
    )
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert one["global_step"] == two["global_step"] == 4
    for name, tensor in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], tensor, rtol=1e-6, atol=1e-7)
    for name, tensor in one["ema"]["shadow"].items():
        torch.testing.assert_close(two["ema"]["shadow"][name], tensor, rtol=1e-6, atol=1e-7)


def test_two_process_sampling_shards_batches_with_distinct_seeds(tmp_path, data_cache):  # noqa: F811
    import json

    run_main(tmp_path / "train", "trainer.max_steps=2", cache=data_cache)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    run_main(
        out,
        "mode=sample_eval",
        f"eval.checkpoint_path={ckpt}",
        "loader.eval_batch_size=2",
        "sampling.num_sample_batches=2",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        cache=data_cache,
    )
    rows = {}
    for rank in (0, 1):
        lines = (out / f"samples.rank{rank}.jsonl").read_text().splitlines()
        rows[rank] = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows[0]] == [0, 1] and [r["index"] for r in rows[1]] == [2, 3]
    texts = [r["token_ids"] for rank in rows for r in rows[rank]]
    assert len({tuple(t) for t in texts}) == 4, "ranks must not repeat each other's samples"
    assert json.loads((out / "sample_eval.json").read_text())["num_samples"] == 4
