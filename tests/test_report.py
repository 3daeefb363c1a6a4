"""Tests of the results report: means checked against hand-computed values, figures as valid PNGs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from sts.errors import STSError
from sts.eval.report import budget_panels, load_records, markdown_table, plot_all, summarise, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = {
    "recall_vs_budget.png",
    "accuracy_vs_budget.png",
    "needle_heatmap.png",
    "acceptance_vs_budget.png",
    "recall_per_layer.png",
}


def record(method: str, budget: float | None, task: str = "needle", **fields: Any) -> dict[str, Any]:
    """Return one results.jsonl record in the harness's schema, with every optional field null."""
    base: dict[str, Any] = {
        "key": f"{task}-{method}-{budget}",
        "task": task,
        "sample_id": f"{task}-0",
        "context_tokens": 4096,
        "prompt_tokens": 4200,
        "depth": None,
        "method": method,
        "budget": budget,
        "score": None,
        "nll": None,
        "nll_dense": None,
        "prediction": "",
        "agreement": None,
        "acceptance_length": None,
        "sparsity": None,
        "recall": None,
        "recall_context": None,
        "recall_per_layer": None,
        "set_recall": None,
        "time_s": 1.0,
        "tokens_per_s": None,
    }
    return {**base, **fields}


def needle(method: str, budget: float | None, length: int, depth: float, score: float, **fields: Any) -> dict[str, Any]:
    """Return a needle record at one cell of the length x depth grid."""
    return record(method, budget, context_tokens=length, depth=depth, score=score, **fields)


def synthetic_records() -> list[dict[str, Any]]:
    """Return records of dense and sparse methods over count and fraction budgets, tasks, lengths, depths."""
    records = []
    for method, acceptance in (("autoregressive", None), ("speculative", 3.0)):
        records += [
            needle(method, None, 4096, 0.0, 1.0, acceptance_length=acceptance),
            needle(method, None, 4096, 0.5, 1.0, acceptance_length=acceptance),
            needle(method, None, 8192, 0.0, 1.0, acceptance_length=acceptance),
            needle(method, None, 8192, 0.5, 0.0, acceptance_length=acceptance),
            record(method, None, "perplexity", nll=2.0, nll_dense=2.0),
        ]
    sts64 = dict(sparsity=0.9, agreement=0.8, acceptance_length=2.5, recall=0.7)
    records += [
        needle("sts", 64, 4096, 0.0, 1.0, recall_context=0.9, recall_per_layer=[0.9, 0.8],
               set_recall={"32": 1.0, "64": 0.5, "budget": 0.75}, **sts64),
        # 64.0 and 64 are one budget: the harness may write either.
        needle("sts", 64.0, 8192, 0.5, 0.0, recall_context=0.7, recall_per_layer=[0.7, 0.6],
               set_recall={"32": 0.5, "64": 0.5, "budget": 0.25}, **sts64),
        record("sts", 64, "qa", score=1.0),
        record("sts", 64, "perplexity", nll=2.2, nll_dense=2.0),
        record("sts", 64, "perplexity", nll=2.4, nll_dense=2.0),
        needle("sts", 256, 4096, 0.0, 1.0, recall_context=0.95, acceptance_length=2.9),
        needle("sts", 256, 8192, 0.5, 1.0, recall_context=0.99, acceptance_length=2.9),
        needle("sts", 0.1, 4096, 0.0, 0.0, recall_context=0.5),
        needle("streaming", 64, 4096, 0.0, 0.0, recall_context=0.4, recall_per_layer=[0.5, 0.3]),
        needle("quest", 64, 4096, 0.0, 1.0, recall_context=0.85),
    ]
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Return ``path`` after writing ``records`` one JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def row_of(rows: list[dict[str, Any]], method: str, budget: float | None) -> dict[str, Any]:
    """Return the summary row of (method, budget)."""
    (row,) = [r for r in rows if r["method"] == method and r["budget"] == budget]
    return row


def test_summarise_means_match_hand_computed_values() -> None:
    row = row_of(summarise(synthetic_records()), "sts", 64)
    assert row["accuracy_needle"] == pytest.approx(50.0)  # scores 1 and 0
    assert row["accuracy_qa"] == pytest.approx(100.0)
    # Mean of the task means (50 and 100), not of the three samples (66.7).
    assert row["accuracy"] == pytest.approx(75.0)
    assert row["recall_context"] == pytest.approx(0.8)
    assert row["recall"] == pytest.approx(0.7)
    assert row["set_recall_32"] == pytest.approx(0.75)
    assert row["set_recall_64"] == pytest.approx(0.5)
    assert row["set_recall_budget"] == pytest.approx(0.5)
    assert row["acceptance_length"] == pytest.approx(2.5)
    assert row["n"] == 5
    dense = row_of(summarise(synthetic_records()), "autoregressive", None)
    assert dense["accuracy_needle"] == pytest.approx(75.0)
    assert dense["recall_context"] is None
    assert dense["accuracy_qa"] is None


