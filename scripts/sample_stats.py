"""Summarise sample runs: per directory and in total, the number of samples, the mean generative
perplexity (samples without one skipped), its 95% confidence interval, the mean NFEs (both
kinds), the mean entropy and the median and maximum length; optionally a plot of mean Gen PPL
against mean NFE, one point per directory.

    python scripts/sample_stats.py RUN_OR_LOG_DIR [...] [--out summary.json]
        [--plot genppl_vs_nfe.png] [--nfe denoise|total]

Each argument is a directory holding samples*.jsonl (a sample_eval run directory or a
`sampling.logdir` that several seeds appended to), or a directory above such directories
(every one below it is summarised, e.g. outputs/samples). The records are those
sampling/generate.py writes; the per-directory numbers are metrics.summarize_samples (as in
sample_eval.json) plus:
`num_scored`, `gen_ppl_std` and `gen_ppl_ci95` (1.96 x sample std / sqrt(num_scored), over the
per-sample Gen PPL values) and `seeds`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import summarize_samples  # noqa: E402

Z95 = 1.959964  # two-sided 95% normal quantile
PATTERN = "samples*.jsonl"


def find_sample_dirs(path: str) -> list[str]:
    """`path` itself when it holds samples*.jsonl, else every directory below it that does."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory")
    if glob.glob(os.path.join(path, PATTERN)):
        return [path]
    found = []
    for root, dirs, _ in os.walk(path):
        dirs.sort()
        if root != path and glob.glob(os.path.join(root, PATTERN)):
            found.append(root)
    if not found:
        raise ValueError(f"{path}: no {PATTERN} in it or below it")
    return found


def read_records(directory: str) -> list[dict]:
    records = []
    for name in sorted(glob.glob(os.path.join(directory, PATTERN))):
        with open(name) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name}:{number}: not JSON ({err.msg})") from None
    return records


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def summarize(records: list[dict]) -> dict:
    """metrics.summarize_samples plus the spread of the per-sample Gen PPL values. Samples whose
    gen_ppl is null or not finite are left out of every Gen PPL number."""
    clean = [r if _finite(r.get("gen_ppl")) else {**r, "gen_ppl": None} for r in records]
    summary = summarize_samples(clean, None)
    summary.pop("evaluator", None)
    values = [float(r["gen_ppl"]) for r in clean if r["gen_ppl"] is not None]
    n = len(values)
    std = None
    if n > 1:
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    summary.update(
        num_scored=n,
        gen_ppl_std=std,
        gen_ppl_ci95=Z95 * std / math.sqrt(n) if std is not None else None,
        seeds=sorted({r["seed"] for r in records if r.get("seed") is not None}),
    )
    return summary


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(runs: dict[str, dict], total: dict) -> None:
    header = ["run", "n", "scored", "gen_ppl", "+-95%", "nfe_denoise", "nfe_total", "entropy"]
    header += ["len_median", "len_max"]
    rows = [[name, *_columns(s)] for name, s in runs.items()] + [["TOTAL", *_columns(total)]]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _columns(s: dict) -> list[str]:
    return [
        _fmt(s["num_samples"]),
        _fmt(s["num_scored"]),
        _fmt(s["gen_ppl_mean_per_sample"]),
        _fmt(s["gen_ppl_ci95"]),
        _fmt(s["nfe_denoise_mean"], 1),
        _fmt(s["nfe_total_mean"], 1),
        _fmt(s["entropy_mean"], 3),
        _fmt(s["length_median"], 1),
        _fmt(s["length_max"]),
    ]


def plot_genppl_vs_nfe(runs: dict[str, dict], path: str, nfe: str = "denoise") -> int:
    """One point per run with a Gen PPL: mean NFE against mean Gen PPL, 95% CI bars.
    Runs whose names differ only in their numbers (conf0.3, conf0.5; k2, k3) form a family:
    one colour and marker, joined by a line in NFE order, each point tagged with its numbers.
    Returns the number of points drawn (the file is written even when it is 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"nfe_{nfe}_mean"
    points = [
        (name, s[key], s["gen_ppl_mean_per_sample"], s["gen_ppl_ci95"] or 0.0)
        for name, s in runs.items()
        if s["gen_ppl_mean_per_sample"] is not None and s[key] is not None
    ]
    from matplotlib.ticker import MaxNLocator

    families: dict[str, list] = {}
    for name, x, y, ci in points:
        label = os.path.basename(os.path.normpath(name))
        family = re.sub(r"\d+(\.\d+)?", "", label)
        families.setdefault(family, []).append((x, y, ci, re.findall(r"\d+(?:\.\d+)?", label)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>ph*X"
    for i, (family, members) in enumerate(families.items()):
        members.sort()
        xs, ys, cis, tags = zip(*members, strict=True)
        style = dict(color=f"C{i % 10}", marker=markers[i % len(markers)], capsize=3)
        label = family.strip("_") or "runs"
        ax.errorbar(xs, ys, yerr=cis, ls="-" if len(xs) > 1 else "none", label=label, **style)
        for x, y, tag in zip(xs, ys, tags, strict=True):
            if len(members) > 1 and tag:
                ax.annotate("/".join(tag), (x, y), xytext=(3, 3), textcoords="offset points",
                            fontsize=6, color=style["color"])  # fmt: skip
    if points:
        ax.legend(fontsize=7, ncol=2, loc="best")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no run has a generative perplexity", ha="center", transform=ax.transAxes)
    ax.margins(x=0.1, y=0.1)
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel(f"mean NFE ({nfe})")
    ax.set_ylabel("mean Gen PPL (95% CI)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_LOG_DIR")
    parser.add_argument("--out", help="write the summary as JSON to this file")
    parser.add_argument("--plot", help="write the Gen PPL vs NFE plot (PNG) to this file")
    parser.add_argument(
        "--nfe",
        choices=("denoise", "total"),
        default="denoise",
        help="the NFE on the plot's x axis (default: denoise)",
    )
    args = parser.parse_args(argv)
    try:
        dirs = [d for path in args.dirs for d in find_sample_dirs(path)]
        dirs = list(dict.fromkeys(os.path.normpath(d) for d in dirs))
        records = {d: read_records(d) for d in dirs}
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = {d: summarize(r) for d, r in records.items()}
    total = summarize([r for rs in records.values() for r in rs])
    print_table(runs, total)
    result = {"runs": runs, "total": total}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    if args.plot:
        drawn = plot_genppl_vs_nfe(runs, args.plot, args.nfe)
        print(f"{args.plot}: {drawn} point(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
