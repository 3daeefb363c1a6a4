"""Policy options: a name the policy does not take is a user error; a bug inside a policy is not."""

from __future__ import annotations

import pytest

from sts.errors import STSError
from sts.selection import REGISTRY, SelectionConfig, SelectionPolicy, make_policy

CONFIG = SelectionConfig(budget=16, sink=1, window=2)


def test_an_unknown_option_names_the_ones_the_policy_takes(tiny_pair):
    _, target, draft = tiny_pair
    with pytest.raises(STSError, match=r"unknown option 'pagesize' for quest \(it takes page_size\)"):
        make_policy("quest", CONFIG, target, draft, pagesize=8)
    with pytest.raises(STSError) as err:
        make_policy("sts", CONFIG, target, draft, rerankk=2)
    assert "'rerankk'" in str(err.value) and all(name in str(err.value) for name in ("rerank", "feedback", "head_budgets"))
    with pytest.raises(STSError, match="takes no options"):
        make_policy("streaming", CONFIG, target, draft, page_size=8)
    assert make_policy("quest", CONFIG, target, draft, page_size=8).page_size == 8


class Broken(SelectionPolicy):
    """A policy with a bug: its constructor raises TypeError on a valid option."""

    name = "broken"

    def __init__(self, config: SelectionConfig, scale: float = 1.0) -> None:
        super().__init__(config)
        self.width = len(scale)  # type: ignore[arg-type]  (the bug)

    def scores(self, layer, q, k_cache, start_pos):  # pragma: no cover - never constructed
        raise AssertionError


def test_a_type_error_inside_a_policy_is_not_called_a_bad_option(tiny_pair, monkeypatch):
    _, target, draft = tiny_pair
    monkeypatch.setitem(REGISTRY, "broken", Broken)
    with pytest.raises(TypeError, match="has no len"):
        make_policy("broken", CONFIG, target, draft, scale=2.0)
    with pytest.raises(STSError, match=r"it takes scale\)"):
        make_policy("broken", CONFIG, target, draft, size=2.0)
