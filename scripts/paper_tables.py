"""The paper's result tables, ours beside the published numbers, in Markdown.

    python scripts/paper_tables.py RUN_DIR [...] [--table 3,4,5,7] [--plot genppl_vs_nfe.png]
        [--numbers scripts/paper_numbers.toml]

Each argument is a run directory, or a directory above run directories (every one below it is
read). A run directory holds the run's `config_resolved.yaml` (main.py writes it into the run
directory and, for sample_eval with `sampling.logdir`, into the logdir too) and its results:
`ppl_eval.json` (Tables 3, 4 and 5: test and zero-shot perplexity) and/or `samples*.jsonl`
(Table 7: generative perplexity and NFE, summarised by scripts/sample_stats.py, whose plot of
Gen PPL against NFE `--plot` draws for the Table 7 runs).

The paper's numbers live in scripts/paper_numbers.toml, one entry per table row with its
source and the config keys a run must have to fill that row (algorithm, block size, validation
data, tokenizer, length, sampling keys). Every paper row is printed in the paper's order; a row
that several runs match is printed once per run, and runs that match no row are listed after
the tables. Table 5 keeps the paper's grid (a line per model, a column per data set; a cell
holds ours, its interval and, where stored, the paper's number and the difference).
Columns: the paper's number ("≤" for the diffusion bounds, "–" where this repository has no
source for it), ours, our 95% interval and ours − paper. Our perplexity
interval is `ppl_ci95` of ppl_eval.json when it is there (an [lo, hi] pair or a half-width),
else exp(nll ± 1.96 nll_stderr) from `nll_stderr` (nats per token), else "–"; the Gen PPL
interval is sample_stats' 95% interval of the per-sample mean. Gen PPL is the mean over
samples of each sample's generative perplexity (`gen_ppl_mean_per_sample`), NFE the mean
`nfe_denoise`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sample_stats  # noqa: E402

NUMBERS = os.path.join(HERE, "paper_numbers.toml")
TABLES = ("3", "4", "5", "7")
CONFIG = "config_resolved.yaml"
PPL = "ppl_eval.json"
Z95 = sample_stats.Z95
DASH = "–"


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
def _is_run(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, CONFIG)):
        return False
    return os.path.isfile(os.path.join(path, PPL)) or _has_samples(path)


def _has_samples(path: str) -> bool:
    import glob

    return bool(glob.glob(os.path.join(path, sample_stats.PATTERN)))


def find_runs(path: str) -> list[str]:
    """`path` itself when it is a run directory (config_resolved.yaml plus ppl_eval.json or
    samples*.jsonl), else every run directory below it, in sorted order."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory")
    if _is_run(path):
        return [os.path.normpath(path)]
    found = []
    for root, dirs, _ in os.walk(path):
        dirs.sort()
        if root != path and _is_run(root):
            found.append(os.path.normpath(root))
    if not found:
        raise ValueError(
            f"{path}: no run directory ({CONFIG} with {PPL} or {sample_stats.PATTERN}) in it "
            "or below it"
        )
    return found


def read_config(run: str) -> dict:
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(os.path.join(run, CONFIG)), resolve=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is one line
        raise ValueError(f"{os.path.join(run, CONFIG)}: not readable YAML ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{os.path.join(run, CONFIG)}: not a mapping of keys")
    return config


def read_run(run: str) -> dict:
    """{'dir', 'config', 'ppl': ppl_eval.json or None, 'samples': sample_stats summary or
    None}."""
    result = {"dir": run, "config": read_config(run), "ppl": None, "samples": None}
    path = os.path.join(run, PPL)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                result["ppl"] = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err.msg})") from None
    if _has_samples(run):
        result["samples"] = sample_stats.summarize(sample_stats.read_records(run))
    return result


