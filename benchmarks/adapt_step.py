"""Adaptation-step benchmark (issue 26): the BD3-LM training step of a pretrained causal LM
(models.hf_causal: the 2L pass [x_t ; x_0], token shift, clean_attention="causal") over the
AR fine-tuning step of the same model (algo=ar: the plain next-token loss over the L tokens),
beside the ratio of their useful FLOPs.

A step is forward + backward + AdamW step on random tokens, through the objectives' own loss
and models.network.BackboneNetwork as training runs them; every variant holds its own copy of
the model and optimiser, and the variants run interleaved in one process (one step each per
round, after one warm-up step each); reported: the median step time, within it the median
forward + backward time, and the median CPU time of the process per step (time.process_time:
with --threads 1 on a shared CPU machine, the step's own work, whatever else runs there).

Models: `tiny`, a random Llama built here (benchmarks/acceptance_hf_causal.tiny_llama: width
256, 4 layers, 4 heads, 2 KV heads, vocabulary 4097, the last row the mask), `smollm2`,
SmolLM2-135M (`smollm2-135m` through models.pretrained.load_causal_lm, with the mask row that
ensure_mask_token adds, as `model=hf_causal` builds it; cached after the first load) and
`toy` (a seconds-long check that the script runs).

Useful FLOPs of a step, from the model's shapes (forward + backward = 3 x forward; norms,
rotary, softmax, the loss and the optimiser left out):
  - body: 2 x (the weights of the decoder layers' matrices) per token through the layers:
    2L tokens for BD3-LM, L - 1 for AR (its input is x_0[:, :-1]);
  - attention: 2 x 2 x heads x head_dim per allowed (query, key) pair, per layer: BD3-LM with
    the causal clean stream: x_t block b sees its own block and the b clean blocks before it
    (K^2 nb (nb + 1) / 2 pairs, nb = L / K blocks), the x_0 rows are causal (L (L + 1) / 2);
    AR is causal over L - 1 tokens;
  - output layer: 2 x hidden x V per logit row: BD3-LM only at the masked x_t positions
    (counted in each timed step: about L / 2 per row, t being uniform), AR at all L - 1.
The useful-FLOP ratio is BD3-LM's over AR's, with BD3-LM's logit rows as counted; the target
of issue 26 is a step-time ratio within 1.1x of it.

Usage: python benchmarks/adapt_step.py [--models tiny,smollm2] [--variants ar,bd3lm4,bd3lm16]
       [--reps 5] [--json PATH] [--device cpu|cuda] [--bf16] [--attn-backend sdpa|flex]
       [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from common import build_algorithm  # noqa: E402

from models.network import BackboneNetwork  # noqa: E402

# model -> (L, batch); the shapes of the random Llamas are in `load_model`
MODELS = {"toy": (16, 2), "tiny": (256, 8), "smollm2": (128, 4)}
VARIANTS = {"ar": 1, "bd3lm4": 4, "bd3lm16": 16}  # variant -> K (AR: one token at a time)
TARGET = 1.1  # issue 26: step-time ratio within 1.1x of the useful-FLOP ratio


def load_model(name: str):
    """(plain transformers causal LM in train mode, mask id) of the benchmark model `name`."""
    from benchmarks.acceptance_hf_causal import tiny_llama

    if name == "smollm2":
        from models.hf_causal import ensure_mask_token
        from models.pretrained import load_causal_lm

        model, tokenizer = load_causal_lm("smollm2-135m", key="--models")
        return model.train(), ensure_mask_token(model, tokenizer)
    L = MODELS[name][0]
    shape = {
        "toy": dict(width=32, layers=2, heads=4, kv_heads=2, vocab=97, L=L),
        "tiny": dict(width=256, layers=4, heads=4, kv_heads=2, vocab=4097, L=L),
    }[name]
    return tiny_llama(shape).train(), shape["vocab"] - 1


class CountingNetwork(BackboneNetwork):
    """BackboneNetwork that counts the logit rows it returns (`rows`)."""

    rows = 0

    def __call__(self, tokens, sigma, layout):
        logits = super().__call__(tokens, sigma, layout)
        self.rows += logits.shape[:-1].numel()
        return logits


class Runner:
    """One variant on its own copy of `model`: `step()` -> (fwd + bwd seconds, step seconds)."""

    def __init__(self, variant, model, mask_id, L, batch, device, bf16, attn_backend):
        from models.hf_causal import HFCausalLM

        K = VARIANTS[variant]
        ar = variant == "ar"
        self.variant, self.L, self.K, self.batch = variant, L, K, batch
        self.device, self.bf16 = device, bf16
        self.backbone = HFCausalLM(
            copy.deepcopy(model), token_shift=not ar, clean_attention="causal",
            attn_backend=attn_backend,
        ).to(device).train()  # fmt: skip
        self.network = CountingNetwork(self.backbone)
        self.algo = build_algorithm("ar" if ar else "bd3lm", L, K, mask_id)
        self.opt = torch.optim.AdamW(self.backbone.parameters(), lr=1e-5)
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.randint(0, mask_id, (batch, L), generator=gen).to(device)
        self.attn = torch.ones(batch, L, device=device)
        self.eps = (torch.tensor(1e-3, device=device), torch.tensor(1.0, device=device))

    def step(self) -> tuple[float, float, float]:
        """One step -> (forward + backward, whole step: wall seconds; whole step: seconds of
        this process's CPU time)."""
        common.sync(self.device)
        start, cpu_start = common.now(), time.process_time()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.algo.loss(self.network, self.x0, self.attn, *self.eps, train=True).loss
        loss.backward()
        common.sync(self.device)
        backward = common.now()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        common.sync(self.device)
        return backward - start, common.now() - start, time.process_time() - cpu_start

    def useful_flops(self, logit_rows: float) -> dict[str, float]:
        """The step's useful FLOPs (module docstring) by part, for `logit_rows` logit rows."""
        model = self.backbone.model
        units = self.backbone.fsdp_units()
        layers = [m for m in model.modules() if type(m) in units]
        matrices = sum(p.numel() for m in layers for p in m.parameters() if p.dim() == 2)
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        ar = self.variant == "ar"
        tokens = self.L - 1 if ar else 2 * self.L
        pairs = attention_pairs(self.L, self.K, ar)
        vocab = model.get_output_embeddings().weight.shape[0]
        return {
            "body": 3 * self.batch * 2 * matrices * tokens,
            "attention": 3 * self.batch * 2 * 2 * heads * head_dim * pairs * len(layers),
            "output": 3 * 2 * config.hidden_size * vocab * logit_rows,
        }


def attention_pairs(L: int, K: int, ar: bool) -> float:
    """The (query, key) pairs a row attends: AR causal over its L - 1 inputs; BD3-LM's 2L
    input with the causal clean stream: x_t block b its own block and the b clean blocks
    before it, each x_0 token the clean tokens up to itself."""
    if ar:
        return (L - 1) * L / 2
    blocks = L // K
    return K * K * blocks * (blocks + 1) / 2 + L * (L + 1) / 2


def run_model(name, variants, reps, device, bf16, attn_backend) -> dict:
    """The record of one model: per variant the median step and forward + backward ms, the
    logit rows per step, the useful FLOPs by part; per BD3-LM variant the time and FLOP
    ratios over AR."""
    L, batch = MODELS[name]
    torch.manual_seed(0)
    model, mask_id = load_model(name)
    runners = {v: Runner(v, model, mask_id, L, batch, device, bf16, attn_backend) for v in variants}
    del model
    for runner in runners.values():  # warm-up
        runner.step()
    times = {v: ([], [], []) for v in runners}  # fwd + bwd, step, step CPU time
    for runner in runners.values():
        runner.network.rows = 0
    for _ in range(reps):  # interleaved: each variant once per round
        for v, runner in runners.items():
            for samples, seconds in zip(times[v], runner.step(), strict=True):
                samples.append(seconds)
    record = {"L": L, "batch": batch, "mask_id": mask_id, "variants": {}}
    for v, runner in runners.items():
        rows = runner.network.rows / reps
        flops = runner.useful_flops(rows)
        record["variants"][v] = {
            "K": runner.K,
            "step_ms": round(common.median_ms(times[v][1]), 1),
            "fwd_bwd_ms": round(common.median_ms(times[v][0]), 1),
            "cpu_ms": round(common.median_ms(times[v][2]), 1),
            "logit_rows": round(rows, 1),
            "useful_flops": flops,
        }
    if "ar" in runners:
        ar = record["variants"]["ar"]
        for v, row in record["variants"].items():
            if v == "ar":
                continue
            flop = sum(row["useful_flops"].values()) / sum(ar["useful_flops"].values())
            step, fwd_bwd = row["step_ms"] / ar["step_ms"], row["fwd_bwd_ms"] / ar["fwd_bwd_ms"]
            cpu = row["cpu_ms"] / ar["cpu_ms"]
            row["over_ar"] = {
                "time_ratio": round(step, 3),
                "fwd_bwd_ratio": round(fwd_bwd, 3),
                "cpu_time_ratio": round(cpu, 3),
                "flop_ratio": round(flop, 3),
                "time_over_flop": round(step / flop, 3),
                "cpu_time_over_flop": round(cpu / flop, 3),
            }
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--variants", default="ar,bd3lm4,bd3lm16", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast bf16 (GPU)")
    parser.add_argument("--attn-backend", default="sdpa", choices=("sdpa", "flex"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, variants = args.models.split(","), args.variants.split(",")
    for key, given, valid in (("--models", models, MODELS), ("--variants", variants, VARIANTS)):
        bad = [g for g in given if g not in valid]
        if bad:
            parser.error(f"{key}: {', '.join(bad)} unknown; valid: {', '.join(valid)}")
    device = torch.device(args.device)
    load = os.getloadavg()
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average {load[0]:.2f} before")  # fmt: skip
    records = {}
    for name in models:
        records[name] = record = run_model(
            name, variants, args.reps, device, args.bf16, args.attn_backend
        )
        rows = [
            [f"{v}@{name}", r["step_ms"], r["fwd_bwd_ms"], r["cpu_ms"], r["logit_rows"],
             round(sum(r["useful_flops"].values()) / 1e9, 1)]
            for v, r in record["variants"].items()
        ]  # fmt: skip
        header = ["variant@model", "step ms", "fwd+bwd ms", "CPU ms", "logit rows", "useful GFLOP"]
        print(common.table(rows, header), flush=True)
        for v, r in record["variants"].items():
            if "over_ar" in r:
                o = r["over_ar"]
                print(f"{v} / ar, {name} (L={record['L']}, batch {record['batch']}): step time "
                      f"{o['time_ratio']:.2f}x (fwd+bwd {o['fwd_bwd_ratio']:.2f}x, CPU time "
                      f"{o['cpu_time_ratio']:.2f}x), useful-FLOP ratio {o['flop_ratio']:.2f}x -> "
                      f"{o['time_over_flop']:.2f} of it ({_verdict(o['time_over_flop'])}), CPU "
                      f"time {o['cpu_time_over_flop']:.2f} ({_verdict(o['cpu_time_over_flop'])})",
                      flush=True)  # fmt: skip
    after = os.getloadavg()[0]
    print(f"load average {after:.2f} after")
    payload = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16": args.bf16,
        "attn_backend": args.attn_backend,
        "reps": args.reps,
        "load_average": [round(load[0], 2), round(after, 2)],
        "models": records,
    }
    common.write_json(args.json, payload)
    return payload


def _verdict(over_flop: float) -> str:
    return f"{'within' if over_flop <= TARGET else 'NOT within'} {TARGET}x"


if __name__ == "__main__":
    main()
