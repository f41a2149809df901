"""scripts/generate.py and the input contract of hf generate(): the CLI's jobs draw in
turn from one generator, as sample_eval's batches do (job i is sample_eval's sample i at batch
size 1, so N samples differ); an MDLM refuses prompts by naming --num-samples; the output holds
the samples only (no progress bar, no temporary path); pad ids are padding on either side of a
row; exports follow the umask and their tokenizer pads on the left; the README's Hydra quoting
of a prompt composes."""

from __future__ import annotations

import os
import shlex
import types

import pytest
import torch

from conftest import randomize_

PROMPTS = ["The king", "O Romeo, wherefore art thou"]


@pytest.fixture(scope="module")
def exported(smoke_checkpoint, tmp_path_factory):
    """The smoke BD3-LM checkpoint exported under umask 022."""
    from hf.export import export

    out = str(tmp_path_factory.mktemp("hf") / "smoke-bd3lm")
    umask = os.umask(0o022)
    try:
        export(str(smoke_checkpoint), out)
    finally:
        os.umask(umask)
    return out


@pytest.fixture
def job_ids(monkeypatch):
    """The token ids (prompt + new tokens) of each job scripts/generate.py streams."""
    import scripts.generate as cli

    jobs: list[list[int]] = []

    class Recorder(cli.BlockPrinter):
        def end(self):
            jobs.append(list(self.ids))
            super().end()

    monkeypatch.setattr(cli, "BlockPrinter", Recorder)
    return jobs


def sample_eval_batches_of_one(exported, tmp_path, prompts, num_batches):
    """sampling.generate.generate (sample_eval below its config) at batch size 1, seed 7:
    8 new tokens per prompt, or num_batches unconditional samples of 8 tokens."""
    from transformers import AutoTokenizer

    import registry
    import sampling
    from data.vocab import Vocab
    from hf import BD3LM
    from hf.generation import checkpoint_kind, objective_from_config, token_ids
    from sampling import generate as generation

    model = BD3LM.from_pretrained(exported).eval()
    bos, mask, eos = token_ids(model.config)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    vocab = Vocab(tokenizer=tokenizer, mask_id=mask, size=model.config.vocab_size, bos_id=bos,
                  eos_id=eos)  # fmt: skip
    objective = objective_from_config(model.config, mask, checkpoint_kind(model))
    cfg, sample_fn = registry.build_sampler(
        registry.objective_spec(checkpoint_kind(model)), objective, model.backbone,
        model.config.model_length, 8, sampling.TokenIds(bos, mask, eos), {"num_steps": 8},
    )  # fmt: skip
    job = generation.GenerationJob(1, num_batches, 7, str(tmp_path), prompts=prompts,
                                   show_progress=False)  # fmt: skip
    return [r["token_ids"] for r in generation.generate(sample_fn, cfg, job, vocab, None, "cpu")]


