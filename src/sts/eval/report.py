"""Summary table, confidence-interval tables and figures of an evaluation's ``results.jsonl`` (one record per
sample, method and budget).

A record's ``budget`` is either a count of KV rows per head (>= 1) or a fraction of the
context (< 1); the two are different axes, so they are kept apart in the table and only
counts are drawn on the budget axis of the figures. Records without a budget are dense
methods (autoregressive and speculative decoding), drawn as dashed reference lines.
The interval tables (:func:`interval_tables`) give accuracy per task and context length with
its 95% interval, its paired difference to dense autoregressive decoding on the same samples,
that difference over every task's samples of a context length, and acceptance length per context
length (:mod:`sts.eval.intervals`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from sts.errors import STSError
from sts.eval.intervals import CONFIDENCE, Interval, mean_interval, paired_difference_interval, wilson_interval
from sts.eval.output import atomic_write, read_jsonl

Record = dict[str, Any]
Row = dict[str, Any]
GroupKey = tuple[str, float | None]
Aggregate = Callable[[Sequence[Record]], float | None]

NEEDLE_TASK = "needle"
STS_METHOD = "sts"
# The needle heatmap's dense panel: speculative decoding is what STS speeds up, so it is the
# reference to beat; autoregressive decoding stands in when it was not run.
DENSE_PREFERENCE = ("speculative", "autoregressive")

_REQUIRED_FIELDS = ("method", "task")
_SET_RECALL_KEYS = ("32", "64", "budget")
_TASK_PREFIX = "accuracy_"
_MEAN_FIELDS = ("recall", "recall_context")
_STEP_FIELDS = ("sparsity", "acceptance_length", "agreement")
_HEADERS = {
    "accuracy": "accuracy %",
    "recall": "mass recall",
    "recall_context": "mass recall / context",
    "set_recall_32": "set recall@32",
    "set_recall_64": "set recall@64",
    "set_recall_budget": "set recall@budget",
    "acceptance_length": "acceptance length",
    "perplexity_delta": "Δ perplexity",
}
_METRIC_NOTES = (
    "Task columns and *accuracy %* are percentages; *accuracy %* is the mean of the task means, "
    "so that a task with many samples (the needle grid) does not outweigh the others. "
    "*mass recall*: share of the dense attention mass that falls on the selected rows; "
    "*mass recall / context*: the same over the mass that falls on the context at all "
    "(1.0 = as good as attending to the whole context); *set recall@k*: share of the oracle's "
    "top-k rows that the selection contains; *Δ perplexity*: exp(mean NLL) - exp(mean dense NLL) "
    "on the perplexity samples."
)
#: The method every accuracy difference is taken against, on the same samples.
REFERENCE_METHOD = "autoregressive"
_INTERVAL_NOTES = (
    f"*accuracy %*: mean score (0/1 for one answer, partial credit for several) with its "
    f"{CONFIDENCE:.0%} Wilson score interval; *Δ*: accuracy minus dense {REFERENCE_METHOD} decoding's "
    f"on the same samples, in points, with Newcombe's paired square-and-add {CONFIDENCE:.0%} interval "
    "(for 0/1 scores the textbook intervals; for partial credit conservative); *all tasks*: the mean over "
    "every sample of a context length, all tasks together, of that paired difference, ± the half-width of its "
    f"{CONFIDENCE:.0%} Student t interval; *acceptance length*: "
    "mean over samples of tokens per target forward, ± the half-width of its "
    f"{CONFIDENCE:.0%} Student t interval over samples."
)
_RECALL_CONTEXT_LABEL = "mass recall / context mass"
_BUDGET_AXIS_LABEL = "token budget (KV rows per head, log2 scale)"
_DPI = 120


def load_records(path: str | Path) -> list[Record]:
    """Return the records of a ``results.jsonl`` file, skipping blank lines.

    Raises :class:`STSError` naming the file and line of a line that is not a JSON object
    with a ``method`` and a ``task``.
    """
    return read_jsonl(path, _REQUIRED_FIELDS)


def summarise(records: Iterable[Record]) -> list[Row]:
    """Return one row per (method, budget): dense methods first, then by method name and budget.

    Every row has the same keys: ``method``, ``budget`` (None for dense), one
    ``accuracy_<task>`` percentage per scored task present, ``accuracy`` (mean of the task
    means, %), ``recall``, ``recall_context``, ``set_recall_32``, ``set_recall_64``,
    ``set_recall_budget``, ``sparsity``, ``acceptance_length``, ``agreement``,
    ``perplexity_delta`` (only when some record has an NLL) and ``n`` (records). A mean
    over no values is None.
    """
    records = list(records)
    tasks = sorted({r["task"] for r in records if r.get("score") is not None})
    with_perplexity = any(r.get("nll") is not None for r in records)
    return [
        _summary_row(method, budget, group, tasks, with_perplexity)
        for (method, budget), group in _sorted_groups(records)
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    """Return ``rows`` (from :func:`summarise`) as a GitHub markdown table; "" for no rows.

    Numbers get three significant digits, fraction budgets read as percentages ("10%") and
    missing values as "-".
    """
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [
        _table_line(_header(key) for key in keys),
        _table_line("---" if key == "method" else "---:" for key in keys),
    ]
    lines += [_table_line(_cell(key, row[key]) for key in keys) for row in rows]
    return "\n".join(lines) + "\n"


def accuracy_intervals(records: Iterable[Record]) -> list[Row]:
    """Return one row per (task, context length, method, budget) of the scored records.

    Rows are ordered by task, context length, then as :func:`summarise` orders methods. Each has
    ``task``, ``context_tokens``, ``method``, ``budget``, ``n`` (samples), ``accuracy`` (an
    :class:`~sts.eval.intervals.Interval` of the mean score, in [0, 1]), ``delta`` (the paired
    difference to :data:`REFERENCE_METHOD` over the samples both ran, or None for the reference
    itself and where it did not run), ``sparsity`` and ``acceptance_length`` (means, or None).
    """
    groups: dict[tuple[str, int, str, float | None], dict[str, Record]] = defaultdict(dict)
    for record in records:
        if _values([record], "score"):
            groups[(record["task"], record["context_tokens"], record["method"], _budget(record))][record["sample_id"]] = record
    rows = []
    for (task, length, method, budget), group in sorted(groups.items(), key=lambda kv: (*kv[0][:2], *_order(kv[0][2:]))):
        scores = {sample: float(r["score"]) for sample, r in group.items()}
        reference = groups.get((task, length, REFERENCE_METHOD, None), {})
        paired = [sample for sample in scores if sample in reference]
        delta = None
        if (method, budget) != (REFERENCE_METHOD, None) and paired:
            delta = paired_difference_interval([scores[s] for s in paired], [float(reference[s]["score"]) for s in paired])
        rows.append({
            "task": task, "context_tokens": length, "method": method, "budget": budget, "n": len(scores),
            "accuracy": wilson_interval(list(scores.values())), "delta": delta,
            "sparsity": _mean(_values(group.values(), "sparsity")),
            "acceptance_length": _mean(_values(group.values(), "acceptance_length")),
        })
    return rows


def acceptance_intervals(records: Iterable[Record]) -> dict[GroupKey, dict[int, Interval | float]]:
    """Return, per (method, budget) with acceptance lengths, per context length: the mean over samples and its
    Student t interval (the bare mean where only one sample ran). Ordered as :func:`summarise` orders methods."""
    values: dict[GroupKey, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        values[(record["method"], _budget(record))][record["context_tokens"]] += _values([record], "acceptance_length")
    return _per_length(values, (1.0, math.inf))  # a round yields at least one token


def pooled_deltas(records: Iterable[Record]) -> dict[GroupKey, dict[int, Interval | float]]:
    """Return, per (method, budget) other than the reference, per context length: the mean over every scored
    sample of that length, all tasks together, of its score minus :data:`REFERENCE_METHOD`'s on the same sample
    (in points), with the Student t interval of that paired mean. Tasks with equal sample counts weigh equally.
    Ordered as :func:`summarise` orders methods."""
    scored = [r for r in records if _values([r], "score")]
    reference = {r["sample_id"]: float(r["score"]) for r in scored if (r["method"], _budget(r)) == (REFERENCE_METHOD, None)}
    values: dict[GroupKey, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in scored:
        key = (record["method"], _budget(record))
        if key != (REFERENCE_METHOD, None) and record["sample_id"] in reference:
            values[key][record["context_tokens"]].append(100 * (float(record["score"]) - reference[record["sample_id"]]))
    return _per_length(values, (-100.0, 100.0))


def _per_length(values: dict[GroupKey, dict[int, list[float]]],
                bounds: tuple[float, float]) -> dict[GroupKey, dict[int, Interval | float]]:
    """Return each group's per-length mean with its Student t interval cut to ``bounds`` (a bare mean for one
    value), in method order."""
    out: dict[GroupKey, dict[int, Interval | float]] = {}
    for key in sorted(values, key=_order):
        cells = {length: mean_interval(v, bounds=bounds) or v[0] for length, v in sorted(values[key].items()) if v}
        if cells:
            out[key] = cells
    return out


def interval_tables(records: Sequence[Record]) -> str:
    """Return the markdown of the accuracy and acceptance tables with their 95% intervals and a note on the
    methods; "" when no record is scored nor has an acceptance length. Ready to paste into docs whole."""
    parts = []
    rows = accuracy_intervals(records)
    if rows:
        lines = [
            _table_line(("task", "context", "method", "budget", "n", "accuracy %", f"{CONFIDENCE:.0%} CI",
                         f"Δ vs {REFERENCE_METHOD} (points)", f"{CONFIDENCE:.0%} CI", "sparsity", "acceptance length")),
            _table_line(("---",) * 4 + ("---:",) * 7),
        ]
        for row in rows:
            accuracy, delta = row["accuracy"], row["delta"]
            lines.append(_table_line((
                row["task"], _tokens_label(row["context_tokens"]), row["method"], _budget_label(row["budget"]),
                str(row["n"]), f"{100 * accuracy.estimate:.1f}", _points(accuracy, signed=False),
                "-" if delta is None else f"{100 * delta.estimate:+.1f}", "-" if delta is None else _points(delta, signed=True),
                _cell("sparsity", row["sparsity"]), _cell("acceptance_length", row["acceptance_length"]),
            )))
        parts.append("\n".join(lines))
    for title, table in ((f"Δ vs {REFERENCE_METHOD}, all tasks (points)", pooled_deltas(records)),
                         ("acceptance length", acceptance_intervals(records))):
        if table:
            lengths = sorted({length for cells in table.values() for length in cells})
            lines = [
                _table_line(("method", "budget", *(f"{title} @ {_tokens_label(n)}" for n in lengths))),
                _table_line(("---", "---", *("---:",) * len(lengths))),
            ]
            for (method, budget), cells in table.items():
                lines.append(_table_line((method, _budget_label(budget), *(_plus_minus(cells.get(n)) for n in lengths))))
            parts.append("\n".join(lines))
    if not parts:
        return ""
    return "\n\n".join(parts + [_INTERVAL_NOTES]) + "\n"


def plot_all(
    records: Sequence[Record],
    out_dir: str | Path,
    heatmap_budget: float | None = None,
    layer_budget: float | None = None,
) -> list[Path]:
    """Return the paths of the PNG figures written to ``out_dir``; a figure without records is skipped.

    ``heatmap_budget`` picks the STS panel of the needle heatmap and ``layer_budget`` the
    budget of the per-layer recall figure; each defaults to the most common count budget
    among the records concerned (STS records, records with per-layer recall).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if heatmap_budget is None:
        heatmap_budget = _most_common_count(r for r in records if r["method"] == STS_METHOD)
    if layer_budget is None:
        layer_budget = _most_common_count(r for r in records if r.get("recall_per_layer"))
    figures = [
        _plot_vs_budget(
            records,
            _field_mean("recall_context"),
            out / "recall_vs_budget.png",
            title="Mass recall / context mass vs token budget",
            ylabel=_RECALL_CONTEXT_LABEL,
        ),
        _plot_vs_budget(
            records,
            _accuracy,
            out / "accuracy_vs_budget.png",
            title="Mean task accuracy vs token budget",
            ylabel="accuracy (%, mean of task means)",
        ),
        _plot_needle_heatmap(records, heatmap_budget, out / "needle_heatmap.png"),
        _plot_vs_budget(
            records,
            _field_mean("acceptance_length"),
            out / "acceptance_vs_budget.png",
            title="Acceptance length vs token budget",
            ylabel="acceptance length (tokens per target forward)",
        ),
        _plot_recall_per_layer(records, layer_budget, out / "recall_per_layer.png"),
    ]
    return [path for path in figures if path is not None]


