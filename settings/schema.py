"""The schema of every key a user can set, derived from the typed settings (settings/groups.py,
the registry's algo settings, the data package's): `check_schema(cfg)` walks the composed
config and fails on the first unknown key or bad value with one line naming the key and what
would be valid; `typed(cfg)` then builds the RunSettings. Cross-key rules (capabilities of the
objective, backends, strategies, paths) are in settings/checks.py.

A field's annotation and metadata (config_keys) become a `Spec` here; the tables TOP, GROUPS
and BY_CHOICE list them by key. A group whose keys depend on a choice (`algo`, `model`,
`strategy`, `lr_scheduler`) has one table per choice. `trainer` also takes any other keyword
of `lightning.Trainer`, `wandb` any keyword of Lightning's WandbLogger or `wandb.init`;
`callbacks` nodes are checked by instantiating them (settings.checks.check_callbacks). Every
number, in the tables or not, is finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from config_keys import (
    chosen_class,
    extras_field,
    fields_of,
    from_mapping,
    has_default,
    hints,
    key_info,
    split_optional,
)
from settings.groups import RunSettings
from utils import UserError


@dataclasses.dataclass(frozen=True)
class Spec:
    """One key: `kind` int | real | bool | text | choice | reals | batches | any; bounds for
    numbers (`lo_open` / `hi_open`: strict); `choices` for choice; `null`: None allowed; `extra`:
    literal values also allowed (e.g. "auto"). Numbers are finite (NaN and inf never pass).
    `batches` is Lightning's batch count or epoch fraction: an integer >= lo, or a fraction of
    an epoch, a float in [0, 1] ((0, 1] when lo > 0: a zero fraction is as empty as 0)."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    null: bool = False
    extra: tuple = ()

    def problem(self, value: Any) -> str | None:
        """None when `value` is valid, else what would be valid."""
        if value is None:
            return None if self.null else f"must be {self.describe()}"
        if any(type(value) is type(e) and value == e for e in self.extra):
            return None
        if self.kind == "any":
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "text":
            return None if isinstance(value, str) and value else "must be a non-empty string"
        if self.kind == "choice":
            return None if str(value) in self.choices else f"valid are {', '.join(self.choices)}"
        if self.kind == "reals":
            if not isinstance(value, (list, tuple)):
                return f"must be a list of {self.describe()}"
            bad = [v for v in value if not self._in_range(v, real=True)]
            return f"entries must be {self.describe()}" if bad else None
        if self.kind == "batches" and isinstance(value, float):
            fraction = Spec("real", 0, 1, lo_open=bool(self.lo))
            return None if fraction.problem(value) is None else f"must be {self.describe()}"
        return (
            None
            if self._in_range(value, real=self.kind == "real")
            else f"must be {self.describe()}"
        )

    def _in_range(self, value: Any, real: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if real else int):
            return False
        if real and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        if self.kind in ("bool", "text", "choice"):
            text = {"bool": "true or false", "text": "a non-empty string"}.get(
                self.kind, f"one of {', '.join(self.choices)}"
            )
        elif self.kind == "batches":
            zero = "(0, 1]" if self.lo else "[0, 1]"
            text = f"an integer >= {_num(self.lo)} or a fraction of an epoch in {zero}"
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        alternatives = [repr(e) if isinstance(e, str) else str(e) for e in self.extra]
        alternatives += ["null"] if self.null else []
        return text + "".join(f" or {a}" for a in alternatives)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def spec_of(cls: type, name: str) -> Spec:
    """The Spec of `cls`'s field `name`, from its annotation and metadata (config_keys)."""
    field = fields_of(cls)[name]
    info = key_info(field)
    base, null = split_optional(hints(cls)[name])
    null = null and not info.required
    bounds = dict(lo=info.lo, hi=info.hi, lo_open=info.lo_open, hi_open=info.hi_open)
    if base is Any:
        return Spec("any", null=True)
    if info.choices is not None:
        return Spec("choice", choices=info.choices(), null=null)
    parts = typing.get_args(base) if _is_union(base) else (base,)
    extra = tuple(v for p in parts if typing.get_origin(p) is Literal for v in typing.get_args(p))
    kinds = {p for p in parts if typing.get_origin(p) is not Literal}
    if not kinds:
        return Spec("choice", choices=extra, null=null)
    if kinds == {int, float}:
        return Spec("batches", info.lo, null=null)
    (kind,) = kinds
    if typing.get_origin(kind) is tuple:
        return Spec("reals", **bounds, null=null)
    names = {bool: "bool", int: "int", float: "real", str: "text"}
    return Spec(names[kind], **bounds, null=null, extra=extra)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def is_required(field: dataclasses.Field) -> bool:
    return not has_default(field) or key_info(field).required


