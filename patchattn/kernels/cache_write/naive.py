"""Writing one decode token into a layer's head-budgeted pools: the PyTorch reference (and the CPU path).

Contract (the Triton kernel's too, :mod:`.kernel`), everything in place on the device, nothing read by the host:

    write_token_naive(key, value, keys, values, positions, valid, offsets, span, sink, ring, written, pad, page)
        -> (slots, counts, limits)

``key``/``value`` (B, Hkv, D): the token; ``keys``/``values`` (B, C, D) and ``positions`` (B, C) int32: the pools;
``valid`` (B, Hkv) int32: each row's valid slots per head, from the head's ``offsets`` (Hkv,) int32; ``span``
(Hkv,) int32: the slots after which a head's ring is full (a growing head never is); ``sink`` / ``ring`` (Hkv,) int32:
a ring head's sinks and window; ``written`` (1-element int32): the token's index in the batch's sequence; ``pad``
(B, 1) int32: each row's left padding. Head ``h`` of row ``b`` takes the token at its valid count while filling, at
the ring slot of the row's own token index once full; its position is recorded, and its valid count grows while
filling. Returns the slots written (B, Hkv) int64 (Quest bounds fold the keys in at them) and, after the write, each
(row, head)'s page count and read limit (B, Hkv) int32: what the decode kernel reads. ``written`` is not advanced.
"""

from __future__ import annotations

import torch

from ...kv_policies import ring_slot


def write_token_naive(key, value, keys, values, positions, valid, offsets, span, sink, ring, written, pad, page: int):
    filling = valid < span  # (B, Hkv)
    slots = (offsets + torch.where(filling, valid, ring_slot(written - pad, sink, ring))).long()
    at_slots = slots[..., None].expand(-1, -1, key.shape[-1])
    keys.scatter_(1, at_slots, key)
    values.scatter_(1, at_slots, value)
    positions.scatter_(1, slots, written.expand(slots.shape))
    valid.add_(filling.to(torch.int32))
    return slots, (valid + (page - 1)) // page, offsets + valid
