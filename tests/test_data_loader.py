"""make_loader: order deterministic from (seed, epoch), sharding by rank, and mid-epoch resume
by hand and through a Lightning fit (the fit loop saves and restores the loader's state)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import dataloader as dl


def dataset(n=23):
    return dl.TokenDataset(torch.arange(n * 4).view(n, 4))


def firsts(batches):
    return [b["input_ids"][:, 0].div(4, rounding_mode="floor").tolist() for b in batches]


def test_order_depends_on_seed_and_epoch_only():
    a, b = dl.make_loader(dataset(), 5, True, seed=3), dl.make_loader(dataset(), 5, True, seed=3)
    assert firsts(a) == firsts(b)
    a.sampler.set_epoch(1)
    assert firsts(a) != firsts(b) and sorted(sum(firsts(a), [])) == list(range(23))
    assert firsts(dl.make_loader(dataset(), 5, False, seed=3))[0] == [0, 1, 2, 3, 4]


def test_ranks_partition_the_epoch():
    shards = [
        sum(firsts(dl.make_loader(dataset(24), 4, True, 7, rank=r, world_size=3)), [])
        for r in range(3)
    ]
    assert all(len(s) == 8 for s in shards)
    assert sorted(sum(shards, [])) == list(range(24))
    padded = dl.make_loader(dataset(23), 4, True, 7, rank=2, world_size=3)
    assert len(padded.sampler) == 8  # padded by repetition like DistributedSampler


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_the_next_unseen_batch(workers):
    full = firsts(dl.make_loader(dataset(), 3, True, 11, num_workers=workers))
    first = dl.make_loader(dataset(), 3, True, 11, num_workers=workers, prefetched=0)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 3:
            break
    state = first.state_dict()
    assert state["batches"] == 3 and state["epoch"] == 0
    resumed = dl.make_loader(dataset(), 3, True, 11, num_workers=workers, prefetched=0)
    resumed.load_state_dict(state)
    assert firsts(seen) + firsts(resumed) == full
    assert firsts(resumed) == full  # the next epoch-0 iteration starts from the beginning


def test_state_after_an_exhausted_epoch_starts_the_next():
    loader = dl.make_loader(dataset(), 5, True, 1, prefetched=1)
    list(loader)
    state = loader.state_dict()
    assert state["complete"] and state["batches"] == 5


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].div(4, rounding_mode="floor").tolist())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tmp_path, max_steps, ckpt=None, every=None):
    callbacks = []
    if every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1
            )
        )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    module = Recorder()
    trainer.fit(module, dl.make_loader(dataset(), 3, True, 5), ckpt_path=ckpt, weights_only=False)
    return module.seen


@pytest.mark.e2e
def test_lightning_fit_resumes_mid_epoch(tmp_path):
    full = fit(tmp_path / "a", 11)  # 8 batches per epoch: crosses into epoch 1
    first = fit(tmp_path / "b", 3, every=3)
    resumed = fit(tmp_path / "c", 11, ckpt=str(tmp_path / "b" / "epoch=0-step=3.ckpt"))
    assert first == full[:3]
    assert resumed == full[3:]
    again = fit(tmp_path / "d", 11, ckpt=None)
    assert again == full


def test_workers_survive_ctrl_c():
    """A terminal Ctrl-C reaches the DataLoader workers too; they ignore it, so the main
    process can save and stop instead of failing with "worker exited unexpectedly"."""
    import os
    import signal
    import time

    loader = dl.make_loader(dataset(), 2, True, 0, num_workers=1, rank=0, world_size=1)
    batches = torch.utils.data.DataLoader.__iter__(loader)  # the worker-owning iterator
    next(batches)
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.2)
    assert worker.is_alive()
    assert len(list(batches)) == len(loader) - 1
