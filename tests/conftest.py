"""Test setup: offline hub variables (hub look-ups otherwise stall for tens of seconds), the
repository root on sys.path, the shared data cache, in-process and subprocess runs of main.py,
and a tiny model factory shared by the numerics tests."""

from __future__ import annotations

import functools
import os
import sys

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
os.environ.update(OFFLINE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from models.dit import DiT, DiTConfig  # noqa: E402

P_VALUE = 1e-6  # statistical tests fail by chance less than once in a million seeds


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square statistic over bins with expected counts > 0
    (df = bins - 1); bins of expected count 0 must have count 0."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    assert (counts[expected == 0] == 0).all(), "draws where the law puts no mass"
    counts, expected = counts[expected > 0], expected[expected > 0]
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), statistic / 2)
    )


def two_sample_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """The chi-square homogeneity p-value of two count vectors over the same bins."""
    a, b = a.double(), b.double()
    total = a + b
    keep = total > 0
    a, b, total = a[keep], b[keep], total[keep]
    expected_a, expected_b = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    statistic = ((a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b).sum()
    df = a.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), statistic / 2)
    )


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised layers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture
def tiny_dit():
    """factory(vocab_size=37, causal=False, backend='sdpa', randomized=True) -> DiT in eval mode."""

    def make(vocab_size=37, causal=False, backend="sdpa", randomized=True, seed=0):
        torch.manual_seed(seed)
        config = DiTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            cond_dim=16,
            n_blocks=2,
            n_heads=4,
            dropout=0.0,
            causal=causal,
            adaln=not causal,
            attn_backend=backend,
        )
        model = DiT(config)
        if randomized:
            randomize_(model, seed)
        return model.eval()

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny tensors (threads gain nothing there and stall
    on a busy 2-core machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One token/tokenizer cache for the session (BD3LMS_CACHE, which data.cache_dir reads);
    BD3LMS_TEST_CACHE names a persistent one (the mutation runs share it)."""
    path = os.environ.get("BD3LMS_TEST_CACHE") or str(tmp_path_factory.mktemp("data_cache"))
    os.environ["BD3LMS_CACHE"] = path
    return path


def run_inprocess(run_dir, *overrides, experiment="smoke"):
    """`main.py experiment=smoke OVERRIDES` in this process with run directory `run_dir`
    (UserError propagates). Needs the data_cache fixture."""
    import main

    run_dir = str(run_dir)
    cfg = main.compose([f"experiment={experiment}", *overrides], run_dir)
    main.run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory, data_cache):
    """A 1-layer GPT-2 with the GPT-2 tokenizer, saved as a local judge directory."""
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    import dataloader

    path = tmp_path_factory.mktemp("judge")
    cfg = OmegaConf.create({"tokenizer_name_or_path": "gpt2", "cache_dir": data_cache})
    dataloader.get_vocab(cfg).tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=48, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory, data_cache):
    """last.ckpt of a 4-step BD3-LM smoke run (in process)."""
    run_dir = tmp_path_factory.mktemp("smoke_bd3lm")
    run_inprocess(run_dir, "algo=bd3lm")
    return run_dir / "checkpoints" / "last.ckpt"


def random_run_checkpoint(path, *overrides):
    """A freshly built module of the smoke config with `overrides` (the data tokenizer's
    vocabulary), its weights randomised and copied to the EMA, saved as our Lightning .ckpt at
    `path` -> the module in eval mode with the EMA weights in. Needs the data_cache fixture."""
    from data.vocab import get_vocab

    cfg = compose_cfg(*overrides)
    vocab = get_vocab(cfg.data)
    torch.manual_seed(0)
    module = build_module(cfg, vocab_size=vocab.size, mask_id=vocab.mask_id)
    randomize_(module.backbone, seed=1)
    if module.ema is not None:
        module.ema.reset(module.backbone)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return module.eval()


def readme_code(section: str, lang: str) -> list[str]:
    """The ```lang fenced blocks of README.md's `## section` (in order)."""
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


def write_reference_ckpt(path, module, ema_list, hparams, compiled=True):
    """`module` saved in the reference's Lightning layout: backbone weights under
    backbone._orig_mod. (compiled) or backbone., hyper_parameters, and the EMA as an unnamed
    list `ema_list` in the reference's parameter order."""
    prefix = "backbone._orig_mod." if compiled else "backbone."
    state = {}
    for name, tensor in module.state_dict().items():
        key = prefix + name[len("backbone.") :] if name.startswith("backbone.") else name
        state[key] = tensor.clone()
    checkpoint = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.5.0.post0",
        "state_dict": state,
        "hyper_parameters": hparams,
        "ema": {"decay": 0.9999, "num_updates": 1000, "shadow_params": ema_list},
        "sampler": {"random_state": torch.zeros(4, dtype=torch.uint8)},
        "loops": {"fit_loop": {"state_dict": {}}},
    }
    torch.save(checkpoint, path)


