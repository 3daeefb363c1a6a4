"""`sts eval` end to end on a tiny random pair with a real tokenizer, resuming, and recall by brute force."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import hf_config, hf_model
from smollm2 import smollm2_tokenizer
from sts.cli import main
from sts.errors import STSError
from sts.eval import harness
from sts.selection import SelectionConfig
from sts.selection.attend import SelectiveAttention
from sts.selection.base import SelectionPolicy


class FixedRows(SelectionPolicy):
    """A policy that returns given rows (for checking the recall arithmetic)."""

    name = "fixed"

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__(SelectionConfig(budget=rows.shape[-1], sink=0, window=0))
        self.rows = rows

    def scores(self, layer, q, k_cache, start_pos):  # pragma: no cover - select() is overridden
        raise AssertionError

    def select(self, layer, q, k_cache, start_pos):
        return self.rows


def test_recall_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, t, d, s = 2, 4, 2, 3, 8, 30
    q, k = torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    start = torch.tensor([20, 12])
    rows = torch.tensor([[[0, 5, 7, 19, 25], [1, 2, 3, 4, 5]], [[0, 11, 3, 14, 29], [6, 7, 8, 9, 10]]])
    observer = SelectiveAttention(FixedRows(rows), measure_recall=True)
    observer.observe(0, q, k, start)
    mass, ratio, n = 0.0, 0.0, 0
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            chosen = {int(r) for r in rows[bi, kv] if r < start[bi]}
            for ti in range(t):
                visible = int(start[bi]) + ti + 1
                p = torch.softmax(q[bi, h, ti] @ k[bi, kv, :visible].T / math.sqrt(d), -1)
                m = float(sum(p[r] for r in chosen))
                mass += m
                ratio += m / float(p[: int(start[bi])].sum())
                n += 1
    assert observer.recall[0] == pytest.approx(mass / n, rel=1e-5)
    assert observer.recall_context[0] == pytest.approx(ratio / n, rel=1e-5)
    expected_sparsity = 1 - (4 / 20 + 5 / 20 + 3 / 12 + 5 / 12) / 4  # row 14 is past sequence 1's context
    assert float(observer.layer_sparsity()[0]) == pytest.approx(expected_sparsity)


@pytest.fixture(scope="module")
def tiny_pair_with_tokenizer(tmp_path_factory, sts_cache_dir):
    """Return (target dir, draft dir): tiny random Llamas sharing SmolLM2's real tokenizer."""
    tokenizer = smollm2_tokenizer(sts_cache_dir)
    root = tmp_path_factory.mktemp("pair")
    for name, layers, seed in (("target", 2, 0), ("draft", 1, 1)):
        hf_model(hf_config("llama", vocab=len(tokenizer), layers=layers, hidden=32), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return str(root / "target"), str(root / "draft")


def test_eval_runs_end_to_end_and_resumes(tiny_pair_with_tokenizer, tmp_path, capsys):
    target, draft = tiny_pair_with_tokenizer
    out = tmp_path / "eval"
    base = ["eval", "--target", target, "--draft", draft, "--tasks", "needle,qa,perplexity", "--lengths", "400",
            "--depths", "0.5", "--methods", "autoregressive,speculative,sts,streaming,oracle", "--sink", "2",
            "--window", "8", "--max-new-tokens", "6", "--ppl-tokens", "12", "--out", str(out)]
    assert main(base + ["--budgets", "32"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = {r["key"] for r in records}
    assert len(records) == len(keys) == 3 * 5  # 3 samples x (2 dense + 3 sparse at one budget)
    sparse = [r for r in records if r["method"] == "sts" and r["task"] != "perplexity"]
    assert all(0 < r["sparsity"] < 1 and 0 < r["recall"] <= 1 for r in sparse)
    assert all(len(r["recall_per_layer"]) == 2 for r in sparse)
    ppl = [r for r in records if r["task"] == "perplexity"]
    assert all(r["nll"] > 0 and r["nll_dense"] > 0 for r in ppl)
    assert [r["nll"] for r in ppl if r["method"] == "speculative"] == [ppl[0]["nll_dense"]]
    dense = {r["task"]: r["tokens"] for r in records if r["method"] == "autoregressive"}
    assert [r["agreement"] for r in records if r["method"] == "speculative"] == [1.0, 1.0, None]  # lossless
    assert len(dense["needle"]) == len(dense["qa"]) == 6
    # The random tiny target never ends its text: every answer is cut at 6 tokens, and the report says so.
    answered = [r for r in records if r["task"] != "perplexity"]
    assert all(r["cut"] and r["answers"] and r["score"] < 1 for r in answered)
    report = (out / "report.md").read_text()
    assert "| sts" in report and "recall_vs_budget.png" in report
    assert f"**Warning**: {len(answered)} of {len(answered)} answers scored below 1 stopped at the new-token limit" \
        in report
    assert (out / "recall_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    # Resuming: nothing new for the same grid; only the new budget's runs for a larger one.
    assert main(base + ["--budgets", "32"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 15
    assert main(base + ["--budgets", "32,64"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 15 + 3 * 3
    capsys.readouterr()


def _needle_eval(target: str, draft: str, out, *options: str) -> list[str]:
    """Return `sts eval` argv for one needle sample of 300 tokens into ``out``, then ``options``."""
    return ["eval", "--target", target, "--draft", draft, "--tasks", "needle", "--lengths", "300", "--depths", "0.5",
            "--sink", "2", "--window", "8", "--no-recall", "--out", str(out), *options]


def test_the_eval_bar_counts_the_reference_runs_it_adds(tiny_pair_with_tokenizer, tmp_path, capsys):
    """Dense greedy decoding runs for every sample (token agreement needs it) even when the grid leaves it out: the
    progress bar's total counts it, and ends full."""
    for methods, runs in (("speculative,sts", 3), ("autoregressive,speculative", 2)):
        out = tmp_path / methods.replace(",", "-")
        assert main(_needle_eval(*tiny_pair_with_tokenizer, out, "--methods", methods, "--budgets", "32",
                                 "--max-new-tokens", "4")) == 0
        bars = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("eval:")]
        assert bars and f"| {runs}/{runs} [" in bars[-1], bars[-3:]
        assert len(_records(out)) == runs


def _files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_eval_resumes_only_with_the_settings_of_its_records(tiny_pair_with_tokenizer, tmp_path, capsys):
    """A resume whose records would differ (records are keyed by sample, method and budget only) is refused
    without touching the folder; one with the same settings adds only the runs it lacks."""
    out = tmp_path / "eval"
    argv = _needle_eval(*tiny_pair_with_tokenizer, out, "--methods", "speculative,sts", "--max-new-tokens", "6")
    assert main(argv + ["--budgets", "32"]) == 0
    before, records = _files(out), _records(out)
    assert {"results.jsonl", "settings.json", "report.md"} <= before.keys() and len(records) == 3
    capsys.readouterr()
    for changed, named in ((["--max-new-tokens", "7"], "--max-new-tokens for needle 6 there, 7 now"),
                           (["--gamma", "2"], "--gamma 4 there, 2 now"), (["--window", "6"], "--window 8 there, 6 now")):
        assert main(argv + ["--budgets", "32,48", *changed]) == 2  # (of an option given twice, the last counts)
        (error,) = capsys.readouterr().err.strip().split("\n")[-1:]
        assert error.startswith(f"sts: error: {out} holds results made with other settings") and named in error
        assert "use another --out" in error
        assert _files(out) == before
    assert main(argv + ["--budgets", "32,48"]) == 0
    resumed = _records(out)
    assert resumed[:3] == records and [(r["method"], r["budget"]) for r in resumed[3:]] == [("sts", 48)]
    capsys.readouterr()
    other = tmp_path / "other"  # a folder of someone else's files is not an eval to resume: left as it was
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(_needle_eval(*tiny_pair_with_tokenizer, other, "--methods", "speculative")) == 2
    assert "holds other files and no sts eval results" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_eval_resumes_a_folder_from_before_settings_were_stored(tiny_pair_with_tokenizer, tmp_path, capsys, caplog):
    """A folder of records without settings.json resumes unchecked (with a warning), then stores its settings."""
    out = tmp_path / "eval"
    argv = _needle_eval(*tiny_pair_with_tokenizer, out, "--max-new-tokens", "6", "--budgets", "32")
    assert main(argv + ["--methods", "speculative"]) == 0
    (out / "settings.json").unlink()
    assert main(argv + ["--methods", "speculative,sts", "--gamma", "2"]) == 0
    assert "from before sts eval stored their settings" in caplog.text
    assert len(_records(out)) == 3 and json.loads((out / "settings.json").read_text())["gamma"] == 2
    assert main(argv + ["--methods", "speculative,sts"]) == 2
    assert "--gamma 2 there, 4 now" in capsys.readouterr().err


def test_a_failed_eval_leaves_no_output_folder(tiny_pair_with_tokenizer, tmp_path, capsys):
    """A run that fails before its first record (a prompt past the context) creates no folder, and its error
    prints on a line of its own, after the progress bars."""
    out = tmp_path / "x" / "e6b"
    argv = _needle_eval(*tiny_pair_with_tokenizer, out, "--methods", "sts", "--budgets", "32", "--max-new-tokens", "6")
    argv[argv.index("300")] = "1020"  # the tiny models' context: 1024 tokens, too few for the answer too
    assert main(argv) == 2
    assert not (tmp_path / "x").exists()
    errors = [line for line in capsys.readouterr().err.split("\n") if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("sts: error: prompt of "), errors
    argv[argv.index("1020")] = "2000"  # past the context itself: refused before any sample is built or tokenized
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenize" not in err and not (tmp_path / "x").exists()
    assert err.strip().endswith("sts: error: --lengths 2000: not below the context of target (1024 tokens), "
                                "which must also hold the answer"), err


def test_each_task_gets_its_own_answer_length_unless_one_is_given(tiny_pair_with_tokenizer, tmp_path, monkeypatch, capsys):
    target, draft = tiny_pair_with_tokenizer
    monkeypatch.setattr(harness, "ANSWER_TOKENS", {**harness.ANSWER_TOKENS, "needle": 5, "qa": 9})
    base = ["eval", "--target", target, "--draft", draft, "--tasks", "needle,qa", "--lengths", "400", "--depths", "0.5",
            "--methods", "autoregressive", "--no-recall"]
    assert main(base + ["--out", str(tmp_path / "own")]) == 0
    records = [json.loads(line) for line in (tmp_path / "own" / "results.jsonl").read_text().splitlines()]
    assert {r["task"]: len(r["tokens"]) for r in records} == {"needle": 5, "qa": 9}
    assert main(base + ["--max-new-tokens", "7", "--out", str(tmp_path / "given")]) == 0
    records = [json.loads(line) for line in (tmp_path / "given" / "results.jsonl").read_text().splitlines()]
    assert {r["task"]: len(r["tokens"]) for r in records} == {"needle": 7, "qa": 7}
    capsys.readouterr()


def test_recall_command_compares_methods_on_the_same_queries(tiny_pair_with_tokenizer, tmp_path, capsys):
    from sts.eval.text import haystack_text

    target, draft = tiny_pair_with_tokenizer
    text = tmp_path / "text.txt"
    text.write_text(haystack_text()[:6000])
    out = tmp_path / "recall.json"
    assert main(["recall", "--target", target, "--draft", draft, "--text-file", str(text), "--context", "300",
                 "--steps", "3", "--methods", "sts/rerank=0,sts,streaming,quest,oracle", "--budgets", "16,48",
                 "--sink", "2", "--window", "4", "--out", str(out)]) == 0
    rows = {(r["method"], r["budget"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 10
    for budget in (16.0, 48.0):
        oracle = rows["oracle", budget]["recall"]
        assert all(rows[m, budget]["recall"] <= oracle + 1e-6 for m in ("sts/rerank=0", "sts", "streaming", "quest"))
        # The oracle holds the true top rows among all but the forced sink + window (2 + 4) rows.
        assert rows["oracle", budget]["set_recall"]["budget"] >= (budget - 6) / budget - 1e-6
    assert rows["oracle", 48.0]["recall"] > rows["oracle", 16.0]["recall"]
    assert "sts/rerank=0" in capsys.readouterr().out
    table = out.with_suffix(".md").read_text()  # with its provenance, as an eval report
    assert table.startswith("Command: `sts recall --target") and "| sts/rerank=0 |" in table


def test_the_readme_eval_example_builds_its_methods(tiny_pair_with_tokenizer, tmp_path, monkeypatch, capsys):
    import shlex
    from pathlib import Path

    from sts.eval import harness
    from sts.models.loading import load_model
    from sts.selection import HeadMapping

    target, draft = tiny_pair_with_tokenizer
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("sts eval ")]
    paths = {"T": target, "D": draft, "runs/eval": str(tmp_path / "eval")}
    argv = [paths.get(word, word) for word in shlex.split(line)[1:]]
    runs = []  # the grid itself is minutes of work: stop where it would start, after the models load

    def planned(target, draft, out, settings, header=""):
        runs.append(settings)
        return Path(out) / "report.md"

    monkeypatch.setattr(harness, "run_eval", planned)
    assert main(argv) == 0
    names = [spec.name for spec in runs[-1].method_specs()]
    assert sorted(names) == sorted(["autoregressive", "speculative", "sts", "streaming", "quest", "tidal", "specpc", "oracle"])
    assert runs[-1].lengths == (2048, 4096) and runs[-1].budgets == (64, 256, 512)
    # Given a mapping, calibrated STS joins the default methods.
    mapping = tmp_path / "map.json"
    HeadMapping.default(load_model(target)[0].config, load_model(draft)[0].config).save(mapping)
    assert main(argv + ["--mapping", str(mapping)]) == 0
    assert "sts-cal" in [spec.name for spec in runs[-1].method_specs()]
    capsys.readouterr()


def test_teacher_forced_dense_perplexity_equals_transformers(tiny_pair):
    """The engine's teacher-forced rounds, verifying densely, score the text exactly as one transformers forward."""
    from sts.eval.teacher import teacher_forced

    hf, target, draft = tiny_pair
    tokens = [(11 * i + 3) % 96 for i in range(75)]
    context, gamma = 40, 3
    run = teacher_forced(target, draft, tokens, context, gamma, None)
    assert run.n_tokens == 32 and run.stats.target_forwards == 8  # 8 blocks of gamma + 1 after the context
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0]
    scored = range(context + 1, context + 1 + run.n_tokens)
    want = torch.nn.functional.cross_entropy(logits[[i - 1 for i in scored]], torch.tensor([tokens[i] for i in scored]))
    assert run.nll == pytest.approx(float(want), rel=1e-4)


def test_reused_engines_give_the_records_of_fresh_engines(tiny_pair_with_tokenizer, tmp_path, monkeypatch):
    """One engine per (method, budget) decodes every sample exactly as a fresh engine per run (`run_method`) does,
    the sparse-draft method and a method's own gamma and selection settings included; an interrupted grid resumes
    with the same records."""
    from sts import runner
    from sts.eval import harness
    from sts.eval.tasks import make_prompt
    from sts.runner import load_pair, run_method

    # The target drafts for itself: every dense draft is accepted, so acceptance tells a sparse draft apart.
    target, draft = load_pair(tiny_pair_with_tokenizer[0], tiny_pair_with_tokenizer[0], torch.float32, "cpu")
    every_layer = f"sts/dense_layers={target.model.config.n_layers}"  # verifies densely: decodes as speculative does
    settings = harness.EvalSettings(
        methods=("autoregressive", "speculative", "speculative/gamma=2", "sts", "streaming", "sts/draft_budget=12",
                 "sts/window=2/dense_layers=1", every_layer),
        budgets=(24, 0.25),
        tasks=("needle", "qa"), lengths=(300, 500), depths=(0.5,), limit=1, max_new_tokens=8, sink=2, window=8,
        measure_recall=False)
    specs = settings.method_specs()
    samples = harness.build_samples(settings.tasks, settings.lengths, settings.depths, 1, target.tokenizer, 0)
    built = []

    def counting(method, *args, **kwargs):
        built.append(method)
        return runner.build_engine(method, *args, **kwargs)

    monkeypatch.setattr(harness, "build_engine", counting)
    evaluator = harness.Evaluator(settings, target, draft, tmp_path)
    evaluator.run(samples, specs)
    assert len(built) == 13  # one engine per (method, budget), for 4 samples x 13 runs
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 13 and len({r["prompt_tokens"] for r in records}) == 4
    tokens = {(r["method"], r["sample_id"], r["budget"]): r["tokens"] for r in records}
    for r in records:
        if r["method"] == every_layer:
            assert r["tokens"] == tokens["speculative", r["sample_id"], None] and r["sparsity"] == 0, r["key"]
    dense_draft = {r["acceptance_length"] for r in records if r["method"] == "speculative"}
    sparse_draft = [r["acceptance_length"] for r in records if r["method"] == "sts/draft_budget=12"]
    assert dense_draft == {5.0} and max(sparse_draft) < 5
    assert {r["acceptance_length"] for r in records if r["method"] == "speculative/gamma=2"} == {3.0}
    by_id = {s.sample_id: s for s in samples}
    names = {spec.name: spec for spec in specs}
    for r in records:
        spec = names[r["method"]]
        prompt = target.tokenizer(make_prompt(by_id[r["sample_id"]], target.tokenizer), add_special_tokens=False)["input_ids"]
        fresh = run_method(spec.method, target, draft, [prompt], 8, gamma=evaluator.gamma(spec),
                           selection=settings.selection(r["budget"], spec) if r["budget"] is not None else None,
                           options=spec.policy_options(), draft_budget=spec.draft_budget,
                           draft_selection=spec.engine_draft_selection(), verify="sparse")
        assert r["tokens"] == fresh.tokens[0], r["key"]
        assert r["acceptance_length"] == pytest.approx(fresh.stats.summary()["acceptance_length"]), r["key"]
    # Interrupted after 13 runs: a new evaluator runs the other 39 and writes the same records.
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text("".join(lines[:13]))
    harness.Evaluator(settings, target, draft, tmp_path).run(samples, specs)
    resumed = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]

    def timeless(rs):
        return sorted(({k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in rs), key=lambda r: r["key"])

    assert timeless(resumed) == timeless(records)


def test_draft_budget_method_names():
    from sts.eval.harness import EvalSettings, parse_methods
    from sts.eval.recall import RecallSettings

    (spec,) = parse_methods(["sts-cal/rerank=0/draft_budget=256"], "map.json")
    assert (spec.method, spec.draft_budget, spec.policy_options()) == ("sts", 256, {"rerank": 0.0})
    assert parse_methods(["speculative/draft_budget=64"], None)[0].draft_budget == 64
    assert (parse_methods(["sts/gamma=6/draft_budget=64"], None)[0].gamma, parse_methods(["sts"], None)[0].gamma) == (6, None)
    (spec,) = parse_methods(["sts/window=256/rerank=8/dense_layers=2"], None)
    assert (spec.selection_settings, spec.policy_options()) == ((("window", 256), ("dense_layers", 2)), {"rerank": 8.0})
    config = EvalSettings(window=16, sink=4).selection(0.1, spec)
    assert (config.budget, config.sink, config.window, config.dense_layers) == (0.1, 4, 256, 2)
    for name, message in (("autoregressive/draft_budget=64", "apply to methods with a draft"),
                          ("autoregressive/gamma=6", "apply to methods with a draft"),
                          ("sts/gamma=0", "gamma must be a whole number"), ("speculative/gamma=2.5", "whole number"),
                          ("sts/draft_budget=64.5", "whole number"), ("sts/draft_budget=4", "exceed the 4 sink rows"),
                          ("sts/window=-1", "window must be a whole number >= 0"), ("sts/dense_layers=1.5", "whole number"),
                          ("speculative/window=8", "apply to selection methods only"),
                          ("sts/rerank=-1", "method 'sts/rerank=-1': rerank must be a whole number >= 0, got -1$")):
        with pytest.raises(STSError, match=message):
            parse_methods([name], None)
    with pytest.raises(STSError, match="one dense draft"):
        RecallSettings(methods=("sts/draft_budget=64",)).method_specs()
    with pytest.raises(STSError, match="compares selection methods .*, not autoregressive: name sparse methods only"):
        RecallSettings(methods=("sts", "autoregressive")).method_specs()
    assert all(s.sparse for s in RecallSettings(methods=None).method_specs())
    with pytest.raises(STSError, match="budget"):  # no room past sink + window: refused before any model loads
        EvalSettings(methods=("sts/window=600",), budgets=(512,)).method_specs()
    with pytest.raises(STSError, match="--lengths must be >= 1 tokens, got 0"):
        EvalSettings(methods=("sts",), lengths=(4096, 0)).method_specs()
