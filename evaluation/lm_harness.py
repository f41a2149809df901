"""The lm-evaluation-harness model `bd3lm`: likelihoods and generations of our checkpoints.

    BD3LMHarness(checkpoint=PATH, mc_samples=8, seed=0, device="cpu", batch_size=1,
                 tokenizer=None, dtype=None, kv_cache=None, nucleus_p=1.0)

PATH: anything the project loads (evaluation.loading): an HF directory (scripts/export_hf.py;
the released format) or hub id, one of our Lightning .ckpt files, or the reference's pickled
.ckpt (both exported to a temporary HF directory first, hf.export.loadable); SSD-LM
checkpoints (no likelihood bound, no HF model) are refused. The tokenizer is `tokenizer` (a
directory or a name the data configs accept, such as gpt2) when given, else the one saved with
the checkpoint, else gpt2 for the released repositories; the reference's .ckpt needs it (its
token ids are then the data pipeline's for that tokenizer). batch_size: requests per forward
("auto": max_batch_size, default 16); the noise is drawn per request in order, so estimates
do not depend on it. evaluation.estimators computes the estimates below.
The objective is the checkpoint's family (hf.generation.checkpoint_kind): AR, BD3-LM
(block size K), MDLM (one block of the window) or SEDD, and every estimate below calls that
objective's own loss on an x_t built here, so the weights and the score are training's.

loglikelihood(context, continuation): the two are encoded together and split at the context's
end (as lm-eval's HF model does), BOS at position 0 as in training; the sequence is cut from
the left to the trained window (BOS kept), and the block grid is counted from position 0.
- AR: the exact log-likelihood of the continuation (the AR loss at its positions).
- BD3-LM / MDLM / SEDD: minus a conditional NELBO (paper Sec. 3, Eq. 8 with the context
  clean): every continuation token is masked with probability t of its block (one t for the
  window when K = L) and weighted as in training (1/t under the log-linear schedule; dsigma
  times the score entropy for SEDD); context tokens are never masked, also in the block that
  straddles the boundary, and later blocks condition on the clean x_0 of earlier ones.
  Positions after the continuation are unknown: masked and never scored (the input is the
  trained window; BD3-LM's blocks after the continuation cannot influence it anyway). t is
  drawn per block in the objective's evaluation interval (t = 1 for K = 1, where the bound is
  the exact NLL and does not depend on the draw) with antithetic strata over the
  `mc_samples` draws, which are averaged. A lower bound on log p(continuation | context).
  Each request's noise comes from a generator seeded by (seed, its context's tokens): the
  options of a multiple-choice question share their noise (common random numbers), and no
  estimate depends on the batch size or the order of the requests.
  is_greedy: every continuation token is the argmax (mask token excluded) given the clean
  context and all continuation tokens masked: per block for BD3-LM, whose blocks see the
  clean continuation before them; at once for MDLM and SEDD. An approximation of greedy
  decoding for diffusion models, exact for AR.
loglikelihood_rolling(text): the same bound over windows of the trained context, summed:
  [BOS] + window - 1 tokens each (ppl_eval's rows, every token noised), except the last,
  shorter window, which takes the tokens before it as clean context.
generate_until(context, gen_kwargs): `model.generate` (the sample_eval sampler, KV cache when
  the model allows it) with `max_gen_toks` (default 256), greedy token draws unless the
  request sets do_sample=True, cut at the first EOS and the first `until` string; MDLM and
  SEDD checkpoints (their samplers take no prompt) and blocks that leave no room for a prompt
  are refused.
kind: ar, bd3lm, mdlm or sedd, to override the family read from the checkpoint (an HF export
  without `parameterization` cannot tell a time-conditioned MDLM from SEDD). Unknown keyword
  arguments (a typo in --model_args) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from torch import Tensor

from evaluation.estimators import Estimators
from evaluation.loading import load
from utils import UserError

try:
    from lm_eval.api.model import LM
except ImportError as err:  # pragma: no cover - requirements-eval.txt
    raise ImportError(
        "evaluation.lm_harness needs lm-eval: pip install -r requirements-eval.txt"
    ) from err

KINDS = ("ar", "bd3lm", "mdlm", "sedd")  # the families the harness scores
GREEDY_NUCLEUS = 1e-300  # a nucleus that keeps only the top-1 token: greedy token draws


def _batch_size(batch_size, max_batch_size) -> int:
    """Requests per forward pass: lm-eval's batch_size, where "auto" (or "auto:N") means
    max_batch_size, default 16 (each request is mc_samples rows of the window)."""
    text = str(1 if batch_size is None else batch_size)
    if text.startswith("auto"):
        return int(max_batch_size or 16)
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"batch_size={batch_size}: give a number >= 1 or auto")
    return int(text)


def _harness_device(device: str) -> str:
    """lm-eval's CLI passes device cuda:0 unless --device is given: on a machine without CUDA
    that default means the CPU (as for lm-eval's own HF model), with a warning line."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        from utils import get_logger

        get_logger("bd3lms").warning(f"device={device}: CUDA is not available; using the CPU")
        return "cpu"
    return device


MODEL_ARGS = (
    "checkpoint", "mc_samples", "seed", "device", "batch_size", "max_batch_size", "dtype",
    "kv_cache", "nucleus_p", "tokenizer", "kind",
)  # fmt: skip


def check_model_args(args: dict) -> None:
    """UserError (one line) for --model_args that BD3LMHarness refuses: unknown keys,
    mc_samples < 1, an unknown kind. Cheap: scripts/run_lm_eval.py calls it before lm-eval
    indexes its tasks."""
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise UserError(
            f"--model_args {', '.join(unknown)}: unknown; valid: {', '.join(MODEL_ARGS)}"
        )
    mc_samples = args.get("mc_samples", 1)
    if not str(mc_samples).isdigit() or int(mc_samples) < 1:
        raise UserError(f"mc_samples={mc_samples} must be an integer >= 1")
    kind = args.get("kind")
    if kind is not None and kind not in KINDS:
        raise UserError(f"kind={kind}: valid: {', '.join(KINDS)}")


class BD3LMHarness(Estimators, LM):
    """lm-eval's LM over our checkpoints; see the module docstring for the estimators."""

    def __init__(
        self,
        checkpoint: str,
        mc_samples: int = 8,
        seed: int = 0,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        dtype: str | None = None,
        kv_cache: bool | None = None,
        nucleus_p: float = 1.0,
        tokenizer: str | None = None,
        kind: str | None = None,
        **unknown,
    ):
        super().__init__()
        from hf.generation import checkpoint_kind, objective_from_config, token_ids
        from models.network import BackboneNetwork

        check_model_args({"mc_samples": mc_samples, "kind": kind, **unknown})
        self._stack = contextlib.ExitStack()
        self.model, self.tokenizer = load(
            checkpoint, tokenizer, self._stack, tokenizer_key="tokenizer=NAME in --model_args"
        )
        if dtype is not None or device is not None:
            from hf.configuration import resolve_device, resolve_dtype

            target = resolve_dtype(dtype)
            if target not in (None, "auto"):
                self.model.to(target)
            if device is not None:
                self.model.to(resolve_device(_harness_device(str(device))))
        self.model.eval()
        self.config = self.model.config
        self.bos, self.mask, self.eos = token_ids(self.config)
        self.kind = kind or checkpoint_kind(self.model)
        self.objective = objective_from_config(self.config, self.mask, self.kind)
        self.network = BackboneNetwork(self.model.backbone)
        self.window = int(self.config.model_length)
        self.is_ar = self.kind == "ar"
        self.block = 1 if self.is_ar else int(self.objective.block_size)
        self.mc_samples = int(mc_samples)
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.seed = int(seed)
        self.kv_cache = self.objective.supports_kv_cache if kv_cache is None else bool(kv_cache)
        self.nucleus_p = float(nucleus_p)
        self.interval = self.objective.eval_interval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's HF split: trailing spaces of the context move to the continuation, both
        encoded together and split at the context's token count."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self._encode(context + continuation)
        n_ctx = len(self._encode(context))
        return whole[:n_ctx], whole[n_ctx:]

    def _sequence(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """[BOS] + ctx + cont cut from the left to the window (BOS kept) -> (ids, start of the
        continuation)."""
        if len(cont) + 1 > self.window:
            cont = cont[-(self.window - 1) :]  # the harness's own rule: keep the tail
        keep = self.window - 1 - len(cont)
        ctx = ctx[max(len(ctx) - keep, 0) :] if keep > 0 else []
        return [self.bos, *ctx, *cont], 1 + len(ctx)

    # ------------------------------------------------------------------------------------------
    def _generator(self, *keys) -> torch.Generator:
        """A CPU generator seeded by (seed, keys) (a stable hash of token ids), so that each
        request's noise depends on the request only, and the options of one multiple-choice
        question, which share their context, share their noise (common random numbers: the
        differences between options, which decide the answer, vary less)."""
        digest = hashlib.sha256(json.dumps([self.seed, *keys]).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _score_all(self, items, generators) -> list[tuple[float, bool, Tensor]]:
        out = []
        for start in range(0, len(items), self.batch_size):
            end = start + self.batch_size
            out += self.score_batch(items[start:end], generators[start:end])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        items, generators = [], []
        for request in requests:
            context, continuation = request.args
            ctx, cont = self._split(context, continuation)
            items.append(self._sequence(ctx, cont))
            generators.append(self._generator(ctx))
        return [(value, greedy) for value, greedy, _ in self._score_all(items, generators)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Disjoint windows of window - 1 tokens after BOS (the rows of ppl_eval), except
        the last, shorter one, which takes the tokens before it as clean context (as
        lm-eval's HF model fills its last window)."""
        step = self.window - 1
        items, generators, owner = [], [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self._encode(text)
            for begin in range(0, max(len(tokens), 1), step):
                chunk = tokens[begin : begin + step]
                if begin and len(chunk) < step:
                    items.append(self._sequence(tokens[:begin], chunk))
                else:
                    items.append(([self.bos, *chunk], 1))
                generators.append(self._generator(tokens, begin))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (value, _, _) in zip(owner, self._score_all(items, generators), strict=True):
            totals[index] += value
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Batches of `batch_size` consecutive requests with equal generation arguments. As
        lm-eval's HF model: greedy token draws (a top-1 nucleus) unless the request says
        do_sample=True (then the harness's nucleus_p, temperature 1 only); each text ends at
        the first EOS and at the first `until` string."""
        if not self.objective.supports_prompts:
            raise UserError(
                f"generate_until: this checkpoint ({self.kind.upper()}) samples without a "
                "prompt; use an AR or BD3-LM checkpoint for generation tasks"
            )
        keep = self.window - 1 - self.block  # room for the prompt: [BOS] + prompt + one block
        if keep < 1:
            raise UserError(
                f"generate_until: block size {self.block} leaves no room for a prompt in the "
                f"window of {self.window} tokens; use a checkpoint with a smaller block size"
            )
        jobs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            sample = gen_kwargs.get("do_sample") is True
            temperature = gen_kwargs.get("temperature")
            if sample and temperature not in (None, 1, 1.0):
                raise UserError(
                    f"generate_until: temperature={temperature} is not supported (the samplers "
                    "draw at temperature 1); use do_sample=false or temperature 1"
                )
            nucleus = self.nucleus_p if sample else GREEDY_NUCLEUS
            ids = self._encode(context)
            ids = ids[len(ids) - keep :] if len(ids) > keep else ids
            if ids[:1] == [self.bos]:  # generate() prepends the BOS itself (and refuses a second)
                ids = ids[1:]
            jobs.append((ids, until, max_new, nucleus))
        out: list[str] = []
        start = 0
        while start < len(jobs):
            end = start + 1
            while (
                end < len(jobs)
                and end - start < self.batch_size
                and jobs[end][1:] == jobs[start][1:]
            ):
                end += 1
            out += self._generate(jobs[start:end])
            start = end
        return out

    def _generate(self, jobs: list[tuple[list[int], tuple[str, ...], int, float]]) -> list[str]:
        _, until, max_new, nucleus = jobs[0]
        width = max(len(job[0]) for job in jobs)
        input_ids = torch.zeros(len(jobs), width, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, (ids, *_) in enumerate(jobs):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        result = self.model.generate(
            input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=max_new, seed=self.seed, kv_cache=self.kv_cache,
            nucleus_p=nucleus, var_length=False, reject_low_entropy=False,
        )  # fmt: skip
        texts = []
        for row in result[:, width:].tolist():
            if self.eos in row:
                row = row[: row.index(self.eos)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts


def register() -> None:
    """Register BD3LMHarness with lm-eval's model registry as `bd3lm` (idempotent)."""
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model("bd3lm") is BD3LMHarness:
            return
    except (KeyError, ValueError):
        pass
    register_model("bd3lm")(BD3LMHarness)
