"""The GPU acceptance script's CPU dry run (`benchmarks/acceptance.py --cpu`): every section
runs at toy size or is listed as skipped with its reason, and the benchmark scripts it calls
write the JSON fields they promise (the figures themselves are never asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks import acceptance

GPU_ONLY = {"ddp_one_gpu", "fsdp_one_gpu", "fp16", "compile"}


@pytest.mark.e2e
def test_acceptance_cpu_dry_run(tmp_path, data_cache):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "cache").symlink_to(data_cache)  # the session's tokenizer and token caches
    out = tmp_path / "out"
    args = ["--cpu", "--out", str(out), "--bundle", str(bundle), "--work", str(tmp_path / "w")]
    assert acceptance.main(args)["ok"]  # in process: the sections run here anyway with --cpu
    report = json.loads((out / "acceptance.json").read_text())
    assert report["ok"] and report["mode"] == "cpu dry run"
    for name, record in report["sections"].items():
        if name in GPU_ONLY:
            assert record["status"].startswith("skipped: "), (name, record)
        else:
            assert record["status"] == "ok", (name, record)
    assert len(report["sections"]) == 13
    sections = {name: record.get("result") for name, record in report["sections"].items()}
    flex = sections["flex_vs_sdpa"]["float32"]
    assert flex["loss_rel_diff"] < 1e-4 and flex["grad_rel_diff"].startswith("skipped: ")
    hf_causal = sections["hf_causal"]
    assert set(hf_causal["flex_vs_sdpa"]) == {"causal_float32", "causal_bfloat16",
                                              "block_float32", "block_bfloat16"}  # fmt: skip
    assert hf_causal["flex_vs_sdpa"]["block_float32"]["logits_rel_diff"] < 1e-4
    assert hf_causal["train_step_bf16"]["checkpointing_grad_rel_diff"] < 1e-3
    assert hf_causal["fsdp_units"] == {"classes": ["LlamaDecoderLayer"], "count": 2}
    assert sections["kv_cache"]["bd3lm4_bfloat16"]["cache_dtype"] == "torch.bfloat16"
    assert sections["pipeline"]["ppl_eval"]["precision"] == "bf16-mixed"

    train = json.loads((out / "train_cpu.json").read_text())
    assert set(train["step_ms"]) == {"mdlm@toy", "mdlm@toy_baseline", "bd3lm4@toy",
                                     "bd3lm4@toy_baseline"}  # fmt: skip
    assert train["ratio_bd3lm4_over_mdlm"]["toy"] > 0
    assert train["flop_ratio_bd3lm4_over_mdlm"]["toy"] > 1  # the x_0 half costs extra work
    sample = json.loads((out / "sample_cpu.json").read_text())
    names = ["bd3lm4_kv_b1_n64", "bd3lm4_nokv_b1_n64", "ar_kv_b1_n64"]
    assert set(sample["tokens_per_s"]) == {*names, *(n + "_baseline" for n in names)}
    assert sample["kv_speedup_1024"] > 0 and sample["bd3lm4_over_ar_kv"] > 0
    # fused commits: no separate commit pass; the baseline commits each block but the last
    assert sample["nfe_denoise_and_total"]["bd3lm4_kv_b1_n64"] == [63, 63]
    assert sample["nfe_denoise_and_total"]["bd3lm4_kv_b1_n64_baseline"] == [63, 63 + 15]
    # the GPU mode's driver: each section in a child process, its record read back
    isolated = tmp_path / "isolated"
    args = ["--cpu", "--isolate", "--only", "environment", "--out", str(isolated), "--bundle",
            str(bundle), "--work", str(tmp_path / "w2")]  # fmt: skip
    report = acceptance.main(args)
    assert report["ok"] and report["sections"]["environment"]["result"]["torch"]


@pytest.mark.e2e
def test_adapt_step_toy(tmp_path):
    """benchmarks/adapt_step.py at toy size writes the fields it promises (the times are never
    asserted), and its useful FLOPs are the shapes': the body's matrices are the decoder
    layers' (from the Llama config), the attention pairs are the allowed entries of the masks
    the backbone attends under (models.hf_causal.CleanCausal over BlockDiffusionMask; causal),
    the output layer's rows are BD3-LM's masked positions and AR's L - 1 targets per row."""
    from benchmarks import adapt_step
    from models.attention import BlockDiffusionMask, CausalMask, dense_mask
    from models.hf_causal import CleanCausal

    path = tmp_path / "adapt.json"
    args = ["--models", "toy", "--variants", "ar,bd3lm4", "--reps", "1", "--json", str(path)]
    adapt_step.main(args)
    record = json.loads(path.read_text())["models"]["toy"]
    L, B, K = record["L"], record["batch"], 4
    ar, bd3lm = record["variants"]["ar"], record["variants"]["bd3lm4"]
    ratios = {"time_ratio", "fwd_bwd_ratio", "cpu_time_ratio", "flop_ratio", "time_over_flop"}
    assert set(bd3lm["over_ar"]) == ratios | {"cpu_time_over_flop"}
    assert ar["logit_rows"] == B * (L - 1) and 0 < bd3lm["logit_rows"] <= B * L
    clean_causal = CleanCausal(BlockDiffusionMask(L, K), 0, L)
    pairs = adapt_step.attention_pairs
    assert pairs(L, K, ar=False) == dense_mask(clean_causal, 2 * L, 2 * L).sum()
    assert pairs(L, 1, ar=True) == dense_mask(CausalMask(), L - 1, L - 1).sum()
    D, layers, heads, kv_heads, vocab = 32, 2, 4, 2, 97  # the toy Llama (adapt_step.load_model)
    hd, inner = D // heads, 2 * D
    matrices = layers * (2 * D * heads * hd + 2 * D * kv_heads * hd + 3 * D * inner)
    for row, tokens, k in ((ar, L - 1, 1), (bd3lm, 2 * L, K)):
        assert row["useful_flops"]["body"] == 3 * B * 2 * matrices * tokens
        attention = 3 * B * 2 * 2 * heads * hd * pairs(L, k, ar=row is ar) * layers
        assert row["useful_flops"]["attention"] == attention
        assert row["useful_flops"]["output"] == 3 * 2 * D * vocab * row["logit_rows"]
