"""Loaders: deterministic from (seed, epoch), sharded by rank, resumable mid-epoch.

`make_loader(...)` returns a `ResumableDataLoader` over a `ResumableSampler` (a plain DataLoader
for iterable datasets); its `state_dict()` / `load_state_dict()` resume at the next unseen batch.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch

from utils import UserError


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed when initialised; else RANK / WORLD_SIZE
    (or NODE_RANK x devices + LOCAL_RANK is not guessable: a None world size means 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if rank is None:
        rank = (
            int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) if world_size > 1 else 0
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


class EvalRows(torch.utils.data.Dataset):
    """An evaluation view of a dataset that tells each row where it sits in its global batch.

    Its sampler (ResumableSampler with `eval_batch_size`) yields keys (index, global_row,
    global_batch_rows, real): items gain `global_row` (the row's index in the global batch of
    eval_batch_size x world rows), `global_batch_rows` (real rows in that global batch) and
    `real` (False for the repeated rows that pad the ranks to equal length). The objectives
    draw evaluation noise per global row (algorithms.base.Shard), and padding rows are left
    out of every sum, so evaluation numbers do not depend on the number of processes.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, bool]) -> dict[str, Any]:
        index, global_row, global_batch_rows, real = key
        item = dict(self.dataset[index])
        item.update(global_row=global_row, global_batch_rows=global_batch_rows, real=real)
        return item


class ResumableSampler(torch.utils.data.DistributedSampler):
    """Indices deterministic from (seed, epoch), sharded by rank, able to skip a prefix.

    Like torch's DistributedSampler (a subclass, so Lightning does not replace it): a
    permutation seeded with seed + epoch (or the identity without shuffle), padded by
    repetition (or cut, with drop_last) to a multiple of the world size, then every
    world_size-th index from `rank`. Rank and world size default to torch.distributed's at
    iteration time (Lightning initialises it after the loader is built).

    eval_batch_size: yield EvalRows keys for loaders of that per-device batch size instead of
    plain indices.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        eval_batch_size: int | None = None,
    ):
        # DistributedSampler.__init__ would query torch.distributed now; resolve lazily instead
        self.dataset, self.shuffle, self.seed, self.drop_last = (
            dataset,
            shuffle,
            int(seed),
            drop_last,
        )
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skip = 0  # samples of the next iteration to skip (set by ResumableDataLoader)
        self.eval_batch_size = eval_batch_size

    @property
    def num_replicas(self) -> int:
        return rank_and_world(self._rank, self._world)[1]

    @property
    def rank(self) -> int:
        return rank_and_world(self._rank, self._world)[0]

    @property
    def num_samples(self) -> int:
        n, world = len(self.dataset), self.num_replicas
        return n // world if self.drop_last else math.ceil(n / world)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch, before skipping."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        total = self.total_size
        if total > n:
            order = (order * math.ceil(total / max(n, 1)))[:total]
        rank, world = rank_and_world(self._rank, self._world)
        return order[:total][rank:total:world]

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        indices = self.indices()[skip:]
        if self.eval_batch_size is None:
            return iter(indices)
        return iter(self._eval_keys(indices, skip))

    def _eval_keys(self, indices: list[int], skip: int) -> list[tuple[int, int, int, bool]]:
        """(index, global_row, global_batch_rows, real) per yielded index (see EvalRows). The
        i-th index of this rank sits at position rank + world * i of the padded order; global
        batch j holds positions [j G, (j + 1) G), G = eval_batch_size x world."""
        rank, world = rank_and_world(self._rank, self._world)
        n, per_batch = len(self.dataset), self.eval_batch_size * world
        keys = []
        for i, index in enumerate(indices, start=skip):
            position = rank + world * i
            start = position - position % per_batch
            keys.append((index, position - start, min(per_batch, n - start), position < n))
        return keys

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a ResumableSampler with `state_dict()` / `load_state_dict()`.

    The state is {"epoch", "batches": batches consumed in that epoch, "complete"}. Lightning
    (2.6) saves it in the checkpoint's fit-loop state and restores it before iterating, so a
    resumed fit continues at the next unseen batch (tests/test_data_loader.py checks it with a
    real fit). `prefetched`: batches the consumer holds beyond those it has processed when it
    saves the state, not counted as consumed unless the epoch is exhausted (0 for Lightning
    2.6's fit loop, which saves after the step of every batch it has fetched).
    """

    def __init__(self, *args: Any, prefetched: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prefetched = prefetched
        self._yielded = 0
        self._exhausted = False
        self._epoch = self.sampler.epoch
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        sampler = self.sampler
        skip = 0
        state, self._pending = self._pending, None
        if state is not None and state["epoch"] == sampler.epoch and not state["complete"]:
            skip = int(state["batches"])
        sampler.skip = skip * self.batch_size
        self._epoch, self._yielded, self._exhausted = sampler.epoch, skip, False
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        consumed = self._yielded if self._exhausted else max(0, self._yielded - self.prefetched)
        return {
            "epoch": self._epoch,
            "batches": consumed,
            "complete": self._exhausted,
            "seed": self.sampler.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next unseen batch on the next iteration of the saved epoch."""
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise UserError(
                f"resuming a data loader saved with seed {state['seed']} under seed "
                f"{self.sampler.seed}: keep the run's seed"
            )
        self.sampler.set_epoch(int(state["epoch"]))
        self._pending = dict(state)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the terminal sends SIGINT to the whole process group,
    and a worker that died of it would fail the run ("DataLoader worker exited unexpectedly")
    instead of letting the main process save and stop (training_callbacks.Preemption); the
    main process shuts its workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    prefetched: int = 0,
    eval_rows: bool = False,
) -> torch.utils.data.DataLoader:
    """A deterministic, rank-sharded, resumable loader (a plain one for streaming datasets).

    rank / world_size: None = torch.distributed's at iteration time (or RANK / WORLD_SIZE).
    prefetched: see ResumableDataLoader (0 under Lightning 2.6 and when iterating by hand).
    eval_rows: an evaluation loader whose items say where they sit in the global batch and
    whether they pad (EvalRows).
    """
    persistent = num_workers > 0
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent,
            drop_last=drop_last,
            worker_init_fn=ignore_interrupts,
        )
    sampler = ResumableSampler(
        dataset, shuffle, seed, rank, world_size, drop_last, batch_size if eval_rows else None
    )
    return ResumableDataLoader(
        EvalRows(dataset) if eval_rows else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent,
        drop_last=drop_last,
        prefetched=prefetched,
        worker_init_fn=ignore_interrupts,
    )
