"""The settings sweep without running main: every numeric key of the schema against NaN, inf,
negative and zero values; the rules between keys on one composed config; the clip intervals
against what resampling can reach; the sampler options each objective declares against what
its sampler reads; the directories a run creates; and the typed settings (their declarations
are the config files' keys, the schema's tables and what validate returns). (The same checks
end to end, through main.run, are cases of test_bad_input.py.)"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from omegaconf import OmegaConf

import registry
import settings
from algorithms.ar import Autoregressive
from algorithms.base import SAMPLER_OPTIONS, q_xt
from algorithms.clip_search import interval_grid
from algorithms.masked_diffusion import MaskedDiffusion
from algorithms.sedd import SEDD
from algorithms.ssdlm import SSDLM
from conftest import ROOT, compose_cfg
from data.config import DataSettings
from noise_schedule import LogLinear
from registry.masked_diffusion import BD3LMSettings
from registry.ssdlm import SSDLMSettings
from settings import checks, groups, paths, schema
from settings import sampling as sampling_rules
from utils import UserError

CPU = settings.Hardware("cpu", 1, 1, "32-true")

# numeric keys where 0 means something (else a count or size: 0 is refused)
ZERO_MEANS = {
    "seed": "a seed",
    "loader.num_workers": "load in the main process",
    "sampling.eb_gamma": "the EB-sampler commits one token per call",
    "training.ema": "no EMA",
    "optim.weight_decay": "none",
    "optim.beta1": "no momentum",
    "optim.beta2": "no second-moment averaging",
    "trainer.gradient_clip_val": "no clipping",
    "trainer.num_sanity_val_steps": "no sanity check",
    "trainer.limit_val_batches": "no validation",
    "algo.T": "no sampling steps: training only (sample_eval needs >= 1)",
    "algo.ar_loss_weight": "no auxiliary AR loss",
    "model.dropout": "none",
    "lr_scheduler.num_warmup_steps": "no warm-up",
    "lr_scheduler.warmup_t": "no warm-up",
    "lr_scheduler.warmup_lr_init": "warm up from 0",
    "lr_scheduler.lr_min": "decay to 0",
}
# numeric keys where -1 means something (Lightning's "all" / "no limit")
MINUS_ONE_MEANS = {"trainer.num_sanity_val_steps": "all", "trainer.max_epochs": "no limit"}


def numeric_keys():
    """(dotted key, spec, the choice of its group or None) for every numeric key: every
    table of the schema, one per choice of a group whose keys depend on one."""
    keys = [(k, s, None) for k, s in schema.TOP.items()]
    keys += [(f"{g}.{k}", s, None) for g, table in schema.GROUPS.items() for k, s in table.items()]
    for group, tables in schema.BY_CHOICE.items():
        for choice, table in tables.items():
            keys += [(f"{group}.{k}", s, choice) for k, s in table.items()]
    return [(k, s, c) for k, s, c in keys if s.kind in ("int", "real", "reals", "batches")]


@pytest.fixture(scope="module")
def resolved():
    """The smoke config as check_schema reads it (a plain resolved dict)."""
    return OmegaConf.to_container(compose_cfg(), resolve=True)


def choice_node(resolved: dict, group: str, choice: str) -> dict:
    """A `group` node of `choice`: the smoke config's own when it is that choice (its model:
    the DiT, or that DiT's keys as RoBERTa's), else the choice's config file
    (configs/GROUP/CHOICE.yaml; a global-package algo file nests it under `algo`)."""
    key = schema.fields_of(schema.RunSettings)[group].metadata["config_key"].choose_by
    if resolved[group][key] == choice:
        return copy.deepcopy(resolved[group])
    if group == "model" and choice == "roberta":
        return {**resolved["model"], "backbone": "roberta"}
    path = os.path.join(ROOT, "configs", group, f"{choice}.yaml")
    node = OmegaConf.to_container(OmegaConf.load(path))
    return node.get(group, node)


def with_value(resolved: dict, key: str, spec, choice, value) -> dict:
    cfg = copy.deepcopy(resolved)
    *groups, name = key.split(".")
    node = cfg
    if choice is not None:
        node[groups[0]] = choice_node(resolved, groups[0], choice)
    for group in groups:
        node = node[group]
    node[name] = [value] if spec.kind == "reals" else value
    return cfg


def refusal(cfg: dict) -> str | None:
    try:
        schema.check_schema(cfg)
    except UserError as err:
        return str(err)
    return None


def test_the_smoke_config_passes(resolved):
    assert refusal(resolved) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_numeric_key_refuses_nan_and_inf(resolved, value):
    for key, spec, choice in numeric_keys():
        message = refusal(with_value(resolved, key, spec, choice, value))
        assert message is not None and message.startswith(f"{key}="), (key, message)


def test_zero_and_minus_one_only_where_they_mean_something(resolved):
    for key, spec, choice in numeric_keys():
        for value, meaning in ((0, ZERO_MEANS), (-1, MINUS_ONE_MEANS)):
            message = refusal(with_value(resolved, key, spec, choice, value))
            if key in meaning:
                assert message is None, (key, value, message)
            else:
                assert message is not None and message.startswith(f"{key}="), (key, value)


def test_numbers_outside_the_tables_are_finite_too(resolved):
    cfg = copy.deepcopy(resolved)
    cfg["callbacks"]["checkpoint_every_n_steps"]["every_n_train_steps"] = float("nan")
    assert refusal(cfg) == (
        "callbacks.checkpoint_every_n_steps.every_n_train_steps=nan: must be a finite number"
    )
    cfg = copy.deepcopy(resolved)
    cfg["trainer"]["max_time"] = {"hours": float("inf")}  # a keyword passed to Lightning
    assert refusal(cfg) == "trainer.max_time.hours=inf: must be a finite number"


def test_seed_fits_lightning(resolved):
    """Lightning's seed_everything replaces a seed beyond numpy's range with 0."""
    spec = schema.TOP["seed"]
    assert refusal(with_value(resolved, "seed", spec, None, 2**32 - 1)) is None
    message = refusal(with_value(resolved, "seed", spec, None, 2**32))
    assert message == "seed=4294967296: must be an integer >= 0 and <= 4294967295"


def test_batch_limits_are_counts_or_fractions(resolved):
    """Lightning's batch limits: an integer count, or a float fraction of an epoch in [0, 1]."""
    spec = schema.GROUPS["trainer"]["limit_train_batches"]
    for good in (1, 3, 0.5, 1.0):
        assert spec.problem(good) is None, good
    for bad in (0, 0.0, 1.5, 2.0, -1, True, "all"):
        assert spec.problem(bad) == "must be an integer >= 1 or a fraction of an epoch in (0, 1]"
    val = schema.GROUPS["trainer"]["limit_val_batches"]
    assert val.problem(0) is None and val.problem(0.0) is None and val.problem(1.5) is not None


