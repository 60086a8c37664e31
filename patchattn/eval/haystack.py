"""Seeded long-context prompts: passkey and variable tracking in repeated filler, RULER-style needles in real prose.

Every builder is ``(tokenizer, length_tokens, seed) -> Prompt``. The same arguments give the same prompt
in any process (``random.Random`` with a string seed). The prompt is ``length_tokens`` long, or at most
``LENGTH_SLACK_TOKENS`` shorter where re-tokenising the joins shifts a token; it is never longer.

The haystack is cut from a token stream (the filler repeated, or the held-out State of the Union text,
tiled when a prompt is longer than it), starting at a seeded sentence start. Needles go in at sentence
ends at seeded depths. The whole prompt is then tokenised as one text, and the haystack length adjusted
until the total fits.

With a chat template (instruct models) the instruction, haystack and question form one user turn and the
answer prefix opens the assistant turn; without one (base models) the same parts are joined as plain text.
"""

from __future__ import annotations

import bisect
import random
import re
import weakref
from dataclasses import dataclass
from typing import Callable

from ..errors import PatchattnError
from ..text import load_text
from .scoring import numbers_in, score_reply

__all__ = ["BUILDERS", "Prompt", "build_prompt", "numbers_in", "score"]

LENGTH_SLACK_TOKENS = 8
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_KEY_ADJECTIVES = (
    "amber", "brisk", "crimson", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly", "kind", "lunar",
    "misty", "noble", "olive", "proud", "quiet", "rustic", "silver", "tidy", "urban", "vivid", "windy", "young",
)
_KEY_NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "falcon", "garden", "harbor", "island", "jaguar", "kettle", "lantern",
    "meadow", "nectar", "orchid", "pepper", "quartz", "river", "saddle", "tiger", "umbrella", "violin", "walrus",
)

PASSKEY_INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it afterwards."
)
NEEDLE_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the numbers afterwards."
)
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
# The answer prefix repeats the needle's exact words, so the model can look the key up by copying.
NEEDLE = "The special magic number for {key} is: {value}."
NEEDLE_QUESTION = "What is the special magic number for {key}?"
NEEDLE_ANSWER_PREFIX = "The special magic number for {key} is:"
MULTIVALUE_QUESTION = "What are all the special magic numbers for {key}?"
MULTIVALUE_ANSWER_PREFIX = "The special magic numbers for {key} are:"
VARIABLE_INSTRUCTION = "Memorize and track the chain of variable assignments hidden in the following text."
VARIABLE_VALUE = "VAR {name} = {value}."
VARIABLE_COPY = "VAR {name} = VAR {source}."
VARIABLE_QUESTION = "Find all variables that are assigned the value {value} in the text above."
VARIABLE_ANSWER_PREFIX = "According to the chain of variable assignments in the text above, {count} variables are assigned the value {value}, they are:"
NEEDLE_SEPARATOR = "\n\n"  # a needle stands as its own paragraph: SmolLM2 finds it far more reliably


@dataclass(frozen=True)
class Prompt:
    """One eval prompt. ``answers``: what a correct reply contains; ``match`` says how they are scored
    (scoring.py): ``"any"`` (the one answer appears), ``"first"`` (the first number in the reply is the
    answer, so that reciting a distractor first fails), ``"all"`` (every answer appears)."""

    task: str
    input_ids: list[int]
    text: str
    answers: tuple[str, ...]
    match: str
    max_new_tokens: int
    depths: tuple[float, ...]  # where the needles sit, as fractions of the haystack

    @property
    def length_tokens(self) -> int:
        return len(self.input_ids)


# ---- token streams --------------------------------------------------------------------------------
@dataclass
class _Stream:
    ids: list[int]
    sentence_starts: list[int]  # token indices right after a sentence end


_STREAMS: "weakref.WeakKeyDictionary[object, dict[str, _Stream]]" = weakref.WeakKeyDictionary()


def _stream(tokenizer, corpus: str) -> _Stream:
    """The corpus tokenised once per tokenizer, with the token indices where a sentence starts."""
    try:
        cache = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # an object that cannot be weakly referenced: no cache
        cache = {}
    if corpus not in cache:
        if corpus == "filler":
            text = " ".join([PASSKEY_FILLER] * 256)
        else:
            text = re.sub(r"\s+", " ", load_text(corpus))  # one paragraph: no stray line breaks in haystacks
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = sentence_starts(tokenizer, ids)
        if not starts:
            raise ValueError(f"the {corpus} text has no sentence ends under this tokenizer")
        cache[corpus] = _Stream(ids, starts)
    return cache[corpus]


def sentence_starts(tokenizer, ids: list[int], line_breaks: bool = False) -> list[int]:
    """The token indices right after a sentence end (a token ending in ``.``, ``?`` or ``!``), and with
    ``line_breaks`` after a token ending in a line break too."""

    def ends(token: str) -> bool:
        return token.rstrip().endswith((".", "?", "!")) or (line_breaks and token.endswith("\n"))

    enders = {t for t in set(ids) if ends(tokenizer.decode([t]))}
    return [i + 1 for i in range(len(ids) - 1) if ids[i] in enders]