def test_dense_rows_first_then_method_and_budget_order() -> None:
    order = [(row["method"], row["budget"]) for row in summarise(synthetic_records())]
    assert order == [
        ("autoregressive", None),
        ("speculative", None),
        ("quest", 64),
        ("streaming", 64),
        ("sts", 0.1),
        ("sts", 64),
        ("sts", 256),
    ]


def test_fraction_budgets_are_separate_rows() -> None:
    rows = summarise(synthetic_records())
    fraction = row_of(rows, "sts", 0.1)
    assert fraction["n"] == 1
    assert fraction["recall_context"] == pytest.approx(0.5)
    assert row_of(rows, "sts", 64)["recall_context"] == pytest.approx(0.8)
    assert re.search(r"^\| sts \| 10% \|", markdown_table(rows), re.MULTILINE)


def test_perplexity_delta_is_difference_of_perplexities() -> None:
    rows = summarise(synthetic_records())
    assert row_of(rows, "sts", 64)["perplexity_delta"] == pytest.approx(math.exp(2.3) - math.exp(2.0))
    assert row_of(rows, "speculative", None)["perplexity_delta"] == pytest.approx(0.0)
    assert row_of(rows, "quest", 64)["perplexity_delta"] is None
    without = [r for r in synthetic_records() if r["task"] != "perplexity"]
    assert all("perplexity_delta" not in row for row in summarise(without))


def test_markdown_has_one_row_per_group_and_dashes_for_missing() -> None:
    rows = summarise(synthetic_records())
    lines = markdown_table(rows).strip().splitlines()
    assert len(lines) == 2 + len(rows)  # header, separator, one line per (method, budget)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lines[2:]}
    assert set(cells) == {
        ("autoregressive", "dense"),
        ("speculative", "dense"),
        ("quest", "64"),
        ("sts", "10%"),
        ("sts", "64"),
        ("sts", "256"),
        ("streaming", "64"),
    }
    autoregressive = [c.strip() for c in cells[("autoregressive", "dense")].strip("|").split("|")]
    assert autoregressive[header.index("mass recall / context")] == "-"
    sts = [c.strip() for c in cells[("sts", "64")].strip("|").split("|")]
    assert sts[header.index("needle %")] == "50.0"
    assert sts[header.index("set recall@32")] == "0.750"


def test_plot_all_writes_valid_pngs(tmp_path: Path) -> None:
    paths = plot_all(synthetic_records(), tmp_path)
    assert {path.name for path in paths} == ALL_FIGURES
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), path.name
    assert not list(tmp_path.glob(".*.tmp"))


def test_budget_panels_keep_each_context_length_apart() -> None:
    """A budget run at one length only is not averaged with another length's samples: one panel per length, each
    with that length's means (hand-computed), dense methods as single values, fractional budgets left out."""
    def at(method, budget, length, score, sample):
        return record(method, budget, context_tokens=length, score=score, sample_id=f"s{sample}")
    records = [at("autoregressive", None, 4096, 1.0, 0), at("autoregressive", None, 4096, 0.0, 1),
               at("autoregressive", None, 8192, 1.0, 0),
               at("sts", 512, 4096, 1.0, 0), at("sts", 512, 4096, 1.0, 1), at("sts", 0.1, 4096, 0.0, 0),
               at("sts", 512, 8192, 0.0, 0), at("sts", 1024, 8192, 1.0, 0), at("sts", 1024, 8192, 0.5, 1)]
    mean_score = lambda group: sum(r["score"] for r in group) / len(group)
    assert budget_panels(records, mean_score) == {
        4096: ({"sts": [(512, 1.0)]}, {"autoregressive": 0.5}),
        8192: ({"sts": [(512, 0.0), (1024, 0.75)]}, {"autoregressive": 1.0}),
    }
    only_dense = [at("autoregressive", None, 4096, 1.0, 0), at("sts", 512, 8192, 1.0, 0)]
    assert list(budget_panels(only_dense, mean_score)) == [8192]


def test_plot_all_skips_figures_without_records(tmp_path: Path) -> None:
    dense_only = [record("autoregressive", None, "qa", score=1.0)]
    assert plot_all(dense_only, tmp_path) == []
    sts_needles = [needle("sts", 64, 4096, 0.0, 1.0, recall_context=0.9)]
    names = {path.name for path in plot_all(sts_needles, tmp_path / "sts")}
    assert names == {"recall_vs_budget.png", "accuracy_vs_budget.png", "needle_heatmap.png"}


