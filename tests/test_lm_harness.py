"""evaluation.lm_harness: the lm-eval model `bd3lm` on the smoke checkpoint, offline: a local
multiple-choice task and a local generation task through simple_evaluate; the conditional
NELBO's spread shrinks with mc_samples; a deterministic bound at t = 1."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import ROOT

lm_eval = pytest.importorskip("lm_eval")

TASKS = os.path.join(ROOT, "tests", "data", "lm_eval_tasks")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The task YAMLs with their JSONL paths made absolute."""
    out = tmp_path_factory.mktemp("tasks")
    for name in os.listdir(TASKS):
        with open(os.path.join(TASKS, name)) as f:
            text = f.read()
        text = text.replace("tests/data/lm_eval_tasks/", TASKS + "/")
        (out / name).write_text(text)
    return str(out)


@pytest.fixture(scope="module")
def harness(smoke_checkpoint):
    from evaluation.lm_harness import BD3LMHarness

    return BD3LMHarness(checkpoint=str(smoke_checkpoint), mc_samples=4, device="cpu")


@pytest.mark.e2e
def test_simple_evaluate_multiple_choice_and_generation(harness, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=task_dir, include_defaults=False)
    results = simple_evaluate(
        model=harness, tasks=["bd3lm_toy_mc", "bd3lm_toy_gen"], task_manager=manager,
        bootstrap_iters=0,
    )  # fmt: skip
    mc = results["results"]["bd3lm_toy_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["bd3lm_toy_gen"]


@pytest.mark.e2e
def test_spread_shrinks_with_mc_samples(harness):
    ctx, cont = harness._split("The king said", " to the queen and the lords of the land")
    ids, start = harness._sequence(ctx, cont)

    def spread(m):
        harness.mc_samples = m
        values = [harness.score(ids, start, torch.Generator().manual_seed(s))[0] for s in range(8)]
        return torch.tensor(values).std().item()

    try:
        assert spread(16) < spread(1)
    finally:
        harness.mc_samples = 4


@pytest.mark.e2e
def test_interval_at_one_is_deterministic(harness):
    """With the interval at t = 1 (K = 1's evaluation interval) every continuation token is
    masked with weight 1: the estimate no longer depends on the draw (here on the K = 4 smoke
    model, where this is not the NLL; K = 1's exactness is tested against ppl_eval below)."""
    ctx, cont = harness._split("To be, or", " not to be")
    ids, start = harness._sequence(ctx, cont)
    saved = harness.interval
    harness.interval = (1.0, 1.0)
    try:
        a = harness.score(ids, start, torch.Generator().manual_seed(0))
        b = harness.score(ids, start, torch.Generator().manual_seed(1))
        assert a[0] == pytest.approx(b[0]) and a[0] < 0
        assert torch.allclose(a[2], a[2][0])
    finally:
        harness.interval = saved


# ----------------------------------------------------------------------------------------------
# One row of text: the harness's rolling bound against ppl_eval's NELBO of the same row
# ----------------------------------------------------------------------------------------------
RUNS = {  # name: overrides of the smoke config
    "ar": ("algo=ar",),
    "bd3lm_k1": ("algo=bd3lm", "block_size=1"),
    "bd3lm_k4": ("algo=bd3lm", "block_size=4"),
    "mdlm": ("algo=mdlm",),
    "sedd": ("algo=sedd",),
}
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First "
    "Citizen: You are all resolved rather to die than to famish?"
)


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory, data_cache):
    """name -> (module with random weights, its .ckpt path), built once per module."""
    from conftest import random_run_checkpoint

    out = tmp_path_factory.mktemp("random_runs")
    runs = {}
    for name, overrides in RUNS.items():
        path = out / f"{name}.ckpt"
        runs[name] = (random_run_checkpoint(path, *overrides), str(path))
    return runs


def one_row_text(harness) -> tuple[str, list[int]]:
    """A text that encodes to exactly window - 1 tokens ([BOS] + it fills one row)."""
    tokens = harness._encode(TEXT)[: harness.window - 1]
    text = harness.tokenizer.decode(tokens)
    assert harness._encode(text) == tokens and len(tokens) == harness.window - 1
    return text, tokens


