"""The GPU acceptance run: every GPU-only path checked in one time-boxed run, correctness first
and benchmarks last. `benchmarks/gpu.sh` installs what the machine lacks from the bundle and
calls this script; the results go to OUT/acceptance.json, rewritten after every section so a
run cut short still reports what finished.

    python benchmarks/acceptance.py [--cpu] [--out DIR] [--bundle DIR] [--only A,B] [--budget S]
    python benchmarks/acceptance.py --prepare DIR    # on a CPU machine: the bundle's data

Sections (GPU: each in a process of its own with its time box; --cpu: in process unless
--isolate, toy sizes, GPU-only sections listed as `skipped: <reason>`):
  environment      versions, the card, bf16 / flex / flash-attn availability
  flex_vs_sdpa     BD3-LM training loss and gradients, flex against sdpa, float32 and bf16
  kv_cache         cached against recomputed log-probabilities (BD3-LM, AR), float32 and bf16
  hf_causal        the pretrained causal-LM backbone (models.hf_causal) on a tiny random Llama:
                   2L-pass logits and gradients flex against sdpa (float32, bf16), a bf16
                   training step (finite loss; gradient checkpointing changes no gradient),
                   FSDP units = the decoder layer class (CPU: flex forward only)
  judge_float32    the generative-perplexity judge scores in float32 under bf16 autocast
  pipeline         train -> ppl_eval -> sample_eval through `python main.py` (precision auto)
  ddp_one_gpu      a few steps with the DDP strategy forced on one GPU; a fine-tuning step
                   from them whose loading sanity check runs on the GPU, on rank 0
  fsdp_one_gpu     FSDP with training.ema=0: wrapping, mixed precision, checkpoint save + load
  fp16             trainer.precision=16-mixed training and evaluation
  compile          training.compile=true (inductor on CUDA)
  text8_crop       data=text8-crop (the crop drawn on the step generator's device)
  bench_train      benchmarks/train.py at the paper's small shape, with --baseline
  bench_sample     benchmarks/sample.py, with --baseline

The bundle (scripts for it: benchmarks/gpu_bundle.sh) holds the wheels the GPU machine may lack
(hydra-core, omegaconf, antlr4) and, under DIR/cache, the tokenizer and token caches these
sections read (so `datasets` is never needed there), a tiny judge and a synthetic text8.
transformers is not in it: the judge, the pipeline and hf_causal use the GPU image's own.
Numbers in the JSON are what each section measured; `ok` is false when a check failed; a
section that cannot run here says why in its `skipped: ...` status.

This module is the driver (sections, time boxes, the report); the sections live in
`acceptance_numerics` (random weights, in process), `acceptance_hf_causal` (the pretrained
causal-LM backbone), `acceptance_runs` (main.py runs and the benchmarks), their shared helpers
in `acceptance_common`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:  # after the project (benchmark script names must not shadow it)
    sys.path.append(HERE)
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from benchmarks.acceptance_common import (  # noqa: E402
    TEXT8,
    Context,
    SectionSkipped,
    ensure_judge,
    ensure_text8,
    read_json,
)
from benchmarks.acceptance_hf_causal import section_hf_causal  # noqa: E402
from benchmarks.acceptance_numerics import (  # noqa: E402
    section_flex_vs_sdpa,
    section_judge_float32,
    section_kv_cache,
)
from benchmarks.acceptance_runs import (  # noqa: E402
    section_bench_sample,
    section_bench_train,
    section_compile,
    section_ddp_one_gpu,
    section_environment,
    section_fp16,
    section_fsdp_one_gpu,
    section_pipeline,
    section_text8_crop,
)

TOTAL_BUDGET_S = 360
OUT_OF_TIME = "out of time"


class SectionTimeout(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    run: object
    seconds: int  # time box on the GPU
    gpu_only: str | None = None  # the reason it is skipped with --cpu


SECTIONS = [  # time boxes (s) summing to TOTAL_BUDGET_S
    Section("environment", section_environment, 10),
    Section("flex_vs_sdpa", section_flex_vs_sdpa, 30),
    Section("kv_cache", section_kv_cache, 15),
    Section("hf_causal", section_hf_causal, 60),
    Section("judge_float32", section_judge_float32, 10),
    Section("pipeline", section_pipeline, 45),
    Section("ddp_one_gpu", section_ddp_one_gpu, 25, "DDP forced on one GPU (NCCL)"),
    Section("fsdp_one_gpu", section_fsdp_one_gpu, 25, "Lightning has no FSDP on CPU"),
    Section("fp16", section_fp16, 20, "no float16 autocast training on CPU"),
    Section("compile", section_compile, 35, "inductor on CUDA (CPU compile: test_compile.py)"),
    Section("text8_crop", section_text8_crop, 15),
    Section("bench_train", section_bench_train, 45),
    Section("bench_sample", section_bench_sample, 25),
]


# ----------------------------------------------------------------------------------------------
# Running sections
# ----------------------------------------------------------------------------------------------
def run_in_process(section: Section, ctx: Context, seconds: int) -> dict:
    """Run one section here, time-boxed by SIGALRM; -> its record."""

    def alarm(signum, frame):
        raise SectionTimeout(f"timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, seconds))
    start = time.perf_counter()
    try:
        record = {"status": "ok", "result": section.run(ctx)}
    except SectionSkipped as err:
        record = {"status": f"skipped: {err}"}
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the run goes on
        if isinstance(err, SectionTimeout):
            record = {"status": "timeout", "error": str(err)}
        else:
            lines = traceback.format_exception(type(err), err, err.__traceback__)
            record = {"status": "failed", "error": "".join(lines)[-4000:]}
        if getattr(err, "partial", None):  # what the section measured before it stopped
            record["result"] = err.partial
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def run_in_child(section: Section, ctx: Context, seconds: int) -> dict:
    """Run one section in a process of its own (a CUDA fault cannot take the others down)."""
    path = os.path.join(ctx.work, "sections", f"{section.name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--section", section.name, "--out", ctx.out,
           "--work", ctx.work, "--bundle", ctx.bundle, "--seconds", str(seconds)]  # fmt: skip
    start = time.perf_counter()
    log_path = os.path.join(ctx.work, "sections", f"{section.name}.log")
    with open(log_path, "w") as log:
        try:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           timeout=seconds + 15)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"killed after {seconds + 15} s",
                    "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if not os.path.exists(path):
        with open(log_path) as f:
            tail = f.read()[-3000:]
        return {"status": "failed", "error": f"no result; log tail:\n{tail}",
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    return read_json(path)


def write_report(ctx: Context, report: dict) -> None:
    report["ok"] = all(
        r["status"] == "ok" or r["status"].startswith("skipped")
        for r in report["sections"].values()
    )
    path = os.path.join(ctx.out, "acceptance.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


# The CPU dry run's time boxes are the GPU boxes times this: the toy sections are small, but a
# shared 2-core machine (CI, the test suite's parallel workers) can run them several times slower.
CPU_SLACK = 4


def run_all(ctx: Context, only: list[str] | None, budget: int, isolate: bool) -> dict:
    report = {"mode": "cpu dry run" if ctx.cpu else "gpu", "budget_s": budget, "sections": {}}
    scale = CPU_SLACK if ctx.cpu else 1
    deadline = time.monotonic() + budget * scale
    for section in SECTIONS:
        if only and section.name not in only:
            continue
        left = int(deadline - time.monotonic())
        if ctx.cpu and section.gpu_only:
            record = {"status": f"skipped: {section.gpu_only}"}
        elif left < 5:
            record = {"status": f"skipped: {OUT_OF_TIME} (budget {budget} s)"}
        else:
            seconds = min(section.seconds * scale, left)
            runner = run_in_child if isolate else run_in_process
            record = runner(section, ctx, seconds)
        report["sections"][section.name] = record
        print(f"[acceptance] {section.name}: {record['status']} ({record.get('seconds', 0)} s)",
              flush=True)  # fmt: skip
        write_report(ctx, report)
    return report


def prepare(ctx: Context) -> None:
    """On a CPU machine with the full requirements: build the tokenizer and token caches that
    the GPU sections read, the judge and the synthetic text8, under ctx.bundle."""
    import dataloader
    import main

    os.environ["BD3LMS_CACHE"] = ctx.cache
    for overrides in ([], [*TEXT8, f"data.source={ensure_text8(ctx)}"]):
        cfg = main.compose(["experiment=smoke", *overrides], ctx.run_dir("prepare"))
        vocab = dataloader.get_vocab(cfg.data)
        for split in ("train", "valid"):
            dataloader.get_dataset(cfg.data, vocab, split, cfg.model.length)
    ensure_judge(ctx)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU at toy sizes")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--bundle", default=os.path.join(ROOT, ".gpu_bundle"))
    parser.add_argument("--work", default=None, help="runs and logs (default: a new temp dir)")
    parser.add_argument("--only", default=None, help="comma-separated section names")
    parser.add_argument("--budget", type=int, default=TOTAL_BUDGET_S, help="seconds in all")
    parser.add_argument(
        "--isolate", action="store_true", help="each section in its own process (GPU default)"
    )
    parser.add_argument("--prepare", default=None, metavar="DIR", help="build the bundle data")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # a child's section
    parser.add_argument("--seconds", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bd3lms-acceptance-"))
    if args.prepare:
        prepare(Context(cpu=True, out=work, bundle=args.prepare, work=work))
        return None
    cpu = args.cpu or not torch.cuda.is_available()
    bundle = os.path.abspath(args.bundle)
    ctx = Context(cpu=cpu, out=os.path.abspath(args.out), bundle=bundle, work=work)
    os.makedirs(ctx.out, exist_ok=True)
    if args.section:  # a child process of run_in_child
        section = next(s for s in SECTIONS if s.name == args.section)
        record = run_in_process(section, ctx, args.seconds or section.seconds)
        path = os.path.join(ctx.work, "sections", f"{section.name}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=2, default=str)
        return record
    only = args.only.split(",") if args.only else None
    with contextlib.suppress(KeyboardInterrupt):
        report = run_all(ctx, only, args.budget, isolate=args.isolate or not cpu)
        print(json.dumps({k: v["status"] for k, v in report["sections"].items()}, indent=1))
        return report
    return None


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result is None or result.get("ok") else 1)
