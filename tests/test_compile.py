"""training.compile: torch.compile of the DiT blocks for training steps. The blocks compile
without a graph break (fullgraph) and give the eager loss and gradients; sampling with a
compiled model stays eager (no compile at any of its calls); one inductor run end to end."""

from __future__ import annotations

import pytest
import torch

import main
import sampling
from conftest import build_module, module_denoiser, randomize_, run_inprocess


def compiled_counts() -> int:
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.e2e  # a unit test, but it compiles for seconds
def test_compiled_blocks_match_eager_and_sampling_never_compiles():
    torch._dynamo.reset()
    cfg = main.compose(["experiment=smoke"], "/tmp/bd3lms-unused-run-dir")
    torch.manual_seed(0)
    module = build_module(cfg, vocab_size=41, mask_id=40)
    randomize_(module.backbone, seed=1, scale=0.2)
    module.train()
    x0 = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(0))
    eps = (torch.tensor(1e-3), torch.tensor(1.0))

    def loss_and_grads():
        module.zero_grad()
        generator = torch.Generator().manual_seed(5)
        ones = torch.ones(4, 32)
        loss = module.algorithm.loss(
            module.network, x0, ones, *eps, train=True, generator=generator
        )
        loss.loss.backward()
        return loss.loss.detach(), [p.grad.clone() for p in module.backbone.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    module.backbone.compile_blocks(backend="aot_eager", fullgraph=True, dynamic=False)
    before = compiled_counts()
    loss, grads = loss_and_grads()  # fullgraph: a graph break inside DiTBlock would raise
    assert compiled_counts() - before == 2  # the blocks, and the last one (x_t queries only)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    module.eval()
    cfg = sampling.SamplerConfig(length=256, block_size=4, num_steps=4, context=32, bos_id=0,
                                 mask_id=40, eos_id=0, reject_low_entropy=False)  # fmt: skip
    before = compiled_counts()
    for cached in (True, False):
        run_cfg = sampling.SamplerConfig(**{**cfg.__dict__, "kv_cache": cached})
        out = sampling.semi_ar_sample(
            module_denoiser(module, 32), 2, run_cfg, torch.Generator().manual_seed(0), "cpu"
        )
        assert out.tokens.shape == (2, 256)
    assert compiled_counts() == before, "sampling must not compile (its shapes grow per block)"


@pytest.mark.e2e
def test_training_compile_with_inductor_end_to_end(tmp_path, data_cache):
    """training.compile=true through main.run with the default (inductor) backend; the
    checkpoint keeps plain parameter names and evaluates eagerly."""
    torch._dynamo.reset()
    common = ["algo=ar", "block_size=1", "model.n_blocks=1", "trainer.max_steps=2"]
    before = compiled_counts()
    run_inprocess(tmp_path, *common, "training.compile=true")
    assert compiled_counts() > before
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in name for name in ckpt["state_dict"])
    run_inprocess(tmp_path / "eval", *common, "mode=ppl_eval",
                  f"eval.checkpoint_path={tmp_path}/checkpoints/last.ckpt")  # fmt: skip
