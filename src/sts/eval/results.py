"""The results folder of ``sts eval``: ``results.jsonl``, the settings its records were made with, and resuming.

A record is keyed by sample, method and budget only, so a run resumed under another gamma or answer
length would skip the runs the folder already holds, made another way, and its report would name the new
command over them. ``settings.json`` beside ``results.jsonl`` therefore keeps every setting the records'
results depend on beyond their key (:meth:`sts.eval.harness.Evaluator.result_settings` says which: the
models and dtype, the grid's gamma, sink, window, answer lengths, ...), written atomically just before a
run's first record; a resume with a different value of any of them is refused (:func:`resume`).

Settings are compared by name, those both runs have: a setting a run's grid does not use (the mapping
without ``sts-cal``, the answer length of a task it does not run) is not among its settings, and the
first run that uses it adds it. So adding tasks, lengths, samples, methods or budgets to a folder works.

A folder from before ``settings.json`` (records, no settings file) resumes as before, unchecked, with a
warning; the settings of the first run that adds records to it are stored from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

import torch

from sts.errors import STSError
from sts.eval.output import atomic_write
from sts.eval.report import Record, load_records
from sts.models.transformer import Transformer

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "settings.json"

#: Setting name -> value (JSON): an :class:`~sts.eval.harness.EvalSettings` field, ``max_new_tokens.<task>``
#: (a task's answer length), ``target``, ``draft`` (:func:`model_identity`) or ``dtype``.
ResultSettings = dict[str, Any]

#: The option that sets a setting, where it is not ``--`` and the setting's name in dashes.
_OPTIONS = {"measure_recall": "measuring recall (off with --no-recall)", "mapping": "--mapping (file contents)"}
#: Parameters' elements a model's weights digest reads, per tensor.
_DIGEST_ELEMENTS = 64


class ResultsLog:
    """Appends one run's records to ``folder/results.jsonl``, each durably at once (an interrupted run keeps it).

    The file is opened at the first record, after ``settings`` (the stored ones with this run's added) are
    written beside it where they add something: a run that writes no record changes nothing in the folder.
    """

    def __init__(self, folder: Path, stored: ResultSettings | None, current: ResultSettings) -> None:
        self.folder = folder
        self.stored = stored
        self.settings = {**(stored or {}), **current}
        self.file: TextIO | None = None

    def append(self, record: Record) -> None:
        """Write ``record`` to the end of ``results.jsonl`` and to disk."""
        if self.file is None:
            if self.settings != self.stored:
                text = json.dumps(self.settings, indent=1, sort_keys=True) + "\n"
                atomic_write(self.folder / SETTINGS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self.file = (self.folder / RESULTS_FILE).open("a", encoding="utf-8")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.file is not None:
            self.file.close()


def resume(folder: Path, current: ResultSettings) -> tuple[dict[str, Record], ResultsLog]:
    """Return the records ``folder`` holds by key (a resumed run skips them), and the log for this run's.

    Raises :class:`STSError`, before anything is written, when the records were made with a setting of
    ``current`` at another value: one line naming each such setting and its two values, and asking for
    another ``--out``. Also for a settings file that cannot be read, and for a folder that holds other files but no
    records (not an earlier run's: the report and figures would mix into them). A folder with records but no
    settings file (from before they were stored) resumes unchecked, with a warning.
    """
    done = _records(folder / RESULTS_FILE)
    if not done and any(folder.iterdir()):
        raise STSError(f"{folder} holds other files and no sts eval results: use a new or empty --out (or an "
                       "earlier run's folder, to resume it)")
    stored = _stored_settings(folder / SETTINGS_FILE) if done else None  # settings of no record bind nothing
    if stored is None:
        if done:
            log.warning("%s holds results from before sts eval stored their settings: resuming without checking "
                        "that they were made with this run's", folder)
        return done, ResultsLog(folder, None, current)
    differing = [name for name in current if name in stored and stored[name] != current[name]]
    if differing:
        changes = "; ".join(f"{_option(name)} {_shown(stored[name])} there, {_shown(current[name])} now"
                            for name in differing)
        raise STSError(f"{folder} holds results made with other settings ({changes}): use another --out, or its "
                       "settings to resume it")
    return done, ResultsLog(folder, stored, current)


def model_identity(model: Transformer) -> str:
    """Return a model's identity whatever its device: its name and a digest of some of every weight's elements.

    The elements are rounded to bfloat16 first, so that a checkpoint loaded at another dtype (float32 on a
    CPU, bfloat16 on a GPU) digests alike; :func:`model_dtype` tells such runs apart.
    """
    samples = []
    for parameter in model.parameters():
        flat = parameter.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // _DIGEST_ELEMENTS)][:_DIGEST_ELEMENTS].to(torch.bfloat16).float())
    digest = hashlib.sha256(torch.cat(samples).cpu().numpy().tobytes()).hexdigest()
    return f"{model.config.name} (weights {digest[:16]})"


def model_dtype(model: Transformer) -> str:
    """Return the dtype of a model's weights, e.g. ``bfloat16``."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def file_digest(path: str | Path) -> str:
    """Return the SHA-256 of a file's bytes (the first 16 hex digits); STSError when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as error:
        raise STSError(f"cannot read {path}: {error.strerror or error}") from None


def _records(path: Path) -> dict[str, Record]:
    """Return the records of a ``results.jsonl`` by key; none for a missing file."""
    if not path.exists():
        return {}
    return {r["key"]: r for r in load_records(path)}


def _stored_settings(path: Path) -> ResultSettings | None:
    """Return the settings in ``path``, None for a missing file; STSError for one that is not a JSON object."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise STSError(f"cannot read the settings of the results beside it, {path}: {error}") from None
    if not isinstance(settings, dict):
        raise STSError(f"{path}: expected a JSON object of settings, got {type(settings).__name__}")
    return settings


def _option(name: str) -> str:
    """Return the command-line option of a setting, e.g. ``--max-new-tokens for needle`` for ``max_new_tokens.needle``."""
    field, _, task = name.partition(".")
    option = _OPTIONS.get(field, f"--{field.replace('_', '-')}")
    return f"{option} for {task}" if task else option


def _shown(value: Any) -> str:
    """Return a setting's value as the error message shows it."""
    return value if isinstance(value, str) else json.dumps(value)
