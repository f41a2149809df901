"""Bad input at the settings boundary: every case is a distinct check, run in process through
`main.run` on the smoke experiment. Each must raise one UserError line naming the key (or file)
and what would be valid, and leave the run directory without outputs (`conftest.bad_run`). The
exit-code-2 contract of the CLI is tested once, in a subprocess, in test_main.py."""

from __future__ import annotations

import pytest

from conftest import bad_run

SAMPLE, PPL = "mode=sample_eval", "mode=ppl_eval"
MISSING = "/nonexistent/bd3lms"

# (group, overrides, a fragment of the expected message)
CASES = [
    # top level
    ("top", ["block_size=5"], "block_size=5"),
    ("top", ["block_size=0"], "block_size=0: must be an integer >= 1"),
    ("top", ["seed=-1"], "seed=-1: must be an integer >= 0"),
    ("top", ["seed=4294967296"], "seed=4294967296: must be an integer >= 0 and <= 4294967295"),
    ("top", ["mode=serve"], "mode='serve': valid are train, ppl_eval, sample_eval"),
    ("top", ["algo=nonsense"], "algo=nonsense: unknown; valid are ar, bd3lm, mdlm"),
    ("top", ["+typo_key=1"], "typo_key"),
    ("top", ["max_steps=4"], "max_steps is not a known key (did you mean trainer.max_steps?"),
    ("top", ["block_size=64"], "block_size=64 exceeds model.length (32 tokens)"),
    (
        "top",
        ["algo=mdlm", "block_size=4"],
        "block_size=4: algo=mdlm denoises its whole context as one block (K = model.length = 32)",
    ),
    ("top", ["algo=ar", "block_size=4"], "block_size=4: algo=ar predicts one token at a time"),
    # loader
    (
        "loader",
        ["loader.global_batch_size=10", "loader.batch_size=4"],
        "loader.global_batch_size=10",
    ),
    ("loader", ["loader.num_workers=-1"], "loader.num_workers=-1"),
    ("loader", ["loader.eval_global_batch_size=0"], "loader.eval_global_batch_size=0"),
    ("loader", ["+loader.shuffle=true"], "loader.shuffle"),
    # training
    ("training", ["training.ema=1.0"], "training.ema=1.0"),
    ("training", ["training.sampling_eps_max=0"], "training.sampling_eps_max=0"),
    (
        "training",
        ["training.sampling_eps_min=0.9", "training.sampling_eps_max=0.1"],
        "training.sampling_eps_min",
    ),
    ("training", ["training.compile=maybe"], "training.compile='maybe': must be true or false"),
    (
        "training",
        [
            "training.resample=true",
            "training.sampling_eps_min=0.3",
            "training.sampling_eps_max=0.4",
        ],
        "K=4 tokens must lie in the interval and no multiple of 1/4 does",
    ),
    # optim
    ("optim", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be a number >= 0"),
    ("optim", ["optim.lr=0"], "optim.lr=0"),
    ("optim", ["optim.beta2=1"], "optim.beta2=1"),
    ("optim", ["optim.eps=-1e-8"], "optim.eps"),
    # lr_scheduler
    ("lr_scheduler", ["lr_scheduler.num_warmup_steps=-1"], "lr_scheduler.num_warmup_steps=-1"),
    ("lr_scheduler", ["+lr_scheduler.warmup_t=5"], "lr_scheduler.warmup_t"),
    # trainer
    ("trainer", ["trainer.precision=fp8"], "trainer.precision='fp8': valid are auto"),
    ("trainer", ["trainer.max_steps=0"], "trainer.max_steps=0"),
    ("trainer", ["trainer.devices=0"], "trainer.devices=0"),
    ("trainer", ["trainer.accelerator='tpu'"], "trainer.accelerator='tpu'"),
    ("trainer", ["trainer.float32_matmul_precision=tf32"], "float32_matmul_precision='tf32'"),
    ("trainer", ["trainer.precision=16-mixed"], "16-mixed needs a GPU"),
    ("trainer", ["+trainer.no_such_trainer_kwarg=1"], "trainer.no_such_trainer_kwarg"),
    ("trainer", ["trainer.max_step=4"], "trainer.max_step is not a known key (did you mean trai"),
    ("trainer", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    ("trainer", ["trainer.val_check_interval=0.5"], "needs trainer.check_val_every_n_epoch"),
    ("trainer", ["trainer.limit_train_batches=1.5"], "limit_train_batches=1.5: must be an integer"),
    # strategy
    ("strategy", ["strategy=fsdp"], "strategy=fsdp needs CUDA GPUs"),
    ("strategy", ["strategy.find_unused_parameters=1"], "strategy.find_unused_parameters=1"),
    # checkpointing
    ("checkpointing", ["checkpointing.keep_last_k=0"], "checkpointing.keep_last_k=0"),
    (
        "checkpointing",
        ["checkpointing.save_dir=/dev/null/bd3lms"],
        "checkpointing.save_dir=/dev/null",
    ),
    (
        "checkpointing",
        ["checkpointing.save_dir=/proc/bd3lms"],  # root may write /proc, yet creates nothing
        "checkpointing.save_dir=/proc/bd3lms cannot be written",
    ),
    (
        "checkpointing",
        ["checkpointing.save_dir=nope://bucket/run"],
        "checkpointing.save_dir=nope://bucket/run: no fsspec filesystem",
    ),
    (
        "checkpointing",
        ["checkpointing.resume_ckpt_path=nope://x/last.ckpt"],
        "checkpointing.resume_ckpt_path=nope://x/last.ckpt: no fsspec filesystem",
    ),
    # callbacks
    ("callbacks", ["+callbacks.extra.every_n_train_steps=3"], "callbacks.extra"),
    (
        "callbacks",
        ["callbacks.checkpoint_every_n_steps.every_n_train_steps=nan"],
        "every_n_train_steps=nan: must be a finite number",
    ),
    ("callbacks", ["callbacks.checkpoint_monitor.save_top_k=-2"], "save_top_k=-2. Must be >= -1"),
    # algo
    ("algo", ["algo.clip_search_delta=0"], "algo.clip_search_delta=0"),
    ("algo", ["algo.var_min=false", "algo.clip_search_widths=[0.5]"], "algo.var_min"),
    ("algo", ["algo.parameterization=score"], "algo.parameterization='score': valid are subs"),
    ("algo", ["algo=sedd", "block_size=32", "algo.time_conditioning=false"], "time_conditioning"),
    ("algo", ["algo.backbone='resnet'"], "algo.backbone='resnet'"),
    (
        "algo",
        ["algo.clip_search_widths=[0.1]", "training.resample=true"],
        "the clip search's interval [0.001, 0.1] holds no multiple of 1/4",
    ),
    # model
    ("model", ["model.attn_backend=nope"], "model.attn_backend"),
    ("model", ["model.attn_backend=flex"], "model.attn_backend=flex cannot train on CPU"),
    ("model", ["model.hidden_size=0"], "model.hidden_size=0"),
    ("model", ["model.n_heads=3"], "model.n_heads=3"),
    ("model", ["model.dropout=1.5"], "model.dropout=1.5"),
    ("model", ["+model.typo=1"], "model.typo"),
    # noise
    ("noise", ["noise.type='cosine_typo'"], "noise.type='cosine_typo'"),
    ("noise", ["+noise.eps=1e-3"], "noise.eps"),
    # data
    ("data", ["+data.typo=1"], "data.typo"),
    ("data", ["data.num_valid_docs=0"], "data.num_valid_docs=0"),
    ("data", ["data.wrap='sometimes'"], "data.wrap='sometimes'"),
    ("data", ["data.cache_dir=/proc/bd3lms"], "data.cache_dir=/proc/bd3lms cannot be written"),
    # eval / ppl_eval
    ("eval", [PPL, f"eval.checkpoint_path={MISSING}.ckpt"], "eval.checkpoint_path"),
    ("eval", [PPL, "eval.sanity_ppl_max=0.5"], "eval.sanity_ppl_max=0.5"),
    ("eval", [PPL, "eval.disable_ema=1"], "eval.disable_ema=1"),
    # sampling / sample_eval
    ("sampling", [SAMPLE, "sampling.nucleus_p=0"], "sampling.nucleus_p"),
    ("sampling", [SAMPLE, "model.length=30"], "block_size=4 must divide"),
    ("sampling", [SAMPLE, "algo.T=0"], "algo.T=0"),
    ("sampling", [SAMPLE, "sampling.num_sample_batches=0"], "sampling.num_sample_batches=0"),
    ("sampling", [SAMPLE, "sampling.tokens_per_step=0"], "sampling.tokens_per_step"),
    ("sampling", [SAMPLE, "sampling.unmask_order=entropy"], "sampling.unmask_order"),
    ("sampling", [SAMPLE, "sampling.confidence_threshold=1.5"], "sampling.confidence_threshold"),
    ("sampling", [SAMPLE, "sampling.prefix=a", "sampling.prefix_file=b"], "not both"),
    ("sampling", [SAMPLE, f"sampling.prefix_file={MISSING}.txt"], "sampling.prefix_file"),
    ("sampling", [SAMPLE, "sampling.kv_cache=true", "algo.time_conditioning=true"], "kv_cache"),
    ("sampling", [SAMPLE, "sampling.kv_cache=true", "sampling.reencode_context=true"], "reencode"),
    ("sampling", [SAMPLE, "algo=mdlm", "block_size=32", "sampling.prefix=a"], "prompts need"),
    ("sampling", [SAMPLE, "sampling.logdir=/dev/null/bd3lms"], "sampling.logdir=/dev/null"),
    ("sampling", [SAMPLE, "sampling.logdir=memory://logs"], "a local directory is needed"),
    (
        "sampling",
        [SAMPLE, "algo=ar", "block_size=1", "sampling.tokens_per_step=2"],
        "sampling.tokens_per_step=2: algo=ar has no use for it",
    ),
    (
        "eval",
        [SAMPLE, f"eval.gen_ppl_eval_model_name_or_path={MISSING}/judge"],
        "eval.gen_ppl_eval_model_name_or_path",
    ),
]


@pytest.mark.parametrize("group,overrides,expected", CASES, ids=lambda c: str(c))
def test_bad_input_is_one_line_naming_the_key(tmp_path, data_cache, group, overrides, expected):
    message = bad_run(tmp_path, *overrides)
    assert expected in message, message


def test_the_table_covers_every_group_and_mode():
    """At least 40 distinct checks, one per config group and per mode."""
    import os

    import conftest

    groups = {g for g, _, _ in CASES}
    on_disk = set(os.listdir(os.path.join(conftest.ROOT, "configs"))) - {"config.yaml", "hydra"}
    on_disk -= {"experiment"}  # an experiment is a preset of the other groups' keys
    assert on_disk <= groups, on_disk - groups
    assert {"loader", "sampling", "training", "eval", "optim", "trainer", "checkpointing"} <= groups
    modes = {next((o for o in ov if o.startswith("mode=")), "mode=train") for _, ov, _ in CASES}
    assert {"mode=train", PPL, SAMPLE} <= modes
    assert len({tuple(ov) for _, ov, _ in CASES}) == len(CASES) >= 40
