"""Data pipeline on small fixture files in each hub dataset's layout: detokenisers, sources
(data.source directories, fsspec URLs), token streams with BOS/EOS, text8 and its 2L crop
path, worker-count independence, caching (reuse, killed builds, remote cache_dir), bad input.

Hand-computable ids come from the `text8` character tokenizer: [BOS]=2, [EOS]=3, [PAD]=5,
'a'..'z' = 8..33, ' ' = 34."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

import dataloader as dl
from benchmarks import baselines
from data import detokenizers, options, processing
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS, PAD = 2, 3, 5


def ids(text: str) -> list[int]:
    return [34 if c == " " else ord(c) - ord("a") + 8 for c in text]


def cfg_for(tmp_path, **overrides):
    cfg = {
        "train": "local",
        "valid": "local",
        "tokenizer_name_or_path": "text8",
        "cache_dir": str(tmp_path / "cache"),
        "wrap": True,
        "streaming": False,
        "source": None,
        "num_proc": 1,
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return dl.get_vocab(cfg_for(tmp_path_factory.mktemp("v")))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


# ------------------------------------------------------------------ detokenisers


def test_wikitext_detokenizer():
    raw = " = = Early life = = \n The 1 @,@ 000 km road , built in 1990 @-@ 91 ( see below ) . "
    raw += 'It \'s N " big " . \n'
    expected = " == Early life ==\nThe 1,000 km road, built in 1990-91 (see below). "
    expected += 'It\'s 1 "big".\n'
    assert detokenizers.wikitext_detokenizer(raw) == expected


def test_ptb_detokenizer():
    raw = "the company 's shares fell N N to $ N \\/ share <unk> \n ok"
    assert detokenizers.ptb_detokenizer(raw) == "the company's shares fell 1 1 to $1 / share ?\nok"


def test_lm1b_detokenizer():
    assert detokenizers.lm1b_detokenizer('He said " hello there " , and left .') == (
        'He said "hello there", and left.'
    )
    assert detokenizers.lm1b_detokenizer("see http : / / x.org ( now ) ; costs $ 5 ?") == (
        "see http://x.org (now); costs $5?"
    )


def test_lambada_and_scientific_papers_detokenizers():
    assert detokenizers.lambada_detokenizer("\u201cHi,\u201d she said. ") == '\n"Hi," she said.'
    assert detokenizers.scientific_papers_detokenizer("we use @xmath0 , see ( 1 ) .") == (
        "we use @xmath0, see (1) ."
    )
    assert dl.DATASETS["ptb"].detokenizer == "ptb" and dl.DATASETS["ag_news"].detokenizer is None


# ------------------------------------------------------------------ sources and token streams


def test_local_jsonl_token_stream(tmp_path, vocab):
    write_jsonl(tmp_path / "src" / "train.jsonl", [{"text": t} for t in ("ab", "c", "de")])
    cfg = cfg_for(tmp_path, source=str(tmp_path / "src"), train_split="train")
    rows = dl.get_dataset(cfg, vocab, "train", 5).input_ids.tolist()
    # docs + EOS: ab. c. de. -> 8 tokens; bodies of 3; the remainder "e." is dropped
    assert rows == [[BOS, *ids("ab"), EOS, EOS], [BOS, *ids("c"), EOS, *ids("d"), EOS]]
    no_special = cfg_for(tmp_path, source=str(tmp_path / "src"), insert_train_special=False)
    assert dl.get_dataset(no_special, vocab, "train", 4).input_ids.tolist() == [
        [*ids("ab"), EOS, *ids("c")],
        [EOS, *ids("de"), EOS],
    ]
    no_eos = cfg_for(tmp_path, source=str(tmp_path / "src"), insert_train_eos=False)
    assert dl.get_dataset(no_eos, vocab, "train", 4).input_ids.tolist() == [
        [BOS, *ids("ab"), EOS],
        [BOS, *ids("cd"), EOS],
    ]


def test_hub_layout_parquet_with_hub_column_and_detokenizer(tmp_path, vocab):
    # ptb's hub column is `sentence`; the parquet export's layout is config/split/NNNN.parquet
    write_parquet(
        tmp_path / "ptb" / "penn_treebank" / "validation" / "0000.parquet",
        {"sentence": ["it 's a b", "c d"]},
    )
    write_parquet(tmp_path / "ptb" / "other" / "validation" / "0000.parquet", {"sentence": ["zz"]})
    cfg = cfg_for(tmp_path, train="ptb", valid="ptb", source=str(tmp_path / "ptb"))
    rows = dl.get_dataset(cfg, vocab, "valid", 8).input_ids.tolist()
    # detokenised "it's a b" (the apostrophe is [UNK]=7) + EOS + "c d" + EOS = 13 tokens
    body = [*ids("it"), 7, *ids("s a b"), EOS, *ids("c d"), EOS]
    assert rows == [[BOS, *body[:6], EOS], [BOS, *body[6:12], EOS]]


def test_txt_split_files_by_split_name_and_fsspec_url(tmp_path, vocab):
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "train-00000-of-00002.txt").write_text("ab\n")
    (tmp_path / "wt" / "train-00001-of-00002.txt").write_text("cd\n")
    (tmp_path / "wt" / "validation.txt").write_text("zz\n")
    cfg = cfg_for(tmp_path, train="wikitext2", valid="wikitext2", source=f"file://{tmp_path}/wt")
    assert dl.get_dataset(cfg, vocab, "train", 8).input_ids.tolist() == [
        [BOS, *ids("ab"), EOS, *ids("cd"), EOS, EOS]
    ]


def test_openwebtext_held_out_docs_and_shared_source(tmp_path, vocab):
    write_jsonl(tmp_path / "owt" / "train.jsonl", [{"text": t} for t in ("aa", "bb", "cc", "dd")])
    cfg = cfg_for(
        tmp_path,
        train="openwebtext-train",
        valid="openwebtext-valid",
        source=str(tmp_path / "owt"),
        held_out_docs=1,
        insert_train_special=False,
        insert_valid_special=False,
    )
    train = dl.get_dataset(cfg, vocab, "train", 3).input_ids.tolist()
    valid = dl.get_dataset(cfg, vocab, "valid", 3).input_ids.tolist()
    assert train == [[*ids("aa"), EOS], [*ids("bb"), EOS], [*ids("cc"), EOS]]
    assert valid == [[*ids("dd"), EOS]]


def test_text8_splits_and_2L_train_chunks_for_crop(tmp_path, vocab):
    (tmp_path / "t8").mkdir()
    (tmp_path / "t8" / "text8").write_text("abcdefghij" * 5)
    base = dict(source=str(tmp_path / "t8"), held_out_chars=10)
    crop = cfg_for(tmp_path, train="text8-crop", valid="text8", **base)
    train = dl.get_dataset(crop, vocab, "train", 8)
    valid = dl.get_dataset(crop, vocab, "valid", 8)
    # train = chars [0, 30): one chunk of 2L = 16 chars + EOS; row of 2L: BOS + 14 + EOS
    assert train.input_ids.tolist() == [[BOS, *ids("abcdefghijabcd"), EOS]]
    # valid = the test split, chars [40, 50): one chunk of L = 8 chars + EOS -> BOS + 6 + EOS
    assert valid.input_ids.tolist() == [[BOS, *ids("abcdef"), EOS]]
    plain = cfg_for(tmp_path, train="text8", valid="text8", **base)
    assert dl.get_dataset(plain, vocab, "train", 8).input_ids.shape == (4, 8)


def test_padding_mode_rows_and_mask(tmp_path, vocab):
    write_jsonl(tmp_path / "src" / "validation.jsonl", [{"text": "abcdefgh"}, {"text": "a"}])
    cfg = cfg_for(tmp_path, source=str(tmp_path / "src"), wrap=False)
    data = dl.get_dataset(cfg, vocab, "valid", 5)
    assert data.input_ids.tolist() == [[BOS, *ids("abc"), EOS], [BOS, *ids("a"), EOS, PAD, PAD]]
    assert data[1]["attention_mask"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


# ------------------------------------------------------------------ workers and caching


def make_corpus(path, n_docs=2500):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abc "), size=rng.integers(1, 30))) for _ in range(n_docs)]
    write_parquet(path / "train-00000-of-00001.parquet", {"text": texts})
    return texts


def test_same_rows_with_one_and_two_processes(tmp_path, vocab):
    texts = make_corpus(tmp_path / "src")
    results = []
    for procs in (1, 2):
        cfg = cfg_for(
            tmp_path,
            source=str(tmp_path / "src"),
            num_proc=procs,
            cache_dir=str(tmp_path / f"cache{procs}"),
        )
        results.append(dl.get_dataset(cfg, vocab, "train", 16).input_ids)
    assert torch.equal(results[0], results[1])
    docs = [ids(t) for t in texts]
    assert torch.equal(results[0], baselines.wrap_documents(docs, 16, BOS, EOS, True, True))
    names = {
        options.cache_name(
            options.PipelineOptions.from_cfg(cfg_for(tmp_path, num_proc=p), "train", 16), vocab
        )
        for p in (1, 2)
    }
    assert len(names) == 1


def test_cache_reused_and_names_distinguish_sources(tmp_path, vocab, monkeypatch):
    make_corpus(tmp_path / "src", 50)
    cfg = cfg_for(tmp_path, source=str(tmp_path / "src"))
    first = dl.get_dataset(cfg, vocab, "train", 16)
    monkeypatch.setattr(processing, "_tokenize", lambda *a: pytest.fail("retokenized"))
    assert torch.equal(dl.get_dataset(cfg, vocab, "train", 16).input_ids, first.input_ids)
    other = cfg_for(tmp_path, source=str(tmp_path / "elsewhere"))
    opts = [options.PipelineOptions.from_cfg(c, "train", 16) for c in (cfg, other)]
    assert options.cache_name(opts[0], vocab) != options.cache_name(opts[1], vocab)


def test_remote_cache_dir_uploads_marker_last_and_is_reused(tmp_path, vocab, monkeypatch):
    make_corpus(tmp_path / "src", 50)
    monkeypatch.setenv("BD3LMS_CACHE", str(tmp_path / "mirror1"))
    cfg = cfg_for(tmp_path, source=str(tmp_path / "src"), cache_dir="memory://bd3lms-test")
    first = dl.get_dataset(cfg, vocab, "train", 16)
    monkeypatch.setenv("BD3LMS_CACHE", str(tmp_path / "mirror2"))  # a fresh machine
    monkeypatch.setattr(processing, "_tokenize", lambda *a: pytest.fail("retokenized"))
    assert torch.equal(dl.get_dataset(cfg, vocab, "train", 16).input_ids, first.input_ids)


KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from omegaconf import OmegaConf
import dataloader as dl
from data import pipeline
cfg = OmegaConf.create({cfg!r})
vocab = dl.get_vocab(cfg)
real = pipeline._write_wrapped
def slow(*args):
    real(*args)
    open({flag!r}, "w").close()
    time.sleep(60)
pipeline._write_wrapped = slow
dl.get_dataset(cfg, vocab, "train", 16)
"""


