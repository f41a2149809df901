"""Config keys declared once, as the fields of frozen dataclasses (lingua's dataclass configs).

A settings class is a frozen dataclass whose fields are the keys of one config group. A
field's annotation is the key's type: bool, int, float, str (non-empty), Literal[...] (the
valid values; beside a number or bool, literal extras such as "auto"), `X | None` (null
allowed), tuple[float, ...] (a list), `int | float` (Lightning's batch count or epoch
fraction), Mapping (keys passed through), a nested settings class (a sub-group) or Any. What
the annotation cannot say (ranges, a class chosen by a key) goes into the field's metadata
through `setting(...)`. A field without a default must be set; `setting(None, required=True)`
must be set by a run, its default None standing for a key a partial mapping leaves out (the
data package read by key with a tokenizer's name alone).

settings/ derives the schema (types, ranges, one-line errors) from these declarations, and
`from_mapping` builds the dataclasses from the resolved config. Standard library only: the
registry (algo), the data package (data) and settings/ (the rest) declare their groups with it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

METADATA = "config_key"


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """What a field's annotation cannot say. lo / hi: bounds of a number (lo_open / hi_open:
    strict). required: the run must set it although the field has a default. choices: () ->
    the valid values of a str field where a registry knows them. choose: for a
    nested settings field, () -> {value: settings class}, the class picked by the node's
    `choose_by` key. extras: a Mapping field that takes the group's undeclared keys; `keys`:
    () -> the valid ones (None: any); `listing`: how messages name them."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    required: bool = False
    choices: Callable[[], tuple[str, ...]] | None = None
    choose: Callable[[], Mapping[str, type]] | None = None
    choose_by: str = "name"
    extras: bool = False
    keys: Callable[[], Iterable[str]] | None = None
    listing: str | None = None


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    **info: Any,
) -> Any:
    """A config key's field: `default` (none: the key must be set) and the KeyInfo `info`."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={METADATA: KeyInfo(**info)}
    )


def key_info(field: dataclasses.Field) -> KeyInfo:
    return field.metadata.get(METADATA) or KeyInfo()


def has_default(field: dataclasses.Field) -> bool:
    return (
        field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    )


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a settings class (its module's names in scope)."""
    return typing.get_type_hints(cls)


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) < len(args):
            return functools.reduce(operator.or_, rest), True
    return hint, False


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def extras_field(cls: type) -> dataclasses.Field | None:
    """The field that takes a group's undeclared keys, if the class has one."""
    return next((f for f in dataclasses.fields(cls) if key_info(f).extras), None)


def chosen_class(cls: type, name: str, node: Any) -> type | None:
    """The settings class of `cls`'s nested field `name` for the mapping `node`: the class
    chosen by its key (None when that value has none), else the field's own class (None when
    the field is not a settings class)."""
    info = key_info(fields_of(cls)[name])
    if info.choose is not None:
        choice = node.get(info.choose_by) if isinstance(node, Mapping) else None
        return info.choose().get(choice) if isinstance(choice, str) else None
    base, _ = split_optional(hints(cls)[name])
    return base if dataclasses.is_dataclass(base) else None


def from_mapping(cls: type, node: Mapping[str, Any]):
    """`cls` from a mapping of its keys (a resolved config node, a stored config's group, or
    part of one): keys `cls` does not declare are left out (or go to its extras field), missing
    ones take their defaults; lists become tuples, an integer in a float field a float, a
    nested group its settings class (chosen by its key where the class depends on it). Values
    are not checked: the settings schema checked the run's config."""
    if isinstance(node, cls):
        return node
    annotations = hints(cls)
    values: dict[str, Any] = {}
    extras = extras_field(cls)
    declared = fields_of(cls)
    for name, value in node.items():
        field = declared.get(name)
        if field is None or field is extras:
            if extras is not None:
                values.setdefault(extras.name, {})[name] = value
            continue
        values[name] = _convert(cls, name, annotations[name], value)
    return cls(**values)


def _convert(cls: type, name: str, hint: Any, value: Any) -> Any:
    if value is None:
        return None
    nested = chosen_class(cls, name, value)
    if nested is not None:
        return from_mapping(nested, value)
    base, _ = split_optional(hint)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(base) is tuple and isinstance(value, Iterable):
        return tuple(value)
    return value