def _haystack(stream: _Stream, start: int, n_tokens: int, depths: list[float], needles: list[str], tokenizer) -> str:
    """``n_tokens`` of the stream from ``start`` (wrapping around), each needle put at the sentence end
    nearest its depth."""
    n = len(stream.ids)
    ids = [stream.ids[(start + i) % n] for i in range(n_tokens)]
    cuts = []
    for depth in depths:
        offset = int(depth * n_tokens)
        target = (start + offset) % n
        j = bisect.bisect_left(stream.sentence_starts, target)
        candidates = [stream.sentence_starts[k] for k in (j - 1, j) if 0 <= k < len(stream.sentence_starts)]
        best = min(candidates, key=lambda s: abs(s - target))
        cuts.append(min(max(offset + best - target, 0), n_tokens))
    pieces, prev = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda cn: cn[0]):
        pieces += [tokenizer.decode(ids[prev:cut]).strip(), needle]
        prev = cut
    pieces.append(tokenizer.decode(ids[prev:]).strip())
    return NEEDLE_SEPARATOR.join(p for p in pieces if p)


# ---- assembling the prompt ------------------------------------------------------------------------
def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, instruction: str, haystack: str, question: str, answer_prefix: str) -> tuple[str, list[int]]:
    body = f"{instruction}\n\n{haystack}\n\n{question}"
    if uses_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        text += answer_prefix
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = f"{body}\n{answer_prefix}" if answer_prefix else body
        ids = tokenizer(text)["input_ids"]
    return text, list(ids)


def _fit(
    tokenizer, length_tokens: int, corpus: str, rng: random.Random, depths: list[float], needles: list[str],
    instruction: str, question: str, answer_prefix: str,
) -> tuple[str, list[int]]:
    """Choose the haystack size so the whole prompt is as close to ``length_tokens`` as possible without
    exceeding it."""
    stream = _stream(tokenizer, corpus)
    start = rng.choice(stream.sentence_starts)
    _, overhead_ids = _render(tokenizer, instruction, " ".join(needles), question, answer_prefix)
    if len(overhead_ids) + 16 > length_tokens:
        raise PatchattnError(
            f"{length_tokens} tokens is too short for this prompt (its fixed parts alone take {len(overhead_ids)}); use longer lengths"
        )
    n_hay = length_tokens - len(overhead_ids)
    best: tuple[str, list[int]] | None = None
    for _ in range(12):
        text, ids = _render(tokenizer, instruction, _haystack(stream, start, n_hay, depths, needles, tokenizer), question, answer_prefix)
        if len(ids) <= length_tokens and (best is None or len(ids) > len(best[1])):
            best = (text, ids)
        if length_tokens - LENGTH_SLACK_TOKENS // 2 <= len(ids) <= length_tokens:
            break
        step = length_tokens - len(ids)
        n_hay += step if step else -1
    if best is None or len(best[1]) < length_tokens - LENGTH_SLACK_TOKENS:
        raise RuntimeError(f"could not fit a {corpus} prompt to {length_tokens} tokens (got {len(best[1]) if best else 'none'})")
    return best


def _answer_tokens(tokenizer, answers: list[str]) -> int:
    """Room for the answers plus a little wording around each (models like to reply with a numbered list)."""
    return sum(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + 5 for a in answers) + 4


def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in _KEY_ADJECTIVES for n in _KEY_NOUNS], count)
    return [f"{a}-{n}" for a, n in pairs]


def _numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    values: set[str] = set()
    while len(values) < count:
        values.add(str(rng.randint(10 ** (digits - 1), 10**digits - 1)))
    return rng.sample(sorted(values), count)


def _rng(task: str, length_tokens: int, seed: int) -> random.Random:
    return random.Random(f"patchattn-eval:{task}:{length_tokens}:{seed}")


# ---- the builders ---------------------------------------------------------------------------------
def passkey_prompt(tokenizer, length_tokens: int, seed: int) -> Prompt:
    """A 5-digit pass key at a seeded depth in the repeated grass/sky/sun filler."""
    rng = _rng("passkey", length_tokens, seed)
    key = _numbers(rng, 1, 5)[0]
    depth = rng.uniform(0.05, 0.95)
    needle = PASSKEY_NEEDLE.format(value=key)
    text, ids = _fit(tokenizer, length_tokens, "filler", rng, [depth], [needle], PASSKEY_INSTRUCTION, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX)
    return Prompt("passkey", ids, text, (key,), "any", _answer_tokens(tokenizer, [key]), (depth,))


def single_needle_prompt(tokenizer, length_tokens: int, seed: int) -> Prompt:
    """One key with one 7-digit number at a seeded depth in held-out prose."""
    rng = _rng("single", length_tokens, seed)
    (key,), (value,) = _keys(rng, 1), _numbers(rng, 1, 7)
    depth = rng.uniform(0.05, 0.95)
    return _needle_prompt(tokenizer, length_tokens, rng, "single", key, [key], [value], [depth], "any")


