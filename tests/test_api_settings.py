"""``sts.LLM``'s settings and prompts: a bad one is a one-line STSError, and a setting's before anything loads."""

import numpy as np
import pytest
import torch

from sts import LLM
from sts.errors import STSError
from sts.runner import LoadedModel

MISSING = "/nonexistent/sts-target"  # loading it would fail: a settings error must come first


@pytest.mark.parametrize(("settings", "words"), [
    ({"gamma": 2.5}, "gamma must be an integer"),
    ({"gamma": 0}, "gamma must be >= 1"),
    ({"window": 2.5}, "window must be an integer"),
    ({"budget": "256"}, "budget must be a number"),
    ({"budget": float("nan")}, "budget must be finite and > 0"),
    ({"budget": float("inf")}, "budget must be finite and > 0"),
    ({"seed": 2**70}, "seed must be a 64-bit integer"),
    ({"max_model_len": 4}, "max_model_len must be >= 7"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
], ids=lambda v: str(v))
def test_a_bad_setting_is_refused_before_loading(settings, words):
    with pytest.raises(STSError, match=words):
        LLM(MISSING, MISSING, "sts", **settings)


@pytest.mark.parametrize("method", ["autoregressive", "speculative"])
@pytest.mark.parametrize("budget", [64, 1000, 0.5])
def test_a_budget_for_a_dense_method_is_refused_as_such(method, budget):
    # 64 is below the default sink + window: the message must still be that dense methods take no budget
    with pytest.raises(STSError, match=f"budget applies to selection methods .*not {method}"):
        LLM(MISSING, MISSING, method, budget=budget)


@pytest.mark.parametrize("method", ["autoregressive", "sts"])
def test_a_misspelt_keyword_is_a_type_error_as_python_gives_one(method):
    # not "options budgett apply to selection methods", nor a list of sts's options without the LLM's own keywords
    with pytest.raises(TypeError, match=r"^LLM\(\) got an unexpected keyword argument 'budgett'$"):
        LLM(MISSING, MISSING, method, budgett=64)
    with pytest.raises(STSError, match="unknown option 'page_size' for sts"):  # another policy's option: said so
        LLM(MISSING, MISSING, "sts", page_size=16)


def test_the_errors_are_exported_from_the_package():
    import sts
    from sts import RequestError, STSError as Exported

    assert Exported is STSError and issubclass(RequestError, STSError)
    with pytest.raises(sts.STSError, match="budget must be a number"):
        LLM(MISSING, MISSING, "sts", budget="abc")


def test_a_target_or_draft_that_is_not_a_model_source_is_refused():
    with pytest.raises(STSError, match="target must be a checkpoint directory.*got NoneType"):
        LLM(None, MISSING)  # type: ignore[arg-type]
    with pytest.raises(STSError, match="draft must be a checkpoint directory.*got int"):
        LLM(MISSING, 3)  # type: ignore[arg-type]


def test_a_missing_draft_path_fails_before_the_target_loads(tmp_path, monkeypatch):
    from conftest import hf_config, hf_model

    from sts import api

    hf_model(hf_config("llama")).save_pretrained(tmp_path / "target")
    loaded = []
    monkeypatch.setattr(api, "load", lambda source, *args: loaded.append(source))
    with pytest.raises(STSError, match="model path /nonexistent/sts-target does not exist"):
        LLM(str(tmp_path / "target"), MISSING)
    assert loaded == []


def test_autoregressive_needs_room_for_one_round_only():
    with pytest.raises(STSError, match="max_model_len must be >= 3"):
        LLM(MISSING, method="autoregressive", max_model_len=2)


def test_prompts_are_text_or_token_ids(tiny_pair):
    _, target, draft = tiny_pair
    llm = LLM(LoadedModel(target, None), LoadedModel(draft, None), "speculative", max_model_len=64, device="cpu")
    try:
        ids = [5, 9, 13, 2]
        want = llm.generate(ids, max_tokens=4)[0].token_ids
        # numpy and torch ids are ids too: the same tokens as a list of ints.
        assert llm.generate(np.array(ids), max_tokens=4)[0].token_ids == want
        assert llm.generate(torch.tensor(ids), max_tokens=4)[0].token_ids == want
        assert [r.token_ids for r in llm.generate([ids, ids], max_tokens=4)] == [want, want]
        for prompts, words in ((None, "prompts must be"), ([], "prompts must be"), ([1.5, 2.0], "a prompt is text or"),
                               ([[1, 2], None], "a prompt is text or"), (7, "prompts must be")):
            with pytest.raises(STSError, match=words):
                llm.generate(prompts, max_tokens=2)
        assert llm.generate(ids, max_tokens=4)[0].token_ids == want  # it still serves
    finally:
        llm.close()
