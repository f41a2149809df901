"""A numerical fingerprint of every objective through every mode, for refactors that must not
change numbers: for ar, mdlm, bd3lm, sedd and ssdlm, a 4-step smoke training run (its logged
losses and the sum and sum of squares of its weights), ppl_eval of that checkpoint and a
sample_eval of it (token ids' checksum, lengths, NFE).

    python benchmarks/fingerprint.py > before.json   # then, after the change:
    python benchmarks/fingerprint.py > after.json && diff before.json after.json

Runs on CPU in one thread (bit-reproducible) in about two minutes; writes under a temporary
directory. The figures are printed with 10 significant digits: a diff is a change.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.update(
    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled"
)

ALGORITHMS = ("ar", "mdlm", "bd3lm", "sedd", "ssdlm")
# more sample_eval runs: the KV cache, a prompt, parallel decoding, ppl_eval's Monte-Carlo draws
EXTRA_SAMPLES = {
    "ar": [("sampling.kv_cache=true", "sampling.prefix=ROMEO:")],
    "bd3lm": [
        ("sampling.kv_cache=true", "sampling.prefix=ROMEO:"),
        ("sampling.tokens_per_step=2", "sampling.first_hitting=true"),
    ],
}


def _g(x: float) -> str:
    return f"{float(x):.10g}"


def _run(run_dir: str, *overrides: str) -> None:
    import main

    cfg = main.compose(["experiment=smoke", *overrides], run_dir)
    with contextlib.redirect_stdout(sys.stderr):  # the runs' own prints; stdout: the JSON
        main.run(cfg, run_dir)


def _losses(run_dir: str) -> dict:
    rows = []
    for path in sorted(glob.glob(f"{run_dir}/logs/*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    out = {}
    for row in rows:
        for key, value in row.items():
            if value and ("loss" in key or "nll" in key or "ppl" in key or "bpd" in key):
                out.setdefault(key, []).append(_g(value))
    return out


def _weights(ckpt: str) -> dict:
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    tensors = [t.double() for t in state.values() if t.is_floating_point()]
    return {
        "tensors": len(state),
        "sum": _g(sum(t.sum() for t in tensors)),
        "sum_sq": _g(sum((t * t).sum() for t in tensors)),
    }


def fingerprint(algo: str, work: str) -> dict:
    train_dir = os.path.join(work, algo, "train")
    _run(train_dir, f"algo={algo}")
    ckpt = os.path.join(train_dir, "checkpoints", "last.ckpt")
    result = {"train": _losses(train_dir), "weights": _weights(ckpt)}
    if algo != "ssdlm":  # SSD-LM has no likelihood bound (ppl_eval is refused)
        ppl_dir = os.path.join(work, algo, "ppl")
        _run(ppl_dir, f"algo={algo}", "mode=ppl_eval", f"eval.checkpoint_path={ckpt}")
        with open(os.path.join(ppl_dir, "ppl_eval.json")) as f:
            ppl = json.load(f)
        result["ppl_eval"] = {k: _g(v) for k, v in ppl.items() if isinstance(v, float)}
    for index, extra in enumerate([(), *EXTRA_SAMPLES.get(algo, [])]):
        sample_dir = os.path.join(work, algo, f"sample{index}")
        overrides = [f"algo={algo}", "mode=sample_eval", f"eval.checkpoint_path={ckpt}", *extra]
        _run(sample_dir, *overrides)
        with open(os.path.join(sample_dir, "samples.jsonl")) as f:
            records = [json.loads(line) for line in f]
        ids = [r["token_ids"] for r in records]
        result[" ".join(["samples", *extra])] = {
            "n": len(records),
            "crc32": zlib.crc32(json.dumps(ids).encode()),
            "lengths": [r["length"] for r in records],
            "nfe": [r.get("nfe_total") for r in records],
        }
    return result


def main(argv: list[str]) -> None:
    import torch

    from utils import quiet_console

    quiet_console()
    torch.set_num_threads(1)
    algorithms = argv or ALGORITHMS
    with tempfile.TemporaryDirectory() as work:
        os.environ.setdefault("BD3LMS_CACHE", os.path.join(work, "cache"))
        out = {algo: fingerprint(algo, work) for algo in algorithms}
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