@pytest.mark.e2e
def test_killed_preparation_leaves_no_usable_cache(tmp_path, vocab):
    make_corpus(tmp_path / "src", 50)
    cfg = cfg_for(tmp_path, source=str(tmp_path / "src"))
    flag = str(tmp_path / "written")
    script = KILL_SCRIPT.format(root=ROOT, cfg=OmegaConf.to_container(cfg), flag=flag)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    deadline = time.time() + 60
    while not os.path.exists(flag) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert os.path.exists(flag), "the build never reached the write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = tmp_path / "cache"
    complete = [d for d in os.listdir(cache) if os.path.isfile(cache / d / "meta.json")]
    assert complete == [] and any(d.startswith(".tmp-") for d in os.listdir(cache))
    rebuilt = dl.get_dataset(cfg, vocab, "train", 16)  # the lock was released by the kill
    assert len(rebuilt) > 0 and not any(d.startswith(".tmp-") for d in os.listdir(cache))


# ------------------------------------------------------------------ bad input


def test_missing_source_path(tmp_path, vocab):
    cfg = cfg_for(tmp_path, source=str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"^data\.source=.*nope.* does not exist"):
        dl.get_dataset(cfg, vocab, "train", 8)


def test_source_without_split_file_or_column(tmp_path, vocab):
    write_jsonl(tmp_path / "src" / "train.jsonl", [{"body": "ab"}])
    cfg = cfg_for(tmp_path, source=str(tmp_path / "src"))
    with pytest.raises(UserError, match=r"no file for split 'validation'.*validation\.parquet"):
        dl.get_dataset(cfg, vocab, "valid", 8)
    with pytest.raises(UserError, match=r"columns \['body'\].*column 'text'"):
        dl.get_dataset(cfg, vocab, "train", 8)
    assert not [d for d in os.listdir(tmp_path / "cache") if not d.endswith(".lock") and d != "hf"]


