"""The command line of main.py, checked before torch and Lightning are imported: group options
whose config file does not exist and keys the composed config does not have are one line each
(Hydra's own messages span many), with the schema's "did you mean" hint. `compose` is the same
composition in process (tests, scripts); `command_line_keys` the keys a run's command line set;
`fail` the CLI's answer to bad input (exit code 2, one line).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from utils import UserError, get_logger, global_rank

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
GROUPS = ("algo", "model", "data", "noise", "lr_scheduler", "strategy", "experiment")
SWEEP_FUNCTION = re.compile(r"^(\w+)\((.*)\)$")  # choice(a,b), range(...), glob(...)
OTHER_PRIMARY_CONFIG = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
log = get_logger("bd3lms")


def group_values(value: str) -> list[str] | None:
    """The config names a `group=value` override asks for: one name, a comma-separated sweep
    list (`-m algo=ar,mdlm`) or `choice(...)`; None for values that are not names
    (`glob(...)`, `range(...)`, interpolations), which Hydra checks itself."""
    function = SWEEP_FUNCTION.match(value)
    if function:
        if function[1] != "choice":
            return None
        value = function[2]
    if "${" in value:
        return None
    return [v.strip().strip("'\"") for v in value.split(",")]


def check_group_choices(argv: Sequence[str]) -> None:
    """Fail in one line on `group=name` overrides whose config file does not exist (Hydra's own
    message spans many lines)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, key)))
        for name in group_values(value) or []:
            if name not in choices:
                raise UserError(f"{key}={name}: unknown; valid are {', '.join(choices)}")


def check_override_keys(overrides: Sequence[str]) -> None:
    """Fail in one line on a `key=value` override of a key that the composed config does not
    have, with the schema's "did you mean" hint (Hydra's own message advises `+key=`, which the
    schema then refuses). The config is composed from the overrides that shape it (groups,
    `+key=` additions, `~key` deletions), once per option of a swept group (`-m
    lr_scheduler=constant,cosine_decay_warmup`). Additions, deletions and Hydra's own keys are
    left to Hydra and the schema, and so is a command line Hydra cannot parse or compose."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return
    changes, shaping = [], []
    for override in parsed:
        if override.is_hydra_override():
            continue
        key = override.key_or_group
        plain = override.type == OverrideType.CHANGE and override.package is None
        is_group = os.path.isdir(os.path.join(CONFIG_DIR, key))
        (changes if plain and not is_group else shaping).append(override)
    if not changes:
        return
    for variant, note in _shaping_variants(shaping):
        try:
            with initialize_config_dir(CONFIG_DIR, version_base=None):
                cfg = hydra_compose("config", overrides=variant)
        except (HydraException, OmegaConfBaseException):
            return
        config = OmegaConf.to_container(cfg, resolve=False)
        for override in changes:
            problem = unknown_key(config, override.key_or_group, note)
            if problem is not None:
                raise UserError(problem)


def _shaping_variants(shaping: list) -> list[tuple[list[str], str]]:
    """(overrides, note) to compose, from Hydra's parsed overrides: each swept override at its
    first option, then each of its other options in turn (note: " with KEY=OPTION"); [] when a
    sweep is not a list of options (glob, range), which Hydra expands itself."""
    from hydra.core.override_parser.types import OverrideType

    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}
    options = []
    for override in shaping:
        if not override.is_sweep_override():
            options.append([override.input_line])
            continue
        if not override.is_discrete_sweep():
            return []
        head = prefix.get(override.type, "") + override.get_key_element()
        options.append([f"{head}={value}" for value in override.sweep_string_iterator()])
    base = [choices[0] for choices in options]
    variants = [(base, "")]
    for index, choices in enumerate(options):
        for choice in choices[1:]:
            variants.append(([*base[:index], choice, *base[index + 1 :]], f" with {choice}"))
    return variants


def unknown_key(config: dict, key: str, note: str = "") -> str | None:
    """Why the dotted `key` is not a key of the composed `config` (a plain dict; `note` says
    which composition), naming the closest key and the keys beside it; None when it is one, or
    when a list lies on its path (Hydra's to judge)."""
    parts, node = key.split("."), config
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        if node is None:
            return f"{key}: {parent} is null here{note}; add the key with +{key}=VALUE"
        if not isinstance(node, dict):
            return None
        if part not in node:
            hint = _closest(config, node, parent, part)
            listing = ", ".join(map(str, node))
            if parent == "trainer":  # the schema also takes Lightning's other Trainer keywords
                listing += ", or another keyword of lightning.Trainer as +trainer.KEYWORD=VALUE"
            where = f" in {parent}" if parent else ""
            return f"{key} is not a known key{note} ({hint}valid{where}: {listing})"
        node = node[part]
    return None


def _closest(config: dict, node: dict, parent: str, name: str) -> str:
    """ "did you mean KEY? " for the key of `node` (at `parent`) closest to `name`, else for the
    closest key of that name anywhere in `config` (a key given in the wrong group), else ""."""
    close = difflib.get_close_matches(name, [str(k) for k in node], n=1)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}? "
    paths = _key_paths(config)
    close = difflib.get_close_matches(name, [p.rsplit(".", 1)[-1] for p in paths], n=1)
    if close:
        return f"did you mean {next(p for p in paths if p.rsplit('.', 1)[-1] == close[0])}? "
    return ""


def _key_paths(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, inner nodes included."""
    paths = []
    for name, value in node.items():
        path = f"{prefix}{name}"
        paths.append(path)
        if isinstance(value, dict):
            paths += _key_paths(value, path + ".")
    return paths


def check_command_line(argv: Sequence[str]) -> None:
    """The overrides of `python main.py ARGV` (its arguments with `=`, and `~key` deletions):
    group options (check_group_choices), then keys (check_override_keys), unless a flag names
    another primary config."""
    if any(arg.split("=")[0] in OTHER_PRIMARY_CONFIG for arg in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    check_group_choices(overrides)
    check_override_keys(overrides)


def compose(overrides: Sequence[str], run_dir: str) -> DictConfig:
    """The config that `python main.py OVERRIDES hydra.run.dir=RUN_DIR` runs, for in-process
    runs (tests, scripts): Hydra's compose API, with `${hydra:runtime.output_dir}` = run_dir.
    Bad group options and unknown keys are one UserError line, as on the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    check_group_choices(overrides)
    try:
        with initialize_config_dir(CONFIG_DIR, version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    except ConfigCompositionException:
        check_override_keys(overrides)  # an unknown key: our line; else Hydra's error
        raise
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)
        cfg.hydra.job.name = "main"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def command_line_keys() -> frozenset[str]:
    """The config keys this run's command line (or compose's overrides) sets, additions
    included; none outside Hydra."""
    if not HydraConfig.initialized():
        return frozenset()
    task = HydraConfig.get().overrides.task
    return frozenset(o.split("=", 1)[0].lstrip("+") for o in task if "=" in o and o[0] != "~")


def fail(err: UserError) -> NoReturn:
    """The one line of bad input: `error: ...` on stderr and in the run's log files (Hydra's
    main.log, once it exists); exit code 2."""
    line = f"error: {err}"
    if global_rank() == 0:
        record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    print(line, file=sys.stderr)
    sys.exit(2)
