"""RULER-style long-context tasks, generated offline from a seed.

Every generator is ``generate_<task>(n_samples, context_tokens, count_tokens, seed, ...)``:
``count_tokens`` measures text in the evaluated model's tokens, and the prompt body
(context, blank line, question) is sized to about ``context_tokens`` of them. The haystack
is the Paul Graham essays (:func:`sts.eval.text.haystack_text`), read from a seed-dependent
sentence and wrapping around; planted sentences ("needles") go in at sentence boundaries.
All randomness comes from ``random.Random(seed)``; invented keys, names and words are drawn
from the fixed lists below and never occur in the essays, so every needle appears exactly
once in a prompt and every answer is found in it by a plain string search.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sts.errors import STSError
from sts.eval.text import haystack_text

CountTokens = Callable[[str], int]

MATCH_ALL = "string_match_all"
PERPLEXITY = "perplexity"

# English BPE averages about 4 characters per token; only the first guess of the sizing uses it.
_CHARS_PER_TOKEN = 4
# A list entry such as "123. tolaku" is about 5 BPE tokens; again only a first guess.
_TOKENS_PER_ENTRY = 5
_FIT_TOLERANCE = 0.02
_FIT_ROUNDS = 5
_DRAW_ATTEMPTS = 1000

_NEEDLE = "The special magic number for {key} is: {value}."
_NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
_MULTIVALUE_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_MULTIVALUE_QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
_VARTRACK_QUESTION = (
    "Find all variables that are assigned the value {value} in the text above, "
    "directly or through other variables."
)
_CWE_PREAMBLE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "What are the {n} most common words in the above list?"

_ADJECTIVES = (
    "amber", "brisk", "cobalt", "dusky", "eager", "fabled", "gilded", "hollow", "icy", "jagged",
    "kindly", "lunar", "mossy", "nimble", "opal", "placid", "quaint", "rustic", "scarlet", "tawny",
    "umber", "velvet", "wistful", "zesty", "ashen", "briny", "coral", "dappled", "frosty", "gusty",
)
_NOUNS = (
    "lantern", "harbor", "falcon", "meadow", "anvil", "beacon", "cistern", "dune", "ember", "fjord",
    "glacier", "heron", "inlet", "juniper", "kettle", "lagoon", "marble", "nectar", "orchard",
    "pebble", "quiver", "raven", "saddle", "thicket", "urchin", "vessel", "willow", "yarrow",
)
_FIRST_NAMES = (
    "Orvin", "Talsa", "Brennick", "Yselde", "Corvan", "Mirabel", "Dastien", "Quenna", "Halvard",
    "Ilvane", "Joruk", "Kestra", "Lorcan", "Nimsa", "Peralt", "Saphine", "Tovric", "Ulvina",
)
_LAST_NAMES = (
    "Quade", "Vellmont", "Ashgrove", "Brindeloe", "Corrath", "Dunmere", "Fennick", "Galloway",
    "Harrowind", "Islecombe", "Jastrow", "Kellerby", "Lowenthorpe", "Marchetti", "Norrow", "Penhale",
)
_CITIES = (
    "Varnholt", "Queltrin", "Dorwick Fen", "Ostmarrow", "Caldrith", "Velmoor", "Skarnby",
    "Lindqvale", "Thessaby", "Grimmolt", "Ardwen Cross", "Brackmere", "Feldhaven", "Mossgarde",
)
_COMPANIES = (
    "Brastel Dynamics", "Quorvex Labs", "Tindlewood Foundry", "Olvane Systems", "Perrimack Textiles",
    "Zendra Optics", "Halcrest Mills", "Yarrowby Freight", "Corvel Instruments", "Dunlith Ceramics",
)
_PETS = (
    "Zibble", "Morsk", "Pettrin", "Quillo", "Barnaby Snoot", "Fizzwick", "Glimmet", "Tobrin",
    "Wuzzle", "Crumpet Vane", "Jinxel", "Noodlebrook",
)
# Pseudo-words for common-word extraction: three consonant-vowel syllables, so that all words
# have the same length and none is a substring of another (the scoring searches substrings).
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_WORD_SYLLABLES = 3


@dataclass(frozen=True)
class _Relation:
    """A kind of planted fact: its sentence, its question and the invented objects it may take."""

    fact: str
    question: str
    objects: tuple[str, ...]


_RELATIONS = (
    _Relation("The hometown of {name} is {obj}.", "What is the hometown of {name}?", _CITIES),
    _Relation(
        "{name} works for a company called {obj}.", "Which company does {name} work for?", _COMPANIES
    ),
    _Relation(
        "The pet parrot of {name} is named {obj}.",
        "What is the name of the pet parrot of {name}?",
        _PETS,
    ),
)


@dataclass(frozen=True)
class Sample:
    """One evaluation sample: a long context, a question about it and the answers that score it."""

    task: str
    sample_id: str
    context_tokens: int
    depth: float | None
    context: str
    question: str
    answers: tuple[str, ...]
    metric: str
    # The planted sentences in drawing order: lets an evaluation measure a selection's needle recall.
    needles: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Plan:
    """What one haystack sample plants (depth, sentence) and what it asks."""

    planted: tuple[tuple[float, str], ...]
    question: str
    answers: tuple[str, ...]
    depth: float | None
    metric: str = MATCH_ALL


@dataclass(frozen=True)
class _Haystack:
    """The essays cut into sentences, and their lower-cased join for collision checks."""

    sentences: tuple[str, ...]
    lowered: str


@functools.lru_cache(maxsize=1)
def _haystack() -> _Haystack:
    """Return the essays as whitespace-normalised sentences (cached: read once per process)."""
    text = " ".join(haystack_text().split())
    # The essay files glue some paragraphs together ("accelerating.We"): split there too.
    parts = re.split(r"(?<=[.!?])\s+|(?<=[a-z][.!?])(?=[A-Z])", text)
    sentences = tuple(part for part in parts if part)
    return _Haystack(sentences, " ".join(sentences).lower())


def prompt_body(sample: Sample) -> str:
    """Return the text the model reads before any chat template: context, blank line, question."""
    return _join(sample.context, sample.question)


def make_prompt(sample: Sample, tokenizer: Any) -> str:
    """Return the prompt string for ``sample``, through the tokenizer's chat template when it has one.

    A perplexity sample has no question: its prompt is the raw context, teacher-forced as is.
    Without a chat template the prompt ends with ``"\\nAnswer:"`` to cue a base model.
    """
    if not sample.question:
        return sample.context
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_body(sample)}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return f"{prompt_body(sample)}\nAnswer:"


def token_counter(tokenizer: Any) -> CountTokens:
    """Return a ``count_tokens`` function: a text's length in ``tokenizer``'s tokens, no special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_needle(
    n_samples: int, context_tokens: int, count_tokens: CountTokens, seed: int, depth: float | None = None
) -> list[Sample]:
    """Return single-needle samples (RULER niah_single): one magic number at ``depth``, asked back.

    ``depth`` is the needle's position as a fraction of the context (0 = start, 1 = end);
    ``None`` draws one per sample. With a fixed depth the keys, numbers and haystack offsets
    depend on the seed only, so a sweep over depths or lengths moves the same needle.
    """
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise STSError(f"depth must be within [0, 1], got {depth}")
    draw = functools.partial(_draw_keyed, n_keys=1, depth=depth)
    return _haystack_samples("needle", n_samples, context_tokens, count_tokens, seed, draw)