def ppl_eval_row(module, tokens, bos, draws):
    """ppl_eval's NELBO estimates of the one row [BOS] + tokens (Diffusion._eval_loss, draw d
    of eval.mc_samples each) -> (draws,) summed NLL of the row, and its token count."""
    row = torch.tensor([[bos, *tokens]])
    batch = {"input_ids": row, "attention_mask": torch.ones_like(row)}
    interval = module.algorithm.eval_interval()
    with torch.no_grad():
        outs = [module._eval_loss(batch, 0, interval, d) for d in range(draws)]
    sums = torch.stack([o.nlls.double().sum() for o in outs])
    return sums, int(outs[0].token_mask.sum())


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["ar", "bd3lm_k1"])
def test_rolling_equals_ppl_eval_exactly_for_ar_and_k1(random_runs, name):
    """AR and K = 1 (t = 1: every token masked, weight 1): the bound is the exact NLL, so
    -rolling / tokens is ppl_eval's NLL of the row, and no draw changes it."""
    from evaluation.lm_harness import BD3LMHarness

    module, path = random_runs[name]
    harness = BD3LMHarness(checkpoint=path, mc_samples=3)
    text, tokens = one_row_text(harness)
    (rolling,) = harness.loglikelihood_rolling([Request(text)])
    sums, count = ppl_eval_row(module, tokens, harness.bos, draws=1)
    assert count == len(tokens)
    assert -rolling / count == pytest.approx(float(sums[0]) / count, rel=1e-5)
    _, _, per_draw = harness.score([harness.bos, *tokens], 1, torch.Generator().manual_seed(5))
    assert torch.allclose(per_draw, per_draw[0])


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["bd3lm_k4", "mdlm", "sedd"])
def test_rolling_matches_ppl_eval_within_mc_error(random_runs, name):
    """BD3-LM K = 4, MDLM, SEDD: the harness's bound and ppl_eval's NELBO of the same row
    agree within their Monte-Carlo errors (4 standard errors)."""
    from evaluation.lm_harness import BD3LMHarness

    module, path = random_runs[name]
    harness = BD3LMHarness(checkpoint=path, mc_samples=32)
    _, tokens = one_row_text(harness)
    _, _, ours = harness.score([harness.bos, *tokens], 1, torch.Generator().manual_seed(0))
    ref, _ = ppl_eval_row(module, tokens, harness.bos, draws=32)
    ours = -ours
    error = (ours.var() / len(ours) + ref.var() / len(ref)).sqrt()
    assert abs(ours.mean() - ref.mean()) < 4 * error, (ours.mean(), ref.mean(), error)
    assert ours.std() > 0  # a Monte-Carlo estimate, not the t = 1 bound


@pytest.mark.e2e
def test_conditional_bound_never_masks_the_context(random_runs):
    """The context (also in the block that straddles the boundary) stays clean in every draw
    and in is_greedy's input, the positions after the continuation are masked (unknown, never
    scored), and the continuation's tokens are what is scored (changing the last changes the
    estimate on equal draws)."""
    from evaluation.lm_harness import BD3LMHarness

    _, path = random_runs["bd3lm_k4"]
    harness = BD3LMHarness(checkpoint=path, mc_samples=4)
    ids = [harness.bos, *harness._encode(TEXT)[:9]]  # continuation starts mid-block (at 6)
    a = harness.score(ids, 6, torch.Generator().manual_seed(0))[2]
    b = harness.score(ids[:-1] + [ids[1]], 6, torch.Generator().manual_seed(0))[2]
    assert not torch.allclose(a, b)
    seen = []
    original = harness._nelbo_terms

    def spy(x0, xt, t):
        seen.append(xt.clone())
        return original(x0, xt, t)

    harness._nelbo_terms = spy
    inputs = []
    network = harness.network
    harness.network = lambda tokens, sigma, layout: (
        inputs.append(tokens) or network(tokens, sigma, layout)
    )
    harness.score(ids, 6, torch.Generator().manual_seed(0))
    xt = seen[0]
    assert (xt[:, :6] == torch.tensor(ids[:6])).all()  # BOS + context: clean in every draw
    assert (xt[:, len(ids) :] == harness.mask).all()  # after the continuation: unknown
    greedy_xt = inputs[-1][0, : harness.window]  # is_greedy's input: [x_t ; x_0], one row
    assert greedy_xt[:6].tolist() == ids[:6] and (greedy_xt[6:] == harness.mask).all()


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["mdlm", "sedd"])
def test_prompt_free_checkpoints_score_and_refuse_generation(random_runs, name):
    from evaluation.lm_harness import BD3LMHarness
    from utils import UserError

    _, path = random_runs[name]
    harness = BD3LMHarness(checkpoint=path, mc_samples=2)
    assert harness.kind == name
    ((value, greedy),) = harness.loglikelihood([Request("The king said", " to the queen")])
    assert value < 0 and isinstance(greedy, bool)
    with pytest.raises(UserError, match=f"{name.upper()}.*samples without a prompt"):
        harness.generate_until([Request("The king", {"until": ["\n"], "max_gen_toks": 4})])


