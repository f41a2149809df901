"""`main.run` for several runs in each process of one torchrun launch (the two-process tests):

    python -m torch.distributed.run --nproc_per_node=2 tests/torchrun_main.py \\
        RUN_DIR OVERRIDE... [--- RUN_DIR OVERRIDE...] [--- OUT_JSON fsdp]

torchrun starts the processes (Lightning sees them as launched externally), so one launch
serves every run; a UserError exits with code 2 as main.py does, and a run stopped by
SIGTERM (Lightning's SIGTERMException, raised on every rank) ends its job only."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

import main  # noqa: E402
from utils import UserError  # noqa: E402


def jobs(argv: list[str]) -> list[list[str]]:
    out, current = [], []
    for arg in argv:
        if arg == "---":
            out.append(current)
            current = []
        else:
            current.append(arg)
    return [*out, current]


def fsdp_check(out_path: str) -> None:
    """Torch FSDP (gloo, CPU) over the smoke BD3-LM with our wrap policy (each DiT block a unit)
    and mixed precision: the loss and the gathered gradients against the same module unsharded
    (float32), and a bf16 step that keeps the rotary buffer in float32. Rank 0 writes JSON."""
    import json

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    import builders
    from conftest import build_module, randomize_

    if not dist.is_initialized():  # earlier jobs of the launch (Lightning) may have made it
        dist.init_process_group("gloo")
    cfg = main.compose(["experiment=smoke", "strategy=fsdp", "training.ema=0"], "/tmp/unused")

    def fresh():
        torch.manual_seed(0)
        built = build_module(cfg, vocab_size=41, mask_id=40)
        randomize_(built.backbone, seed=1, scale=0.2)
        return built

    module = fresh()
    x0 = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(0))
    eps = (torch.tensor(1e-3), torch.tensor(1.0))

    def loss_of(network):
        generator = torch.Generator().manual_seed(5)
        return module.algorithm.loss(
            network, x0, torch.ones(4, 32), *eps, train=True, generator=generator
        ).loss

    plain = loss_of(module.network)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in module.backbone.named_parameters()}
    result = {}
    for precision in ("32-true", "bf16-mixed"):
        module = fresh()
        wrapped = FullyShardedDataParallel(
            module.backbone, auto_wrap_policy=builders.fsdp_wrap_policy(),
            sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True,
            device_id=torch.device("cpu"),
            mixed_precision=builders.fsdp_mixed_precision(precision),
        )  # fmt: skip
        from models.network import BackboneNetwork

        network = BackboneNetwork(wrapped.module)
        network.backbone = wrapped  # the call goes through the FSDP root
        # Lightning's FSDP precision plugin runs the forward under autocast, as here
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = loss_of(network)
        loss.backward()
        units, diff = units_and_grad_diff(wrapped, plain_grads)
        buffer_dtype = str(wrapped.module.rotary_emb.inv_freq.dtype)
        result[precision] = {"loss": loss.item(), "plain_loss": plain.item(), "units": units,
                             "max_grad_diff": diff, "inv_freq_dtype": buffer_dtype}  # fmt: skip
    result["ssdlm"] = fsdp_ssdlm_check()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()


def units_and_grad_diff(wrapped, plain_grads: dict) -> tuple[int, float]:
    """(FSDP units in `wrapped`, the largest gradient difference to the unsharded run)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        diff = max(
            (p.grad - plain_grads[n.replace("_fsdp_wrapped_module.", "")]).abs().max().item()
            for n, p in wrapped.named_parameters()
        )
    return units, diff


def fsdp_ssdlm_check() -> dict:
    """SSD-LM's RoBERTa network under FSDP with the same wrap policy: a unit per RobertaLayer
    (the tied embeddings and lm_head at the root), float32 loss and gradients as unsharded."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    import builders
    from conftest import build_module, randomize_

    cfg = main.compose(
        ["experiment=smoke", "algo=ssdlm", "block_size=4", "training.ema=0"], "/tmp/unused"
    )

    def fresh():
        torch.manual_seed(0)
        built = build_module(cfg, vocab_size=41, mask_id=40)
        randomize_(built.backbone, seed=1, scale=0.2)
        return built

    x0 = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(0))
    eps = (torch.tensor(1e-3), torch.tensor(1.0))

    def loss_of(module, network):
        generator = torch.Generator().manual_seed(5)
        return module.algorithm.loss(
            network, x0, torch.ones(4, 32), *eps, train=True, generator=generator
        ).loss

    module = fresh()
    plain = loss_of(module, module.backbone)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in module.backbone.named_parameters()}
    module = fresh()
    wrapped = FullyShardedDataParallel(
        module.backbone, auto_wrap_policy=builders.fsdp_wrap_policy("roberta"),
        sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True,
        device_id=torch.device("cpu"),
    )  # fmt: skip
    loss = loss_of(module, wrapped)
    loss.backward()
    units, diff = units_and_grad_diff(wrapped, plain_grads)
    layers = module.backbone.mlm.config.num_hidden_layers
    return {"loss": loss.item(), "plain_loss": plain.item(), "units": units,
            "layers": layers, "max_grad_diff": diff}  # fmt: skip


if __name__ == "__main__":
    try:
        for run_dir, *overrides in jobs(sys.argv[1:]):
            if overrides == ["fsdp"]:
                fsdp_check(run_dir)
                continue
            try:
                main.run(main.compose(overrides, run_dir), run_dir)
            except SIGTERMException:
                continue
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
