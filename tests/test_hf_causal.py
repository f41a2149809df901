"""models.hf_causal: a transformers causal LM as a BD3-LM backbone, checked against the plain
transformers model (stock SDPA attention) on tiny random models of each family.

Oracles: the 2L pass equals a per-block brute force (the stock model on [clean prefix ; noisy
block] under an explicit 4-D mask); K = 1 equals transformers' own next-token loss; K = L
equals the MDLM layout; the cached sampler equals the uncached one at every step and
transformers' DynamicCache (append the block, denoise, crop, commit)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from algorithms.base import subs_log_probs
from algorithms.masked_diffusion import MaskedDiffusion
from conftest import randomize_
from models.attention import (
    AttentionMask,
    BandedBlockCausalMask,
    BlockCausalMask,
    BlockDiffusionMask,
    CausalMask,
    MaskCache,
)
from models.backbone import Backbone
from models.hf_causal import HFCausalLM, bos_id, ensure_mask_token, from_pretrained
from noise_schedule import LogLinear

V = 64
MASK = V - 1
L = 8
TOL = dict(atol=2e-5, rtol=1e-5)


def _llama():
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip


def _qwen2():
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip


def _qwen3():
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=12,
            max_position_embeddings=64, tie_word_embeddings=False,
        )
    )  # fmt: skip


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=48))


def _gemma3(sliding_window=64):
    # a non-default attention scale and a final softcap: both must reach the backbone
    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            query_pre_attn_scalar=5, sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=3.0, max_position_embeddings=64,
        )
    )  # fmt: skip


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gpt2": _gpt2, "gemma3": _gemma3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, plain model with random weights in eval mode)."""
    torch.manual_seed(0)
    model = FAMILIES[request.param]()
    randomize_(model, seed=1, scale=0.3)
    model.set_attn_implementation("sdpa")
    return request.param, model.eval()


def wrap(model, **options) -> HFCausalLM:
    return HFCausalLM(copy.deepcopy(model), **options).eval()


def data(B=3, length=L, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (B, length), generator=gen)
    xt = torch.where(torch.rand(B, length, generator=gen) < 0.5, MASK, x0)
    return x0, xt


def two_stream(net, xt, x0, K, outputs=None):
    Lx = xt.shape[1]
    return net(
        torch.cat([xt, x0], dim=1),
        positions=torch.arange(Lx, device=xt.device).repeat(2),
        mask=BlockDiffusionMask(Lx, K),
        outputs=slice(0, Lx) if outputs is None else outputs,
    )


def clean_rows(n: int, K: int, clean_attention: str) -> torch.Tensor:
    """(n, n) attention among clean tokens: token-causal or block-causal."""
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return k <= q if clean_attention == "causal" else k // K <= q // K


def brute_force(model, xt, x0, K, clean_attention, token_shift=True):
    """(B, L, V) logits of x_t, one block at a time: the stock model on [x0 blocks < b ; x_t
    block b] with clean rows as clean_attention says and the noisy block seeing everything."""
    B, Lx = x0.shape
    out = []
    for start in range(0, Lx, K):
        n = start + K
        tokens = torch.cat([x0[:, :start], xt[:, start:n]], dim=1)
        mask = torch.ones(n, n, dtype=torch.bool)
        mask[:start, :start] = clean_rows(start, K, clean_attention)
        mask[:start, start:] = False
        logits = model(
            tokens, attention_mask=mask[None, None].expand(B, 1, n, n),
            position_ids=torch.arange(n)[None].expand(B, n),
        ).logits  # fmt: skip
        rows = torch.arange(start, n)
        if token_shift:
            rows = (rows - 1).clamp(min=0)
        out.append(logits[:, rows])
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------
# The 2L pass
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clean_attention", ["causal", "block"])
@torch.no_grad()
def test_two_stream_equals_per_block_brute_force(family, clean_attention):
    _, model = family
    net = wrap(model, clean_attention=clean_attention)
    x0, xt = data()
    for K in (1, 2, 4, L):
        got = two_stream(net, xt, x0, K)
        want = brute_force(model, xt, x0, K, clean_attention)
        torch.testing.assert_close(got, want, **TOL, msg=f"K={K}")


