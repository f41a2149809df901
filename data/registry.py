"""The dataset registry: where each `data.train` / `data.valid` name lives.

`DATASETS` maps a config name to a `DatasetSpec`; the split names and the held-out defaults that
go with them are here too.
"""

from __future__ import annotations

import dataclasses

from data.shakespeare import EMBEDDED_DATASET


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how its text is read.

    hub/config/revision: the `datasets.load_dataset` arguments (None: not a hub dataset).
    url: one remote file used for every split (lambada's jsonl, text8's zip).
    train_split/valid_split: the split names as the hub (and a `data.source` copy) name them.
    held_out: "head"/"tail" take all but / only the last `data.held_out_docs` documents of the
    split (the openwebtext-train/-valid convention).
    kind: "hub", "text8" (character chunks of L, or 2L for the text8-crop train split),
    "local" (`data.source` required) or "embedded".
    """

    hub: str | None = None
    config: str | None = None
    revision: str | None = None
    url: str | None = None
    train_split: str = "train"
    valid_split: str = "validation"
    column: str = "text"
    detokenizer: str | None = None
    held_out: str | None = None
    kind: str = "hub"


LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet export of former script datasets
OWT = "Skylion007/openwebtext"


DATASETS: dict[str, DatasetSpec] = {
    "openwebtext": DatasetSpec(OWT, valid_split="train"),
    "openwebtext-train": DatasetSpec(OWT, valid_split="train", held_out="head"),
    "openwebtext-valid": DatasetSpec(OWT, valid_split="train", held_out="tail"),
    "wikitext103": DatasetSpec(
        "Salesforce/wikitext", "wikitext-103-raw-v1", detokenizer="wikitext"
    ),
    "wikitext2": DatasetSpec("Salesforce/wikitext", "wikitext-2-raw-v1", detokenizer="wikitext"),
    "lm1b": DatasetSpec(
        "billion-word-benchmark/lm1b",
        "plain_text",
        PARQUET_REVISION,
        valid_split="test",
        detokenizer="lm1b",
    ),
    "ptb": DatasetSpec(
        "ptb-text-only/ptb_text_only",
        "penn_treebank",
        PARQUET_REVISION,
        column="sentence",
        detokenizer="ptb",
    ),
    "lambada": DatasetSpec(
        url=LAMBADA_URL, train_split="test", valid_split="test", detokenizer="lambada"
    ),
    "ag_news": DatasetSpec("fancyzhx/ag_news", valid_split="test"),
    "scientific_papers_arxiv": DatasetSpec(
        "armanc/scientific_papers",
        "arxiv",
        PARQUET_REVISION,
        column="article",
        detokenizer="scientific_papers",
    ),
    "scientific_papers_pubmed": DatasetSpec(
        "armanc/scientific_papers",
        "pubmed",
        PARQUET_REVISION,
        column="article",
        detokenizer="scientific_papers",
    ),
    "text8": DatasetSpec(url=TEXT8_URL, valid_split="test", kind="text8"),
    "text8-crop": DatasetSpec(url=TEXT8_URL, valid_split="test", kind="text8"),
    "local": DatasetSpec(kind="local"),
    EMBEDDED_DATASET: DatasetSpec(kind="embedded"),
}


SPLITS = ("train", "valid")
TEXT8_HELD_OUT_CHARS = 5_000_000  # the reference's 90M / 5M / 5M split of the 100M characters
OWT_HELD_OUT_DOCS = 100_000