@pytest.mark.e2e
def test_cli_jobs_are_sample_eval_samples_at_batch_size_one(exported, tmp_path, job_ids, capsys):
    """Job i continues the generator of job i - 1: prompts and unconditional samples alike give
    sample_eval's samples in order, and two unconditional samples differ."""
    from scripts.generate import main as generate_main

    common = ["--max-new-tokens", "8", "--num-steps", "8", "--seed", "7"]
    argv = [exported, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *common]
    assert generate_main(argv) == 0
    want = sample_eval_batches_of_one(exported, tmp_path / "prompts", PROMPTS, 1)
    assert job_ids == [ids[1:] for ids in want]  # sample_eval's records start with the BOS
    job_ids.clear()
    assert generate_main([exported, "--num-samples", "2", *common]) == 0
    want = sample_eval_batches_of_one(exported, tmp_path / "unconditional", None, 2)
    assert job_ids == want and want[0] != want[1]
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.mark.e2e
def test_cli_on_an_mdlm_names_num_samples_and_draws_distinct_samples(exported, tmp_path, capsys):
    from transformers import AutoTokenizer

    from hf import MDLM, MDLMConfig
    from scripts.generate import main as generate_main

    tokenizer = AutoTokenizer.from_pretrained(exported)
    config = MDLMConfig(
        vocab_size=len(tokenizer), model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1,
        n_heads=2, dropout=0.0, bos_token_id=0, eos_token_id=0, mask_token_id=len(tokenizer) - 1,
    )  # fmt: skip
    randomize_(MDLM(config), seed=2).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()
    argv = [str(tmp_path), "--max-new-tokens", "8", "--num-steps", "4"]
    assert generate_main([*argv, "--prompt", "To be"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--num-samples N" in err and len(err.splitlines()) == 1
    assert generate_main([*argv, "--num-samples", "2"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first != second


@pytest.mark.e2e
def test_cli_on_a_ckpt_prints_the_sample_only(smoke_checkpoint, capsys):
    """The .ckpt is exported to a temporary directory without a word: stdout is the sample
    (not the temporary path), stderr the report (no "Writing model shards" bar); transformers'
    progress bars are back on afterwards."""
    from transformers.utils import logging

    from scripts.generate import main as generate_main

    argv = [str(smoke_checkpoint), "--prompt", "To be", "--max-new-tokens", "4", "--num-steps", "4"]
    assert generate_main(argv) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 and out.out.startswith("To be")
    assert [line[:1] for line in out.err.splitlines()] == ["["], out.err
    assert logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--num-samples", "0"], "--num-samples=0 must be >= 1"),
        (["--num-samples", "2", "--prompt", "To be"], "give it or --prompt"),
    ],
)
def test_cli_num_samples_checks(args, fragment, capsys):
    from scripts.generate import main as generate_main

    assert generate_main(["unused-checkpoint", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1


def test_cli_missing_checkpoint_is_one_line(capsys):
    """A path that is no file, directory or hub id: one line naming CHECKPOINT and what is valid
    (not a hub lookup's "no such directory (and not a hub id)")."""
    from scripts.generate import main as generate_main

    assert generate_main(["/nonexistent/bd3lms.ckpt", "--prompt", "To be"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CHECKPOINT=/nonexistent/bd3lms.ckpt: no such file or directory")
    assert "a Lightning .ckpt, an HF directory" in err and len(err.splitlines()) == 1


def test_cli_refuses_an_ssdlm_ckpt_in_one_line(tmp_path, data_cache, capsys):
    """SSD-LM has no HF model: its .ckpt is refused in one line naming the valid algos (the
    export raised a CheckpointError traceback about the missing DiT keys)."""
    from conftest import random_run_checkpoint
    from scripts.generate import main as generate_main

    path = tmp_path / "ssdlm.ckpt"
    random_run_checkpoint(path, "algo=ssdlm", "block_size=4")
    assert generate_main([str(path), "--prompt", "To be"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: CHECKPOINT={path}: algo=ssdlm has no HF model")
    assert "valid: ar, bd3lm, mdlm and sedd" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_bd3lm():
    """A random BD3-LM (K = 2, V = 11: GPT-2 layout, mask 10, BOS 9) whose pad id is the mask
    id, as data.vocab's added [PAD] is."""
    from hf import BD3LM, BD3LMConfig

    config = BD3LMConfig(
        block_size=2, vocab_size=11, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1,
        n_heads=2, dropout=0.0, attn_backend="sdpa", pad_token_id=10,
    )  # fmt: skip
    return randomize_(BD3LM(config), seed=4, scale=0.5).eval()  # the prompt matters


def test_generate_treats_pad_ids_as_padding_on_either_side(tiny_bd3lm):
    """Without attention_mask the pad ids at either end of a row are padding (the streamer
    gets the row without them); a pad id between prompt tokens, a prompt token equal to the
    mask id, seed with generator, and a generator off the CPU are refused in one line."""
    model, pad = tiny_bd3lm, 10
    plain = model.generate(torch.tensor([[3, 4]]), max_new_tokens=4, seed=5)[:, 2:]
    other = model.generate(torch.tensor([[3]]), max_new_tokens=4, seed=5)[:, 1:]
    assert not torch.equal(plain, other)  # a test of what the model is conditioned on
    for row in ([pad, pad, 3, 4], [3, 4, pad, pad]):
        out = model.generate(torch.tensor([row]), max_new_tokens=4, seed=5)
        assert torch.equal(out[:, 4:], plain) and out[0, :4].tolist() == row

    from conftest import StreamRecorder

    rec = StreamRecorder()
    model.generate(torch.tensor([[pad, 3, 4]]), max_new_tokens=2, streamer=rec)
    assert rec.calls[0] == [[3, 4]]
    with pytest.raises(ValueError, match=r"row 0 has the pad id 10 between prompt tokens"):
        model.generate(torch.tensor([[3, pad, 4]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"row 1: prompt position 0 holds the mask id 10"):
        ids = torch.tensor([[3, 4], [pad, 4]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    with pytest.raises(ValueError, match="seed and generator: give one"):
        model.generate(torch.tensor([[3]]), max_new_tokens=2, seed=1, generator=torch.Generator())
    cuda = types.SimpleNamespace(device=torch.device("cuda"))  # what the check reads of it
    with pytest.raises(ValueError, match="generator on cuda: the samplers draw from a CPU"):
        model.generate(torch.tensor([[3]]), max_new_tokens=2, generator=cuda)


def test_generate_with_a_generator_continues_its_stream(tiny_bd3lm):
    """generator=G draws from G: two calls sharing one seeded generator give, first, the
    sample of seed=S, then a different one (the stream continued, not restarted)."""
    model, prompt = tiny_bd3lm, torch.tensor([[3, 4]])
    generator = torch.Generator().manual_seed(5)
    first = model.generate(prompt, max_new_tokens=4, generator=generator)
    second = model.generate(prompt, max_new_tokens=4, generator=generator)
    assert torch.equal(first, model.generate(prompt, max_new_tokens=4, seed=5))
    assert not torch.equal(first, second)


@pytest.mark.e2e
def test_export_files_follow_the_umask_and_the_tokenizer_pads_left(exported):
    from transformers import AutoTokenizer

    modes = {name: os.stat(os.path.join(exported, name)).st_mode & 0o777 for name in
             os.listdir(exported)}  # fmt: skip
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.padding_side == "left"


def test_readme_prompt_override_composes():
    """README "Usage": the sample_eval command that continues a prompt, split as a shell
    splits it, gives Hydra the prompt with its comma (unquoted, Hydra refuses it)."""
    from hydra.errors import ConfigCompositionException

    import main
    from conftest import readme_code

    (usage, *_) = readme_code("Usage", "bash")
    lines = usage.replace("\\\n", " ").splitlines()
    (command,) = [line for line in lines if "sampling.prefix=" in line]
    overrides = shlex.split(command)[2:]
    cfg = main.compose(["experiment=smoke", *overrides], "/tmp/bd3lms-tests-unused-run-dir")
    assert cfg.sampling.prefix == "ROMEO. O, she doth teach"
    with pytest.raises(ConfigCompositionException, match="Ambiguous value"):
        main.compose(shlex.split('sampling.prefix="ROMEO. O, she doth teach"'), "/tmp/unused")


def test_pyproject_installs_every_package_and_module():
    """`pip install -e .` (README "Generating from Python") makes `import hf` work from
    any directory: pyproject.toml names every top-level package and module of the code (not
    tests/ or benchmarks/), since the hf package imports across them."""
    import tomllib

    from conftest import ROOT

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    names = os.listdir(ROOT)
    packages = {n for n in names if os.path.isfile(os.path.join(ROOT, n, "__init__.py"))}
    included = {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    assert included == packages - {"tests", "benchmarks"}
    assert set(setuptools["py-modules"]) == {n[:-3] for n in names if n.endswith(".py")}


@pytest.mark.e2e
def test_cli_reads_the_reference_ckpt_with_tokenizer(tmp_path, data_cache, capsys):
    """The reference's pickled .ckpt (EMA as an unnamed list, OmegaConf hparams) samples as
    our .ckpt of the same weights does, given --tokenizer (its pickled tokenizer is not read);
    without it, one line naming --tokenizer."""
    from omegaconf import OmegaConf

    from conftest import random_run_checkpoint, reference_parameter_order, write_reference_ckpt
    from scripts.generate import main as generate_main

    ours = tmp_path / "ours.ckpt"
    module = random_run_checkpoint(ours, "algo=bd3lm", "block_size=4")
    params = dict(module.backbone.named_parameters())
    ema = [params[n].detach().clone() for n in reference_parameter_order(2, adaln=True)]
    algo = {"parameterization": "subs", "cross_attn": True, "time_conditioning": False}
    config = {"block_size": 4, "algo": algo, "model": {"length": 32, "n_heads": 2}}
    reference = tmp_path / "reference.ckpt"
    write_reference_ckpt(reference, module, ema, {"config": OmegaConf.create(config)})
    argv = ["--prompt", "To be", "--max-new-tokens", "8", "--num-steps", "4", "--seed", "3"]
    assert generate_main([str(ours), *argv]) == 0
    want = capsys.readouterr().out
    assert generate_main([str(reference), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tokenizer" in err and len(err.splitlines()) == 1
    tokenizer = module.run_config["data"]["tokenizer_name_or_path"]
    assert generate_main([str(reference), "--tokenizer", tokenizer, *argv]) == 0
    assert capsys.readouterr().out == want