# ----------------------------------------------------------------------------------------------
# Rules between keys (settings.validate on one composed config, mutated)
# ----------------------------------------------------------------------------------------------
def refused(*edits, overrides=()) -> str:
    """settings.validate's one line for the smoke config with `overrides` and the
    (dotted key, value) `edits`."""
    cfg = compose_cfg(*overrides)
    for key, value in edits:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    with pytest.raises(UserError) as err:
        settings.validate(cfg, CPU)
    return str(err.value)


def test_trainer_rules():
    assert "needs trainer.check_val_every_n_epoch" in refused(("trainer.val_check_interval", 0.5))
    message = refused(("mode", "ppl_eval"), ("trainer.limit_val_batches", 0))
    assert message.startswith("trainer.limit_val_batches=0: mode=ppl_eval evaluates")
    message = refused(
        ("lr_scheduler", {"name": "cosine_decay_warmup", "warmup_t": 4, "warmup_lr_init": 0.0,
                          "lr_min": 0.0}),
    )  # fmt: skip
    assert message.startswith("lr_scheduler.warmup_t=4 leaves no steps for the cosine decay")


def test_callbacks_are_built_before_the_run():
    message = refused(("callbacks.checkpoint_monitor.save_top_k", -2))
    assert message == "callbacks.checkpoint_monitor: Invalid value for save_top_k=-2. Must be >= -1"


def test_the_clip_interval_is_bd3lm_s():
    """Without algo.var_min every objective trains on [1e-3, 1]: its interval keys are refused."""
    mdlm = ("algo=mdlm", "block_size=32")
    message = refused(("training.sampling_eps_min", 0.3), overrides=mdlm)
    assert "algo=mdlm with algo.var_min=false trains on t in [0.001, 1.0]" in message
    message = refused(("training.resample", True), overrides=mdlm)
    assert message.startswith("training.resample=true: algo=mdlm")