def needle_grid(
    lengths: Sequence[int],
    depths: Sequence[float],
    count_tokens: CountTokens,
    seed: int,
    n_samples: int = 1,
) -> list[Sample]:
    """Return the needle samples of a length x depth sweep, lengths outermost, ``n_samples`` per cell."""
    return [
        sample
        for length in lengths
        for depth in depths
        for sample in generate_needle(n_samples, length, count_tokens, seed, depth)
    ]


def generate_multikey(
    n_samples: int, context_tokens: int, count_tokens: CountTokens, seed: int, n_keys: int = 4
) -> list[Sample]:
    """Return multi-key needle samples: ``n_keys`` magic numbers under different keys, one asked."""
    _require_positive(n_keys=n_keys)
    draw = functools.partial(_draw_keyed, n_keys=n_keys, depth=None)
    return _haystack_samples("multikey", n_samples, context_tokens, count_tokens, seed, draw)


def generate_multivalue(
    n_samples: int, context_tokens: int, count_tokens: CountTokens, seed: int, n_values: int = 4
) -> list[Sample]:
    """Return multi-value needle samples: one key with ``n_values`` magic numbers, all to be returned."""
    _require_positive(n_values=n_values)
    draw = functools.partial(_draw_multivalue, n_values=n_values)
    return _haystack_samples("multivalue", n_samples, context_tokens, count_tokens, seed, draw)


