"""The LightningModule: glue between the DiT, an objective from `algorithms/` and Lightning's
loop (the samplers take its backbone and objective through sampling.build_sampler). It owns the
optimiser, the LR schedule, the EMA (swapped in for validation and sampling), the clip-interval
buffers and the checkpoint hooks; all maths lives below it.
"""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import torch
from torch import Tensor

from algorithms.base import (
    DEFAULT_EPS_MAX,
    DEFAULT_EPS_MIN,
    Loss,
    Objective,
    Shard,
)
from algorithms.clip_search import VarianceRecorder, per_block_means, select_interval
from checkpoints.layout import CHECKPOINT_FORMAT
from metrics import ROW_STATISTICS, nll_stderr, ppl_interval, row_statistics
from models.dit import DiT
from models.ema import EMA
from models.network import BackboneNetwork


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "constant_warmup"  # constant_warmup | cosine_decay_warmup | constant
    warmup_steps: int = 2500  # constant_warmup
    max_steps: int = 1_000_000
    warmup_t: float | None = None  # cosine_decay_warmup; None = 0.1 max_steps
    warmup_lr_init: float = 1e-6
    lr_min: float = 1e-6
    ema: float = 0.9999  # 0 disables the EMA


def lr_multiplier(settings: OptimSettings):
    """step -> lr / base lr for the three schedules (constant, warm-up, warm-up + cosine decay).

    constant_warmup: step / warmup until warmup, then 1 (the first step runs at lr 0).
    cosine_decay_warmup: linear from warmup_lr_init over warmup_t steps (0.1 max_steps by
    default), then cosine from lr down to lr_min over the remaining steps, then lr_min.
    """
    lr, name = settings.lr, settings.lr_schedule
    if name == "constant":
        return lambda step: 1.0
    if name == "constant_warmup":
        warmup = settings.warmup_steps
        return lambda step: step / max(1, warmup) if step < warmup else 1.0
    if name == "cosine_decay_warmup":
        start, floor = settings.warmup_lr_init, settings.lr_min
        warmup = settings.warmup_t if settings.warmup_t is not None else 0.1 * settings.max_steps
        decay = settings.max_steps - warmup

        def cosine(step: int) -> float:
            if step < warmup:
                return (start + step * (lr - start) / warmup) / lr
            progress = min((step - warmup) / decay, 1.0)
            return (floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))) / lr

        return cosine
    raise ValueError(
        f"lr_scheduler={name!r}: valid are constant_warmup, cosine_decay_warmup, constant"
    )


TORCH_SEEDS = 2**64  # torch.manual_seed and Generator.manual_seed take seeds in [0, 2**64)


def dropout_seed(key: int, rank: int) -> int:
    """The global RNG's seed (dropout) for the micro-batch of `key` (Diffusion.step_key) on
    `rank`: key * 1031 + rank modulo 2**64, the seeds torch takes. The product outgrows 64
    bits for run seeds above about 4.4 million; below that the modulo changes nothing, so runs
    made before it existed reproduce and resume bit-identically. On one rank distinct keys
    give distinct seeds (1031 is odd: x -> 1031 x is a bijection modulo 2**64); two of up to
    1031 ranks collide only for keys some 10**15 apart, farther than any run's steps."""
    return (key * 1031 + rank) % TORCH_SEEDS