def test_the_clip_search_grid_ends_by_t_1():
    message = refused(("algo.clip_search_widths", [0.5]), ("algo.clip_search_delta", 0.3))
    assert "reaches the interval [0.6, 1.1] (width 0.5), beyond t = 1" in message
    cfg = compose_cfg("algo.clip_search_widths=[0.5,0.6,0.7,0.8,0.9]", "training.resample=true")
    settings.validate(cfg, CPU)  # the paper's grid


def resample_raises(low: float, high: float, block_size: int) -> bool:
    """Whether q_xt refuses to resample into [low, high] (float32 bounds, as in training)."""
    x0 = torch.zeros(2, 2 * block_size, dtype=torch.long)
    p = torch.full((2, 1), min(max((low + high) / 2, 0.05), 0.95))
    bounds = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
    try:
        q_xt(x0, p, 7, block_size, *bounds, True, torch.Generator().manual_seed(0))
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_refused_intervals_are_those_resampling_refuses(block_size):
    """settings' rule is q_xt's own, on configured intervals and every interval of grids of
    narrow and wide widths (one-sided ones included: a grid starts at float32 1e-3)."""
    intervals = [(1e-3, 1.0), (0.3, 0.4), (0.2, 0.3), (1e-3, 0.1), (0.9, 1.0), (1.0, 1.0)]
    intervals += interval_grid([0.05, 0.1, 0.2, 0.26, 0.5], 0.05, block_size)
    outcomes = set()
    for low, high in intervals:
        expected = resample_raises(low, high, block_size)
        assert checks._resample_refused(low, high, block_size) == expected, (low, high)
        outcomes.add(expected)
    assert outcomes == {True, False}


# ----------------------------------------------------------------------------------------------
# Sampler options: what each objective declares is what its sampler reads
# ----------------------------------------------------------------------------------------------
V, MASK, BOS, WINDOW = 11, 10, 0, 16
# a non-default value of every option (SamplerConfig's cross-rules allow each one alone)
OTHER_VALUE = {
    "var_length": True,
    "reject_low_entropy": False,
    "nucleus_p": 0.5,
    "first_hitting": False,
    "reencode_context": True,
    "fuse_commit": False,
    "tokens_per_step": 2,
    "confidence_threshold": 0.5,
    "entropy_bound": 1.0,
    "eb_gamma": 0.5,
    "unmask_order": "confidence",
}


def fake_logits(tokens: torch.Tensor) -> torch.Tensor:
    """Deterministic logits (..., V) that depend on the tokens and their positions."""
    scale = torch.arange(1, V + 1, dtype=torch.float32)
    place = torch.arange(tokens.shape[1], dtype=torch.float32)[:, None]
    return torch.sin(tokens[..., None].float() * scale + place)


class FakeSSDLMNet:
    vocab_size = V

    def __call__(self, context, x_t, t_frac):
        return torch.sin(x_t.float() * 3 + t_frac[:, None, None])


def samplers(tiny_dit):
    """(objective, backbone, network, length) for sampling.build_sampler, of the objectives
    whose sampler reads less than every option (AR beyond its window; SEDD within its
    context)."""
    return [
        (Autoregressive(mask_id=MASK, seq_len=WINDOW), tiny_dit(V, causal=True), None, 24),
        (SEDD(LogLinear(), MASK, WINDOW), None, lambda x, sigma, layout: fake_logits(x), 12),
        (SSDLM(block_size=4, num_steps=3), FakeSSDLMNet(), None, 12),
    ]


SPEC = {Autoregressive: "ar", SEDD: "sedd", SSDLM: "ssdlm"}  # the registry entry of each


def sample(objective, backbone, network, length, *changed: str) -> torch.Tensor | str:
    """Tokens of 2 samples with the default options but the `changed` ones (OTHER_VALUE), or
    the sampler's refusal."""
    import registry
    import sampling

    options = {k: OTHER_VALUE[k] for k in changed}
    reencode = options.pop("reencode_context", False)
    options.setdefault("reject_low_entropy", True)
    ids = sampling.TokenIds(BOS, MASK, BOS)
    try:
        cfg, fn = registry.build_sampler(
            registry.objective_spec(SPEC[type(objective)]), objective, backbone, WINDOW, length,
            ids, {"num_steps": 3, **options}, reencode, network,
        )  # fmt: skip
        return fn(2, cfg, torch.Generator().manual_seed(0), torch.device("cpu")).tokens
    except ValueError as err:
        return str(err)