def generate_vartrack(
    n_samples: int,
    context_tokens: int,
    count_tokens: CountTokens,
    seed: int,
    n_chains: int = 1,
    n_hops: int = 4,
) -> list[Sample]:
    """Return variable-tracking samples: chains ``VAR A = 12345. VAR B = VAR A. ...``, one asked.

    Each chain has ``n_hops + 1`` variables; the answer is every variable of the asked chain.
    A chain's statements are planted in order, at increasing depths.
    """
    _require_positive(n_chains=n_chains, n_hops=n_hops)
    draw = functools.partial(_draw_vartrack, n_chains=n_chains, n_hops=n_hops)
    return _haystack_samples("vartrack", n_samples, context_tokens, count_tokens, seed, draw)


def generate_qa(
    n_samples: int, context_tokens: int, count_tokens: CountTokens, seed: int, n_facts: int = 4
) -> list[Sample]:
    """Return question-answering samples: ``n_facts`` invented facts about invented people, one asked."""
    _require_positive(n_facts=n_facts)
    draw = functools.partial(_draw_qa, n_facts=n_facts)
    return _haystack_samples("qa", n_samples, context_tokens, count_tokens, seed, draw)


def generate_perplexity(
    n_samples: int, context_tokens: int, count_tokens: CountTokens, seed: int
) -> list[Sample]:
    """Return perplexity samples: a haystack slice of about ``context_tokens`` tokens, no question.

    The evaluation teacher-forces the end of the context; there is nothing to score by string.
    """
    return _haystack_samples(
        "perplexity", n_samples, context_tokens, count_tokens, seed, _draw_perplexity
    )


def generate_cwe(
    n_samples: int,
    context_tokens: int,
    count_tokens: CountTokens,
    seed: int,
    n_common: int = 10,
    freq_common: int = 30,
    freq_rare: int = 3,
) -> list[Sample]:
    """Return common-word-extraction samples: a numbered word list, asking for its top ``n_common`` words.

    Each common word appears ``freq_common`` times, each rare word ``freq_rare`` times; the
    number of rare words grows with ``context_tokens``. The context is synthetic, not the essays.
    """
    _require_positive(
        n_samples=n_samples, context_tokens=context_tokens, n_common=n_common, freq_rare=freq_rare
    )
    if freq_common <= freq_rare:
        raise STSError(f"freq_common ({freq_common}) must exceed freq_rare ({freq_rare})")
    rng = random.Random(seed)
    question = _CWE_QUESTION.format(n=n_common)
    overhead = count_tokens(_join(_CWE_PREAMBLE, question))
    samples = []
    for index in range(n_samples):
        common = _pseudo_words(rng, n_common, set())
        build = functools.partial(
            _cwe_list, common, freq_common, freq_rare, list_seed=rng.getrandbits(64)
        )
        # build(0) is the shortest list: every common word, and as many rare words as common ones.
        shortest = count_tokens(_join(build(0), question))
        if shortest > context_tokens:
            raise STSError(
                f"context_tokens={context_tokens} is too small for cwe with n_common={n_common}, "
                f"freq_common={freq_common}: the shortest list takes {shortest} tokens"
            )
        context = _fit(
            build,
            lambda text: count_tokens(_join(text, question)),
            context_tokens,
            overhead,
            guess=(context_tokens - overhead) // _TOKENS_PER_ENTRY,
        )
        samples.append(
            Sample(
                task="cwe",
                sample_id=_sample_id("cwe", context_tokens, seed, index, None),
                context_tokens=context_tokens,
                depth=None,
                context=context,
                question=question,
                answers=tuple(common),
                metric=MATCH_ALL,
            )
        )
    return samples


