"""scripts/paper_tables.py on synthetic run directories: rows matched by their config keys,
the paper's numbers beside ours, our error bars (ppl_ci95, nll_stderr, the Gen PPL interval
of scripts/sample_stats.py) and the difference; unmatched runs listed; bad input in one line.
The zero-shot launcher prints its table through the same script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location(
        "paper_tables", os.path.join(ROOT, "scripts", "paper_tables.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(algo, block_size, valid, tokenizer, length, **extra) -> dict:
    cfg = {
        "mode": "ppl_eval",
        "block_size": block_size,
        "algo": {"name": algo, "T": extra.pop("T", 0)},
        "data": {"train": valid, "valid": valid, "tokenizer_name_or_path": tokenizer},
        "model": {"length": length},
        "sampling": {"nucleus_p": extra.pop("nucleus_p", 1.0)},
    }
    assert not extra
    return cfg


def make_run(path, cfg: dict, ppl: dict | None = None, samples: list[dict] | None = None):
    os.makedirs(path)
    with open(os.path.join(path, "config_resolved.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    if ppl is not None:
        with open(os.path.join(path, "ppl_eval.json"), "w") as f:
            json.dump(ppl, f)
    if samples is not None:
        with open(os.path.join(path, "samples.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in samples)


def sample(gen_ppl: float, nfe: int, seed: int) -> dict:
    return {
        "length": 1024,
        "gen_ppl": gen_ppl,
        "gen_nll_sum": math.log(gen_ppl) * 1000,
        "gen_num_tokens": 1000,
        "entropy": 5.5,
        "nfe_denoise": nfe,
        "nfe_total": nfe,
        "seed": seed,
    }


def rows_of(text: str) -> dict[str, list[list[str]]]:
    """Markdown table rows -> {label: [cells of each line with that label]}."""
    out: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out.setdefault(cells[0], []).append(cells[1:])
    return out


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "outputs"
    owt, gpt2 = "openwebtext-valid", "gpt2"
    ar = config("ar", 128, "lm1b", "bert-base-uncased", 128)
    make_run(root / "lm1b_ar", ar, {"ppl": 23.0, "nll": math.log(23.0), "ppl_ci95": [22.9, 23.1]})
    bd3 = config("bd3lm", 4, owt, gpt2, 1024)
    make_run(root / "owt_bd3lm4", bd3, {"ppl": math.exp(3.0), "nll": 3.0, "nll_stderr": 0.01})
    make_run(root / "owt_mdlm", config("mdlm", 1024, owt, gpt2, 1024), {"ppl": 23.5, "nll": 3.1})
    zero_shot = config("bd3lm", 4, "ptb", gpt2, 1024)
    make_run(root / "zs" / "bd3lm_bs4" / "ptb", zero_shot, {"ppl": 95.0, "ppl_ci95": 1.5})
    gen = config("bd3lm", 16, owt, gpt2, 1024, T=5000, nucleus_p=0.9)
    values = [30.0, 34.0, 38.0, 32.0]
    make_run(root / "samples" / "genppl_bs16", gen, samples=[sample(v, 1000, 1) for v in values])
    demo = config("bd3lm", 4, "shakespeare", "shakespeare-bpe", 128)
    make_run(root / "demo", demo, {"ppl": 184.7, "nll": math.log(184.7)})
    os.makedirs(root / "not_a_run")  # no config: skipped
    return root, values


def test_tables_put_ours_beside_the_paper(runs, capsys):
    """About 1 s."""
    root, values = runs
    assert load_script().main([str(root)]) == 0
    text = capsys.readouterr().out
    rows = rows_of(text)
    for title in ("Table 3", "Table 4", "Table 5", "Table 7"):
        assert f"### {title}:" in text
    # Table 3: ppl_ci95 as [lo, hi]; the paper's AR value is exact (no bound sign)
    assert rows["AR"][0][:4] == ["22.83", "23.00", "[22.90, 23.10]", "+0.17"]
    assert rows["AR"][0][4].endswith("lm1b_ar`")
    assert rows["BD3-LM K = 4"][0][:2] == ["≤ 28.23", "–"]  # LM1B row without a run
    # Table 4: the interval from nll_stderr; no error bar -> "–"
    owt_k4 = rows["BD3-LM K = 4"][1]
    lo, hi = math.exp(3.0 - 1.959964 * 0.01), math.exp(3.0 + 1.959964 * 0.01)
    assert owt_k4[:4] == ["≤ 20.73", f"{math.exp(3):.2f}", f"[{lo:.2f}, {hi:.2f}]", "-0.64"]
    assert rows["MDLM"][1][:4] == ["≤ 22.98", "23.50", "–", "+0.52"]
    # Table 5: ours beside the paper's (a bound for BD3-LM), the paper's alone without a run
    k4 = rows["BD3-LM K = 4"][2]
    assert k4[0] == "95.00 [93.50, 96.50] (paper ≤ 96.81, -1.81)"  # PTB first
    assert k4[1:] == [
        f"– (paper ≤ {v})" for v in ("31.31", "60.88", "50.03", "61.67", "42.52", "39.20")
    ]
    assert rows["AR"][2] == [
        f"– (paper {v})" for v in ("81.07", "25.32", "51.14", "52.13", "52.11", "48.59", "41.22")
    ]
    # Table 7: sample_stats' per-sample mean and 95% interval, mean NFE, number of samples
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = 1.959964 * std / math.sqrt(len(values))
    k16 = rows["BD3-LM K = 16, L = 1024"][0]
    assert k16[:7] == [
        "33.4", "1K", f"{mean:.1f}", f"[{mean - half:.1f}, {mean + half:.1f}]",
        f"{mean - 33.4:+.1f}", "1000", "4",
    ]  # fmt: skip
    assert rows["SSD-LM, L = 1024"][0][:2] == ["37.2", "40K"]
    # the demo run and the directory without a config
    unmatched = text.split("Runs matching no row:")[1]
    assert "demo`: algo.name=bd3lm, block_size=4, data.valid=shakespeare" in unmatched
    assert "not_a_run" not in text


def test_one_table_and_the_plot(runs, tmp_path, capsys):
    root, _ = runs
    plot = tmp_path / "genppl.png"
    assert load_script().main([str(root / "samples"), "--table", "7", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "Table 7" in text and "Table 3" not in text and "Runs matching no row" not in text
    assert text.rstrip().endswith(f"{plot}: 1 point(s)") and plot.stat().st_size > 0


def test_bad_input_is_one_line(tmp_path, capsys):
    script = load_script()
    assert script.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no run directory" in err and "\n" not in err
    make_run(tmp_path / "r", config("ar", 1, "lm1b", "gpt2", 128))
    (tmp_path / "r" / "ppl_eval.json").write_text("{")
    assert script.main([str(tmp_path)]) == 2
    assert "ppl_eval.json: not JSON" in capsys.readouterr().err


@pytest.mark.e2e
def test_zero_shot_launcher_prints_table5_through_paper_tables(runs, tmp_path):
    """TABLE_ONLY=1 zs_ppl.sh: the table of finished runs is paper_tables' Table 5 (about 2 s)."""
    root, _ = runs
    env = {**os.environ, "TABLE_ONLY": "1", "ZS_ROOT": str(root / "zs"), "DATASETS": "ptb"}
    env["PYTHON"] = sys.executable
    cmd = ["bash", os.path.join(ROOT, "scripts/zero_shot/zs_ppl.sh"), "bd3lm", "ckpt", "4"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    assert "### Table 5:" in out and "Table 3" not in out
    assert rows_of(out)["BD3-LM K = 4"][0][0] == "95.00 [93.50, 96.50] (paper ≤ 96.81, -1.81)"