@torch.no_grad()
def test_two_stream_without_token_shift(family):
    _, model = family
    net = wrap(model, token_shift=False)
    x0, xt = data()
    for K in (2, 4):
        want = brute_force(model, xt, x0, K, "causal", token_shift=False)
        torch.testing.assert_close(two_stream(net, xt, x0, K), want, **TOL)


@torch.no_grad()
def test_block_size_one_is_the_causal_lm_nll(family):
    """K = 1 with token shift: every x_t position is predicted from the clean tokens before it,
    so the per-token terms are the causal LM's NLL (transformers' loss with labels=, which has
    no term for position 0)."""
    _, model = family
    x0, xt = data()
    want = model(x0, labels=x0).loss
    for clean_attention in ("causal", "block"):
        logits = two_stream(wrap(model, clean_attention=clean_attention), xt, x0, 1)
        nll = -logits[:, 1:].log_softmax(-1).gather(-1, x0[:, 1:, None])
        torch.testing.assert_close(nll.mean(), want, **TOL)


def objective(block_size: int, seq_len: int = L) -> MaskedDiffusion:
    return MaskedDiffusion(
        noise=LogLinear(), mask_id=MASK, seq_len=seq_len, block_size=block_size,
        cross_attn=True, ignore_bos=True, time_conditioning=False, antithetic=False,
    )  # fmt: skip


def network(backbone: HFCausalLM):
    """network(tokens, sigma, layout) as the objectives call it (models.network's role)."""

    def call(tokens, sigma, layout):
        S = tokens.shape[1]
        positions = torch.arange(S // layout.halves).repeat(layout.halves)
        return backbone(tokens, positions=positions, mask=layout.mask, outputs=layout.outputs)

    return call


@torch.no_grad()
def test_block_size_one_nelbo_is_the_causal_lm_nll(family):
    """BD3-LM's validation loss at K = 1 (the exact NLL, every token masked) through this
    backbone is the causal LM's next-token NLL with the mask column excluded (SUBS never
    predicts the mask; the mask token's logit is removed from the plain model's softmax too),
    position 0 ignored (ignore_bos)."""
    _, model = family
    algo = objective(1)
    x0, _ = data()
    eps = [torch.tensor(e) for e in algo.eval_interval()]
    for clean_attention in ("causal", "block"):
        net = network(wrap(model, clean_attention=clean_attention))
        nelbo = algo.loss(net, x0, torch.ones_like(x0), *eps, train=False).loss
        logits = model(x0).logits
        logits[..., MASK] = -float("inf")
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x0[:, 1:].flatten())
        torch.testing.assert_close(nelbo, want, **TOL)


@torch.no_grad()
def test_block_size_L_is_the_mdlm_layout(family):
    _, model = family
    net = wrap(model)
    x0, xt = data()
    mdlm = net(xt, positions=torch.arange(L), mask=None, outputs=slice(0, L))
    torch.testing.assert_close(two_stream(net, xt, x0, L), mdlm, **TOL)


@torch.no_grad()
def test_clean_rows_are_the_causal_lm_logits(family):
    """Rows of the x_0 half are never shifted: with clean_attention=causal they are the plain
    model's next-token logits (what the auxiliary AR loss reads)."""
    _, model = family
    net = wrap(model)
    x0, xt = data()
    got = two_stream(net, xt, x0, 2, outputs=slice(L, 2 * L))
    torch.testing.assert_close(got, model(x0).logits, **TOL)


@torch.no_grad()
def test_output_selections_agree(family):
    """A boolean selection and (B, k) positions pick rows of the full output."""
    _, model = family
    net = wrap(model)
    x0, xt = data()
    full = two_stream(net, xt, x0, 2, outputs=None)
    selected = xt == MASK
    torch.testing.assert_close(two_stream(net, xt, x0, 2, outputs=selected), full[:, :L][selected])
    rows = torch.tensor([[1, 4], [0, 7], [2, 3]])
    picked = full.gather(1, rows[..., None].expand(-1, -1, V)).flatten(0, 1)
    torch.testing.assert_close(two_stream(net, xt, x0, 2, outputs=rows), picked)


