"""sample_eval's rules: the sampler's options (their ranges are sampling.SamplerConfig's), what
the objective's sampler reads (`capabilities.sampling_keys`) and can do (KV cache, prompts),
the prompts and output directory, and the generation length against the blocks of a
checkpoint's trained window (`check_sampler`)."""

from __future__ import annotations

import functools
import os
import pathlib

from omegaconf import OmegaConf

from algorithms.base import SAMPLER_OPTIONS
from sampling import SamplerConfig, sampler_config
from settings.groups import RunSettings
from settings.paths import check_writable, yaml_value
from utils import UserError

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def sampling_options(run: RunSettings) -> dict:
    """The sampler's options (sampling.SamplerConfig fields) the settings give."""
    sampling = run.sampling
    return dict(
        num_steps=run.algo.T,
        first_hitting=sampling.first_hitting,
        nucleus_p=sampling.nucleus_p,
        kv_cache=sampling.kv_cache,
        var_length=sampling.var_length,
        reject_low_entropy=sampling.reject_low_entropy,
        fuse_commit=sampling.fuse_commit,
        tokens_per_step=sampling.tokens_per_step,
        confidence_threshold=sampling.confidence_threshold,
        entropy_bound=sampling.entropy_bound,
        eb_gamma=sampling.eb_gamma,
        unmask_order=sampling.unmask_order,
    )


def check_sampling_keys(run: RunSettings, objective) -> None:
    """sample_eval's keys: the sampler's options (their ranges are SamplerConfig's), what the
    objective can do, prompts and the output directory."""
    sampling, name = run.sampling, run.algo.name
    check_unread_sampling_keys(run, objective)
    try:
        SamplerConfig(
            length=1,
            block_size=1,
            context=1,
            bos_id=0,
            mask_id=0,
            eos_id=0,
            **sampling_options(run),
        )  # fmt: skip  (a trivial geometry: the options alone)
    except ValueError as err:
        raise UserError(str(err)) from None
    length = run.model.length
    if objective.capabilities.two_stream and length % objective.block_size:  # no checkpoint needed
        raise UserError(
            f"block_size={objective.block_size} must divide the generation length "
            f"model.length={length}"
        )
    if sampling.kv_cache and not objective.capabilities.kv_cache:
        which = f"algo={name}"
        if objective.capabilities.time_conditioned:
            which += f" with algo.time_conditioning={yaml_value(run.algo.time_conditioning)}"
        raise UserError(
            f"sampling.kv_cache=true: {which} recomputes its context at every step (only bd3lm "
            "without time conditioning and ar keep clean keys); set sampling.kv_cache=false"
        )
    if sampling.kv_cache and sampling.reencode_context:
        raise UserError(
            "sampling.reencode_context=true is the uncached variant; set kv_cache=false"
        )
    if sampling.prefix is not None and sampling.prefix_file is not None:
        raise UserError("give sampling.prefix or sampling.prefix_file, not both")
    has_prompt = sampling.prefix is not None or sampling.prefix_file is not None
    if has_prompt and not objective.capabilities.prompts:
        raise UserError(
            f"sampling.prefix: algo={name} samples without a prompt; prompts need algo=bd3lm or ar"
        )
    if sampling.prefix_file is not None and not os.path.isfile(sampling.prefix_file):
        raise UserError(f"sampling.prefix_file={sampling.prefix_file}: no such file")
    if sampling.logdir is not None:
        if "://" in sampling.logdir:  # samples are appended to local files as they come
            raise UserError(
                f"sampling.logdir={sampling.logdir}: a local directory is needed (samples are "
                "appended as they are drawn); copy the directory to the URL afterwards"
            )
        check_writable("sampling.logdir", sampling.logdir)


@functools.cache
def sampling_defaults(algo: str) -> dict:
    """The `sampling` group as configs/ sets it for `algo=NAME`, before any experiment or
    override: configs/config.yaml's, under the keys a global-package algo file sets itself
    (configs/algo/ssdlm.yaml: sampling.first_hitting=false)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml").sampling)
    path = CONFIGS / "algo" / f"{algo}.yaml"
    if path.is_file():  # an algo-package file has no `sampling` (algo.sampling is no key)
        defaults.update(OmegaConf.to_container(OmegaConf.load(path)).get("sampling") or {})
    return defaults


def check_unread_sampling_keys(run: RunSettings, objective) -> None:
    """The sampler options (algorithms.base.SAMPLER_OPTIONS) that the objective's sampler does
    not read (`objective.sampling_keys`), refused when set away from their defaults
    (`sampling_defaults`)."""
    keys, name = objective.capabilities.sampling_keys, run.algo.name
    defaults = sampling_defaults(name)
    for key in SAMPLER_OPTIONS:
        value, default = getattr(run.sampling, key), defaults[key]
        if key in keys.reads or value == default:
            continue
        reads = ", ".join(f"sampling.{k}" for k in SAMPLER_OPTIONS if k in keys.reads)
        instead = dict(keys.instead).get(key)
        leave = f"set {instead} instead and leave" if instead else "leave"
        raise UserError(
            f"sampling.{key}={yaml_value(value)}: algo={name} has no use for it (its sampler "
            f"reads {reads or 'no other option'}); {leave} sampling.{key}={yaml_value(default)}"
        )


def check_sampler(run: RunSettings, objective, window: int) -> None:
    """The sampler of `objective` (built for a checkpoint trained on `window` tokens, its K
    settled for that window): the generation length `model.length` against the objective's
    blocks (SamplerConfig's rules)."""
    try:
        sampler_config(objective, window, run.model.length, None, sampling_options(run))
    except ValueError as err:
        raise UserError(str(err)) from None