@pytest.mark.parametrize("name", ["bd3lm_k4", "mdlm", "sedd"])
def test_terms_equal_the_objectives_loss_on_equal_noise(random_runs, name):
    """Given the same x_t and times, the harness's per-token terms are the training loss's
    (the 1/t weight; for SEDD dsigma = expm1(sigma) / t and sigma = -log(1 - t))."""
    from evaluation.lm_harness import BD3LMHarness

    module, path = random_runs[name]
    harness = BD3LMHarness(checkpoint=path, mc_samples=1)
    _, tokens = one_row_text(harness)
    x0 = torch.tensor([[harness.bos, *tokens]] * 3)
    objective = module.algorithm
    lo, hi = (torch.tensor(e) for e in objective.eval_interval())
    xt, scale, sigma = objective.corrupt(x0, lo, hi, torch.Generator().manual_seed(3))
    ones = torch.ones_like(x0)
    with torch.no_grad():
        if name == "sedd":
            t = -torch.expm1(-sigma.double())  # sigma = -log(1 - t) below sigma_max
            ref = objective.score_entropy_loss(module.network, x0, xt, scale, sigma, ones, False)
        else:
            t = -1 / scale.double()
            ref = objective.nelbo(module.network, x0, xt, scale, sigma, ones, False)
        ours = harness._nelbo_terms(x0, xt, t.expand(x0.shape))
    assert (xt == harness.mask).any()
    torch.testing.assert_close(ours, ref.nlls, rtol=1e-4, atol=1e-4)


def test_times_are_antithetic_strata_of_the_interval(random_runs):
    """Per block, the mc_samples times are one uniform shifted by multiples of 1/M (mod 1),
    mapped onto the evaluation interval."""
    from evaluation.lm_harness import BD3LMHarness

    _, path = random_runs["bd3lm_k4"]
    harness = BD3LMHarness(checkpoint=path, mc_samples=8)
    seen = []
    original = harness._nelbo_terms
    harness._nelbo_terms = lambda x0, xt, t: seen.append(t) or original(x0, xt, t)
    harness.score([harness.bos, *harness._encode(TEXT)[:20]], 3, torch.Generator().manual_seed(1))
    lo, hi = harness.interval
    t = seen[0][:, :: harness.block]  # (M, blocks)
    assert ((t >= lo) & (t <= hi)).all()
    gaps = t.sort(0).values.diff(dim=0)
    torch.testing.assert_close(gaps, torch.full_like(gaps, (hi - lo) / 8), rtol=0, atol=1e-9)
    assert len(set(t[0].tolist())) == t.shape[1]  # a uniform of its own per block


