"""A chunk of a prompt prefilled in chunks: its queries are the last ``n_q`` of the keys' positions.

``generate(..., prefill_chunk_size=C)`` (and vLLM's chunked prefill) runs a long prompt ``C`` tokens at a time against
the cache, so the whole prompt's activations and logits never exist at once. transformers gives each chunk a 4D mask
of every query against every key (for a 4K chunk at 128K, half a gigabyte of booleans) and computes all of it. For an
unpadded chunk the mask builder registered for patchattn gives none (:func:`plain_chunk`), and the attention
function applies causality by position itself (:func:`chunk_attention`): the layer's layout for the chunk's query
blocks -- the rows of the square layout they are, from the same strategies and budgets (data-dependent ones estimate
from the chunk's queries, the last of which are the prompt's last so far) -- run by the sparse kernels, which place
query ``t`` at position ``n_k - n_q + t``. Token columns are read as the blocks that hold them, and each chunk's last
query block reads every block before it when it ends the prompt (as a prefill's last does; ``generate``'s chunk loop
says where the prompt ends, and a chunk outside it counts as the last). Dense layers, short or unaligned chunks, dropout
and backend "auto" without a kernel run dense attention with a lower-right causal bias (no mask materialised).
"""

from __future__ import annotations

import contextvars
import logging

import torch

from . import hf, stats
from .backends import kernel_backend
from .compiled import CompiledRecipe
from .kernels import prefill_kernel, sparse_prefill, triton_prefill_unsupported
from .layout import num_blocks, to_ragged

logger = logging.getLogger(__name__)


# (q_length, kv_length) of the chunk whose mask the builder left out in the running forward: only such a call is a
# chunk to the attention function (a static cache's prefill also arrives with fewer queries than keys and no mask,
# from transformers' own builder, and means the top-left causal SDPA then applies). Cleared as each forward begins.
_SKIPPED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("patchattn_chunk_mask_skipped", default=None)


# The whole prompt's length while ``generate`` prefills it in chunks (None otherwise), set as each forward begins: only
# the chunk that ends there gives its last query block every key block, as an unchunked prefill's last block has.
_PROMPT_END: contextvars.ContextVar[int | None] = contextvars.ContextVar("patchattn_chunked_prompt_end", default=None)


def forget_skipped_mask(prompt_end: int | None = None) -> None:
    """A new forward begins: no chunk's mask has been left out in it yet; ``prompt_end``: the whole prompt's length
    when ``generate`` prefills it in chunks (:func:`patchattn.hf.chunked_prompt_tokens`)."""
    _SKIPPED.set(None)
    _PROMPT_END.set(prompt_end)


def prompt_end() -> int | None:
    """The whole prompt's length when the running forward is one of ``generate``'s prefill chunks."""
    return _PROMPT_END.get()


def is_chunk(n_q: int, n_k: int, attention_mask) -> bool:
    """Whether an attention call is a chunk whose mask the builder left out in this forward."""
    return attention_mask is None and 1 < n_q < n_k and _SKIPPED.get() == (n_q, n_k)


def skip_chunk_mask(kwargs) -> bool:
    """:func:`plain_chunk`, remembering the chunk's shape for the attention function when it is one."""
    if not plain_chunk(kwargs):
        return False
    _SKIPPED.set((kwargs["q_length"], kwargs["kv_length"]))
    return True


def plain_chunk(kwargs) -> bool:
    """Whether transformers asks for the mask of an unpadded chunk of a prompt (queries at the last positions of the
    keys, more than one) and nothing else: no sliding window, chunked attention, packed sequences or extra mask
    functions (those turn ``allow_is_causal_skip`` off). Releases whose mask builder names no ``q_length`` keep their
    masks."""
    config = kwargs.get("config")
    if config is None or "q_length" not in kwargs or not kwargs.get("allow_is_causal_skip", True) or kwargs.get("local_size"):
        return False
    q_length, kv_length, q_offset = kwargs["q_length"], kwargs.get("kv_length"), kwargs.get("q_offset", 0)
    if not (isinstance(q_length, int) and isinstance(kv_length, int) and isinstance(q_offset, int)):
        return False
    if q_length <= 1 or q_offset <= 0 or kwargs.get("kv_offset", 0) or q_offset + q_length != kv_length:
        return False
    if hf.chunked_attention(config):
        return False
    padding = kwargs.get("attention_mask")
    return padding is None or bool(padding.all())


