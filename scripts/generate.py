"""Stream samples from a checkpoint, block by block as the sampler commits them.

    python scripts/generate.py CHECKPOINT --prompt "To be, or not to be"
    python scripts/generate.py CHECKPOINT --prompt-file prompts.txt --max-new-tokens 64
    echo "O Romeo" | python scripts/generate.py CHECKPOINT --kv-cache
    python scripts/generate.py CHECKPOINT --num-samples 2        # unconditional (MDLM too)

CHECKPOINT: anything the project loads (evaluation.loading): an HF directory written by
scripts/export_hf.py or a hub id in the released format, one of our Lightning .ckpt files, or
the reference's pickled .ckpt (both exported to a temporary directory first); --tokenizer
(a directory, or a name the data configs take: gpt2, bert-base-uncased) for a checkpoint
without one of its own, as the reference's .ckpt. Prompts come from --prompt (repeatable),
else --prompt-file (one per line), else stdin (one per line); with none of them, or with
--num-samples N, unconditional samples (1, or N); MDLM and SEDD take no prompt. Each job (a
prompt, or one unconditional sample) is sampled by `model.generate` (hf/, the
sample_eval sampler) at batch size 1, all jobs drawing in turn from one generator seeded with
--seed, as sample_eval's batches do: job i gives sample i of `mode=sample_eval` with that seed,
loader.eval_batch_size=1 and the same prompts (sampling.prefix_file) or, unconditional,
sampling.num_sample_batches=N. Text goes to stdout as each block is committed; the tokens,
seconds, tokens/s and NFE of every sample go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import UserError  # noqa: E402


class BlockPrinter:
    """A streamer (put / end) that prints each committed block's text at once. The first put
    (the prompt) is printed as given; decoding the whole sample so far and printing the new
    suffix keeps multi-token characters intact. out: default, sys.stdout when constructed."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, sys.stdout if out is None else out
        self.ids: list[int] = []
        self.printed = ""

    def put(self, value) -> None:
        row = value[0] if value.ndim > 1 else value
        self.ids += row.tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.printed) :] if text.startswith(self.printed) else text
        self.printed = text
        self.out.write(new)
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()
        self.ids, self.printed = [], ""


def read_prompts(args, stdin) -> list[str] | None:
    """The prompts to continue, or None for unconditional samples."""
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise UserError(f"--num-samples={args.num_samples} must be >= 1")
        if args.prompt or args.prompt_file:
            raise UserError(
                "--num-samples draws unconditional samples: give it or --prompt / --prompt-file"
            )
        return None
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise UserError(f"--prompt-file={args.prompt_file} has no prompts")
        return prompts
    if stdin is not None and not stdin.isatty():
        prompts = [line.rstrip("\n") for line in stdin if line.strip()]
        return prompts or None
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="HF directory, hub id, our or the reference's .ckpt")
    parser.add_argument("--tokenizer", help="tokenizer directory or name (gpt2, ...)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", help="a file of prompts, one per line")
    parser.add_argument("--num-samples", type=int, help="unconditional samples (no prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nucleus-p", type=float, default=1.0)
    parser.add_argument("--num-steps", type=int, default=1000, help="DDPM steps (algo.T)")
    parser.add_argument("--kv-cache", action="store_true")
    parser.add_argument("--no-first-hitting", action="store_true", help="DDPM update instead")
    parser.add_argument("--var-length", action="store_true", help="stop at EOS / low entropy")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16")
    return parser.parse_args(argv)


def run(args, stdin) -> None:
    import torch

    from evaluation.loading import load
    from hf.generation import checkpoint_kind, objective_from_config, token_ids

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    prompts = read_prompts(args, stdin)
    with contextlib.ExitStack() as stack:  # a temporary export lives until the model is loaded
        model, tokenizer = load(
            args.checkpoint, args.tokenizer, stack, key="CHECKPOINT",
            tokenizer_key="--tokenizer NAME", dtype=args.dtype, device_map=args.device,
        )  # fmt: skip
    kind = checkpoint_kind(model)
    objective = objective_from_config(model.config, token_ids(model.config)[1], kind)
    if prompts is not None and not objective.supports_prompts:
        raise UserError(
            f"CHECKPOINT={args.checkpoint}: the {kind} objective samples without a prompt; "
            "give --num-samples N (unconditional samples) instead of prompts"
        )
    # one generator for all jobs, continued from job to job as across sample_eval's batches
    generator = torch.Generator().manual_seed(args.seed)
    options = dict(
        max_new_tokens=args.max_new_tokens, generator=generator, nucleus_p=args.nucleus_p,
        num_steps=args.num_steps, kv_cache=args.kv_cache, first_hitting=not args.no_first_hitting,
        var_length=args.var_length, return_dict_in_generate=True,
    )  # fmt: skip
    jobs = prompts if prompts is not None else [None] * (args.num_samples or 1)
    total_tokens = total_seconds = 0.0
    for prompt in jobs:
        printer = BlockPrinter(tokenizer)
        start = time.perf_counter()
        try:
            if prompt is None:
                result = model.generate(num_samples=1, streamer=printer, **options)
                new = int(result.lengths[0])
            else:
                ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
                ids = ids.input_ids.to(model.device)
                result = model.generate(ids, streamer=printer, **options)
                new = int(result.lengths[0]) - ids.shape[1]
        except ValueError as err:
            raise UserError(str(err).splitlines()[0]) from None
        seconds = time.perf_counter() - start
        total_tokens, total_seconds = total_tokens + new, total_seconds + seconds
        print(
            f"[{new} tokens in {seconds:.2f} s, {new / max(seconds, 1e-9):.1f} tokens/s, "
            f"NFE {int(result.nfe_denoise[0])} (total {int(result.nfe_total[0])}), "
            f"stop: {result.stop_reason[0]}]",
            file=sys.stderr,
        )
    if len(jobs) > 1:
        rate = total_tokens / max(total_seconds, 1e-9)
        print(f"[all: {int(total_tokens)} tokens, {rate:.1f} tokens/s]", file=sys.stderr)


def main(argv: list[str] | None = None, stdin=None) -> int:
    args = parse_args(argv)
    try:
        run(args, sys.stdin if stdin is None else stdin)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
