"""``sts eval``'s engine reuse on a CUDA device: engines whose graphs were captured once, sharing the models' caches
and restoring each sample's prefill, decode as a fresh engine per run does. Runs where a GPU is."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_config, hf_model, ours, perturbed
from sts.eval.harness import EvalSettings, Evaluator
from sts.models.loading import build_model
from sts.runner import LoadedModel, build_engine

DEVICE = "cuda" if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device")


def test_cuda_reused_engines_decode_as_fresh_engines(tmp_path):
    target = ours(hf_model(hf_config("llama", layers=3, heads=8, kv_heads=2, hidden=256), seed=0))
    draft = perturbed(target, 0.1, seed=1)
    pair = [LoadedModel(build_model(m.config, m.state_dict(), torch.float32, DEVICE), None) for m in (target, draft)]
    settings = EvalSettings(methods=("autoregressive", "speculative", "sts", "sts/draft_budget=24"), budgets=(32, 0.25),
                            sink=4, window=8, max_new_tokens=16, measure_recall=False)
    specs = settings.method_specs()
    evaluator = Evaluator(settings, *pair, tmp_path)
    prompts = [list(range(1, 90)), [5, 6, 7] * 50, [(7 * i) % 96 for i in range(400)]]  # growing: one cache size
    evaluator.max_len = max(map(len, prompts)) + settings.max_new_tokens + settings.gamma + 1
    for prompt in prompts:  # samples outermost, as the grid runs
        evaluator.prefix_cache.entries.clear()
        for spec in specs:
            for budget in (settings.budgets if spec.sparse else (None,)):
                got = evaluator.engine(spec, budget).generate([prompt], settings.max_new_tokens)
                fresh = build_engine(spec.method, *pair, slots=1, max_len=evaluator.max_len, gamma=settings.gamma,
                                     selection=settings.selection(budget, spec) if budget is not None else None,
                                     draft_budget=spec.draft_budget, draft_selection=spec.engine_draft_selection(),
                                     verify="sparse")
                want = fresh.generate([prompt], settings.max_new_tokens)
                assert got.tokens == want.tokens, (spec.name, budget, len(prompt))
                assert got.stats.accepted_per_round == want.stats.accepted_per_round, (spec.name, budget, len(prompt))
    assert len(evaluator.engines) == 6 and all(engine.graphs_enabled for engine, _ in evaluator.engines.values())
