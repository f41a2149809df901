"""Train a small GPT-2 judge for generative perplexity on the embedded Shakespeare corpus, with
the demo's tokenizer, and save it as a local Hugging Face directory.

    python scripts/train_judge.py OUT_DIR [--steps 1000] [--layers 4] [--width 192] [--heads 4]
        [--context 256] [--batch-size 8] [--lr 2e-3] [--seed 0] [--force] [Hydra overrides...]

The tokenizer and the data are the demo's (`experiment=demo`, i.e. `shakespeare-bpe-4096`, the
train split of the embedded corpus in the same wrapped rows of [BOS] + 126 tokens + [EOS]);
extra Hydra overrides (e.g. `data.cache_dir=...`) are passed to that composition. Training
windows are `--context` tokens cut from consecutive rows, so the judge has seen every position a
retokenised sample may reach. The validation perplexity is measured on every row of the valid
split as they are (128 tokens, like a demo sample), and, as metrics.GenerativePerplexity scores
samples, targets equal to the EOS id (id 0, `<|endoftext|>`, which is also the BOS) are neither
trained on nor scored, and position 0 is never a target.

OUT_DIR then holds the model (`save_pretrained`), the tokenizer (`save_pretrained`) and
`judge_train.json` (options, parameter count, validation perplexity, seconds), so that
`eval.gen_ppl_eval_model_name_or_path=OUT_DIR` works offline. The directory is written under a
temporary name next to OUT_DIR and renamed at the end; an existing OUT_DIR is an error unless
--force. CPU runs are seeded and use deterministic kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402

from utils import follow_umask  # noqa: E402

IGNORE = -100  # the label transformers' causal-LM loss skips


@dataclasses.dataclass(frozen=True)
class JudgeOptions:
    steps: int = 1000
    layers: int = 4
    width: int = 192
    heads: int = 4
    context: int = 256  # training window; a multiple of the data rows' length
    positions: int = 256  # n_positions of the model (>= context)
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    dropout: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch_size: int = 32
    log_every: int = 100


def compose_demo_cfg(overrides: list[str] | None = None):
    """The demo's Hydra config (`experiment=demo` plus `overrides`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(os.path.join(ROOT, "configs"), version_base=None):
        return compose("config", overrides=["experiment=demo", *(overrides or [])])


def load_data(overrides: list[str] | None = None):
    """-> (vocab, train rows (N, L), valid rows (M, L)) of the demo's data and tokenizer."""
    import dataloader

    cfg = compose_demo_cfg(overrides)
    vocab = dataloader.get_vocab(cfg.data)
    length = cfg.model.length
    train = dataloader.get_dataset(cfg.data, vocab, "train", length).input_ids
    valid = dataloader.get_dataset(cfg.data, vocab, "valid", length).input_ids
    return vocab, torch.as_tensor(train).long(), torch.as_tensor(valid).long()