def dense_chunk(query, key, value, scaling, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of queries at the keys' last positions, as (B, Hq, n_q, D): SDPA with a lower-right causal
    bias (no mask tensor)."""
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(query.shape[2], key.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                            scale=scaling, enable_gqa=True)


def chunk_layout(keep: torch.Tensor, cols: torch.Tensor | None, n_keys: int, block_size: int, dense_rows: int,
                 ends_prompt: bool = True) -> torch.Tensor:
    """A chunk's (B, H, nq, nk) layout finished: its token columns' blocks added, clipped to causal blocks by
    position, the diagonal and the recipe's dense prefix rows in full, and the last query block too when the chunk
    ``ends_prompt`` (an earlier chunk's rows are the whole prompt's square layout's)."""
    n_q_blk, n_k_blk = keep.shape[-2:]
    if cols is not None:  # (B, H, C) ascending key positions, padded with n_keys
        blocks = torch.div(cols.long(), block_size, rounding_mode="floor").clamp(max=n_k_blk)
        read = torch.zeros(*cols.shape[:-1], n_k_blk + 1, dtype=torch.bool, device=keep.device).scatter_(-1, blocks, True)
        keep = keep | read[..., None, :n_k_blk]
    rows = torch.arange(n_q_blk, device=keep.device)[:, None] + (n_k_blk - n_q_blk)  # absolute query blocks
    k_blk = torch.arange(n_k_blk, device=keep.device)[None, :]
    full = ((rows == rows[-1]) & ends_prompt) | (rows < dense_rows)
    return ((keep | full) & (k_blk <= rows)) | (k_blk == rows)


def chunk_attention(compiled: CompiledRecipe | None, query, key, value, scaling, dropout: float, layer_idx: int, backend: str,
                    kwargs: dict) -> torch.Tensor:
    """A chunk's attention (see the module docstring), as (B, n_q, Hq, D)."""
    from .prefill import layer_layout  # the prefill path's layouts (it imports this module for its chunks)

    n_q, n_k = query.shape[2], key.shape[2]
    block = compiled.block_size if compiled is not None else 64
    plan = compiled.layers[layer_idx] if compiled is not None else None
    sparse = (plan is not None and not plan.all_dense and dropout == 0.0 and kwargs.get("softcap") is None
              and not kwargs.get("output_attentions") and n_q > block and (n_k - n_q) % block == 0
              and n_k >= max(compiled.recipe.min_sparse_tokens, 0 if backend == "sparse" else plan.min_tokens))
    no_kernel = triton_prefill_unsupported(query, key, value, block) if sparse and backend == "auto" else None
    if plan is not None and not plan.all_dense and (not sparse or no_kernel) and not compiled.said_chunk_dense:
        compiled.said_chunk_dense = True
        logger.info("patchattn: a %d-token chunk against %d keys runs dense attention in layers with sparse heads (%s)", n_q, n_k,
                    no_kernel or f"chunks must be longer than a block, start on a {block}-token block boundary and reach "
                                  "the layer's min_sparse_tokens; no dropout or softcapping")
    if not sparse or no_kernel:
        return dense_chunk(query, key, value, scaling, dropout).transpose(1, 2).contiguous()
    keep, cols = layer_layout(plan, query, key, block, finished=False, columns=True)
    end = _PROMPT_END.get()
    keep = chunk_layout(keep, cols, n_k, block, plan.dense_rows, ends_prompt=end is None or n_k >= end)
    counts, ids, square_density = to_ragged(keep)  # one device sync, which also counted the kept blocks
    kept = round(square_density * counts.numel() * (keep.shape[-1] + 1) / 2)  # its density is against a square's rows
    offset = num_blocks(n_k, block) - keep.shape[-2]
    reach = (offset * keep.shape[-2] + keep.shape[-2] * (keep.shape[-2] + 1) / 2) * keep.shape[0] * keep.shape[1]
    backend = kernel_backend(backend)
    if stats.is_recording():
        stats.report(layer_idx, kept, reach, kernel=prefill_kernel(query, key, value, block, None, None, backend))
    out = sparse_prefill(query, key, value, counts, ids, block, scale=scaling, backend=backend, density=kept / reach)
    return out.transpose(1, 2).contiguous()