@torch.no_grad()
def test_ar_layout_is_the_plain_model(family):
    _, model = family
    x0, _ = data()
    net = wrap(model, token_shift=False)
    got = net(x0, positions=torch.arange(L), mask=CausalMask())
    torch.testing.assert_close(got, model(x0).logits, **TOL)
    with pytest.raises(ValueError, match="token_shift=False"):
        wrap(model)(x0, positions=torch.arange(L), mask=CausalMask())


def test_gradients_flow_with_checkpointing(family):
    name, model = family
    net = HFCausalLM(copy.deepcopy(model), gradient_checkpointing=True).train()
    assert getattr(net.model, "is_activation_checkpointing", None) or getattr(
        net.model, "is_gradient_checkpointing", False
    )
    for module in net.modules():  # dropout off: the two passes must agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x0, xt = data()
    loss = two_stream(net, xt, x0, 2).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), name
    plain = wrap(model).train()
    for module in plain.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    two_stream(plain, xt, x0, 2).logsumexp(-1).mean().backward()
    for a, b in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert net.fsdp_units() and all("Layer" in c.__name__ or "Block" in c.__name__ for c in
                                    net.fsdp_units())  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Sampling: uncached, cached, DynamicCache
# ----------------------------------------------------------------------------------------------
def uncached_steps(net, x, noisy, K, window, key_valid=None, start_block=0):
    """Logits of each noisy block (B, K, V) given the clean blocks before it, without a cache
    (the sampler's banded block-causal mask)."""
    out = []
    for b in range(start_block, x.shape[1] // K):
        tokens = torch.cat([x[:, : b * K], noisy[:, b * K : (b + 1) * K]], dim=1)
        S = tokens.shape[1]
        valid = None
        if key_valid is not None:
            valid = torch.cat([key_valid, torch.ones(x.shape[0], S - key_valid.shape[1],
                                                     dtype=torch.bool)], dim=1)  # fmt: skip
        mask = BandedBlockCausalMask(K, window // K)
        out.append(
            net(
                tokens,
                positions=torch.arange(S),
                mask=mask,
                outputs=slice(S - K, None),
                key_valid=valid,
            )  # fmt: skip
        )
    return out


def cached_steps(net, x, noisy, K, window, fused, prompt_blocks=0, key_valid=None):
    """The same logits through the KV cache: prompt blocks committed first (with their
    validity), then per block a denoising call and a commit (separate, or fused with the next
    block's call)."""
    B = x.shape[0]
    cache = net.new_kv_cache(B, window, K, x.device)
    net.set_kv_cache(cache)
    for b in range(prompt_blocks):
        span = slice(b * K, (b + 1) * K)
        valid = None if key_valid is None else key_valid[:, span]
        net(x[:, span], positions=torch.arange(b * K, (b + 1) * K), outputs=slice(0, 0),
            commit=True, block_valid=valid)  # fmt: skip
        cache.advance(valid)
    out = []
    blocks = x.shape[1] // K
    for b in range(prompt_blocks, blocks):
        span = slice(b * K, (b + 1) * K)
        if fused and b > prompt_blocks:
            tokens = torch.cat([x[:, (b - 1) * K : b * K], noisy[:, span]], dim=1)
            positions = torch.arange((b - 1) * K, (b + 1) * K)
            out.append(net(tokens, positions=positions, outputs=slice(K, None), commit=True))
            cache.advance()
        else:
            out.append(net(noisy[:, span], positions=torch.arange(b * K, (b + 1) * K)))
        if not fused and b < blocks - 1:
            net(x[:, span], positions=torch.arange(b * K, (b + 1) * K), outputs=slice(0, 0),
                commit=True)  # fmt: skip
            cache.advance()
    net.set_kv_cache(None)
    return out


@pytest.mark.parametrize("clean_attention", ["causal", "block"])
@torch.no_grad()
def test_cached_equals_uncached_at_every_step(family, clean_attention):
    """Fused and separate commits; a window of 2 blocks over 6 blocks (beyond the window; the
    uncached side uses the banded mask) and a window that holds the whole sequence."""
    name, model = family
    net = wrap(model, clean_attention=clean_attention)
    K = 2
    x, noisy = data(length=12)
    for window in (4, 12):
        want = uncached_steps(net, x, noisy, K, window)
        for fused in (False, True):
            got = cached_steps(net, x, noisy, K, window, fused)
            for step, (a, b) in enumerate(zip(got, want, strict=True)):
                torch.testing.assert_close(a, b, **TOL, msg=f"{window=} {fused=} {step=}")


@pytest.mark.parametrize("clean_attention", ["causal", "block"])
@torch.no_grad()
def test_cached_equals_uncached_with_left_padded_prompts(family, clean_attention):
    _, model = family
    net = wrap(model, clean_attention=clean_attention)
    K = 2
    x, noisy = data(length=10)
    key_valid = torch.ones(3, 4, dtype=torch.bool)  # a prompt of two blocks, left padded
    key_valid[0, :3] = False
    key_valid[1, :1] = False
    want = uncached_steps(net, x, noisy, K, 10, key_valid=key_valid, start_block=2)
    got = cached_steps(net, x, noisy, K, 10, fused=False, prompt_blocks=2, key_valid=key_valid)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=f"{step=}")


@torch.no_grad()
def test_left_padding_does_not_change_a_row(family):
    """Positions count real tokens: a left-padded prompt gives the logits of the same prompt
    unpadded (clean_attention=causal, where block alignment of the prompt does not matter)."""
    _, model = family
    net = wrap(model)
    K = 2
    x, noisy = data(length=6)
    key_valid = torch.ones(3, 6, dtype=torch.bool)
    key_valid[0, :2] = False
    tokens = torch.cat([x, noisy[:, :K]], dim=1)
    valid = torch.cat([key_valid, torch.ones(3, K, dtype=torch.bool)], dim=1)
    padded = net(tokens, positions=torch.arange(8), mask=BlockCausalMask(K),
                 outputs=slice(6, None), key_valid=valid)  # fmt: skip
    alone = torch.cat([x[:1, 2:], noisy[:1, :K]], dim=1)
    want = net(alone, positions=torch.arange(6), mask=BlockCausalMask(K), outputs=slice(4, None))
    torch.testing.assert_close(padded[:1], want, **TOL)


@pytest.mark.parametrize("clean_attention", ["causal", "block"])
@torch.no_grad()
def test_cache_equals_dynamic_cache(family, clean_attention):
    """transformers' DynamicCache as the oracle: per block append the noisy block (it sees the
    cache and all of itself), crop it off, then append the clean block (token-causal or
    block-wise within itself)."""
    _, model = family
    net = wrap(model, clean_attention=clean_attention)
    K, B = 4, 3
    x, noisy = data(length=12)
    got = cached_steps(net, x, noisy, K, 12, fused=False)
    cache, previous = DynamicCache(config=model.config), None
    for b, logits in enumerate(got):
        past, n = b * K, b * K + K
        positions = torch.arange(past, n)[None].expand(B, K)
        full = torch.ones(B, 1, K, n, dtype=torch.bool)
        out = model(noisy[:, past:n], attention_mask=full, position_ids=positions,
                    cache=cache, use_cache=True).logits  # fmt: skip
        first = out[:, :1] if previous is None else previous
        torch.testing.assert_close(logits, torch.cat([first, out[:, :-1]], dim=1), **TOL)
        cache.crop(-K)
        clean = full.clone()
        clean[..., past:] = clean_rows(K, K, clean_attention)
        out = model(x[:, past:n], attention_mask=clean, position_ids=positions,
                    cache=cache, use_cache=True).logits  # fmt: skip
        previous = out[:, -1:]


# ----------------------------------------------------------------------------------------------
# Guards
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_gpt2_refuses_positions_beyond_its_table():
    net = wrap(_gpt2())
    x0, xt = data(length=48)
    two_stream(net, xt, x0, 4)  # 48 = n_positions: fine
    x0, xt = data(length=52)
    with pytest.raises(ValueError, match="absolute positions for 48"):
        two_stream(net, xt, x0, 4)
    cache = net.new_kv_cache(1, 8, 4, "cpu")
    net.set_kv_cache(cache)
    with pytest.raises(ValueError, match="absolute positions for 48"):
        for b in range(13):
            net(x0[:1, :4], positions=torch.arange(4 * b, 4 * b + 4), outputs=slice(0, 0),
                commit=True)  # fmt: skip
            cache.advance()


@torch.no_grad()
def test_sliding_window_exact_within_refused_beyond():
    model = randomize_(_gemma3(sliding_window=8), seed=2, scale=0.3).eval()
    model.set_attn_implementation("sdpa")
    net = wrap(model)
    x0, xt = data(length=8)
    torch.testing.assert_close(
        two_stream(net, xt, x0, 2), brute_force(model, xt, x0, 2, "causal"), **TOL
    )
    x0, xt = data(length=12)
    with pytest.raises(ValueError, match="sliding window of 8"):
        two_stream(net, xt, x0, 2)
    with pytest.raises(ValueError, match="sliding window of 8"):
        net.new_kv_cache(1, 12, 2, "cpu")


def test_bad_options_and_models_are_refused():
    with pytest.raises(ValueError, match="model.clean_attention='full'"):
        HFCausalLM(_llama(), clean_attention="full")
    with pytest.raises(ValueError, match="not a transformers model"):
        HFCausalLM(torch.nn.Linear(2, 2))
    model = _llama()
    model._supports_attention_backend = False
    with pytest.raises(ValueError, match="AttentionInterface"):
        HFCausalLM(model)


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------
def tokenizer(size: int, **special) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(size)}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", **special)


