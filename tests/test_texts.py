"""The shipped texts: every kind loads, its parts are real text, and the held-out part never repeats calibration."""

from __future__ import annotations

import random
from importlib import resources

import pytest

from patchattn.text import KINDS, PARTS, TEXTS, load_kind, load_text

WINDOW_CHARS = 200
N_WINDOWS = 200


def test_registry_lists_exactly_the_shipped_files():
    shipped = {p.name.removesuffix(".txt.gz") for p in resources.files("patchattn").joinpath("data").iterdir() if p.name.endswith(".txt.gz")}
    assert shipped == set(TEXTS)
    assert len(TEXTS) == 2 * len(KINDS)


def test_prose_is_the_state_of_the_union_pair():
    assert load_kind("prose", "calibration") is load_text("calibration")
    assert load_kind("prose", "heldout") is load_text("heldout")


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("part", PARTS)
def test_each_part_is_long_readable_text(kind, part):
    text = load_kind(kind, part)
    assert len(text) >= (200_000 if part == "calibration" else 130_000)  # about 60k / 40k tokens at least
    assert "\ufffd" not in text  # nothing was decoded with replacement characters
    assert text.replace("\n", "").replace("\t", "").isprintable()  # no control bytes: text, not binary
    assert sum(ch.isalpha() for ch in text[:20_000]) > 8_000  # mostly words, whatever the kind


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_heldout_never_repeats_calibration(kind):
    calibration, heldout = load_kind(kind, "calibration"), load_kind(kind, "heldout")
    rng = random.Random(kind)
    starts = [rng.randrange(len(heldout) - WINDOW_CHARS) for _ in range(N_WINDOWS)]
    shared = [at for at in starts if heldout[at : at + WINDOW_CHARS] in calibration]
    assert not shared, f"{kind}: held-out windows at {shared[:5]} occur in the calibration part"
    assert calibration[:WINDOW_CHARS] not in heldout


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="code"):
        load_kind("poetry", "calibration")
    with pytest.raises(ValueError, match="heldout"):
        load_kind("code", "test")
    with pytest.raises(ValueError, match="code-heldout"):
        load_text("code")