def test_empty_split(tmp_path, vocab):
    write_parquet(tmp_path / "src" / "test.parquet", {"text": pa.array([], pa.string())})
    cfg = cfg_for(tmp_path, train="ag_news", valid="ag_news", source=str(tmp_path / "src"))
    with pytest.raises(
        UserError, match=r"data\.valid=ag_news: split .test. of data.source=.* is empty"
    ):
        dl.get_dataset(cfg, vocab, "valid", 8)


def test_hub_dataset_offline_is_one_line(tmp_path, vocab):
    cfg = cfg_for(tmp_path, train="lm1b", valid="lm1b")
    with pytest.raises(UserError) as err:
        dl.get_dataset(cfg, vocab, "valid", 8)
    message = str(err.value)
    assert "\n" not in message and "billion-word-benchmark/lm1b" in message
    assert "data.source=" in message and "test.parquet" in message


def test_local_needs_a_source_and_vocab_mismatch(tmp_path, vocab):
    with pytest.raises(UserError, match=r"data\.train=local needs data\.source"):
        dl.get_dataset(cfg_for(tmp_path), vocab, "train", 8)
    dl.check_vocab_size(vocab, 35, "eval.checkpoint_path")
    with pytest.raises(UserError, match=r"eval\.checkpoint_path: .*50258 tokens.*V=35"):
        dl.check_vocab_size(vocab, 50258, "eval.checkpoint_path")