def test_mask_token_row_added_mean_initialised_and_tied():
    model = _llama()  # 64 rows, tied head
    model.config.tie_word_embeddings = True
    model.tie_weights()
    tok = tokenizer(V, eos_token="w1")
    mean = model.get_input_embeddings().weight.detach().mean(0).clone()
    mask_id = ensure_mask_token(model, tok)
    assert mask_id == V == tok.mask_token_id and len(tok) == V + 1
    embedding = model.get_input_embeddings().weight
    assert embedding.shape[0] == V + 1
    assert model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    torch.testing.assert_close(embedding[mask_id].detach(), mean)
    net = HFCausalLM(model).eval()
    assert net.vocab_size == V + 1
    x0, xt = data()
    xt = torch.where(xt == MASK, mask_id, xt)
    with torch.no_grad():
        logits = two_stream(net, xt, x0, 2)
    log_probs = subs_log_probs(logits, xt, mask_id)
    assert logits.shape[-1] == V + 1
    assert (log_probs[..., mask_id] <= -1e5).all()  # SUBS never predicts the mask


def test_mask_token_spare_row_or_tokenizer_mask():
    model = _qwen2()  # 64 rows
    tok = tokenizer(60, eos_token="w1")
    assert ensure_mask_token(model, tok) == 60  # a spare row: no resize
    assert model.get_input_embeddings().weight.shape[0] == V
    tok = tokenizer(60, mask_token="w5", bos_token="w2", eos_token="w1")
    assert ensure_mask_token(model, tok) == 5
    assert bos_id(tok) == 2
    assert bos_id(tokenizer(60, eos_token="w1")) == 1  # no BOS: EOS