def write_report(results_path: str | Path, out_dir: str | Path, header: str = "") -> Path:
    """Return the path of ``out_dir/report.md``: ``header``, the summary table, the interval tables and the figures.

    The figures are written beside the report and linked relatively, so the folder can be
    moved as a whole. Raises :class:`STSError` when the results file holds no records.
    """
    records = load_records(results_path)
    if not records:
        raise STSError(f"results file {results_path} holds no records")
    out = Path(out_dir)
    figures = plot_all(records, out)
    parts = [
        header.strip(),
        markdown_table(summarise(records)).strip(),
        cut_note(records),
        _METRIC_NOTES,
        interval_tables(records).strip(),
        *(f"![{path.stem.replace('_', ' ')}]({path.name})" for path in figures),
    ]
    text = "\n\n".join(part for part in parts if part) + "\n"
    report = out / "report.md"
    atomic_write(report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return report


def cut_note(records: Sequence[Record]) -> str:
    """Return a warning when answers that score below 1 stopped at the new-token limit (``cut``): they may be right
    answers cut short, so ``--max-new-tokens`` is too low for them; else ""."""
    cut = [r for r in records if r.get("cut") and (r.get("score") or 0.0) < 1.0]
    if not cut:
        return ""
    scored = sum(1 for r in records if r.get("score") is not None)
    tasks = ", ".join(sorted({r["task"] for r in cut}))
    return (f"**Warning**: {len(cut)} of {scored} answers scored below 1 stopped at the new-token limit, not at the "
            f"model's end of text ({tasks}): a right answer cut short scores as a wrong one. Raise "
            "`--max-new-tokens` (or leave it out: each task's own length) and compare `prediction` with `answers` "
            "in results.jsonl.")


def _summary_row(
    method: str, budget: float | None, group: Sequence[Record], tasks: Sequence[str], with_perplexity: bool
) -> Row:
    """Return the table row of one (method, budget) group."""
    task_accuracies = _task_accuracies(group)
    row: Row = {"method": method, "budget": budget}
    row.update({f"{_TASK_PREFIX}{task}": task_accuracies.get(task) for task in tasks})
    row["accuracy"] = _mean(task_accuracies.values())
    row.update({name: _mean(_values(group, name)) for name in _MEAN_FIELDS})
    row.update({f"set_recall_{k}": _mean(_set_recalls(group, k)) for k in _SET_RECALL_KEYS})
    row.update({name: _mean(_values(group, name)) for name in _STEP_FIELDS})
    if with_perplexity:
        row["perplexity_delta"] = _perplexity_delta(group)
    row["n"] = len(group)
    return row


def _sorted_groups(records: Iterable[Record]) -> list[tuple[GroupKey, list[Record]]]:
    """Return the records grouped by (method, budget): dense first, then by name and ascending budget."""
    groups: dict[GroupKey, list[Record]] = defaultdict(list)
    for record in records:
        groups[(record["method"], _budget(record))].append(record)
    return sorted(groups.items(), key=lambda item: _order(item[0]))


def _order(key: GroupKey) -> tuple[bool, str, float]:
    """Return the sort key of a (method, budget) group: dense first, then name, then budget."""
    method, budget = key
    return (budget is not None, method, 0.0 if budget is None else budget)


def _budget(record: Record) -> float | None:
    """Return a record's budget as a float (64 and 64.0 are one budget), or None when dense."""
    budget = record.get("budget")
    return None if budget is None else float(budget)


def _is_count(budget: float | None) -> bool:
    """Return whether ``budget`` counts rows per KV head (rather than being dense or a fraction)."""
    return budget is not None and budget >= 1


def _values(records: Iterable[Record], name: str) -> list[float]:
    """Return the finite values of field ``name`` among ``records``."""
    # json.dumps writes NaN (e.g. a recall over zero context mass); one would poison a mean.
    return [float(v) for r in records if (v := r.get(name)) is not None and math.isfinite(v)]


def _set_recalls(records: Iterable[Record], k: str) -> list[float]:
    """Return the finite set recall@``k`` values among ``records``."""
    return _values((r.get("set_recall") or {} for r in records), k)


def _mean(values: Iterable[float]) -> float | None:
    """Return the arithmetic mean of ``values``, or None when there are none."""
    values = list(values)
    return sum(values) / len(values) if values else None


def _field_mean(name: str) -> Aggregate:
    """Return a function giving the mean of field ``name`` over records (None when absent)."""
    return lambda records: _mean(_values(records, name))


def _task_accuracies(records: Iterable[Record]) -> dict[str, float]:
    """Return the mean score of each task that has scored records, in percent."""
    scores: dict[str, list[float]] = defaultdict(list)
    for record in records:
        scores[record["task"]] += _values([record], "score")
    return {task: 100.0 * sum(s) / len(s) for task, s in scores.items() if s}


def _accuracy(records: Sequence[Record]) -> float | None:
    """Return the mean of the task accuracies of ``records`` in percent, or None when none is scored."""
    return _mean(_task_accuracies(records).values())


def _perplexity_delta(records: Iterable[Record]) -> float | None:
    """Return exp(mean NLL) - exp(mean dense NLL) over the records that have both, or None."""
    # Only records carrying both NLLs, so that both perplexities are over the same samples.
    paired = [r for r in records if _values([r], "nll") and _values([r], "nll_dense")]
    if not paired:
        return None
    nll, nll_dense = _mean(_values(paired, "nll")), _mean(_values(paired, "nll_dense"))
    return math.exp(nll) - math.exp(nll_dense)


def _budget_label(budget: float | None) -> str:
    """Return a budget as read in the table: "dense", a row count ("64") or a percentage ("10%")."""
    if budget is None:
        return "dense"
    if not _is_count(budget):
        return f"{budget * 100:g}%"
    return str(int(budget)) if budget.is_integer() else f"{budget:g}"


def _header(key: str) -> str:
    """Return the column header of row key ``key``."""
    if key.startswith(_TASK_PREFIX):
        return f"{key.removeprefix(_TASK_PREFIX)} %"
    return _HEADERS.get(key, key)


def _cell(key: str, value: Any) -> str:
    """Return the table text of ``value`` in column ``key``."""
    if key == "budget":
        return _budget_label(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return _format_number(value)
    return str(value)


def _format_number(value: float) -> str:
    """Return ``value`` with three significant digits (whole numbers from 100 on)."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:#.3g}"


def _points(interval: Interval, signed: bool) -> str:
    """Return an interval of shares as percentage points, "[62.1, 94.8]" (``signed``: "[-21.0, +9.9]")."""
    form = "+.1f" if signed else ".1f"
    return f"[{100 * interval.low:{form}}, {100 * interval.high:{form}}]"


def _plus_minus(cell: Interval | float | None) -> str:
    """Return a per-length cell: "2.91 ± 0.12" (the mean and its interval's half-width), a bare mean, or "-"."""
    if cell is None:
        return "-"
    if isinstance(cell, Interval):
        return f"{cell.estimate:.2f} ± {(cell.high - cell.low) / 2:.2f}"
    return f"{cell:.2f}"


def _table_line(cells: Iterable[str]) -> str:
    """Return one markdown table line of ``cells``."""
    return "| " + " | ".join(cells) + " |"


def _most_common_count(records: Iterable[Record]) -> float | None:
    """Return the count budget that most records have (the larger on a tie), or None."""
    counts = Counter(b for r in records if _is_count(b := _budget(r)))
    return max(counts, key=lambda b: (counts[b], b)) if counts else None


#: Per context length: (sparse method -> [(count budget, value)], dense method -> value).
BudgetPanel = tuple[dict[str, list[tuple[float, float]]], dict[str, float]]


def budget_panels(records: Iterable[Record], aggregate: Aggregate) -> dict[int, BudgetPanel]:
    """Return, per context length in ascending order, each sparse method's ``aggregate`` at each count budget and each
    dense method's; lengths without a sparse value are left out. Lengths are kept apart because a grid's methods and
    budgets need not cover every length alike (a mean over lengths would compare different samples)."""
    by_length: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        by_length[record["context_tokens"]].append(record)
    panels: dict[int, BudgetPanel] = {}
    for length in sorted(by_length):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        dense: dict[str, float] = {}
        for (method, budget), group in _sorted_groups(by_length[length]):
            value = aggregate(group)
            if value is None:
                continue
            if budget is None:
                dense[method] = value
            elif _is_count(budget):
                lines[method].append((budget, value))
        if lines:
            panels[length] = (dict(lines), dense)
    return panels


def _plot_vs_budget(
    records: Sequence[Record], aggregate: Aggregate, path: Path, title: str, ylabel: str
) -> Path | None:
    """Return ``path`` after drawing ``aggregate`` vs count budget, one panel per context length and one line per
    method in each (:func:`budget_panels`); None without data. Dense methods are horizontal dashed lines."""
    panels = budget_panels(records, aggregate)
    if not panels:
        return None
    figure = Figure(figsize=(max(7.0, 4.5 * len(panels)), 5), layout="constrained")
    colours = _method_colours(records)
    for axes, (length, (lines, dense)) in zip(figure.subplots(1, len(panels), sharey=True, squeeze=False)[0],
                                              panels.items()):
        for method, points in lines.items():
            budgets, values = zip(*points)
            axes.plot(budgets, values, marker="o", color=colours[method], label=method)
        for method, value in dense.items():
            axes.axhline(value, linestyle="--", color=colours[method], label=f"{method} (dense)")
        budgets = sorted({budget for points in lines.values() for budget, _ in points})
        axes.set_xscale("log", base=2)
        axes.set_xticks(budgets, [_budget_label(budget) for budget in budgets])
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xlabel(_BUDGET_AXIS_LABEL)
        axes.set_title(f"{_tokens_label(length)} tokens of context", fontsize="medium")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel(ylabel)
    handles = {label: handle for axes in figure.axes for handle, label in zip(*axes.get_legend_handles_labels())}
    columns = 2 if 2 * max(map(len, handles)) < 12 * figure.get_figwidth() else 1  # long method names: one column
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=columns, fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


def _plot_needle_heatmap(records: Sequence[Record], budget: float | None, path: Path) -> Path | None:
    """Return ``path`` after drawing needle accuracy over context length x depth; None without needles.

    One panel for the preferred dense method and one for STS at ``budget``, where they exist.
    """
    needles = [
        r
        for r in records
        if r["task"] == NEEDLE_TASK and _values([r], "score") and r.get("depth") is not None
    ]
    panels = []
    for method in DENSE_PREFERENCE:
        dense = [r for r in needles if r["method"] == method and _budget(r) is None]
        if dense:
            panels.append((f"{method} (dense)", dense))
            break
    sts = [r for r in needles if r["method"] == STS_METHOD and budget is not None and _budget(r) == budget]
    if sts:
        panels.append((f"{STS_METHOD}, budget {_budget_label(budget)}", sts))
    if not panels:
        return None
    lengths = sorted({r["context_tokens"] for _, panel in panels for r in panel})
    depths = sorted({_depth(r) for _, panel in panels for r in panel})
    figure = Figure(figsize=(1.5 + 4.5 * len(panels), 4.5), layout="constrained")
    all_axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (title, panel) in zip(all_axes, panels):
        grid = _needle_grid(panel, lengths, depths)
        image = axes.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            if not math.isnan(value):
                axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=10)
        axes.set_xticks(range(len(lengths)), [_tokens_label(n) for n in lengths])
        axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel("needle depth (share of context)")
        axes.set_title(title)
    figure.colorbar(image, ax=list(all_axes), label="needle accuracy (%)")
    figure.suptitle("Needle accuracy by context length and depth")
    return _save(figure, path)


def _depth(record: Record) -> float:
    """Return a record's needle depth rounded to whole percents, the heatmap's resolution."""
    # Rounding keeps float noise (0.1 vs 0.1000001) from splitting one depth into two rows.
    return round(float(record["depth"]), 2)


def _needle_grid(records: Iterable[Record], lengths: Sequence[int], depths: Sequence[float]) -> np.ndarray:
    """Return the mean needle accuracy (%) per (depth, length) cell; NaN where no sample ran."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for record in records:
        cells[(record["context_tokens"], _depth(record))] += _values([record], "score")
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (length, depth), scores in cells.items():
        grid[depths.index(depth), lengths.index(length)] = 100.0 * sum(scores) / len(scores)
    return grid


def _tokens_label(tokens: int) -> str:
    """Return a token count as read on an axis: "4K" for multiples of 1024, else the number."""
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _plot_recall_per_layer(records: Sequence[Record], budget: float | None, path: Path) -> Path | None:
    """Return ``path`` after drawing per-layer mass recall / context at ``budget``, one line per method.

    Returns None when no record at ``budget`` has per-layer recall.
    """
    per_method: dict[str, list[list[float]]] = defaultdict(list)
    for record in records:
        if record.get("recall_per_layer") and budget is not None and _budget(record) == budget:
            per_method[record["method"]].append(record["recall_per_layer"])
    if not per_method:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    colours = _method_colours(records)
    for method in sorted(per_method):
        layers = _mean_per_layer(per_method[method], method)
        axes.plot(range(len(layers)), layers, marker=".", color=colours[method], label=method)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("target layer")
    axes.set_ylabel(_RECALL_CONTEXT_LABEL)
    axes.set_title(f"Per-layer mass recall / context mass at budget {_budget_label(budget)}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def _mean_per_layer(recalls: Sequence[Sequence[float]], method: str) -> np.ndarray:
    """Return the mean over records of each layer's recall; raises STSError on differing layer counts."""
    n_layers = {len(recall) for recall in recalls}
    if len(n_layers) > 1:
        raise STSError(
            f"{method} records have per-layer recall over {sorted(n_layers)} layers; "
            "one results file should hold one target model"
        )
    return np.asarray(recalls, dtype=float).mean(axis=0)


def _method_colours(records: Iterable[Record]) -> dict[str, str]:
    """Return a colour per method, the same in every figure drawn from ``records``."""
    methods = sorted({r["method"] for r in records})
    return {method: f"C{index % 10}" for index, method in enumerate(methods)}


def _save(figure: Figure, path: Path) -> Path:
    """Return ``path`` after writing ``figure`` there as a PNG, atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))
    return path