#: New tokens each task's answer gets by default, RULER-style (its per-task output lengths: 128 for needles,
#: 30 for variable tracking, 120 for common words, 32 for QA), trimmed where our answers are short: a chat model
#: opens with a sentence, then lists four 7-digit values (multivalue) or ten words (cwe), which 24 tokens cut off.
ANSWER_TOKENS: dict[str, int] = {
    "needle": 32, "multikey": 32, "multivalue": 64, "vartrack": 32, "cwe": 96, "qa": 32, "perplexity": 0,
}

TASKS: dict[str, Callable[..., list[Sample]]] = {
    "needle": generate_needle,
    "multikey": generate_multikey,
    "multivalue": generate_multivalue,
    "vartrack": generate_vartrack,
    "cwe": generate_cwe,
    "qa": generate_qa,
    "perplexity": generate_perplexity,
}


def _haystack_samples(
    task: str,
    n_samples: int,
    context_tokens: int,
    count_tokens: CountTokens,
    seed: int,
    draw: Callable[[random.Random], _Plan],
) -> list[Sample]:
    """Return ``n_samples`` samples of ``task``, each planting ``draw(rng)`` into a sized haystack slice."""
    _require_positive(n_samples=n_samples, context_tokens=context_tokens)
    rng = random.Random(seed)
    sentences = _haystack().sentences
    samples = []
    for index in range(n_samples):
        plan = draw(rng)
        needles = tuple(sentence for _, sentence in plan.planted)
        overhead = count_tokens(_join(" ".join(needles), plan.question))
        if 2 * overhead > context_tokens:
            raise STSError(
                f"context_tokens={context_tokens} is too small for {task}: its needles and "
                f"question take {overhead} tokens, which must be at most half of the context"
            )
        start = rng.randrange(len(sentences))
        context = _fit(
            lambda n_chars: _plant(_filler(sentences, start, n_chars), plan.planted),
            lambda text: count_tokens(_join(text, plan.question)),
            context_tokens,
            overhead,
            guess=(context_tokens - overhead) * _CHARS_PER_TOKEN,
        )
        samples.append(
            Sample(
                task=task,
                sample_id=_sample_id(task, context_tokens, seed, index, plan.depth),
                context_tokens=context_tokens,
                depth=plan.depth,
                context=context,
                question=plan.question,
                answers=plan.answers,
                metric=plan.metric,
                needles=needles,
            )
        )
    return samples


def _draw_keyed(rng: random.Random, n_keys: int, depth: float | None) -> _Plan:
    """Return a plan of ``n_keys`` needles with distinct keys and numbers, asking one of them."""
    taken: set[str] = set()
    keys = [_fresh(rng, _key, taken) for _ in range(n_keys)]
    values = [_fresh(rng, _seven_digits, taken) for _ in range(n_keys)]
    depths = [rng.random() if depth is None else depth for _ in range(n_keys)]
    asked = rng.randrange(n_keys)
    return _Plan(
        planted=tuple(
            (d, _NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)
        ),
        question=_NEEDLE_QUESTION.format(key=keys[asked]),
        answers=(values[asked],),
        depth=depths[asked],
    )