def test_from_a_saved_directory(tmp_path):
    """A model directory with its tokenizer: the mask token is added (a new row, tied), the
    logits are the saved model's."""
    torch.manual_seed(0)
    model = randomize_(_llama(), seed=3, scale=0.3).eval()
    model.save_pretrained(tmp_path)
    tokenizer(V, eos_token="w1").save_pretrained(tmp_path)
    net, tok, mask_id = from_pretrained(str(tmp_path), token_shift=False)
    assert mask_id == V == tok.mask_token_id and net.vocab_size == V + 1
    x0, _ = data()
    with torch.no_grad():
        got = net.eval()(x0, positions=torch.arange(L), mask=CausalMask())
    torch.testing.assert_close(got[..., :V], model(x0).logits, **TOL)


@torch.no_grad()
def test_materialised_masks_name_their_predicate(family):
    """Through the backbone contract a mask arrives materialised (models.network); the
    backbone reads the predicate it names and refuses a bare matrix."""
    _, model = family
    net = wrap(model)
    x0, xt = data()
    masks = MaskCache("sdpa")
    want = net(xt, positions=torch.arange(L), mask=None)
    full = masks.get(None, L, L, xt.device)
    torch.testing.assert_close(net(xt, positions=torch.arange(L), mask=full), want)
    structured = masks.get(BlockDiffusionMask(L, 2), 2 * L, 2 * L, xt.device)
    got = net(torch.cat([xt, x0], 1), positions=torch.arange(L).repeat(2), mask=structured,
              outputs=slice(0, L))  # fmt: skip
    torch.testing.assert_close(got, two_stream(net, xt, x0, 2))
    with pytest.raises(ValueError, match="predicate"):
        net(xt, positions=torch.arange(L), mask=AttentionMask(dense=torch.ones(L, L).bool()))
    assert isinstance(net, Backbone)
    with pytest.raises(ValueError, match="KV cache installed"):
        net(xt, positions=torch.arange(L), mask=None, commit=True)