class Diffusion(L.LightningModule):
    """backbone: the DiT (SSD-LM: its models.ssdlm network); algorithm: the objective
    (algorithms.base.Objective).

    run_config: the resolved config as plain containers, stored in every checkpoint.
    var_min: register the learned clip interval buffers `sampling_eps_min/max` (BD3-LM).
    clip_grid: candidate intervals for the clip search (algorithms.clip_search); with more
    than one, validation measures each on its first `clip_search_batches` batches and moves
    the buffers to the one of least variance (unless fix_clipping).
    network: the callable the objective's loss receives when it is not the DiT behind a
    models.network.BackboneNetwork (SSD-LM: the models.ssdlm.SSDLMNetwork `backbone` itself).
    """

    def __init__(
        self,
        backbone: DiT,
        algorithm: Objective,
        optim: OptimSettings,
        run_config: dict,
        var_min: bool = False,
        eps_min: float = DEFAULT_EPS_MIN,
        eps_max: float = DEFAULT_EPS_MAX,
        use_ema_for_eval: bool = True,
        clip_grid: list[tuple[float, float]] | None = None,
        clip_search_batches: int = 100,
        fix_clipping: bool = False,
        seed: int = 0,
        network=None,
    ):
        super().__init__()
        self.backbone = backbone
        self.algorithm = algorithm
        self.optim = optim
        self.run_config = run_config
        self.var_min = var_min
        if var_min:
            self.register_buffer("sampling_eps_min", torch.tensor(eps_min, dtype=torch.float32))
            self.register_buffer("sampling_eps_max", torch.tensor(eps_max, dtype=torch.float32))
        self.ema = EMA(self.backbone, optim.ema) if optim.ema > 0 else None
        self.use_ema_for_eval = use_ema_for_eval
        self.clip_grid = clip_grid if var_min and clip_grid and len(clip_grid) > 1 else []
        self.clip_search_batches = clip_search_batches
        self.fix_clipping = fix_clipping
        self.seed = seed
        self._variance: VarianceRecorder | None = None
        # what the objective calls: the DiT behind a BackboneNetwork, or `network` (SSD-LM's
        # network is the backbone itself, kept out of the module tree so that its weights
        # are not registered twice)
        self.__dict__["network"] = network if network is not None else BackboneNetwork(backbone)
        self._eval_sums: Tensor | None = None
        self.eval_result: dict | None = None
        # independent NELBO draws per validation row (eval.mc_samples; main.ppl_eval sets it)
        self.mc_samples = 1
        # the run's provenance record (provenance.record), stored in every checkpoint
        self.provenance: dict | None = None

    # ------------------------------------------------------------------------------------------
    # The training interval
    # ------------------------------------------------------------------------------------------
    def clip_interval(self) -> tuple[Tensor, Tensor]:
        """The training interval [eps_min, eps_max] as float32 0-d tensors."""
        if self.var_min:
            return self.sampling_eps_min, self.sampling_eps_max
        return (
            torch.tensor(DEFAULT_EPS_MIN, dtype=torch.float32, device=self.device),
            torch.tensor(DEFAULT_EPS_MAX, dtype=torch.float32, device=self.device),
        )

    # ------------------------------------------------------------------------------------------
    # Training and validation
    # ------------------------------------------------------------------------------------------
    def step_key(self, batch_idx: int) -> int:
        """A seed for one micro-batch: (run seed, optimizer step, micro-batch index), in
        [0, 2**63 - 1) for every run seed (the noise generator's seed; see dropout_seed)."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = batch_idx % accumulate
        return ((self.seed * 1_000_003 + self.global_step) * 4099 + micro) % (2**63 - 1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """The forward-process noise comes from a generator seeded by `step_key` and drawn for
        the global batch (each rank takes its rows), dropout from the global RNG seeded by the
        key and the rank: a resumed run draws exactly what an uninterrupted run would have, and
        N processes draw the noise of one process with the same global batch."""
        key = self.step_key(batch_idx)
        torch.manual_seed(dropout_seed(key, self.global_rank))
        generator = torch.Generator(device=self.device).manual_seed(key)
        x0, attention_mask = batch["input_ids"], batch["attention_mask"]
        shard = None
        if self._trainer is not None and self.trainer.world_size > 1:
            shard = Shard.interleaved(
                x0.shape[0], self.global_rank, self.trainer.world_size, x0.device
            )
        eps_min, eps_max = self.clip_interval()
        out = self.algorithm.loss(
            self.network, x0, attention_mask, eps_min, eps_max,
            train=True, generator=generator, shard=shard,
        )  # fmt: skip
        self.log("trainer/loss", out.loss, on_step=True, prog_bar=True)
        return out.loss

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clipping by norm as Lightning does it, except under FSDP, whose precision plugin
        refuses it: the wrapped root's own `clip_grad_norm_` reduces the norm over shards."""
        strategy = self.trainer.strategy
        if gradient_clip_val and isinstance(strategy, L.pytorch.strategies.FSDPStrategy):
            strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.backbone)

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None and self.use_ema_for_eval:
            self.ema.store(self.backbone)
            self.ema.copy_to(self.backbone)
        # [nll sum, token sum, metrics.row_statistics...]
        self._eval_sums = torch.zeros(2 + ROW_STATISTICS, dtype=torch.float64, device=self.device)
        if self.clip_grid:
            self._variance = VarianceRecorder(self.clip_grid, self.clip_search_batches)

    def eval_key(self, batch_idx: int, draw: int = 0) -> int:
        """The seed of validation batch `batch_idx`'s noise: (run seed, batch index), the same
        on every rank and at every validation run (checkpoints are compared on equal noise).
        Draw d > 0 of `eval.mc_samples` gets its own key; draw 0 is the one-draw estimate.
        Keys lie in [0, 2**63 - 1), so a rank offset keeps them below torch's 2**64."""
        key = ((self.seed * 1_000_003 + 2**31 + batch_idx) * 4099) % (2**63 - 1)
        return key if draw == 0 else (key * 1_000_033 + draw) % (2**63 - 1)

    def exact_eval(self, interval: tuple[float, float]) -> bool:
        """Whether the reported loss is deterministic: block size 1 at t = 1 (AR, and BD3-LM
        K = 1 in NLL mode, where every token is masked), so extra draws would repeat it."""
        return self.algorithm.block_size == 1 and tuple(interval) == (1.0, 1.0)

    def _eval_loss(self, batch: dict, batch_idx: int, interval: tuple[float, float], draw: int = 0):
        """One NELBO estimate of `batch` at `interval` (draw `draw`). Evaluation loaders (data
        EvalRows) say where each row sits in the global batch: the noise is drawn per global
        row from a generator seeded by `eval_key`, so it does not depend on the number of
        processes, and padding rows get weight 0. Other loaders: the rank's own draws, every
        row counted."""
        eps_min, eps_max = (
            torch.tensor(e, dtype=torch.float32, device=self.device) for e in interval
        )
        x0, attention_mask = batch["input_ids"], batch["attention_mask"]
        shard = Shard.from_batch(batch)
        key = self.eval_key(batch_idx, draw) + (0 if shard is not None else self.global_rank)
        generator = torch.Generator(device=self.device).manual_seed(key)
        out = self.algorithm.loss(
            self.network, x0, attention_mask, eps_min, eps_max,
            train=False, generator=generator, shard=shard,
        )  # fmt: skip
        if "real" in batch:
            real = batch["real"].to(out.nlls.dtype)[:, None]
            out = Loss(out.loss, out.nlls * real, out.token_mask * real)
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Reported: the unbiased NELBO (or exact NLL for K = 1; for an objective without a
        bound, SSD-LM, its training cross-entropy of one block). With a clip grid, every
        interval that still wants samples costs one more forward pass on this batch (on the
        same noise: common random numbers make the intervals' variances comparable).
        With mc_samples = N > 1 (and an estimate that is not exact) each row's NELBO is the mean
        of N independent draws, and their spread gives the error (metrics.nll_stderr)."""
        if self.algorithm.capabilities.ppl_eval:
            report = self.algorithm.eval_interval()
        else:  # no bound (SSD-LM): its training loss on validation data
            report = tuple(float(e) for e in self.clip_interval())
        draws = 1 if self.exact_eval(report) else self.mc_samples
        outs = [self._eval_loss(batch, batch_idx, report, d) for d in range(draws)]
        out = outs[0]
        nll_sum = torch.stack([o.nlls.double().sum() for o in outs]).sum() / draws
        rows = torch.stack([o.nlls.double().sum(-1) for o in outs])  # (draws, B)
        stats = row_statistics(rows, out.token_mask.double().sum(-1))
        self._eval_sums += torch.cat([torch.stack([nll_sum, out.token_mask.double().sum()]), stats])
        if self._variance is None:
            return
        for interval in self.clip_grid:
            if self._variance.wants(interval):
                nlls = out.nlls
                if interval != report:
                    nlls = self._eval_loss(batch, batch_idx, interval).nlls
                means = per_block_means(nlls, self.algorithm.block_size)
                self._variance.add(interval, means, batch.get("real"))

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        nll = (sums[0] / sums[1]).item()
        bound = self.algorithm.capabilities.ppl_eval  # none (SSD-LM): its training loss
        report = self.algorithm.eval_interval() if bound else (0.0, 0.0)
        exact = self.exact_eval(report)
        draws = 1 if exact else self.mc_samples
        stderr, method = nll_stderr(nll, sums[1].item(), sums[2:], draws, exact)
        self.eval_result = {
            "nll": nll,
            "ppl": math.exp(nll),
            "bpd": nll / math.log(2),
            "num_tokens": int(sums[1].item()),
            "nll_stderr": stderr,
            "nll_stderr_method": method,
            "ppl_ci95": ppl_interval(nll, stderr),
            "mc_samples": self.mc_samples,
        }
        if not self.trainer.sanity_checking:
            for key in ("nll", "ppl", "bpd"):
                # already reduced over ranks: every rank logs the same value (monitorable)
                self.log(f"val/{key}", self.eval_result[key], sync_dist=False)
        if self.ema is not None and self.use_ema_for_eval:
            self.ema.restore(self.backbone)
        if self._variance is not None and not self.trainer.sanity_checking:
            self._search_clip_interval()

    def _search_clip_interval(self) -> None:
        """Move the clip buffers to the interval of least per-block NELBO variance (Sec. 5.3)."""
        scores = self._variance.scores(lambda t: self.all_gather(t))
        for (low, high), score in scores.items():
            self.log(f"valid_var_{round(low, 2)} - {round(high, 2)}", score)
        low, high = select_interval(scores)
        if not self.fix_clipping:
            self.sampling_eps_min.fill_(low)
            self.sampling_eps_max.fill_(high)
        self.log("sampling_eps_min", self.sampling_eps_min.item())
        self.log("sampling_eps_max", self.sampling_eps_max.item())
        self._variance = None

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.backbone.parameters(),
            lr=self.optim.lr,
            betas=(self.optim.beta1, self.optim.beta2),
            eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(self.optim))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "trainer/lr"},
        }

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["format"] = CHECKPOINT_FORMAT
        checkpoint["config"] = self.run_config
        if self.provenance is not None:
            checkpoint["provenance"] = self.provenance
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def apply_ema(self) -> None:
        """Evaluation/sampling outside the fit loop: copy the EMA weights in, for good."""
        if self.ema is not None and self.use_ema_for_eval:
            self.ema.copy_to(self.backbone)
