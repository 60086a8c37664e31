"""The head-budgeted cache's decode step over fixed buffers: pools sized once when the prefill ends, per-head counts
and page lists on the device, the same tensor shapes at every step, and a step ``torch.compile(fullgraph=True)``
traces whole (the CPU half of issue 18; capturing it as a CUDA graph is tested on the GPU).

One layer of mixed plans -- a full head, a window head with sinks (its ring wraps), a SnapKV head whose Quest budget
exceeds its pages, a full head reading 3 Quest pages of 5 to 8 -- prefills a random prompt of 3 rows, then decodes. Each
step is compared with float64 attention over exactly the tokens each row's head keeps, computed here from the raw
inputs. The rows are of one length, or left-padded to one (as ``generate`` pads prompts of different lengths): then
each row's plans apply to its real tokens alone, as if it ran by itself.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from patchattn.cache import BudgetLayer, HeadBudgetCache
from patchattn.cache.quest import pick_pages
from patchattn.recipe import KVPlan

pytestmark = pytest.mark.internals  # reads transformers' layer contract through BudgetLayer

PLANS = [
    KVPlan("full"),
    KVPlan("window", sink_tokens=4, window_tokens=20),
    KVPlan("snapkv", budget_tokens=40, window_tokens=8, decode_pages=8),
    KVPlan("full", decode_pages=3),
]
PAGE, GROUP, DIM, PROMPT, RESERVE = 16, 2, 32, 70, 40
# Per row, pad tokens left of its prompt. Left-padded: 70, 61 and 15 real tokens; the window head's ring (4 sinks + 20)
# wraps at decode step 14 in row 0 and 3 in row 1, and row 2 fills it while decoding (9 steps), wrapping right after.
PADDING = {"unpadded": [0, 0, 0], "left-padded": [0, 9, 55]}
# Graph calls that read a tensor on the host, or copy host data to the device (dynamo keeps a used .item() in the
# graph rather than breaking it, so fullgraph=True alone does not rule them out).
HOST_CALLS = {"item", "tolist", "__int__", "__float__", "__bool__", "_local_scalar_dense", "tensor", "as_tensor"}


def draw(seed: int = 0, steps: int = RESERVE + 1, batch: int = 3):
    """Keys, values (B, Hkv, T, D) and queries (B, Hq, T, D) of a prompt and ``steps`` decode tokens."""
    gen = torch.Generator().manual_seed(seed)
    total = PROMPT + steps
    keys = torch.randn(batch, len(PLANS), total, DIM, generator=gen)
    values = torch.randn(batch, len(PLANS), total, DIM, generator=gen)
    queries = torch.randn(batch, len(PLANS) * GROUP, total, DIM, generator=gen) * 2
    return keys, values, queries


def prefilled(keys, values, queries, reserve: str = "constructor", pads: list[int] | None = None,
              prompt: int = PROMPT) -> BudgetLayer:
    """A layer after the first ``prompt`` tokens (rows left-padded by ``pads``), with room for RESERVE decode tokens
    asked for as ``reserve`` says ("constructor", "after prefill": none at first, then reserved by reallocating; "none":
    the default headroom)."""
    at_first = {"constructor": RESERVE, "after prefill": 0, "none": None}[reserve]
    cache = HeadBudgetCache([PLANS], PAGE, reserve_tokens=at_first)
    cache.set_left_padding(pads)
    layer = cache.layers[0]
    layer.update(keys[:, :, :prompt], values[:, :, :prompt])
    layer.finish_prefill(queries[:, :, :prompt])
    if reserve == "after prefill":
        layer.reserve(RESERVE)
    return layer


def attention_over(q, k, v, keep):
    """q (G, D) attends the rows ``keep`` (bool) of k/v (T, D); float64."""
    scores = q.double() @ k[keep].double().T / math.sqrt(q.shape[-1])
    return torch.softmax(scores, -1) @ v[keep].double()


def quest_keep(q, keys, budget):
    """The tokens a Quest head over ``keys`` (T, D) reads for its query group ``q`` (G, D): the ``budget`` pages of
    largest bound sum_d max(q_d min_d, q_d max_d) (largest over the group), the first and newest pages always."""
    n = keys.shape[0]
    n_pages = -(-n // PAGE)
    pad = n_pages * PAGE - n
    kmin = torch.nn.functional.pad(keys.double(), (0, 0, 0, pad), value=float("inf")).view(n_pages, PAGE, -1).amin(1)
    kmax = torch.nn.functional.pad(keys.double(), (0, 0, 0, pad), value=float("-inf")).view(n_pages, PAGE, -1).amax(1)
    bound = torch.maximum(q.double()[:, None] * kmin, q.double()[:, None] * kmax).sum(-1).amax(0)
    bound[0] = bound[-1] = float("inf")
    keep = torch.zeros(n_pages * PAGE, dtype=torch.bool)
    for p in bound.topk(min(budget, n_pages)).indices.tolist():
        keep[p * PAGE : (p + 1) * PAGE] = True
    return keep[:n]


def expected_keep(h: int, t: int, snap_prompt: list[int], pad: int) -> torch.Tensor:
    """Bool mask over tokens 0..t that head ``h`` of a row after ``pad`` pad tokens holds once token ``t`` is written
    (``snap_prompt``: the prompt tokens its SnapKV head chose): the rules count the row's real tokens only."""
    plan, positions = PLANS[h], torch.arange(t + 1)
    real = positions >= pad
    if plan.policy == "window":
        return real & ((positions - pad < plan.sink_tokens) | (positions > t - plan.window_tokens))
    if plan.policy == "snapkv":
        return torch.isin(positions, torch.tensor(snap_prompt)) | (positions >= PROMPT)
    return real