def test_options_an_objective_does_not_declare_change_nothing(tiny_dit):
    """Each option outside `sampling_keys.reads` leaves the samples as they are (or the
    sampler refuses it); nucleus_p, where read, changes them. (reencode_context, read by AR,
    changes the computation, not the samples: rotary attention is relative.)"""
    for objective, *args in samplers(tiny_dit):
        base = sample(objective, *args)
        assert isinstance(base, torch.Tensor)
        reads = objective.sampling_keys.reads
        for key in SAMPLER_OPTIONS:
            other = sample(objective, *args, key)
            if key not in reads:
                assert isinstance(other, str) or torch.equal(other, base), (objective, key)
            elif key == "nucleus_p":
                assert not torch.equal(other, base), (objective, key)
    assert MaskedDiffusion.sampling_keys.reads == set(SAMPLER_OPTIONS)


def test_an_unread_option_is_refused_when_set_away_from_its_default():
    """The defaults are configs/': SSD-LM's algo file sets sampling.first_hitting=false."""
    assert sampling_rules.sampling_defaults("ar")["first_hitting"] is True
    assert sampling_rules.sampling_defaults("ssdlm")["first_hitting"] is False
    sample_eval = ("mode", "sample_eval")
    sedd = ["algo=sedd", "block_size=32"]
    message = refused(sample_eval, ("sampling.reencode_context", True), overrides=sedd)
    assert message.startswith("sampling.reencode_context=true: algo=sedd has no use for it")
    assert message.endswith("leave sampling.reencode_context=false")
    message = refused(sample_eval, ("sampling.nucleus_p", 0.9), overrides=["algo=ssdlm"])
    assert "set algo.top_p instead and leave sampling.nucleus_p=1.0" in message
    run = settings.load(compose_cfg("algo=ssdlm", "mode=sample_eval"))  # its own default passes
    sampling_rules.check_unread_sampling_keys(run, settings.build_objective(run, 32))


# ----------------------------------------------------------------------------------------------
# Directories a run creates
# ----------------------------------------------------------------------------------------------
def test_directories_that_cannot_be_created(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for path in (a_file, a_file / "sub"):
        with pytest.raises(UserError, match=r"cannot be written \(.*/file is not a directory\)"):
            paths.check_creatable("data.cache_dir", str(path))
    paths.check_creatable("data.cache_dir", str(tmp_path / "new" / "sub"))
    paths.check_writable("checkpointing.save_dir", str(tmp_path / "new" / "sub"))
    assert os.listdir(tmp_path) == ["file"]  # the probes are gone
    if os.path.isdir("/proc"):  # writable by permission bits for root, yet nothing is created
        with pytest.raises(UserError, match="nothing can be created in /proc"):
            paths.check_writable("checkpointing.save_dir", "/proc/bd3lms")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_a_cache_that_cannot_be_built_is_one_line():
    """An existing directory is not probed by settings (reading needs no write); building a
    missing cache there fails in one line (FileLock would wait forever for its lock file)."""
    from data.cache import load_or_build

    with pytest.raises(UserError, match=r"^data.cache_dir=/proc: cannot build the token cache x"):
        load_or_build("/proc", "x", lambda tmp: None)


# ----------------------------------------------------------------------------------------------
# Typed settings: the declarations are the config files' keys; what validate returns
# ----------------------------------------------------------------------------------------------
def yaml_node(*parts: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "configs", *parts)))