def lookup(config: dict, dotted: str):
    """config['a']['b'] for 'a.b'; a missing key is None."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, int | float) and isinstance(value, int | float):
        return math.isclose(float(value), float(expected), rel_tol=1e-9, abs_tol=1e-12)
    return value == expected


def matches(config: dict, keys: dict) -> bool:
    return all(_same(lookup(config, k), v) for k, v in keys.items())


# ----------------------------------------------------------------------------------------------
# Paper rows
# ----------------------------------------------------------------------------------------------
def load_numbers(path: str = NUMBERS) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def table_rows(numbers: dict, table: str) -> tuple[dict, list[dict]]:
    """(the table's header entry, its rows in the paper's order)."""
    spec = numbers[f"table{table}"]
    return spec, list(spec["rows"])


# ----------------------------------------------------------------------------------------------
# Our numbers
# ----------------------------------------------------------------------------------------------
def ppl_interval(result: dict) -> tuple[float, float] | None:
    """Our 95% interval of the perplexity from ppl_eval.json: `ppl_ci95` ([lo, hi] or a
    half-width around `ppl`), else exp(nll -/+ 1.96 nll_stderr), else None."""
    ci = result.get("ppl_ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(c) for c in ci):
        return float(ci[0]), float(ci[1])
    if _number(ci) and _number(result.get("ppl")):
        return result["ppl"] - ci, result["ppl"] + ci
    se, nll = result.get("nll_stderr"), result.get("nll")
    if _number(se) and _number(nll):
        return math.exp(nll - Z95 * se), math.exp(nll + Z95 * se)
    return None


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def ours(run: dict, kind: str) -> dict | None:
    """{'value', 'interval', 'nfe', 'n'} of a run for a table kind ('ppl' | 'gen_ppl'), or
    None when the run has no result of that kind."""
    if kind == "ppl":
        result = run["ppl"]
        if result is None:
            return None
        value = result.get("ppl")
        return {
            "value": value if _number(value) else None,
            "interval": ppl_interval(result),
            "nfe": None,
            "n": result.get("num_tokens"),
        }
    summary = run["samples"]
    if summary is None:
        return None
    value, ci = summary["gen_ppl_mean_per_sample"], summary["gen_ppl_ci95"]
    return {
        "value": value,
        "interval": (value - ci, value + ci) if value is not None and ci is not None else None,
        "nfe": summary["nfe_denoise_mean"],
        "n": summary["num_samples"],
    }


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _fmt(value, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _paper(row: dict, digits: int) -> str:
    if "paper" not in row:
        return DASH
    return ("≤ " if row.get("bound") else "") + f"{row['paper']:.{digits}f}"


def _markdown(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" if i == 0 or h == "run" else "---:" for i, h in
                              enumerate(header)) + "|")  # fmt: skip
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def _cell(value, interval, digits: int) -> str:
    if interval is None:
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def render_matrix(spec: dict, runs: list[dict], used: set[str]) -> list[str]:
    """Table 5's layout: one line per model, one column per data set; a cell is ours with its
    95% interval and the paper's number with ours − paper ("–" and the paper's number without
    a run of ours)."""
    header = ["model", *(name for name, _ in spec["datasets"])]
    papers = spec.get("paper", {})
    lines = []
    for model, keys in spec["models"]:
        cells = [model]
        for dataset, valid in spec["datasets"]:
            match = {**spec["match"], **keys, "data.valid": valid}
            found = [(r, ours(r, "ppl")) for r in runs if matches(r["config"], match)]
            found = [(r, o) for r, o in found if o is not None]
            used.update(r["dir"] for r, _ in found)
            paper = papers.get(model, {}).get(dataset)
            bound = "≤ " if model in spec.get("bound", []) else ""
            texts = []
            for _, mine in found:
                text = _cell(mine["value"], mine["interval"], 2)
                if paper is not None and mine["value"] is not None:
                    text += f" (paper {bound}{paper:.2f}, {mine['value'] - paper:+.2f})"
                texts.append(text)
            if not texts and paper is not None:
                texts.append(f"{DASH} (paper {bound}{paper:.2f})")
            cells.append("; ".join(texts) or DASH)
        lines.append(cells)
    return [f"### {spec['title']}", "", *_markdown(header, lines), ""]


def render_table(table: str, numbers: dict, runs: list[dict], used: set[str]) -> list[str]:
    """The Markdown lines of one table; adds the directories of the runs it shows to `used`."""
    if "models" in numbers[f"table{table}"]:
        return render_matrix(numbers[f"table{table}"], runs, used)
    spec, rows = table_rows(numbers, table)
    kind = spec["kind"]
    digits = 2 if kind == "ppl" else 1
    if kind == "ppl":
        header = ["model", "paper PPL", "ours", "ours 95% CI", "ours − paper", "run"]
    else:
        header = ["model", "paper Gen PPL", "paper NFE", "ours", "ours 95% CI", "ours − paper"]
        header += ["ours NFE", "samples", "run"]
    lines = []
    for row in rows:
        found = [(r, o) for r in runs if matches(r["config"], row["match"])
                 for o in [ours(r, kind)] if o is not None]  # fmt: skip
        for run, mine in found or [(None, None)]:
            value = mine["value"] if mine else None
            interval = mine["interval"] if mine else None
            ci = (
                DASH
                if interval is None
                else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
            )
            diff = DASH
            if value is not None and "paper" in row:
                diff = f"{value - row['paper']:+.{digits}f}"
            cells = [row["label"], _paper(row, digits)]
            if kind == "gen_ppl":
                cells.append(str(row.get("paper_nfe", DASH)))
            cells += [_fmt(value, digits), ci, diff]
            if kind == "gen_ppl":
                cells += [_fmt(mine["nfe"] if mine else None, 0), str(mine["n"]) if mine else DASH]
            cells.append(f"`{run['dir']}`" if run else DASH)
            lines.append(cells)
            if run:
                used.add(run["dir"])
    return [f"### {spec['title']}", "", *_markdown(header, lines), ""]


def describe(config: dict) -> str:
    keys = ("algo.name", "block_size", "data.valid", "data.tokenizer_name_or_path")
    keys += ("model.length", "algo.T", "sampling.nucleus_p")
    return ", ".join(f"{k}={lookup(config, k)}" for k in keys if lookup(config, k) is not None)


def _tables(text: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen or any(t not in TABLES for t in chosen):
        raise argparse.ArgumentTypeError(f"{text!r}: give tables of {','.join(TABLES)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--table",
        type=_tables,
        default=list(TABLES),
        help="comma-separated tables to print, of 3,4,5,7 (default: all)",
    )
    parser.add_argument("--numbers", default=NUMBERS, help="the paper's numbers (TOML)")
    parser.add_argument("--plot", help="write Gen PPL vs NFE of the Table 7 runs (PNG) here")
    args = parser.parse_args(argv)
    try:
        dirs = list(dict.fromkeys(d for path in args.dirs for d in find_runs(path)))
        runs = [read_run(d) for d in dirs]
        numbers = load_numbers(args.numbers)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    used: dict[str, set[str]] = {}
    lines: list[str] = []
    for table in sorted(set(args.table), key=TABLES.index):
        lines += render_table(table, numbers, runs, used.setdefault(table, set()))
    kinds = {numbers[f"table{t}"]["kind"] for t in args.table}
    shown = set().union(*used.values())
    unmatched = [r for r in runs if r["dir"] not in shown
                 and any(ours(r, kind) is not None for kind in kinds)]  # fmt: skip
    if unmatched:
        lines += ["Runs matching no row:", ""]
        lines += [f"- `{r['dir']}`: {describe(r['config'])}" for r in unmatched]
    print("\n".join(lines).rstrip())
    if args.plot:
        table7 = {r["dir"]: r["samples"] for r in runs
                  if r["samples"] is not None and r["dir"] in used.get("7", ())}  # fmt: skip
        drawn = sample_stats.plot_genppl_vs_nfe(table7, args.plot)
        print(f"\n{args.plot}: {drawn} point(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