def held_positions(layer, h: int, b: int) -> list[int]:
    return sorted(p for p in layer.kept_positions(h)[b].tolist() if p >= 0)  # -1: a slot row b holds nothing in


def check_step(layer, out, t, keys, values, queries, snap_prompt, pads):
    for b, pad in enumerate(pads):
        for h, plan in enumerate(PLANS):
            held = expected_keep(h, t, snap_prompt[b], pad)
            assert held_positions(layer, h, b) == torch.arange(t + 1)[held].tolist(), (t, b, h)
            q = queries[b, h * GROUP : (h + 1) * GROUP, t]
            read = held.clone()
            if plan.decode_pages:
                read[held] = quest_keep(q, keys[b, h, : t + 1][held], plan.decode_pages)
            ref = attention_over(q, keys[b, h, : t + 1], values[b, h, : t + 1], read)
            got = out[b, h * GROUP : (h + 1) * GROUP].double()
            assert ((got - ref).norm() / ref.norm()).item() < 1e-5, (t, b, h)


def buffers(layer) -> dict[str, int]:
    names = ("keys", "values", "positions", "page_min", "page_max", "valid_t", "written_t", "page_table")
    return {name: getattr(layer, name).data_ptr() for name in names}


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("reserve", ["constructor", "after prefill"])
def test_reserved_steps_keep_their_buffers_and_shapes_and_attend_exactly_the_kept_tokens(reserve, padding, caplog):
    pads = PADDING[padding]
    keys, values, queries = draw()
    layer = prefilled(keys, values, queries, reserve, pads)
    snap_prompt = [held_positions(layer, 2, b) for b in range(len(pads))]
    for row, pad in zip(snap_prompt, pads):  # the observation window and the votes' picks; a short row keeps it all
        assert len(row) == min(40, PROMPT - pad) and set(range(max(pad, PROMPT - 8), PROMPT)) <= set(row) and row[0] >= pad
    assert layer.room_tokens == RESERVE and layer.caps == [112, 32, 80, 112]  # growing heads: exactly RESERVE more
    before, caps = buffers(layer), list(layer.caps)
    shapes = set()
    for step in range(RESERVE):
        t = PROMPT + step
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        out = layer.attend(queries[:, :, t : t + 1], None, "auto")[:, 0]
        shapes.add(tuple(x.shape for x in layer.page_lists(queries[:, :, t])))
        check_step(layer, out, t, keys, values, queries, snap_prompt, pads)
    assert buffers(layer) == before and layer.caps == caps  # no reallocation within the reserve
    assert len(shapes) == 1, shapes  # every step's page lists have the same shapes
    # The widest non-Quest head's capacity in pages: the full head's 70 + 40 tokens.
    assert shapes.pop()[0] == (len(pads), len(PLANS), 7)
    assert layer.valid == [PROMPT + RESERVE, 24, 40 + RESERVE, PROMPT + RESERVE]
    real = [PROMPT - pad + RESERVE for pad in pads]
    assert layer.valid_t.tolist() == [[n, 24, min(n, 40 + RESERVE), n] for n in real]

    # One token past the reserve: the pools grow (said at debug level) and the step stays exact.
    t = PROMPT + RESERVE
    with caplog.at_level(logging.DEBUG, logger="patchattn.cache.pools"):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        out = layer.attend(queries[:, :, t : t + 1], None, "auto")[:, 0]
    assert "no room left for decode tokens" in caplog.text and layer.caps[0] > caps[0]
    check_step(layer, out, t, keys, values, queries, snap_prompt, pads)