def table(cls: type) -> dict[str, Spec]:
    """{key: Spec} of `cls`'s plain keys (not its sub-groups, mappings or extras)."""
    return {
        f.name: spec_of(cls, f.name)
        for f in dataclasses.fields(cls)
        if not _is_group(cls, f) and not _is_mapping(cls, f)
    }


def _is_group(cls: type, field: dataclasses.Field) -> bool:
    base, _ = split_optional(hints(cls)[field.name])
    return key_info(field).choose is not None or dataclasses.is_dataclass(base)


def _is_mapping(cls: type, field: dataclasses.Field) -> bool:
    base, _ = split_optional(hints(cls)[field.name])
    return typing.get_origin(base) is Mapping or base is Mapping


def choice_tables(cls: type, name: str) -> dict[str, type]:
    """{choice: settings class} of `cls`'s sub-group `name` whose class depends on a key."""
    return key_info(fields_of(cls)[name]).choose()


def group_table(group: str, choice: str | None = None) -> dict[str, Spec]:
    """The table of RunSettings' sub-group `group` (for `choice` where its class depends on
    one)."""
    field = fields_of(RunSettings)[group]
    if key_info(field).choose is None:
        return table(split_optional(hints(RunSettings)[group])[0])
    return table(choice_tables(RunSettings, group)[choice])


TOP = table(RunSettings)
GROUPS = {
    f.name: group_table(f.name)
    for f in dataclasses.fields(RunSettings)
    if _is_group(RunSettings, f) and key_info(f).choose is None
}
BY_CHOICE = {
    f.name: {choice: group_table(f.name, choice) for choice in key_info(f).choose()}
    for f in dataclasses.fields(RunSettings)
    if key_info(f).choose is not None
}


def check_schema(cfg: Mapping[str, Any]) -> None:
    """Raise UserError on the first unknown key or bad value of the resolved config `cfg` (a
    plain dict, `hydra` removed)."""
    _check_node(cfg, RunSettings, "")
    for name, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise UserError(f"callbacks.{name}: needs a _target_ (a callback class to build)")
    _check_finite(cfg, "")


def typed(cfg: Mapping[str, Any]) -> RunSettings:
    """The RunSettings of the resolved config `cfg` (check_schema passed)."""
    return from_mapping(RunSettings, cfg)


def _check_node(node: Mapping[str, Any], cls: type, prefix: str) -> None:
    """The keys of one group `node` (a mapping; `prefix` names it, "" at the top level)
    against the settings class `cls`: unknown keys, then each field in order."""
    extras = extras_field(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f is not extras]
    if extras is not None:
        valid += key_info(extras).keys()
    _known(node, prefix, valid, key_info(extras).listing if extras is not None else None)
    for field in dataclasses.fields(cls):
        name, key = field.name, f"{prefix}{field.name}"
        if field is extras:
            continue
        if _is_group(cls, field):
            _check_group(node.get(name), cls, name, key)
        elif _is_mapping(cls, field):
            _check_mapping(node.get(name), field, key)
        elif name in node:
            _check(key, node[name], spec_of(cls, name))
        elif is_required(field):
            raise UserError(f"{key} is missing; it must be {spec_of(cls, name).describe()}")


def _check_group(node: Any, owner: type, name: str, key: str) -> None:
    if not isinstance(node, Mapping):
        raise UserError(f"{key}={node!r}: the {key} group must be a mapping of keys")
    info = key_info(fields_of(owner)[name])
    if info.choose is not None:
        choices = tuple(info.choose())
        _check(f"{key}.{info.choose_by}", node.get(info.choose_by), Spec("choice", choices=choices))
    _check_node(node, chosen_class(owner, name, node), f"{key}.")


def _check_mapping(value: Any, field: dataclasses.Field, key: str) -> None:
    if value is None and has_default(field):
        return
    if not isinstance(value, Mapping):
        raise UserError(f"{key}={value!r}: give null or keys of the {key} group")
    info = key_info(field)
    if info.keys is not None:
        _known(value, f"{key}.", info.keys())


def _check_finite(node: Any, key: str) -> None:
    """Numbers the tables do not cover (Lightning's other Trainer keywords, callback and wandb
    options) are finite too."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _check_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{key}={node}: must be a finite number")


def _check(key: str, value: Any, spec: Spec) -> None:
    problem = spec.problem(value)
    if problem is not None:
        raise UserError(f"{key}={value!r}: {problem}")


def _known(node: Mapping[str, Any], prefix: str, valid, listing: str | None = None) -> None:
    for key in node:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        listing = listing or ", ".join(map(str, valid))
        raise UserError(f"{prefix}{key} is not a known key ({hint}valid: {listing})")