def test_load_records_skips_blank_lines_and_names_corrupt_line(tmp_path: Path) -> None:
    good = json.dumps(record("sts", 64, score=1.0))
    path = tmp_path / "results.jsonl"
    path.write_text(f"{good}\n\n{good}\n", encoding="utf-8")
    assert len(load_records(path)) == 2
    path.write_text(f"{good}\n\n{{\"method\": \"sts\", \n", encoding="utf-8")
    with pytest.raises(STSError, match=r"results\.jsonl:3:"):
        load_records(path)
    with pytest.raises(STSError, match="cannot read"):
        load_records(tmp_path / "missing.jsonl")


def test_write_report_links_existing_pngs(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "results.jsonl", synthetic_records())
    report = write_report(results, tmp_path / "report", header="# Demo run\n\nH200, `sts eval`.")
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Demo run")
    assert "| sts | 64 |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(links) == ALL_FIGURES
    for link in links:
        assert (report.parent / link).read_bytes().startswith(PNG_MAGIC)
    assert not list(report.parent.glob(".*.tmp"))


def test_interval_tables_pair_samples_by_id_and_match_the_intervals() -> None:
    from scipy import stats

    from sts.eval.intervals import paired_difference_interval
    from sts.eval.report import accuracy_intervals, interval_tables

    ref = [1.0] * 18 + [0.0] * 2
    sts = [1.0] * 14 + [0.0] * 4 + [1.0, 0.0]  # 15 of 20; pairs differ on samples 14-18
    accept = [2.0 + 0.1 * i for i in range(20)]
    records = [needle("autoregressive", None, 8192, 0.5, s, sample_id=f"s{i}", acceptance_length=1.0) for i, s in enumerate(ref)]
    # Written in reverse order: pairing must go by sample id, not by position.
    records += [needle("sts", 0.1, 8192, 0.5, sts[i], sample_id=f"s{i}", acceptance_length=accept[i], sparsity=0.9)
                for i in reversed(range(20))]
    (dense, row) = accuracy_intervals(records)
    assert dense["delta"] is None and dense["n"] == 20
    want = paired_difference_interval(sts, ref)
    assert (row["delta"].estimate, row["delta"].low, row["delta"].high) == pytest.approx((want.estimate, want.low, want.high))
    text = interval_tables(records)
    cells = [c.strip() for c in next(line for line in text.splitlines() if "| sts |" in line).strip("|").split("|")]
    assert cells[:6] == ["needle", "8K", "sts", "10%", "20", "75.0"]
    assert cells[6] == "[53.1, 88.8]"  # Wilson, 15 of 20
    assert cells[7] == f"{100 * want.estimate:+.1f}" == "-15.0"
    t = stats.ttest_1samp(accept, 0.0).confidence_interval(0.95)
    assert f"| sts | 10% | {sum(accept) / 20:.2f} ± {(t.high - t.low) / 2:.2f} |" in text
    assert interval_tables([record("sts", 64, "perplexity", nll=2.0, nll_dense=2.0)]) == ""
    # All tasks of a length together: 10 qa samples where sts gains 2 answers join the 20 needle ones (it loses 3).
    qa_ref, qa_sts = [0.0] * 10, [1.0] * 2 + [0.0] * 8
    records += [record(m, b, "qa", sample_id=f"q{i}", context_tokens=8192, score=s)
                for m, b, scores in (("autoregressive", None, qa_ref), ("sts", 0.1, qa_sts)) for i, s in enumerate(scores)]
    differences = [100 * (a - b) for a, b in zip(sts + qa_sts, ref + qa_ref)]
    t = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    mean = sum(differences) / 30
    assert mean == pytest.approx(-100 / 30)  # a net answer lost of 30
    assert f"| sts | 10% | {mean:.2f} ± {(t.high - t.low) / 2:.2f} |" in interval_tables(records)


def test_the_cut_note_counts_only_answers_cut_short_that_score_below_one():
    from sts.eval.report import cut_note

    def rec(task, score, cut):
        return {"task": task, "score": score, "cut": cut}

    assert cut_note([rec("qa", 0.0, False), rec("qa", 1.0, True), {"task": "qa", "score": 0.0}]) == ""  # old records
    note = cut_note([rec("qa", 0.0, True), rec("needle", 0.5, True), rec("qa", 1.0, True), rec("cwe", 0.0, False),
                     rec("perplexity", None, False)])
    assert note.startswith("**Warning**: 2 of 4 answers scored below 1 stopped at the new-token limit") and \
        "(needle, qa)" in note
