"""Knowing, without reading them, whether parameters changed since a derived tensor was made."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


class WeightStamp:
    """The identity of some tensors' current values: their storage addresses and version
    counters (every in-place update bumps a counter: optimizer steps, EMA copies,
    load_state_dict). The stamp holds the storages, so an address cannot be reused by a
    replacement tensor while the stamp lives. Used to keep inference-only copies (a transposed
    weight, a constant adaLN modulation) until the weights they derive from change."""

    def __init__(self, tensors: Iterable[Tensor]):
        self._held = [t.detach() for t in tensors]
        self._versions = [t._version for t in self._held]

    def matches(self, tensors: Iterable[Tensor]) -> bool:
        tensors = list(tensors)
        return len(tensors) == len(self._held) and all(
            t.data_ptr() == held.data_ptr() and t._version == version
            for t, held, version in zip(tensors, self._held, self._versions, strict=True)
        )
