"""hf generate(): the samples of sample_eval for the same seed, batch and prompts;
batched prompts of any length (left or right padded, padding never in the output); the
streamer protocol (TextStreamer unchanged); AutoModelForMaskedLM loading with dtype and
device_map; the export's tokenizer, model card and absent auto_map; the streaming CLI."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from conftest import run_inprocess

PROMPTS = ["The king", "O Romeo, wherefore art thou"]


@pytest.fixture(scope="module")
def exported(smoke_checkpoint, tmp_path_factory):
    """The smoke BD3-LM checkpoint exported by scripts/export_hf.py (tokenizer, card)."""
    from scripts.export_hf import main as export_main

    out = str(tmp_path_factory.mktemp("hf") / "smoke-bd3lm")
    assert export_main([str(smoke_checkpoint), out]) == 0
    return out


@pytest.fixture(scope="module")
def sample_eval_records(smoke_checkpoint, tmp_path_factory):
    """sample_eval of the smoke checkpoint continuing PROMPTS (seed 7, one batch of 2)."""
    run_dir = tmp_path_factory.mktemp("sample_eval")
    prompts = run_dir / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run_inprocess(
        run_dir, "algo=bd3lm", "mode=sample_eval", f"eval.checkpoint_path={smoke_checkpoint}",
        "seed=7", "loader.eval_batch_size=2", f"sampling.prefix_file={prompts}",
        "model.length=16",
    )  # fmt: skip
    with open(run_dir / "samples.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.e2e
def test_export_writes_tokenizer_card_and_no_auto_map(exported):
    with open(os.path.join(exported, "config.json")) as f:
        config = json.load(f)
    assert "auto_map" not in config
    assert {"bos_token_id", "eos_token_id", "mask_token_id"} <= set(config)
    assert config["parameterization"] == "subs"  # the objective by name (SEDD shares MDLM's)
    assert os.path.exists(os.path.join(exported, "README.md"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer("The king").input_ids


@pytest.mark.e2e
def test_generate_reproduces_sample_eval(exported, sample_eval_records):
    """Same seed, batch size and prompts: the token ids sample_eval wrote ([BOS] + prompt +
    continuation); the prompts are given right-padded, with their attention mask."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import hf  # noqa: F401  (registers the auto classes)

    model = AutoModelForMaskedLM.from_pretrained(exported, dtype="float32", device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    rows = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, seed=7, num_steps=8)
    assert out.shape == (2, width + 16)
    assert torch.equal(out[:, :width], ids)
    bos = model.config.bos_token_id
    for i, record in enumerate(sample_eval_records):
        assert record["token_ids"] == [bos, *rows[i], *out[i, width:].tolist()]


@pytest.mark.e2e
def test_generate_streams_each_block_and_text_streamer_works(exported, capsys):
    from transformers import AutoTokenizer, TextStreamer

    from hf import BD3LM

    model = BD3LM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(["The king"], return_tensors="pt").input_ids

    from conftest import StreamRecorder

    rec = StreamRecorder()
    out = model.generate(ids, max_new_tokens=10, seed=3, kv_cache=True, streamer=rec)
    K = model.config.block_size
    assert rec.calls[0] == ids.tolist() and rec.calls[-1] == "end"
    blocks = rec.calls[1:-1]
    assert [len(b) for b in blocks] == [K, K, 10 - 2 * K]  # cut at max_new_tokens
    assert sum(blocks, []) == out[0, ids.shape[1] :].tolist()
    model.generate(ids, max_new_tokens=8, seed=3, streamer=TextStreamer(tokenizer))
    assert tokenizer.decode(ids[0]) in capsys.readouterr().out


@pytest.mark.e2e
def test_generate_puts_drafts_for_diffusion_streamers(exported, capsys):
    """A streamer with put_draft gets the block's state after each denoising step: one fewer
    masked position each time (first-hitting), the last draft being the committed block; the
    samples do not change; TextDiffusionStreamer works unchanged."""
    from transformers import AutoTokenizer, TextDiffusionStreamer

    from hf import BD3LM

    model = BD3LM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(["The king"], return_tensors="pt").input_ids
    mask = model.config.mask_token_id

    class DraftRecorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(("put", value.tolist()))

        def put_draft(self, value):
            self.calls.append(("draft", value.tolist()))

        def end(self):
            self.calls.append(("end", None))

    rec = DraftRecorder()
    out = model.generate(ids, max_new_tokens=8, seed=3, kv_cache=True, streamer=rec)
    assert torch.equal(out, model.generate(ids, max_new_tokens=8, seed=3, kv_cache=True))
    K = model.config.block_size
    assert [kind for kind, _ in rec.calls].count("put") == 1 + 8 // K  # prompt + blocks
    drafts = []
    for kind, value in rec.calls[1:-1]:
        if kind == "draft":
            drafts.append(value)
            continue
        assert len(drafts) == K and drafts[-1] == value  # one token per step, then committed
        assert [sum(t == mask for t in d) for d in drafts] == list(range(K - 1, -1, -1))
        drafts = []
    model.generate(ids, max_new_tokens=8, seed=3, streamer=TextDiffusionStreamer(tokenizer))
    assert tokenizer.decode(ids[0]) in capsys.readouterr().out


