"""SSD-LM: the sampler's maths pinned by hand, the cosine schedule, the training loss against a
brute-force recomputation, the released checkpoint layout, and a tiny training run."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RobertaConfig, RobertaForMaskedLM

from algorithms.base import Shard
from algorithms.ssdlm import SSDLM, cosine_alpha_bar
from conftest import save_ssdlm
from models.ssdlm import SSDLMNetwork, load_ssdlm
from sampling.config import SamplerConfig
from sampling.ssdlm import SSDLMSamplerOptions, denoise_block, num_blocks, ssdlm_sample

# abar_t = f(t)/f(0), f(t) = cos(((t/T + 1e-4)/(1 + 1e-4)) pi/2)^2, computed to 30 digits
ABAR_1_OF_2 = 0.49992148036978081679692649349


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(vocab: int = 50, positions: int = 40) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=positions, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip


def tiny_network(seed: int = 0, vocab: int = 50) -> SSDLMNetwork:
    torch.manual_seed(seed)
    network = SSDLMNetwork(RobertaForMaskedLM(tiny_config(vocab)))
    with torch.no_grad():  # a non-zero time embedding, so that t matters
        network.timestep_layer.weight.normal_(0, 0.5)
        network.timestep_layer.bias.normal_(0, 0.5)
    return network


class ScriptedDraws:
    """Hands out fixed normals and uniforms, in order, and checks their shapes."""

    def __init__(self, normals, uniforms):
        self.normals, self.uniforms = list(normals), list(uniforms)

    def normal(self, shape):
        value = self.normals.pop(0)
        assert tuple(value.shape) == tuple(shape)
        return value

    def uniform(self, shape):
        value = self.uniforms.pop(0)
        assert tuple(value.shape) == tuple(shape)
        return value


class StubNetwork:
    """Returns the scripted logits of each call and records its inputs."""

    def __init__(self, vocab_size, outputs=None, rule=None, max_tokens=512):
        self.vocab_size, self.max_tokens = vocab_size, max_tokens
        self.outputs, self.rule, self.calls = list(outputs or []), rule, []

    def __call__(self, context, xt, t_frac):
        self.calls.append((None if context is None else context.clone(), xt.clone(), t_frac))
        if self.rule is not None:
            return self.rule(context, xt)
        return self.outputs.pop(0)


def test_cosine_schedule_values():
    got = cosine_alpha_bar(torch.tensor([0, 1, 250, 500, 999, 1000]), 1000)
    expected = [1.0, 0.999997039713663883, 0.853470106110780722, 0.499921480369780817,
                2.46690572637688005e-06, 0.0]  # fmt: skip
    torch.testing.assert_close(got[:5], torch.tensor(expected[:5], dtype=torch.float64))
    assert got[0] == 1.0 and 0 <= got[5] < 1e-30
    thirds = cosine_alpha_bar(torch.tensor([1, 2]), 3)
    expected_thirds = torch.tensor(
        [0.749909332118094903, 0.249954667086677140], dtype=torch.float64
    )
    torch.testing.assert_close(thirds, expected_thirds)
    assert float(cosine_alpha_bar(1, 2)) == pytest.approx(ABAR_1_OF_2, rel=1e-12)


def test_one_block_by_hand():
    """V = 3, K = 2, T = 2, simplex value 5, top-p 0.7; every number below is worked out by
    hand from the update rule, not by the implementation."""
    n0 = torch.tensor([[[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]]])
    n1 = torch.tensor([[[1.0, 0.0, -1.0], [-2.0, 0.5, 0.25]]])
    u2, u1 = torch.tensor([[0.8, 0.1]]), torch.tensor([[0.5, 0.9]])
    logits_t2 = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]]])
    logits_t1 = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.5, 0.0]]])
    net = StubNetwork(3, [logits_t2, logits_t1])
    ctx = torch.tensor([[0]])
    tokens = denoise_block(net, ctx, 1, 2, 2, ScriptedDraws([n0, n1], [u2, u1]), 5.0, 0.7)
    # t = 2: the input is 5 * n0 at time 2/2.
    torch.testing.assert_close(net.calls[0][1], 5 * n0)
    assert net.calls[0][2].tolist() == [1.0] and net.calls[1][2].tolist() == [0.5]
    assert torch.equal(net.calls[0][0], ctx)
    # Row 0: softmax(2, 1, 0) = (.6652, .2447, .0900); the masses ranked above are
    # (0, .6652, .9100), so tokens 0 and 1 stay (1 crosses 0.7 and is kept) -> (.7311, .2689);
    # u = 0.8 > .7311 picks token 1. Row 1: softmax(0, 3, 0) = (.0453, .9094, .0453): only
    # token 1 stays. Both project to (-5, +5, -5).
    w_hat = torch.tensor([[[-5.0, 5.0, -5.0], [-5.0, 5.0, -5.0]]])
    # x_1 = sqrt(abar_1) w_hat + sqrt(1 - abar_1) * 5 * n1 with abar_1 = 0.4999214803697808.
    a = math.sqrt(ABAR_1_OF_2)  # 0.7070512572436180
    b = math.sqrt(1 - ABAR_1_OF_2)  # 0.7071623007699288
    x1 = a * w_hat + b * 5 * n1
    torch.testing.assert_close(net.calls[1][1], x1)
    assert net.calls[1][1][0, 0].tolist() == pytest.approx(
        [-5 * a + 5 * b, 5 * a, -5 * a - 5 * b], abs=1e-5
    )
    # Last step: the tokens are the argmax of its logits, (2, 0), not the sampled tokens.
    assert tokens.tolist() == [[2, 0]]
    assert len(net.calls) == 2


def test_perfect_predictor_recovers_blocks_from_noise():
    vocab, block = 7, 3

    def rule(context, xt):  # the next block continues the count from the context's last token
        target = (context[:, -1:] + 1 + torch.arange(block)) % vocab
        return 1e4 * torch.nn.functional.one_hot(target, vocab).float()

    net = StubNetwork(vocab, rule=rule)
    cfg = SamplerConfig(length=12, block_size=block, num_steps=5, context=6, bos_id=0,
                        mask_id=6, eos_id=5)  # fmt: skip
    out = ssdlm_sample(net, 2, cfg, torch.Generator().manual_seed(0), "cpu")
    assert out.tokens.tolist() == [[i % vocab for i in range(12)]] * 2
    assert len(net.calls) == 5 * 4  # 11 tokens after the BOS: 4 blocks, the last truncated
    assert [c[0].shape[1] for c in net.calls[::5]] == [1, 3, 3, 3]  # BOS, then previous block
    assert [float(c[2][0]) for c in net.calls[:5]] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert out.nfe_denoise.tolist() == [20, 20] and out.lengths.tolist() == [12, 12]
    assert out.stop_reason == ["length", "length"] and out.prompt_pad.tolist() == [0, 0]
    # x_1 (the last step's input) is noise around the right simplex: mostly its argmax.
    x1 = net.calls[4][1]
    assert (x1.argmax(-1) == torch.tensor([1, 2, 3])).float().mean() > 0.5


@pytest.mark.parametrize("length, blocks", [(1025, 41), (2050, 82)])
def test_table7_lengths(length, blocks):
    assert num_blocks(length, 25) * 1000 == blocks * 1000  # 41K and 82K NFEs at T = 1000
    net = StubNetwork(11, rule=lambda ctx, xt: torch.randn(xt.shape[0], 25, 11))
    cfg = SamplerConfig(length=length, block_size=25, num_steps=1, context=50, bos_id=0,
                        mask_id=10, eos_id=2)  # fmt: skip
    seen = []
    out = ssdlm_sample(
        net,
        1,
        cfg,
        torch.Generator().manual_seed(1),
        "cpu",
        progress=lambda n, committed: seen.append(n),
    )
    assert out.tokens.shape == (1, length) and out.tokens.dtype == torch.int64
    assert out.tokens[0, 0] == 0 and out.nfe_denoise.tolist() == [blocks]
    assert seen == [25] * (blocks - 1) + [24]


def test_sampler_with_real_network_contexts_and_seeds():
    net = tiny_network().eval()
    cfg = SamplerConfig(length=10, block_size=5, num_steps=3, context=10, bos_id=0, mask_id=49,
                        eos_id=2)  # fmt: skip
    run = lambda opts, seed: ssdlm_sample(net, 2, cfg, torch.Generator().manual_seed(seed),
                                          "cpu", options=opts).tokens  # fmt: skip
    prev = SSDLMSamplerOptions(num_steps=2)
    assert torch.equal(run(prev, 3), run(prev, 3))
    assert run(SSDLMSamplerOptions(context="all"), 3).shape == (2, 10)
    with pytest.raises(ValueError, match="prompts"):
        ssdlm_sample(net, 1, cfg, torch.Generator(), "cpu", prompt=torch.zeros(1, 2).long())
    with pytest.raises(ValueError, match="context"):
        SSDLMSamplerOptions(context="everything")


def brute_force_loss(net, obj, x0, mask, c, t, eps):
    """The loss recomputed position by position from the definitions."""
    B, V, K, T = x0.shape[0], net.vocab_size, obj.block_size, obj.num_steps
    f = lambda u: math.cos(((u / T + 1e-4) / (1 + 1e-4)) * math.pi / 2) ** 2
    w_sum = net.embed_sum_layer.weight  # (H, V)
    w_t, b_t = net.timestep_layer.weight[:, 0], net.timestep_layer.bias
    rows = []
    for b in range(B):
        abar = f(int(t[b])) / f(0)
        noisy = []
        for j in range(K):
            w = torch.full((V,), -5.0)
            w[x0[b, c + j]] = 5.0
            x = math.sqrt(abar) * w + math.sqrt(1 - abar) * 5.0 * eps[b, j]
            noisy.append(w_sum @ torch.softmax(x, 0) + (int(t[b]) / T) * w_t + b_t)
        words = net.mlm.get_input_embeddings()(x0[b, :c])
        rows.append(torch.cat([words, torch.stack(noisy)]))
    logits = net.mlm(inputs_embeds=torch.stack(rows)).logits[:, c:]
    total, weight = 0.0, 0.0
    for b in range(B):
        for j in range(K):
            m = float(mask[b, c + j])
            total = total - m * torch.log_softmax(logits[b, j], 0)[x0[b, c + j]]
            weight += m
    return total / weight


def test_training_loss_matches_brute_force_and_has_gradients():
    net = tiny_network(1)
    obj = SSDLM(block_size=5, num_steps=100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(3, 50, (3, 16), generator=gen)
    mask = torch.ones(3, 16)
    mask[1, 8:] = 0
    c, t, eps = obj.draw(3, 16, 50, "cpu", torch.Generator().manual_seed(7))
    assert 1 <= c <= 11 and t.min() >= 1 and t.max() <= 100 and eps.shape == (3, 5, 50)
    out = obj.loss(
        net, x0, mask, None, None, train=True, generator=torch.Generator().manual_seed(7)
    )
    assert torch.isfinite(out.loss) and out.nlls.shape == (3, 5)
    expected = brute_force_loss(net, obj, x0, mask, c, t, eps)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for layer in (net.embed_sum_layer, net.timestep_layer):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    grads = [p.grad for p in net.mlm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="no room"):
        obj.loss(net, x0[:, :5], mask[:, :5], None, None, train=True)


def test_sharded_draws_equal_the_global_batch():
    obj = SSDLM(block_size=3, num_steps=50)
    c, t, eps = obj.draw(4, 10, 6, "cpu", torch.Generator().manual_seed(5))
    for rank in range(2):
        shard = Shard.interleaved(2, rank, 2, "cpu")
        gen = torch.Generator().manual_seed(5)
        c_r, t_r, eps_r = obj.draw(2, 10, 6, "cpu", gen, shard)
        assert c_r == c and torch.equal(t_r, t[[rank, rank + 2]])
        assert torch.equal(eps_r, eps[[rank, rank + 2]])


def test_max_context_truncates_the_context():
    seen = []

    def rule(context, xt):
        seen.append(context.shape[1])
        return torch.zeros(xt.shape)

    net = StubNetwork(20, rule=rule)
    obj = SSDLM(block_size=4, num_steps=10, max_context=3)
    for seed in range(20):
        obj.loss(net, torch.randint(20, (2, 30)), torch.ones(2, 30), None, None, train=True,
                 generator=torch.Generator().manual_seed(seed))  # fmt: skip
    assert max(seen) == 3 and min(seen) >= 1


def test_released_layout_round_trip(tmp_path):
    net = tiny_network(2).eval()
    save_ssdlm(net, str(tmp_path), module_prefix=True)
    state = torch.load(tmp_path / "embed_sum_layer.pt", weights_only=True)
    assert list(state) == ["module.weight"]
    assert sorted(torch.load(tmp_path / "timestep_layer.pt", weights_only=True)) == [
        "module.bias", "module.weight"]  # fmt: skip
    loaded = load_ssdlm(str(tmp_path), vocab_size=50)
    ctx, xt, tf = torch.randint(50, (2, 6)), 5 * torch.randn(2, 4, 50), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ctx, xt, tf), net(ctx, xt, tf), rtol=0, atol=0)
    torch.save({"module.weights": state["module.weight"]}, tmp_path / "embed_sum_layer.pt")
    with pytest.raises(ValueError) as err:
        load_ssdlm(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "embed_sum_layer.pt" in message
    assert "missing keys ['weight']" in message and "unexpected keys ['weights']" in message
    torch.save({"weight": state["module.weight"][:, :40]}, tmp_path / "embed_sum_layer.pt")
    with pytest.raises(ValueError, match=r"embed_sum_layer\.pt: shape mismatch"):
        load_ssdlm(str(tmp_path))


def test_tiny_training_lowers_the_loss():
    net = tiny_network(3)
    obj = SSDLM(block_size=5, num_steps=100)
    x0 = ((torch.arange(20) * 7) % 47 + 3).repeat(8, 1)
    mask = torch.ones_like(x0, dtype=torch.float)

    def eval_loss():
        with torch.no_grad():
            return sum(
                float(obj.loss(net, x0, mask, None, None, train=False,
                               generator=torch.Generator().manual_seed(100 + s)).loss)
                for s in range(4)
            ) / 4  # fmt: skip

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        obj.loss(net, x0, mask, None, None, train=True, generator=gen).loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