def save_ssdlm(network, directory: str, module_prefix: bool = True) -> None:
    """An SSD-LM network written in the released layout models.ssdlm.load_ssdlm reads:
    mlm.save_pretrained(directory) plus embed_sum_layer.pt and timestep_layer.pt (keys
    "module."-prefixed when `module_prefix`, as a DataParallel-wrapped layer's state dict has
    them)."""
    from models.ssdlm import EMBED_SUM_FILE, MODULE_PREFIX, TIMESTEP_FILE

    os.makedirs(directory, exist_ok=True)
    network.mlm.save_pretrained(directory)
    prefix = MODULE_PREFIX if module_prefix else ""
    for layer, name in (
        (network.embed_sum_layer, EMBED_SUM_FILE),
        (network.timestep_layer, TIMESTEP_FILE),
    ):
        state = {prefix + k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
        torch.save(state, os.path.join(directory, name))


def build_module(cfg, vocab_size: int, mask_id: int):
    """builders.build_module for the composed config `cfg` (its typed settings, unchecked
    across keys, and the objective for a context of model.length with `mask_id`), its
    resolved config recorded as a run's is."""
    from omegaconf import OmegaConf

    import builders
    import settings

    run = settings.load(cfg)
    objective = settings.build_objective(run, run.model.length, mask_id)
    record = OmegaConf.to_container(cfg, resolve=True)
    return builders.build_module(run, objective, vocab_size, record)


def compose_cfg(*overrides):
    """The smoke config with `overrides` (no run: the run directory is never created); a fresh
    copy of a composition made once per override list (Hydra's compose costs ~0.1 s)."""
    import copy

    return copy.deepcopy(_composed(tuple(overrides)))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    import main

    return main.compose(["experiment=smoke", *overrides], "/tmp/bd3lms-tests-unused-run-dir")


def run_main(run_dir, *overrides, check=True):
    """`python main.py experiment=smoke OVERRIDES` in a subprocess (the CLI contracts: exit
    codes, stderr, signals); needs the data_cache fixture."""
    import subprocess

    env = {**os.environ, **OFFLINE, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "experiment=smoke"]
    cmd += [f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


RECORDS: set[str] = set()  # a refused run writes nothing (config_resolved.yaml comes last)


def bad_run(tmp_path, *overrides) -> str:
    """Run main.run in process expecting a UserError: -> its one-line message, after checking
    that the run directory holds no output."""
    from utils import UserError

    run_dir = tmp_path / "bad"
    with pytest.raises(UserError) as err:
        run_inprocess(run_dir, *overrides)
    message = str(err.value)
    assert "\n" not in message and message, message
    written = set(os.listdir(run_dir)) - RECORDS if run_dir.exists() else set()
    assert not written, f"bad input must not write outputs: {written}"
    return message


# The reference DiT's parameter order, written out (its EMA list is stored in this order)
DIT_BLOCK_KEYS = [
    "norm1.weight",
    "attn_qkv.weight",
    "attn_out.weight",
    "norm2.weight",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
    "adaLN_modulation.weight",
    "adaLN_modulation.bias",
]


def reference_parameter_order(n_blocks: int, adaln: bool) -> list[str]:
    """The order in which the reference's EMA list stores parameters."""
    names = ["vocab_embed.embedding"]
    if adaln:
        names += [f"sigma_map.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    for b in range(n_blocks):
        names += [f"blocks.{b}.{k}" for k in DIT_BLOCK_KEYS if adaln or "adaLN" not in k]
    names += ["output_layer.norm_final.weight", "output_layer.linear.weight"]
    names += ["output_layer.linear.bias"]
    if adaln:
        names += ["output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    return names


# ----------------------------------------------------------------------------------------------
# Sampling helpers: a tiny randomised module, a recorder of denoising calls, a sampler config
# ----------------------------------------------------------------------------------------------
V_TINY, MASK_TINY, BOS_TINY = 41, 40, 0


def tiny_module(algo: str = "bd3lm", window: int = 16, *overrides: str):
    """The smoke config's module for `algo` with V = 41 (mask 40) and random weights."""
    cfg = compose_cfg(f"algo={algo}", f"model.length={window}", *overrides)
    torch.manual_seed(0)
    module = build_module(cfg, vocab_size=V_TINY, mask_id=MASK_TINY)
    randomize_(module.backbone, seed=3, scale=0.3)
    return module.eval()


def module_denoiser(module, window: int, reencode: bool = False):
    """`module`'s network as the samplers see it (what build_sampler gives them): its backbone
    and objective behind sampling.ModelDenoiser, `window` the trained context."""
    from sampling import ModelDenoiser

    return ModelDenoiser(module.backbone, module.algorithm, window, reencode, module.network)


class Recorder:
    """Wraps a denoiser and keeps every denoising call's log-probabilities."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.time_conditioned = getattr(model, "time_conditioned", True)  # DDPM reuse as inside

    def logprobs(self, x, t, num_last, key_valid, cache, commit=False, commit_previous=False,
                 rows=None):  # fmt: skip
        out = self.model.logprobs(x, t, num_last, key_valid, cache, commit, commit_previous, rows)
        self.calls.append(out)
        return out

    def commit(self, x, key_valid, cache):
        self.model.commit(x, key_valid, cache)

    def new_cache(self, batch_size, block_size):
        return self.model.new_cache(batch_size, block_size)


def sampler_cfg(length, block_size, **kw):
    import sampling

    args = dict(length=length, block_size=block_size, num_steps=8, context=16, bos_id=BOS_TINY)
    args.update(mask_id=MASK_TINY, eos_id=BOS_TINY, reject_low_entropy=False)
    args.update(kw)
    return sampling.SamplerConfig(**args)


def sample_with(module, cfg, cached: bool, prompt=None, valid=None, batch=3, window=16):
    """Sample with module's denoiser (cache on or off): -> (output, every call's log-probs)."""
    import dataclasses

    import sampling

    recorder = Recorder(module_denoiser(module, window))
    sampler = sampling.ar_sample if cfg.block_size == 1 else sampling.semi_ar_sample
    cfg = dataclasses.replace(cfg, kv_cache=cached)
    gen = torch.Generator().manual_seed(7)
    out = sampler(recorder, batch, cfg, gen, torch.device("cpu"), prompt, valid)
    return out, recorder.calls


class StreamRecorder:
    """A generate() streamer that keeps what it is given: each put's ids as lists, "end"."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


def char_tokenizer():
    """A character-level fast tokenizer of printable ASCII with <unk>, <s> (BOS) and </s>
    (EOS): 99 tokens, no mask token (hf_causal adds one), decoding its ids back to the text."""
    import string

    import tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = tokenizers.decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_causal_lm(path, family: str = "llama", seed: int = 0, **config) -> str:
    """A tiny random transformers causal LM (`family`: llama | gpt2; 2 layers, width 32) over
    `char_tokenizer()`, saved with its tokenizer as a model directory at `path` (what
    model.pretrained=DIR reads); `config` overrides its config's keys -> the path."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    if family == "gpt2":
        make, options = GPT2LMHeadModel, GPT2Config(**common, n_embd=32, n_layer=2, n_head=4)
    else:
        make, options = LlamaForCausalLM, LlamaConfig(
            **common, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
    options.update(config)
    torch.manual_seed(seed)
    model = make(options)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """`save_tiny_causal_lm`'s Llama (attention dropout 0.1, so that training draws dropout
    masks) saved once per session: model.pretrained=DIR."""
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), attention_dropout=0.1)