@pytest.mark.e2e
def test_readme_lm_eval_command_runs(smoke_checkpoint, task_dir, tmp_path):
    """README "Zero-shot evaluation with lm-eval": the command as written (lm-eval's own CLI,
    a subprocess), with the local multiple-choice task for the downloaded ones."""
    import json
    import shlex
    import subprocess
    import sys

    from conftest import readme_code

    (command,) = readme_code("Zero-shot evaluation with lm-eval", "bash")
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["python", "scripts/run_lm_eval.py"]
    argv = [a.replace("PATH", str(smoke_checkpoint)) for a in argv]
    argv[argv.index("--output_path") + 1] = str(tmp_path / "out")
    argv[argv.index("--tasks") + 1] = "bd3lm_toy_mc"
    argv[0] = sys.executable
    argv += ["--include_path", task_dir]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["bd3lm_toy_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


@pytest.mark.e2e
def test_reference_ckpt_scores_as_our_ckpt(random_runs, tmp_path):
    """The reference's pickled .ckpt of the same weights (EMA as an unnamed list, OmegaConf
    hparams) gives the harness the same estimates as our .ckpt; it needs tokenizer=."""
    from omegaconf import OmegaConf

    from conftest import reference_parameter_order, write_reference_ckpt
    from evaluation.lm_harness import BD3LMHarness
    from utils import UserError

    module, ours = random_runs["bd3lm_k4"]
    params = dict(module.backbone.named_parameters())
    ema = [params[n].detach().clone() for n in reference_parameter_order(2, adaln=True)]
    config = module.run_config
    hparams = {
        "config": OmegaConf.create(
            {
                "block_size": 4,
                "algo": {
                    "parameterization": "subs",
                    "cross_attn": True,
                    "time_conditioning": False,
                },
                "model": {"length": 32, "n_heads": 2},
            }
        )
    }
    path = tmp_path / "reference.ckpt"
    write_reference_ckpt(path, module, ema, hparams)
    with pytest.raises(UserError, match="pass tokenizer="):
        BD3LMHarness(checkpoint=str(path))
    tokenizer = config["data"]["tokenizer_name_or_path"]
    a = BD3LMHarness(checkpoint=ours, mc_samples=4)
    b = BD3LMHarness(checkpoint=str(path), mc_samples=4, tokenizer=tokenizer)
    assert (a.bos, a.mask, a.eos, a.kind, a.block) == (b.bos, b.mask, b.eos, b.kind, b.block)
    requests = [Request("The king said", " to the queen"), Request("O Romeo", ", wherefore")]
    assert a.loglikelihood(requests) == b.loglikelihood(requests)


def test_is_greedy_against_the_models_own_forward(random_runs):
    """is_greedy (batched, one request greedy and one whose last token is not) against the HF
    model's forward: AR by greedy decoding; BD3-LM through its sampling layout ([clean blocks ;
    current block] with the rest of the block masked); MDLM with everything after the context
    masked. The mask token, made the largest logit, never counts."""
    from evaluation.lm_harness import BD3LMHarness

    def argmax(logits, mask):
        logits = logits.clone()
        logits[mask] = float("-inf")
        return int(logits.argmax())

    for name in ("ar", "bd3lm_k4", "mdlm"):
        harness = BD3LMHarness(checkpoint=random_runs[name][1], mc_samples=2)
        model, mask = harness.model, harness.mask
        with torch.no_grad():  # the mask token's logit is the largest: it must be excluded
            model.backbone.output_layer.linear.bias[mask] += 100.0
        ctx = [harness.bos, *harness._encode(TEXT)[:5]]  # 6 tokens: block 1 holds 4, 5, 6, 7
        with torch.no_grad():
            if name == "ar":
                cont = []
                for _ in range(3):
                    logits = model(torch.tensor([ctx + cont]), return_dict=False)[0, -1]
                    cont.append(argmax(logits, mask))
            elif name == "bd3lm_k4":  # blocks 1 (positions 4-7) and 2 (8-11)
                x = torch.tensor([ctx + [mask, mask]])
                logits = model(x, sample_mode=True, return_dict=False)[0]
                cont = [argmax(logits[6], mask), argmax(logits[7], mask)]
                x = torch.tensor([ctx + cont + [mask] * 4])  # block 2 sees block 1 clean
                logits = model(x, sample_mode=True, return_dict=False)[0]
                cont += [argmax(logits[8], mask), argmax(logits[9], mask)]
            else:
                x = torch.tensor([ctx + [mask] * (harness.window - len(ctx))])
                logits = model(x, return_dict=False)[0]
                cont = [argmax(logits[6], mask), argmax(logits[7], mask)]
        other = (cont[-1] + 1) % mask  # the last token off its argmax: not greedy, however
        items = [(ctx + cont, len(ctx)), (ctx + cont[:-1] + [other], len(ctx))]
        flags = [g for _, g, _ in harness.score_batch(items, torch.Generator().manual_seed(0))]
        assert flags == [True, False], name


def test_sequence_keeps_bos_and_cuts_the_context_from_the_left(harness):
    W = harness.window
    ids, start = harness._sequence(list(range(100, 100 + 2 * W)), [7, 8, 9])
    assert len(ids) == W and ids[0] == harness.bos and ids[-3:] == [7, 8, 9]
    assert ids[1:start] == list(range(100 + 2 * W - (W - 4), 100 + 2 * W)) and start == W - 3
    ids, start = harness._sequence([1, 2], list(range(500, 500 + 2 * W)))  # no room: tail kept
    assert ids == [harness.bos, *range(500 + W + 1, 500 + 2 * W)] and start == 1


def test_ssdlm_checkpoints_are_refused_in_one_line(tmp_path, data_cache):
    from conftest import random_run_checkpoint
    from evaluation.lm_harness import BD3LMHarness
    from utils import UserError

    path = tmp_path / "ssdlm.ckpt"
    random_run_checkpoint(path, "algo=ssdlm", "block_size=4")
    with pytest.raises(UserError, match="algo=ssdlm has no HF model.*valid: ar") as err:
        BD3LMHarness(checkpoint=str(path))
    assert "\n" not in str(err.value)


@pytest.mark.e2e
def test_generate_until_batches_requests_and_cuts_at_stop_strings(harness):
    """Two requests with equal arguments go through one generate() call (left-padded prompts)
    and give what that call gives, cut at the first stop string; a third, with other
    arguments, goes alone."""
    kwargs = {"until": ["e"], "max_gen_toks": 8}
    requests = [Request("The king", kwargs), Request("O Romeo, wherefore", kwargs)]
    requests.append(Request("To be", {"until": [], "max_gen_toks": 4}))
    calls = []
    generate = harness.model.generate
    harness.model.generate = lambda ids, **kw: calls.append((ids, kw)) or generate(ids, **kw)
    harness.batch_size = 2
    try:
        texts = harness.generate_until(requests)
    finally:
        harness.batch_size = 1
        del harness.model.generate
    assert [c[0].shape[0] for c in calls] == [2, 1]
    ids, kw = calls[0]
    full = generate(ids, **kw)
    for row, text in enumerate(texts[:2]):
        whole = harness.tokenizer.decode(full[row, ids.shape[1] :], skip_special_tokens=True)
        assert text == whole.split("e")[0] and "e" not in text
    assert calls[1][1]["max_new_tokens"] == 4


def test_generated_text_ends_at_eos_and_greedy_is_the_default(harness):
    """A continuation stops at the first EOS (text after it is another document); requests
    draw greedily (a top-1 nucleus) unless do_sample=True, and other temperatures are refused."""
    from evaluation.lm_harness import GREEDY_NUCLEUS
    from utils import UserError

    hello, world = harness._encode(" hello"), harness._encode(" world")
    calls = []

    def stub(ids, **kw):
        calls.append(kw)
        new = torch.tensor([hello + [harness.eos] + world])
        return torch.cat([ids.cpu(), new.expand(ids.shape[0], -1)], dim=1)

    harness.model.generate = stub
    try:
        (text,) = harness.generate_until([Request("The king", {"until": ["\n\n"]})])
        assert text == " hello"
        assert calls[-1]["nucleus_p"] == GREEDY_NUCLEUS
        harness.generate_until([Request("The king", {"do_sample": True})])
        assert calls[-1]["nucleus_p"] == harness.nucleus_p
        with pytest.raises(UserError, match="temperature=0.7 is not supported"):
            harness.generate_until([Request("The king", {"do_sample": True, "temperature": 0.7})])
    finally:
        del harness.model.generate


def test_options_of_one_question_share_their_noise(random_runs):
    """Common random numbers: two continuations of equal length after one context are scored
    on the same masks and times; another context draws other noise."""
    from evaluation.lm_harness import BD3LMHarness

    harness = BD3LMHarness(checkpoint=random_runs["bd3lm_k4"][1], mc_samples=4)
    seen = []
    original = harness._nelbo_terms
    harness._nelbo_terms = lambda x0, xt, t: (
        seen.append((xt == harness.mask, t)) or original(x0, xt, t)
    )
    a, b = harness._encode(" to the queen"), harness._encode(" of the land")
    assert len(a) == len(b)
    for context in ("The king said", "The king said", "O Romeo"):
        harness.batch_size = 1
        harness.loglikelihood([Request(context, " to the queen"), Request(context, " of the land")])
    masks, times = zip(*seen, strict=True)  # one call per request (batch size 1)
    assert torch.equal(masks[0], masks[1]) and torch.equal(times[0], times[1])  # two options
    assert torch.equal(masks[0], masks[2])  # the same context again: the same noise
    assert not torch.equal(times[0], times[4])  # another context: its own


@pytest.mark.parametrize("name", ["ar", "bd3lm_k4"])
def test_estimates_do_not_depend_on_the_batch_size_ar_and_diffusion(random_runs, name):
    from evaluation.lm_harness import BD3LMHarness

    requests = [
        Request("The king said", " to the queen"),
        Request("O Romeo", ", wherefore art thou"),
        Request("To be", ", or not to be, that is"),
    ]
    path = random_runs[name][1]
    one = BD3LMHarness(checkpoint=path, mc_samples=4, batch_size=1)
    three = BD3LMHarness(checkpoint=path, mc_samples=4, batch_size=3)
    for (a, ga), (b, gb) in zip(
        one.loglikelihood(requests), three.loglikelihood(requests), strict=True
    ):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb
    text = TEXT * 2  # more than a window: the last window takes the text before it as context
    assert one.loglikelihood_rolling([Request(text)]) == pytest.approx(
        three.loglikelihood_rolling([Request(text)]), rel=1e-5
    )


def test_rolling_gives_the_last_window_its_preceding_context(random_runs):
    from evaluation.lm_harness import BD3LMHarness

    harness = BD3LMHarness(checkpoint=random_runs["ar"][1], mc_samples=1)
    tokens = harness._encode(TEXT)
    W = harness.window
    assert W - 1 < len(tokens) < 2 * (W - 1)
    items = []
    score_batch = harness.score_batch
    harness.score_batch = lambda chunk, gens: items.extend(chunk) or score_batch(chunk, gens)
    harness.loglikelihood_rolling([Request(TEXT)])
    (first, one), (last, start) = items
    assert first == [harness.bos, *tokens[: W - 1]] and one == 1
    assert len(last) == W and last[0] == harness.bos and last[start:] == tokens[W - 1 :]
    assert last[1:start] == tokens[len(tokens) - (W - 1) : W - 1]  # clean context before it


def test_harness_arguments_are_checked(random_runs, tmp_path):
    """Unknown --model_args keys and kinds are refused in one line; a block as long as the
    window leaves no room for a prompt and refuses generation in one line."""
    from conftest import random_run_checkpoint
    from evaluation.lm_harness import BD3LMHarness
    from utils import UserError

    path = random_runs["bd3lm_k4"][1]
    with pytest.raises(UserError, match="mc_sample: unknown; valid: checkpoint, mc_samples"):
        BD3LMHarness(checkpoint=path, mc_sample=32)
    with pytest.raises(UserError, match="kind=gpt: valid: ar, bd3lm, mdlm, sedd"):
        BD3LMHarness(checkpoint=path, kind="gpt")
    whole = tmp_path / "k32.ckpt"
    random_run_checkpoint(whole, "algo=bd3lm", "block_size=32")
    harness = BD3LMHarness(checkpoint=str(whole), mc_samples=1)
    with pytest.raises(UserError, match="block size 32 leaves no room for a prompt"):
        harness.generate_until([Request("The king", {"until": []})])


def test_an_old_export_without_parameterization_warns_and_kind_overrides(tmp_path, caplog):
    """A time-conditioned MDLM exported before `parameterization` was written reads as SEDD,
    with a warning; kind=mdlm restores the .ckpt's estimate. A released repository's name
    (config._name_or_path, set by from_pretrained) decides the family."""
    import json
    import logging

    import checkpoints.layout as layout
    from conftest import random_run_checkpoint
    from evaluation.lm_harness import BD3LMHarness
    from hf import MDLM
    from hf.export import export
    from hf.generation import checkpoint_kind

    ckpt = tmp_path / "mdlm_tc.ckpt"
    random_run_checkpoint(ckpt, "algo=mdlm", "algo.time_conditioning=true")
    out = tmp_path / "hf"
    export(str(ckpt), str(out))
    config = json.loads((out / "config.json").read_text())
    assert config.pop("parameterization") == "subs"
    (out / "config.json").write_text(json.dumps(config))
    request = [Request("The king said", " to the queen")]
    reference = BD3LMHarness(checkpoint=str(ckpt), mc_samples=2)
    assert reference.kind == "mdlm"
    with caplog.at_level(logging.WARNING, logger="bd3lms"):
        old = BD3LMHarness(checkpoint=str(out), mc_samples=2)
    assert old.kind == "sedd" and "names no parameterization" in caplog.text
    fixed = BD3LMHarness(checkpoint=str(out), mc_samples=2, kind="mdlm")
    assert fixed.loglikelihood(request) == reference.loglikelihood(request)
    layout.RELEASED[str(out)] = layout.Released("mdlm", 22.98)  # as if it were released
    try:
        assert checkpoint_kind(MDLM.from_pretrained(str(out))) == "mdlm"
    finally:
        del layout.RELEASED[str(out)]


@pytest.mark.parametrize("name", ["ar", "bd3lm_k1"])
def test_conditional_equals_ppl_eval_terms_for_ar_and_k1(random_runs, name):
    """AR and K = 1: log p(continuation | context) with the context clean and the tail masked
    is exactly the sum of ppl_eval's per-token NLLs at the continuation's positions of the
    full row (block-causal: neither what follows nor the masking of it reaches them)."""
    from evaluation.lm_harness import BD3LMHarness

    module, path = random_runs[name]
    harness = BD3LMHarness(checkpoint=path, mc_samples=2)
    _, tokens = one_row_text(harness)
    row = torch.tensor([[harness.bos, *tokens]])
    with torch.no_grad():
        batch = {"input_ids": row, "attention_mask": torch.ones_like(row)}
        nlls = module._eval_loss(batch, 0, module.algorithm.eval_interval()).nlls[0].double()
    shift = 1 if name == "ar" else 0  # AR's terms are indexed by the predicting position
    for start, end in ((10, 20), (1, 31), (29, 32)):
        value = harness.score(row[0, :end].tolist(), start, torch.Generator())[0]
        assert value == pytest.approx(-float(nlls[start - shift : end - shift].sum()), rel=1e-5)


@pytest.mark.parametrize(
    "model_args, fragment",
    [
        ("checkpoint=/nonexistent/bd3lms.ckpt,mc_sample=8", "--model_args mc_sample: unknown"),
        ('{"checkpoint": "/nonexistent/bd3lms.ckpt", "mc_samples": 0}', "mc_samples=0"),
    ],
)
def test_run_lm_eval_bad_model_args_one_line_exit_2(model_args, fragment, monkeypatch, capsys):
    """scripts/run_lm_eval.py: a bad --model_args is one `error:` line and exit code 2, as for
    main.py (was a 25-line traceback ending in utils.UserError), before lm-eval indexes its
    tasks (other UserErrors, such as a missing checkpoint, are caught around lm-eval's CLI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_lm_eval", os.path.join(ROOT, "scripts", "run_lm_eval.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["run_lm_eval.py", "--model", "bd3lm", "--model_args", model_args]
    monkeypatch.setattr("sys.argv", argv + ["--tasks", "lambada_openai"])
    assert script.main() == 2
    (last,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert last.startswith("error: ") and fragment in last, last