@pytest.mark.e2e
def test_generate_batched_padding_is_invisible(exported):
    """A row's continuation does not depend on how (or whether) it is padded in the batch."""
    from hf import BD3LM

    model = BD3LM.from_pretrained(exported)
    a, b = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    left = torch.tensor([[0, 0, 0, *a], b])
    left_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    right = torch.tensor([[*a, 0, 0, 0], b])
    out_left = model.generate(left, attention_mask=left_mask, max_new_tokens=8, seed=1)
    out_right = model.generate(right, attention_mask=left_mask.flip(-1), max_new_tokens=8, seed=1)
    assert torch.equal(out_left[:, 6:], out_right[:, 6:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(left, max_new_tokens=0)


def test_device_map_and_dtype_arguments_are_checked(tmp_path):
    from transformers import AutoModelForMaskedLM

    from hf import BD3LM, BD3LMConfig

    config = BD3LMConfig(
        block_size=2, vocab_size=11, model_length=8, hidden_dim=16, cond_dim=8, n_blocks=1,
        n_heads=2, dropout=0.0, attn_backend="sdpa",
    )  # fmt: skip
    BD3LM(config).save_pretrained(tmp_path)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="auto")
    assert isinstance(model, BD3LM) and next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device_map"):
        BD3LM.from_pretrained(tmp_path, device_map={"backbone": 0})
    with pytest.raises(ValueError, match="dtype"):
        BD3LM.from_pretrained(tmp_path, dtype="float31")
    out = BD3LM.from_pretrained(tmp_path).generate(num_samples=3, max_new_tokens=5)
    assert out.shape == (3, 5) and (out[:, 0] == 9).all()  # GPT-2 layout: BOS = V - 2


@pytest.mark.e2e
def test_generate_cli_streams_blocks_and_reports_nfe(exported, sample_eval_records, capsys):
    """In process: the text printed is the sample generate() makes (sample_eval's first
    prompt with seed 7 at batch size 1 has its own draw, so compare with generate)."""
    from transformers import AutoTokenizer

    from hf import BD3LM
    from scripts.generate import main as generate_main

    argv = [exported, "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--num-steps", "8"]
    assert generate_main([*argv, "--seed", "7"]) == 0
    out = capsys.readouterr()
    assert "NFE" in out.err and "tokens/s" in out.err
    model = BD3LM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer([PROMPTS[0]], return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=8, seed=7, num_steps=8)
    assert out.out == tokenizer.decode(want[0], skip_special_tokens=True) + "\n"
    stdin = io.StringIO("To be\nO Romeo\n")
    assert generate_main([exported, "--max-new-tokens", "4", "--kv-cache"], stdin=stdin) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 2 and "[all: 8 tokens" in out.err
    assert generate_main([exported, "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-new-tokens")


@pytest.mark.e2e
def test_readme_generating_from_python_runs(exported, capsys):
    """README "Generating from Python": its example, as written, on the exported smoke model."""
    from conftest import readme_code

    (code,) = readme_code("Generating from Python", "python")
    namespace = {"OUT_DIR": exported}
    exec(compile(code, "README.md", "exec"), namespace)
    out, batch = namespace["out"], namespace["batch"]
    assert out.shape == (2, batch.input_ids.shape[1] + 64)
    assert torch.equal(out[:, : batch.input_ids.shape[1]], batch.input_ids)
    assert (batch.attention_mask[0] == 0).any()  # the first prompt is padded (on the left)
    printed = capsys.readouterr().out
    assert "[PAD]" not in printed  # neither in the batch's lines nor in the stream
    first, second = namespace["tokenizer"].batch_decode(out, skip_special_tokens=True)
    assert first.startswith("To be") and second.startswith("O Romeo, wherefore")
    assert printed.startswith(f"{first}\n{second}\nTo be")  # then TextStreamer's stream


def test_readme_example_on_a_bert_tokenizer_model_gives_sample_eval_samples(
    tmp_path, data_cache, capsys
):
    """LM1B models use the BERT tokenizer, which wraps each text in [CLS] ... [SEP] unless told
    not to: the README's example on such a model (its tokenizer padding on the right, as
    saved by data.vocab) gives sample_eval's samples ([BOS] + prompt ids, same seed and batch),
    and ids with the special tokens are refused in one line."""
    from omegaconf import OmegaConf

    import dataloader
    import registry
    import sampling
    from conftest import randomize_, readme_code
    from hf import BD3LM, BD3LMConfig
    from hf.generation import checkpoint_kind, objective_from_config
    from sampling import generate as generation

    vocab = dataloader.get_vocab(
        OmegaConf.create({"tokenizer_name_or_path": "bert-base-uncased", "cache_dir": data_cache})
    )
    ids = sampling.TokenIds(bos=vocab.bos_id, mask=vocab.mask_id, eos=vocab.eos_id)
    config = BD3LMConfig(
        block_size=4, vocab_size=vocab.size, model_length=16, hidden_dim=16, cond_dim=8,
        n_blocks=1, n_heads=2, dropout=0.0, attn_backend="sdpa", bos_token_id=ids.bos,
        eos_token_id=ids.eos, mask_token_id=ids.mask, pad_token_id=vocab.tokenizer.pad_token_id,
    )  # fmt: skip
    model = BD3LM(config)
    randomize_(model, seed=1)  # the samples depend on the prompt
    model.save_pretrained(tmp_path)
    vocab.tokenizer.save_pretrained(tmp_path)
    (code,) = readme_code("Generating from Python", "python")
    namespace = {"OUT_DIR": str(tmp_path)}
    exec(compile(code, "README.md", "exec"), namespace)
    out, batch, prompts = namespace["out"], namespace["batch"], namespace["prompts"]
    assert (batch.attention_mask[0, -1] == 0).item()  # right padding, streamed without it
    assert "[PAD]" not in capsys.readouterr().out

    kind = checkpoint_kind(model)
    options = {"num_steps": 1000, "kv_cache": True}  # generate()'s defaults and the example's
    cfg, sample_fn = registry.build_sampler(
        registry.objective_spec(kind), objective_from_config(config, ids.mask, kind),
        model.backbone, 16, 64, ids, options,
    )  # fmt: skip
    job = generation.GenerationJob(2, 1, 0, str(tmp_path / "samples"), prompts=prompts,
                                   show_progress=False)  # fmt: skip
    records = generation.generate(sample_fn, cfg, job, vocab, None, "cpu")
    width = batch.input_ids.shape[1]
    for i, (record, prompt) in enumerate(zip(records, prompts, strict=True)):
        rows = vocab.tokenizer.encode(prompt, add_special_tokens=False)
        assert record["token_ids"] == [ids.bos, *rows, *out[i, width:].tolist()]
    wrapped = vocab.tokenizer(prompts, return_tensors="pt", padding=True)
    assert (wrapped.input_ids[:, 0] == ids.bos).all()  # [CLS], the BOS id
    with pytest.raises(ValueError, match=r"row 0 starts with the BOS id .*add_special_tokens"):
        namespace["model"].generate(
            wrapped.input_ids, attention_mask=wrapped.attention_mask, max_new_tokens=4
        )


@pytest.mark.e2e
def test_sedd_export_generates_sample_eval_samples(tmp_path, data_cache):
    """A SEDD run exported to HF (model_type mdlm, parameterization sedd) is sampled by SEDD's
    analytic sampler, not as MDLM: generate(num_samples=2) gives sample_eval's samples."""
    from conftest import random_run_checkpoint
    from hf import MDLM
    from hf.generation import checkpoint_kind
    from scripts.export_hf import main as export_main

    ckpt = tmp_path / "sedd.ckpt"
    random_run_checkpoint(ckpt, "algo=sedd")
    out = str(tmp_path / "hf")
    assert export_main([str(ckpt), out]) == 0
    run_inprocess(
        tmp_path / "run", "algo=sedd", "mode=sample_eval", f"eval.checkpoint_path={ckpt}",
        "seed=7", "loader.eval_batch_size=2", "model.length=32",
    )  # fmt: skip
    with open(tmp_path / "run" / "samples.jsonl") as f:
        records = [json.loads(line) for line in f]
    model = MDLM.from_pretrained(out)
    assert checkpoint_kind(model) == "sedd"
    samples = model.generate(num_samples=2, max_new_tokens=32, seed=7, num_steps=8)
    assert [r["token_ids"] for r in records] == samples.tolist()