def test_a_left_padded_row_keeps_and_attends_what_it_would_alone():
    """Each row of a left-padded batch: the same kept tokens (shifted by its padding) and decode outputs as a batch of
    that row alone, unpadded -- SnapKV's votes included, which the float64 checks above take from the layer."""
    pads = PADDING["left-padded"]
    keys, values, queries = draw(steps=20)
    batch = prefilled(keys, values, queries, pads=pads)
    alone = [prefilled(*(x[b : b + 1, :, pad:] for x in (keys, values, queries)), prompt=PROMPT - pad)
             for b, pad in enumerate(pads)]
    for t in range(PROMPT, PROMPT + 20):
        batch.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        out = batch.attend(queries[:, :, t : t + 1], None, "auto")
        for b, (layer, pad) in enumerate(zip(alone, pads)):
            layer.update(keys[b : b + 1, :, t : t + 1], values[b : b + 1, :, t : t + 1])
            torch.testing.assert_close(out[b : b + 1], layer.attend(queries[b : b + 1, :, t : t + 1], None, "auto"))
            for h in range(len(PLANS)):
                assert held_positions(batch, h, b) == [p + pad for p in held_positions(layer, h, 0)], (t, b, h)


def test_without_a_reserve_the_pools_keep_a_little_headroom():
    keys, values, queries = draw()
    layer = prefilled(keys, values, queries, reserve="none")
    assert layer.caps[0] == 144  # 70 tokens + 64 headroom, page-rounded (with the reserve: 70 + 40 -> 112)
    assert prefilled(keys, values, queries).caps[0] == 112
    assert layer.kv_bytes() > prefilled(keys, values, queries).kv_bytes()  # reserved slots are counted, unused or not


@pytest.mark.parametrize("padding", PADDING)
def test_the_decode_step_traces_into_one_graph_and_replays_without_recompiling(padding):
    """``torch.compile(fullgraph=True)`` of a layer's write + page lists + decode op: one graph (no break) with no host
    read or host-to-device copy in it, the same graph every step (no recompile: the step's changing state is device
    tensors changed in place, per-row counts of a left-padded batch included), the decode op one node of it, and the
    same results and cache state as eager steps, through row 2's ring filling up and wrapping."""
    torch._dynamo.reset()
    keys, values, queries = draw(seed=1)
    pads = PADDING[padding]
    eager, traced = prefilled(keys, values, queries, pads=pads), prefilled(keys, values, queries, pads=pads)
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(traced.decode_step, fullgraph=True, backend=counter)
    for i in range(12):
        t = PROMPT + i
        args = queries[:, :, t], keys[:, :, t], values[:, :, t]
        eager._make_room(1)
        traced._make_room(1)
        torch.testing.assert_close(step(*args), eager.decode_step(*args), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    calls = {getattr(n.target, "__name__", str(n.target)) for n in counter.graphs[0].graph.nodes if n.op.startswith("call")}
    assert not calls & HOST_CALLS and "sparse_decode.default" in calls, calls & HOST_CALLS
    assert torch.equal(traced.valid_t, eager.valid_t) and torch.equal(traced.written_t, eager.written_t)
    for name in ("keys", "values", "positions", "page_min", "page_max"):
        assert torch.equal(getattr(traced, name), getattr(eager, name)), name


def test_quest_picks_are_ascending_and_a_one_page_budget_reads_the_newest():
    """Two heads score 6 candidate pages with one top-k: one has 5 valid pages, the other 3 (its pages 3..5 junk, never
    picked). Budgets 1 and 4: the first reads only its newest page (it holds the query's own token), the second all 3."""
    gen = torch.Generator().manual_seed(2)
    page_min = torch.randn(1, 12, 8, generator=gen)
    page_max = page_min + torch.rand(1, 12, 8, generator=gen)
    candidates = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    query = torch.randn(1, 2, 2, 8, generator=gen)
    for budgets, want in (((1, 4), [[4], [6, 7, 8]]), ((2, 2), [[0, 4], [6, 8]])):
        pages, counts = pick_pages(query, page_min, page_max, candidates, torch.tensor([5, 3], dtype=torch.int32),
                                   torch.tensor(budgets, dtype=torch.int32), k=max(budgets))
        assert [pages[0, h, : counts[h]].tolist() for h in range(2)] == want
