"""Training-step benchmark: AR, MDLM, BD3-LM K=4 and K=16.

A step is forward + backward + AdamW step on random tokens. Reported per variant: median step
time, tokens/s (B x L data tokens per step) and peak memory. Memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the growth of the process's peak RSS
(VmHWM, /proc/self/status) over its RSS before building the model, measured in a fresh
spawned process per variant (weights, AdamW state and activations of 2 steps).

--baseline also runs every variant as first written (benchmarks/baselines.py), interleaved with
the optimised runs in the same process, so the two columns are measured side by side: logits
and SUBS at every position of the network input (baselines.DenseNELBO, as the reference), the
full last layer (baselines.unpruned) and SDPA over the dense (2L)^2 mask
(baselines.DenseAttentionNetwork).

Usage: python benchmarks/train.py [--quick] [--baseline] [--json PATH] [--device cpu|cuda]
       [--shapes w128_L128,w256_L512] [--backends sdpa,flex,flash_attn] [--bf16] [--compile]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from common import TRAIN_VARIANTS, baselines, build_algorithm, build_dit  # noqa: E402

from models.network import BackboneNetwork  # noqa: E402

# name -> (width, layers, heads, L, vocab, batch)
SHAPES = {
    "w128_L128": (128, 4, 4, 128, 30523, 8),
    "w256_L512": (256, 4, 4, 512, 8193, 4),
    "small_L1024": (768, 12, 12, 1024, 50258, 16),  # the paper's small model (GPU)
    "toy": (32, 2, 2, 32, 513, 4),  # a seconds-long check that the script runs
}


class Runner:
    """One (variant, shape, backend, mode): model, optimiser, data; `step()` times one step."""

    def __init__(self, variant, shape, backend, optimised, device, bf16=False, compile_=False):
        name, block = TRAIN_VARIANTS[variant]
        width, layers, heads, L, vocab, batch = SHAPES[shape]
        self.device, self.bf16 = device, bf16
        self.backbone = build_dit(
            vocab, width, layers, heads, name == "ar", backend, optimised, init_std=0.02
        ).to(device)
        if compile_:
            for i, block_module in enumerate(self.backbone.blocks):
                self.backbone.blocks[i] = torch.compile(block_module)
        network = BackboneNetwork if optimised else baselines.DenseAttentionNetwork
        self.network = network(self.backbone)
        self.algo = build_algorithm(name, L, block, vocab - 1, optimised)
        self.opt = torch.optim.AdamW(self.backbone.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.randint(0, vocab - 1, (batch, L), generator=gen).to(device)
        self.attn = torch.ones(batch, L, device=device)
        self.eps = (torch.tensor(1e-3, device=device), torch.tensor(1.0, device=device))
        self.tokens = batch * L
        self.flops = self._model_flops(name, block, width, layers, L, vocab, batch)

    @staticmethod
    def _model_flops(name, block, width, layers, L, vocab, batch) -> float:
        """Useful FLOPs per step (forward + backward = 3x forward): the body over S = L (2L
        for BD3-LM, whose last layer needs only keys and values of the x_0 half), attention
        over the allowed mask entries, the output layer over the positions that need logits
        (L for AR, about L/2 for the masked-diffusion objectives in expectation)."""
        S = 2 * L if name == "bd3lm" else L
        body = 2 * 12 * width * width * layers * S
        if name == "bd3lm":
            body -= 2 * 10 * width * width * L  # last layer, x_0 rows: only K/V (2 of 12)
        if name == "ar":
            allowed = L * (L + 1) / 2
        elif name == "mdlm":
            allowed = L * L
        else:
            nb, K = L // block, block
            allowed = nb * K * K + K * K * nb * (nb - 1) / 2 + K * K * nb * (nb + 1) / 2
        attention = 2 * 2 * allowed * width * layers
        head = 2 * width * vocab * (L if name == "ar" else L / 2)
        return 3 * batch * (body + attention + head)

    def step(self) -> float:
        common.sync(self.device)
        start = common.now()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.algo.loss(self.network, self.x0, self.attn, *self.eps, train=True)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        common.sync(self.device)
        return common.now() - start


def _memory_worker(args, queue) -> None:
    variant, shape, backend, optimised, device_name, bf16 = args
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(device_name)
    before = common.current_rss_mb()
    runner = Runner(variant, shape, backend, optimised, device, bf16)
    for _ in range(2):
        runner.step()
    queue.put(common.peak_rss_mb() - before)


def cpu_peak_memory_mb(args) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(args, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def peak_tflops(device: torch.device, bf16: bool) -> float | None:
    """Dense peak of the card for MFU (H100/H200 SXM: 989 TFLOP/s bf16, 67 fp32)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        return 989.0 if bf16 else 67.0
    if "A100" in name:
        return 312.0 if bf16 else 19.5
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 3 min CPU)")
    parser.add_argument("--baseline", action="store_true", help="also run with switches off")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="w128_L128,w256_L512")
    parser.add_argument("--variants", default="ar,mdlm,bd3lm4,bd3lm16")
    parser.add_argument("--backends", default="sdpa")
    parser.add_argument("--bf16", action="store_true", help="autocast bf16 (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (3 if args.quick else 7)
    modes = [True, False] if args.baseline else [True]
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    backends = args.backends.split(",")
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}")

    step_ms, tok_s, memory, mfu = {}, {}, {}, {}
    for shape in shapes:
        for backend in backends:
            runners = {}
            for variant in variants:
                if backend == "flash_attn" and variant.startswith("bd3lm"):
                    continue  # flash-attn cannot express the block-diffusion mask
                if backend == "flash_attn" and not _flash_ok(device):
                    continue
                if backend == "flex" and device.type != "cuda":
                    continue  # flex has no CPU backward
                for optimised in modes:
                    key = _key(variant, shape, backend, optimised, len(backends) > 1)
                    runners[key] = Runner(
                        variant, shape, backend, optimised, device, args.bf16, args.compile
                    )
            for runner in runners.values():  # warm-up (and compilation)
                runner.step()
            times = {key: [] for key in runners}
            for _ in range(reps):  # interleaved: every variant and mode once per round
                for key, runner in runners.items():
                    times[key].append(runner.step())
            peak = peak_tflops(device, args.bf16)
            for key, runner in runners.items():
                ms = common.median_ms(times[key])
                step_ms[key] = round(ms, 1)
                tok_s[key] = round(runner.tokens / ms * 1e3)
                if peak:
                    mfu[key] = round(runner.flops / (ms / 1e3) / (peak * 1e12), 3)
                print(f"{key}: {ms:.1f} ms/step, {tok_s[key]} tokens/s", flush=True)
            if device.type == "cuda":
                for key, runner in runners.items():
                    torch.cuda.reset_peak_memory_stats(device)
                    runner.step()
                    memory[key] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                del runners
                torch.cuda.empty_cache()
    if device.type == "cpu" and not args.no_memory:
        for key in list(step_ms):
            if key.endswith("_baseline") and args.quick:
                continue
            variant, shape = key.split("@")[0], key.split("@")[1].removesuffix("_baseline")
            optimised = not key.endswith("_baseline")
            memory[key] = round(
                cpu_peak_memory_mb((variant, shape, "sdpa", optimised, "cpu", False))
            )

    rows, ratios = [], {}
    for key in step_ms:
        if key.endswith("_baseline"):
            continue
        base = step_ms.get(key + "_baseline")
        rows.append(
            [key, step_ms[key], base if base else "", f"{base / step_ms[key]:.2f}x" if base else "",
             tok_s[key], memory.get(key, ""), mfu.get(key, "")]
        )  # fmt: skip
    flop_ratios = {}
    for shape in shapes:
        b, m = step_ms.get(f"bd3lm4@{shape}"), step_ms.get(f"mdlm@{shape}")
        if b and m:
            ratios[shape] = round(b / m, 3)
        width, layers, _, L, vocab, batch = SHAPES[shape]
        bd3 = Runner._model_flops("bd3lm", 4, width, layers, L, vocab, batch)
        mdlm = Runner._model_flops("mdlm", L, width, layers, L, vocab, batch)
        flop_ratios[shape] = round(bd3 / mdlm, 3)
    header = ["variant@shape", "step ms", "baseline ms", "speed-up", "tokens/s", "peak MB"]
    print(common.table(rows, header + ["MFU"]))
    for shape, r in ratios.items():
        line = f"BD3-LM K=4 / MDLM step time, {shape}: {r:.2f}x"
        if args.baseline:
            b, m = step_ms.get(f"bd3lm4@{shape}_baseline"), step_ms.get(f"mdlm@{shape}_baseline")
            if b and m:
                line += f" (baseline {b / m:.2f}x)"
        line += f"  [bd3lm4 {step_ms[f'bd3lm4@{shape}']} ms, mdlm {step_ms[f'mdlm@{shape}']}]"
        print(line + f"; useful-FLOP ratio {flop_ratios[shape]:.2f}x")
    memory_kind = (
        "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) growth"
    )
    common.write_json(
        args.json,
        {
            "device": str(device),
            "step_ms": step_ms,
            "tokens_per_s": tok_s,
            "peak_memory_mb": memory,
            "memory_measure": memory_kind,
            "mfu": mfu,
            "ratio_bd3lm4_over_mdlm": ratios,
            "flop_ratio_bd3lm4_over_mdlm": flop_ratios,
            "reps": reps,
        },
    )


def _key(variant, shape, backend, optimised, show_backend) -> str:
    key = f"{variant}@{shape}" + (f"/{backend}" if show_backend else "")
    return key if optimised else key + "_baseline"


def _flash_ok(device: torch.device) -> bool:
    from models.attention import flash_available

    return device.type == "cuda" and flash_available()


if __name__ == "__main__":
    main()