def declared(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def required(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if schema.is_required(f)}


def test_each_config_file_sets_the_keys_its_settings_declare():
    """A group file sets keys of its settings class only (configs/algo: the registry entry's,
    so the clip-search keys are bd3lm.yaml's alone), every one it must set, and the model,
    strategy and schedule files every declared key; config.yaml's groups likewise."""
    for group, choose_by in (("algo", "name"), ("model", "backbone"), ("strategy", "name"),
                             ("lr_scheduler", "name")):  # fmt: skip
        classes = schema.choice_tables(schema.RunSettings, group)
        for name in os.listdir(os.path.join(ROOT, "configs", group)):
            node = yaml_node(group, name)
            node = node.get(group, node)  # a global-package algo file nests its keys
            cls = classes[node[choose_by]]
            assert required(cls) <= set(node) <= declared(cls), (name, set(node) ^ declared(cls))
            if group != "algo":
                assert set(node) == declared(cls), name
    assert "clip_search_widths" in declared(BD3LMSettings)
    assert "clip_search_widths" not in declared(registry.AlgoSettings)
    base, run = yaml_node("config.yaml"), settings.load(compose_cfg())
    for group in ("loader", "sampling", "training", "eval", "optim", "checkpointing"):
        assert set(base[group]) == declared(type(getattr(run, group))), group
    trainer = type(run.trainer)
    assert required(trainer) <= set(base["trainer"]) <= declared(trainer)
    for name in os.listdir(os.path.join(ROOT, "configs", "data")):
        assert set(yaml_node("data", name)) <= declared(DataSettings), name


def test_validate_returns_frozen_typed_settings():
    run, _, plan = settings.validate(
        compose_cfg("algo.clip_search_widths=[0.5,0.6]", "optim.weight_decay=0"), CPU
    )
    assert type(run.algo) is BD3LMSettings and run.algo.clip_search_widths == (0.5, 0.6)
    assert run.algo.clip_search().widths == (0.5, 0.6) and run.algo.ar_loss_weight == 0.0
    assert run.optim.weight_decay == 0.0 and type(run.optim.weight_decay) is float
    assert (type(run.model), type(run.strategy)) == (groups.DiTSettings, groups.DDPSettings)
    assert type(run.lr_scheduler) is groups.ConstantWarmupSettings
    assert run.lr_scheduler.schedule() == {"warmup_steps": 2}
    assert type(run.data) is DataSettings and run.block_size == 4 and plan.batch_size == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 2
    mdlm, _, _ = settings.validate(compose_cfg("algo=mdlm"), CPU)
    assert type(mdlm.algo) is registry.AlgoSettings and mdlm.algo.clip_search() is None
    assert mdlm.block_size == 32  # the K the objective fixes, settled
    ssdlm = settings.load(compose_cfg("algo=ssdlm"))
    assert type(ssdlm.algo) is SSDLMSettings and type(ssdlm.model) is groups.RobertaSettings
    lightning = settings.load(compose_cfg("+trainer.max_time=00:00:01:00")).trainer
    assert lightning.lightning == {"max_time": "00:00:01:00"}
    assert lightning.keywords()["max_time"] == "00:00:01:00"
    assert lightning.keywords()["max_steps"] == 4 and "precision" not in lightning.keywords()


def test_keys_of_another_choice_are_unknown():
    """The clip search is BD3-LM's, the auxiliary AR loss too; its weight is >= 0."""
    message = refused(("algo.clip_search_widths", [0.5]), overrides=["algo=mdlm"])
    assert message.startswith("algo.clip_search_widths is not a known key (valid: name, ")
    message = refused(("algo.ar_loss_weight", 0.5), overrides=["algo=ar"])
    assert message.startswith("algo.ar_loss_weight is not a known key")
    message = refused(("algo.ar_loss_weight", -1.0))
    assert message == "algo.ar_loss_weight=-1.0: must be a number >= 0"
    message = refused(("model.backbone", "unet"))
    assert message == "model.backbone='unet': valid are dit, roberta, hf_causal"


def test_the_hf_causal_model_keys(resolved):
    """configs/model/hf_causal.yaml types as HFCausalSettings; its choices are the backbone's
    own (models/hf_causal)."""
    from models.hf_causal.backbone import ATTN_BACKENDS, CLEAN_ATTENTION

    cfg = copy.deepcopy(resolved)
    cfg["model"] = yaml_node("model", "hf_causal.yaml")["model"]  # a global-package file
    assert refusal(cfg) is None
    model = schema.typed(cfg).model
    assert type(model) is groups.HFCausalSettings and model.pretrained == "smollm2-135m"
    assert (model.token_shift, model.clean_attention, model.gradient_checkpointing) == (
        True, "causal", False,
    )  # fmt: skip
    table = schema.BY_CHOICE["model"]["hf_causal"]
    assert table["clean_attention"].choices == CLEAN_ATTENTION
    assert table["attn_backend"].choices == ATTN_BACKENDS
    cfg["model"]["clean_attention"] = "full"
    assert refusal(cfg) == "model.clean_attention='full': valid are causal, block"
    cfg["model"] = {**yaml_node("model", "hf_causal.yaml")["model"], "hidden_size": 8}
    assert refusal(cfg).startswith("model.hidden_size is not a known key (valid: name, backbone")
