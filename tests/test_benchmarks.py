"""The benchmark scripts run end to end and write the JSON fields issue 7 names (smallest
settings; the figures themselves are not checked: speed is never asserted in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import OFFLINE, ROOT


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", name), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_train_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "train.json"
    run_script(
        "train.py", "--shapes", "w128_L128", "--variants", "mdlm,bd3lm4", "--reps", "1",
        "--baseline", "--no-memory", "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert set(data["step_ms"]) == {
        "mdlm@w128_L128", "mdlm@w128_L128_baseline", "bd3lm4@w128_L128",
        "bd3lm4@w128_L128_baseline",
    }  # fmt: skip
    assert data["ratio_bd3lm4_over_mdlm"]["w128_L128"] > 0
    assert 1.1 < data["flop_ratio_bd3lm4_over_mdlm"]["w128_L128"] < 1.3


def test_sample_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "sample.json"
    only = "bd3lm4_kv_b1_n256,bd3lm4_nokv_b1_n256,ar_kv_b1_n256"
    run_script("sample.py", "--quick", "--only", only, "--baseline", "--json", str(out))
    data = json.loads(out.read_text())
    assert set(data["tokens_per_s"]) == {
        "bd3lm4_kv_b1_n256", "bd3lm4_kv_b1_n256_baseline", "bd3lm4_nokv_b1_n256",
        "bd3lm4_nokv_b1_n256_baseline", "ar_kv_b1_n256", "ar_kv_b1_n256_baseline",
    }  # fmt: skip
    assert data["kv_speedup_1024"] > 0 and data["bd3lm4_over_ar_kv"] > 0
    # fused commits: no separate commit pass; the baseline commits each block but the last
    assert data["nfe_denoise_and_total"]["bd3lm4_kv_b1_n256"] == [255, 255]
    assert data["nfe_denoise_and_total"]["bd3lm4_kv_b1_n256_baseline"] == [255, 255 + 63]