def test_streaming_rows_match_the_cached_pipeline(tmp_path, vocab, monkeypatch):
    import datasets

    texts = make_corpus(tmp_path / "src", 1500)
    cached = dl.get_dataset(cfg_for(tmp_path, source=str(tmp_path / "src")), vocab, "train", 16)
    stream = datasets.IterableDataset.from_generator(lambda: ({"text": t} for t in texts))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream)
    cfg = cfg_for(tmp_path, train="wikitext2", streaming=True)
    streamed = dl.get_dataset(cfg, vocab, "train", 16)
    rows = torch.stack([item["input_ids"] for item in streamed])
    # wikitext2 detokenises, but these texts (a, b, c and spaces) have nothing to undo
    assert torch.equal(rows, cached.input_ids)


@pytest.mark.e2e
def test_streaming_consumers_read_only_their_shards(tmp_path, vocab, monkeypatch):
    """A local 4-file parquet stream: each of 2 ranks opens only its own 2 files, each of 2
    DataLoader workers of a rank only its own file, and 2 worker processes together give the
    cached pipeline's rows as a multiset (each file holds a multiple of the 1000-document map
    batch). With fewer files than ranks every rank streams all of them."""
    rng = np.random.default_rng(1)
    texts = ["".join(rng.choice(list("abc "), size=rng.integers(1, 30))) for _ in range(4000)]
    files = [texts[i::4] for i in range(4)]
    for i, docs in enumerate(files):
        write_parquet(tmp_path / "src" / f"train-{i:05d}-of-00004.parquet", {"text": docs})
    source = str(tmp_path / "src")
    cached = dl.get_dataset(cfg_for(tmp_path, source=source), vocab, "train", 16).input_ids
    streamed = dl.get_dataset(cfg_for(tmp_path, source=source, streaming=True), vocab, "train", 16)
    for rank in range(2):
        stream, own = streamed.rank_stream(rank, 2)
        assert own and stream.n_shards == 2
        for worker in range(2):  # what datasets gives a DataLoader worker of this rank
            info = torch.utils.data._utils.worker.WorkerInfo(
                id=worker, num_workers=2, seed=0, dataset=None
            )
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            docs = [example["text"] for example in stream]
            assert docs == files[2 * rank + worker]  # 1000 of the 4000 documents
        monkeypatch.undo()
    loader = torch.utils.data.DataLoader(streamed, batch_size=None, num_workers=2)
    rows = torch.stack([item["input_ids"] for item in loader])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, cached.tolist()))
    stream, own = streamed.rank_stream(0, 5)  # fewer shards than ranks: the whole stream
    assert not own and stream.n_shards == 4