def _draw_multivalue(rng: random.Random, n_values: int) -> _Plan:
    """Return a plan of ``n_values`` needles sharing one key, asking for all their numbers."""
    taken: set[str] = set()
    key = _fresh(rng, _key, taken)
    values = tuple(_fresh(rng, _seven_digits, taken) for _ in range(n_values))
    return _Plan(
        planted=tuple((rng.random(), _MULTIVALUE_NEEDLE.format(key=key, value=v)) for v in values),
        question=_MULTIVALUE_QUESTION.format(key=key),
        answers=values,
        depth=None,
    )


def _draw_vartrack(rng: random.Random, n_chains: int, n_hops: int) -> _Plan:
    """Return a plan of ``n_chains`` assignment chains, asking for the variables of one of them."""
    taken: set[str] = set()
    planted: list[tuple[float, str]] = []
    chains: list[tuple[str, tuple[str, ...]]] = []
    for _ in range(n_chains):
        value = _fresh(rng, _five_digits, taken)
        names = tuple(_fresh(rng, _variable, taken) for _ in range(n_hops + 1))
        statements = [f"VAR {names[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
        # Sorted depths keep each assignment after the one it copies.
        planted += zip(sorted(rng.random() for _ in statements), statements)
        chains.append((value, names))
    value, names = chains[rng.randrange(n_chains)]
    return _Plan(
        planted=tuple(planted),
        question=_VARTRACK_QUESTION.format(value=value),
        answers=names,
        depth=None,
    )


def _draw_qa(rng: random.Random, n_facts: int) -> _Plan:
    """Return a plan of ``n_facts`` facts about distinct invented people, asking about one of them."""
    taken: set[str] = set()
    facts = []
    for _ in range(n_facts):
        relation = rng.choice(_RELATIONS)
        name = _fresh(rng, _person, taken)
        obj = _fresh(rng, lambda r: r.choice(relation.objects), taken)
        facts.append((rng.random(), relation, name, obj))
    depth, relation, name, obj = facts[rng.randrange(n_facts)]
    return _Plan(
        planted=tuple((d, rel.fact.format(name=n, obj=o)) for d, rel, n, o in facts),
        question=relation.question.format(name=name),
        answers=(obj,),
        depth=depth,
    )


def _draw_perplexity(rng: random.Random) -> _Plan:
    """Return the empty plan of a perplexity sample: nothing planted, nothing asked."""
    return _Plan(planted=(), question="", answers=(), depth=None, metric=PERPLEXITY)


def _key(rng: random.Random) -> str:
    """Return an invented needle key such as ``amber-lantern``."""
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _seven_digits(rng: random.Random) -> str:
    """Return a random 7-digit magic number as text."""
    return str(rng.randrange(1_000_000, 10_000_000))


def _five_digits(rng: random.Random) -> str:
    """Return a random 5-digit value as text (RULER's variable-tracking values)."""
    return str(rng.randrange(10_000, 100_000))


def _variable(rng: random.Random) -> str:
    """Return a random variable name of five capital letters (as in RULER)."""
    return "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))


def _person(rng: random.Random) -> str:
    """Return an invented full name."""
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"


def _fresh(rng: random.Random, make: Callable[[random.Random], str], taken: set[str]) -> str:
    """Return a new ``make(rng)`` absent from the essays and substring-unrelated to ``taken``; add it there.

    Case is ignored because the scoring is case-insensitive: a key that overlaps the haystack
    or another planted string could be found, or credited, in the wrong place.
    """
    lowered = _haystack().lowered
    for _ in range(_DRAW_ATTEMPTS):
        candidate = make(rng)
        low = candidate.lower()
        unrelated = all(low not in t.lower() and t.lower() not in low for t in taken)
        if unrelated and low not in lowered:
            taken.add(candidate)
            return candidate
    raise STSError(
        f"could not draw {len(taken) + 1} distinct invented strings from the fixed lists: "
        "ask for fewer keys, values, facts or chains"
    )


def _pseudo_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """Return ``n`` distinct pseudo-words not in ``taken`` (which grows by them)."""
    words = []
    while len(words) < n:
        word = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(_WORD_SYLLABLES)
        )
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _cwe_list(
    common: Sequence[str], freq_common: int, freq_rare: int, n_entries: int, list_seed: int
) -> str:
    """Return the preamble and a shuffled numbered list of about ``n_entries`` words (deterministic)."""
    rng = random.Random(list_seed)
    # Never fewer rare words than common ones, so the common words stand out from a real crowd.
    n_rare = max(len(common), (n_entries - len(common) * freq_common) // freq_rare)
    rare = _pseudo_words(rng, n_rare, set(common))
    words = [w for w in common for _ in range(freq_common)]
    words += [w for w in rare for _ in range(freq_rare)]
    rng.shuffle(words)
    return _CWE_PREAMBLE + " ".join(f"{i}. {w}" for i, w in enumerate(words, start=1))


def _filler(sentences: Sequence[str], start: int, n_chars: int) -> list[str]:
    """Return consecutive sentences from ``start``, wrapping around, holding at least ``n_chars`` characters."""
    out: list[str] = []
    total = 0
    while total < n_chars or not out:
        sentence = sentences[(start + len(out)) % len(sentences)]
        out.append(sentence)
        total += len(sentence) + 1
    return out


def _plant(filler: Sequence[str], planted: Sequence[tuple[float, str]]) -> str:
    """Return the filler joined by spaces, each planted sentence at the boundary nearest its depth.

    Depth is measured in characters. Sentences planted at the same boundary keep their order.
    """
    starts = [0, *itertools.accumulate(len(s) + 1 for s in filler)]  # boundary i precedes filler[i]
    at: dict[int, list[str]] = defaultdict(list)
    for depth, sentence in planted:
        at[_nearest(starts, depth * starts[-1])].append(sentence)
    out: list[str] = []
    for i, sentence in enumerate(filler):
        out += at[i]
        out.append(sentence)
    out += at[len(filler)]
    return " ".join(out)


def _nearest(sorted_values: Sequence[float], target: float) -> int:
    """Return the index of the value in ``sorted_values`` nearest to ``target``."""
    i = bisect.bisect_left(sorted_values, target)
    if i == len(sorted_values) or (i > 0 and target - sorted_values[i - 1] <= sorted_values[i] - target):
        return i - 1
    return i


def _fit(
    build: Callable[[int], str],
    measure: CountTokens,
    target: int,
    overhead: int,
    guess: int,
) -> str:
    """Return ``build(size)`` for the size whose ``measure`` came closest to ``target`` tokens.

    Tokens grow about linearly in size above a fixed ``overhead`` (question, needles), so each
    round rescales the size from one measurement: two or three token counts in all, however long.
    """
    size = max(1, guess)
    best, best_error = "", None
    for _ in range(_FIT_ROUNDS):
        text = build(size)
        n_tokens = measure(text)
        error = abs(n_tokens - target)
        if best_error is None or error < best_error:
            best, best_error = text, error
        if error <= _FIT_TOLERANCE * target:
            break
        size = max(1, round(size * (target - overhead) / max(1, n_tokens - overhead)))
    return best


def _join(context: str, question: str) -> str:
    """Return the prompt body: the context, then a blank line and the question when there is one."""
    return f"{context}\n\n{question}" if question else context


def _sample_id(task: str, context_tokens: int, seed: int, index: int, depth: float | None) -> str:
    """Return a deterministic id naming the task, length, seed, index and (when set) depth."""
    suffix = "" if depth is None else f"-d{depth:.3f}"
    return f"{task}-{context_tokens}-s{seed}-{index}{suffix}"


def _require_positive(**values: int) -> None:
    """Raise STSError naming the first argument below 1."""
    for name, value in values.items():
        if value < 1:
            raise STSError(f"{name} must be >= 1, got {value}")