def multikey_prompt(tokenizer, length_tokens: int, seed: int, n_keys: int = 2) -> Prompt:
    """``n_keys`` needles with different keys, one asked for, the rest distractors. Two by default:
    with four, dense SmolLM2-135M answered a distractor's number on every prompt measured at 2K."""
    rng = _rng("multikey", length_tokens, seed)
    keys, values = _keys(rng, n_keys), _numbers(rng, n_keys, 7)
    depths = [rng.uniform(0.05, 0.95) for _ in keys]
    target = rng.randrange(n_keys)
    return _needle_prompt(tokenizer, length_tokens, rng, "multikey", keys[target], keys, values, depths, "first", answer=values[target])


def multivalue_prompt(tokenizer, length_tokens: int, seed: int, n_values: int = 4) -> Prompt:
    """One key with ``n_values`` numbers at different depths; all must be recovered."""
    rng = _rng("multivalue", length_tokens, seed)
    (key,), values = _keys(rng, 1), _numbers(rng, n_values, 7)
    depths = [rng.uniform(0.05, 0.95) for _ in values]
    return _needle_prompt(tokenizer, length_tokens, rng, "multivalue", key, [key] * n_values, values, depths, "all")


def multiquery_prompt(tokenizer, length_tokens: int, seed: int, n_keys: int = 4, n_queries: int = 2) -> Prompt:
    """``n_keys`` needles with different keys; ``n_queries`` of them are asked for at once, all must be
    recovered (RULER's multi-query; the other needles are distractors)."""
    rng = _rng("multiquery", length_tokens, seed)
    keys, values = _keys(rng, n_keys), _numbers(rng, n_keys, 7)
    depths = [rng.uniform(0.05, 0.95) for _ in keys]
    asked = sorted(rng.sample(range(n_keys), n_queries))
    asked_keys = " and ".join(keys[i] for i in asked)
    return _needle_prompt(
        tokenizer, length_tokens, rng, "multiquery", asked_keys, keys, values, depths, "all",
        answers=[values[i] for i in asked],
    )


def variable_tracking_prompt(tokenizer, length_tokens: int, seed: int, n_hops: int = 2) -> Prompt:
    """RULER's variable tracking: ``VAR A = 12345.`` then ``VAR B = VAR A.``, ``n_hops`` times, in order at
    seeded depths of the repeated filler; every variable holding the value must be named."""
    rng = _rng("vartrack", length_tokens, seed)
    value = _numbers(rng, 1, 5)[0]
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    needles = [VARIABLE_VALUE.format(name=names[0], value=value)]
    needles += [VARIABLE_COPY.format(name=name, source=source) for source, name in zip(names, names[1:])]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)  # the chain reads in order
    question = VARIABLE_QUESTION.format(value=value)
    answer_prefix = VARIABLE_ANSWER_PREFIX.format(count=len(names), value=value)
    text, ids = _fit(tokenizer, length_tokens, "filler", rng, depths, needles, VARIABLE_INSTRUCTION, question, answer_prefix)
    return Prompt("vartrack", ids, text, tuple(names), "all", _answer_tokens(tokenizer, names), tuple(depths))


def _needle_prompt(
    tokenizer, length_tokens: int, rng: random.Random, task: str, asked_key: str, keys: list[str], values: list[str],
    depths: list[float], match: str, answer: str | None = None, answers: list[str] | None = None,
) -> Prompt:
    """Needles ``key -> value`` in held-out prose, asked about ``asked_key``: for one value (``answer``, by
    default the first) unless ``match`` is ``"all"`` (``answers``, by default every value)."""
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    if match == "all":
        question = MULTIVALUE_QUESTION.format(key=asked_key)
        answer_prefix = MULTIVALUE_ANSWER_PREFIX.format(key=asked_key)
        answers = tuple(answers or values)
    else:
        question = NEEDLE_QUESTION.format(key=asked_key)
        answer_prefix = NEEDLE_ANSWER_PREFIX.format(key=asked_key)
        answers = (answer or values[0],)
    text, ids = _fit(tokenizer, length_tokens, "heldout", rng, depths, needles, NEEDLE_INSTRUCTION, question, answer_prefix)
    return Prompt(task, ids, text, answers, match, _answer_tokens(tokenizer, list(answers)), tuple(depths))


BUILDERS: dict[str, Callable[..., Prompt]] = {
    "passkey": passkey_prompt,
    "single": single_needle_prompt,
    "multikey": multikey_prompt,
    "multivalue": multivalue_prompt,
    "multiquery": multiquery_prompt,
    "vartrack": variable_tracking_prompt,
}


def build_prompt(task: str, tokenizer, length_tokens: int, seed: int) -> Prompt:
    if task not in BUILDERS:
        raise ValueError(f"unknown needle task {task!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[task](tokenizer, length_tokens, seed)


def score(prompt: Prompt, reply: str) -> float:
    """1.0 when the reply answers the prompt (see :class:`Prompt` for the match modes), else 0.0."""
    return score_reply(reply, prompt.answers, prompt.match)