@pytest.mark.parametrize("clean_attention", ["causal", "block"])
@torch.no_grad()
def test_flex_backend_equals_sdpa(clean_attention):
    """Flex attention (the GPU backend; forward-only on CPU) computes the same 2L logits."""
    model = randomize_(_llama(), seed=4, scale=0.3).eval()
    x0, xt = data(length=16)
    sdpa = wrap(model, clean_attention=clean_attention)
    flex = wrap(model, clean_attention=clean_attention, attn_backend="flex")
    for K in (1, 4):
        torch.testing.assert_close(two_stream(flex, xt, x0, K), two_stream(sdpa, xt, x0, K), **TOL)


def test_attention_dropout_keeps_the_mask():
    """GPT-2 trains with attention dropout (SDPA with a dense mask): block 0 of x_t still sees
    nothing of x_0 (same dropout draws, x_0 changed beyond block 0: block 0 rows unchanged)."""
    net = HFCausalLM(randomize_(_gpt2(), seed=5, scale=0.3)).train()
    x0, xt = data()
    other = x0.clone()
    other[:, 2:] = (other[:, 2:] + 1) % MASK
    runs = []
    for clean in (x0, other):
        torch.manual_seed(7)
        runs.append(two_stream(net, xt, clean, 2, outputs=slice(0, 2)))
    torch.testing.assert_close(runs[0], runs[1])
    torch.manual_seed(8)
    assert not torch.allclose(two_stream(net, xt, x0, 2, outputs=slice(0, 2)), runs[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("clean_attention", ["causal", "block"])
def test_cuda_flex_equals_sdpa_in_bf16_with_gradients(clean_attention):
    """The GPU training path: flex attention (compiled) and SDPA give the same 2L logits and
    gradients under bf16 autocast."""
    model = randomize_(_llama(), seed=6, scale=0.3).cuda()
    x0, xt = (t.cuda() for t in data(length=64))
    results = []
    for backend in ("sdpa", "flex"):
        net = HFCausalLM(copy.deepcopy(model), clean_attention=clean_attention,
                         attn_backend=backend).train()  # fmt: skip
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = two_stream(net, xt, x0, 16)
        logits.float().logsumexp(-1).mean().backward()
        grad = net.model.get_input_embeddings().weight.grad
        results.append((logits.float(), grad.float()))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ga, gb, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("clean_attention", ["causal", "block"])
@torch.no_grad()
def test_block_sampler_through_the_denoiser(clean_attention):
    """The project's block sampler and KV cache drive this backbone through ModelDenoiser:
    fused and separate commits draw the same samples, beyond the window and after a
    left-padded prompt."""
    from sampling.block import semi_ar_sample
    from sampling.config import SamplerConfig
    from sampling.denoiser import ModelDenoiser

    model = randomize_(_llama(), seed=7, scale=0.3).eval()
    net = wrap(model, clean_attention=clean_attention)
    denoiser = ModelDenoiser(net, objective(2), window=L)
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(1))
    prompt_valid = torch.ones(2, 4, dtype=torch.bool)
    prompt_valid[0, :3] = False
    for p, valid in ((None, None), (prompt, prompt_valid)):
        samples = []
        for fuse in (True, False):
            cfg = SamplerConfig(
                length=12, block_size=2, num_steps=4, context=L, bos_id=0, mask_id=MASK,
                eos_id=1, kv_cache=True, fuse_commit=fuse,
            )  # fmt: skip
            gen = torch.Generator().manual_seed(3)
            out = semi_ar_sample(denoiser, 2, cfg, gen, torch.device("cpu"), p, valid)
            samples.append(out.tokens)
        assert (samples[0] != MASK).all()
        torch.testing.assert_close(samples[0], samples[1])