def build_model(opts: JudgeOptions, tokenizer):
    """A randomly initialised GPT2LMHeadModel whose vocabulary covers every tokenizer id."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=opts.positions,
        n_embd=opts.width,
        n_layer=opts.layers,
        n_head=opts.heads,
        resid_pdrop=opts.dropout,
        embd_pdrop=opts.dropout,
        attn_pdrop=opts.dropout,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    torch.manual_seed(opts.seed)
    return GPT2LMHeadModel(config)


def labels_for(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Labels for the causal-LM loss: the ids, with EOS targets ignored (GenerativePerplexity
    does not score them either)."""
    labels = ids.clone()
    if eos_id is not None:
        labels[labels == eos_id] = IGNORE
    return labels


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, eos_id: int | None, batch_size: int) -> tuple[float, int]:
    """-> (summed NLL in nats, number of scored targets) over `rows` (N, n): targets 1..n-1 of
    every row, EOS targets skipped."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels_for(ids[:, 1:], eos_id)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(nll)
        count += int((targets != IGNORE).sum())
    model.train()
    return total, count


def lr_at(step: int, opts: JudgeOptions) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio x lr at the last step."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


def training_windows(rows: torch.Tensor, context: int) -> torch.Tensor:
    """(N, n) consecutive rows -> (N - r + 1, context) windows of r = context / n rows each."""
    n = rows.shape[1]
    if context % n:
        raise ValueError(f"--context={context} must be a multiple of the rows' length {n}")
    r = context // n
    if rows.shape[0] < r:
        raise ValueError(f"{rows.shape[0]} rows cannot make a window of {context} tokens")
    return torch.stack([rows[i : rows.shape[0] - r + 1 + i] for i in range(r)], 1).flatten(1)


def train(opts: JudgeOptions, vocab, train_rows, valid_rows, log=print):
    """Train a judge in memory. -> (model, metrics dict)."""
    if opts.context > opts.positions:
        raise ValueError(f"--context={opts.context} exceeds --positions={opts.positions}")
    torch.use_deterministic_algorithms(True)
    tokenizer = vocab.tokenizer
    eos = tokenizer.eos_token_id
    model = build_model(opts, tokenizer)
    model.train()
    windows = training_windows(train_rows, opts.context)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opts.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=opts.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(opts.seed)
    start = time.time()
    running = 0.0
    for step in range(opts.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opts)
        index = torch.randint(windows.shape[0], (opts.batch_size,), generator=generator)
        ids = windows[index]
        loss = model(input_ids=ids, labels=labels_for(ids, eos)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optimizer.step()
        running += float(loss.detach())
        if opts.log_every and ((step + 1) % opts.log_every == 0 or step + 1 == opts.steps):
            seen = (step % opts.log_every) + 1
            log(
                f"step {step + 1}/{opts.steps}  train loss {running / seen:.3f}  "
                f"lr {lr_at(step, opts):.2e}  {time.time() - start:.0f} s"
            )
            running = 0.0
    train_seconds = time.time() - start
    nll, count = evaluate(model, valid_rows, eos, opts.eval_batch_size)
    metrics = {
        "valid_nll": nll / count,
        "valid_ppl": math.exp(nll / count),
        "valid_tokens": count,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_seen": opts.steps * opts.batch_size * opts.context,
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - start - train_seconds,
        "torch_threads": torch.get_num_threads(),
    }
    return model, metrics


def train_judge(
    out_dir: str,
    opts: JudgeOptions | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    log=print,
) -> dict:
    """Train the judge and save it to `out_dir` (atomically). -> the judge_train.json dict."""
    from utils import atomic_path

    opts = opts or JudgeOptions()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists (use --force to replace it)")
    vocab, train_rows, valid_rows = load_data(overrides)
    log(
        f"judge: {opts.layers} layers, width {opts.width}, context {opts.context}; "
        f"{train_rows.shape[0]} train rows, {valid_rows.shape[0]} valid rows of "
        f"{train_rows.shape[1]} tokens; vocabulary {len(vocab.tokenizer)}"
    )
    model, metrics = train(opts, vocab, train_rows, valid_rows, log)
    result = {
        "options": dataclasses.asdict(opts),
        "tokenizer": vocab.tokenizer.name_or_path,
        "eos_token_id": vocab.tokenizer.eos_token_id,
        "overrides": list(overrides or []),
        **metrics,
    }
    if force and os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        vocab.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "judge_train.json"), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        follow_umask(tmp)  # safetensors writes the weights 0600
    log(
        f"validation perplexity {metrics['valid_ppl']:.2f} over {metrics['valid_tokens']} tokens; "
        f"{metrics['num_parameters'] / 1e6:.2f}M parameters; {metrics['train_seconds']:.0f} s "
        f"training -> {out_dir}"
    )
    return result


def parse_args(argv: list[str] | None = None):
    defaults = JudgeOptions()
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("out_dir")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for experiment=demo")
    for field in dataclasses.fields(JudgeOptions):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=None)
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    chosen = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(JudgeOptions)
        if getattr(args, f.name) is not None
    }
    return args, dataclasses.replace(defaults, **chosen)


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    try:
        train_judge(args.out_dir, opts, args.overrides, args.force)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
