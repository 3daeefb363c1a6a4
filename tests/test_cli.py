"""The ``sts`` command line: JSON output against transformers, and bad input as one-line errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import hf_config, hf_model
from smollm2 import smollm2_tokenizer
from sts.cli import main
from sts.runner import DEFAULT_DRAFT_BUDGET
from sts.selection import HeadMapping


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Return paths of a tiny target, a draft with the same vocabulary, and one with another vocabulary."""
    root = tmp_path_factory.mktemp("ckpt")
    target = hf_model(hf_config("llama", layers=2), seed=0)
    target.save_pretrained(root / "target")
    hf_model(hf_config("llama", layers=1), seed=1).save_pretrained(root / "draft")
    hf_model(hf_config("llama", vocab=80, layers=1), seed=2).save_pretrained(root / "other")
    return {"target": str(root / "target"), "draft": str(root / "draft"), "other": str(root / "other"), "hf": target,
            "root": root}


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # stdout holds exactly one record
    return json.loads(out[0])


def test_generate_without_json_prints_the_output_and_a_stats_line(capsys, checkpoints):
    argv = ["generate", "--target", checkpoints["target"], "--draft", checkpoints["draft"], "--prompt-ids",
            "5,6,7,8,9,10", "--max-new-tokens", "12", "--method", "sts", "--budget", "4", "--sink", "1",
            "--window", "1", "--measure-recall"]
    want = run_json(capsys, argv)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == ",".join(map(str, want["tokens"]))  # no tokenizer: the ids
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[sts] 12 new tokens in "), err
    for part in ("tokens/s after it", "tokens per round; sparsity ", "attention mass recall "):
        assert part in err[0], err


def test_generate_json_matches_transformers(capsys, checkpoints):
    prompt = [5, 6, 7, 8, 9, 10]
    ref = checkpoints["hf"].generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    base = ["generate", "--target", checkpoints["target"], "--draft", checkpoints["draft"],
            "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12"]
    ar = run_json(capsys, base + ["--method", "autoregressive"])
    assert ar["tokens"] == ref and ar["stats"]["new_tokens"] == 12 and ar["stats"]["acceptance_length"] == 1
    spec = run_json(capsys, base + ["--method", "speculative", "--gamma", "3"])
    assert spec["tokens"] == ref and spec["stats"]["acceptance_length"] >= 1
    assert "text" not in spec  # no tokenizer in this checkpoint
    sts = run_json(capsys, base + ["--method", "sts", "--budget", "4", "--sink", "1", "--window", "1", "--measure-recall"])
    assert len(sts["tokens"]) == 12
    stats = sts["stats"]
    assert stats["sparsity"] > 0 and 0 < stats["recall"] <= 1 and stats["verify_s"] > 0
    full = run_json(capsys, base + ["--method", "quest", "--budget", "64", "--window", "8", "--verify", "sparse"])
    assert full["tokens"] == ref and full["stats"]["sparsity"] == 0
    scored = run_json(capsys, base + ["--method", "sts", "--budget", "64", "--sink", "1", "--window", "2", "--verify", "sparse",
                                      "--draft-budget", "5", "--draft-selection", "scored"])
    assert scored["tokens"] == ref  # the sparse draft changes what is proposed, never what is accepted
    assert (scored["draft_budget"], scored["draft_selection"]) == (5, "scored")
    # The default draft: with sts, DEFAULT_DRAFT_BUDGET rows scored by STS; with other methods, dense; "dense" asks.
    assert (sts["draft_budget"], sts["draft_selection"]) == (DEFAULT_DRAFT_BUDGET, "scored-all")
    assert (spec["draft_budget"], spec["draft_selection"]) == (None, None)
    dense = run_json(capsys, base + ["--method", "sts", "--budget", "4", "--sink", "1", "--window", "1", "--draft-budget", "dense"])
    assert (dense["draft_budget"], dense["draft_selection"]) == (None, None)
    # Without --method: sts with a draft (as sts serve and LLM; this short context verifies densely), autoregressive
    # without one.
    default = run_json(capsys, base)
    assert default["method"] == "sts" and default["tokens"] == ref
    alone = run_json(capsys, base[:3] + base[5:])
    assert alone["method"] == "autoregressive" and alone["tokens"] == ref


def test_sts_settings_reach_the_policy():
    from sts.cli import _options, build_parser
    from sts.errors import STSError

    def options(*extra):
        args = build_parser().parse_args(["generate", "--target", "t", "--prompt-ids", "1", "--method", "sts", *extra])
        return _options(args)

    assert options() == {}  # the policy's defaults: re-ranking 4x candidates by probability
    assert options("--rerank", "0") == {"rerank": 0}
    assert options("--rerank", "8", "--rerank-by", "logit") == {"rerank": 8, "rerank_prob": 0.0}
    assert options("--rerank", "0", "--head-budgets", "2") == {"rerank": 0, "head_budgets": 2.0}
    assert options("--feedback", "0.25") == {"feedback": 0.25}
    with pytest.raises(STSError, match="head_budgets works with the plain rule"):  # the policy's rule, before loading
        options("--rerank", "0", "--head-budgets", "2", "--feedback", "0.25")


def bad(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error:") and "\n" not in err and message in err, err


def test_bad_input_gives_one_line_errors(capsys, checkpoints, tmp_path):
    t, d = checkpoints["target"], checkpoints["draft"]
    gen = ["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    bad(capsys, gen + ["--target", str(tmp_path / "missing")], "does not exist")
    # Option values, draft budgets and a missing draft path fail before any model loads (these targets do not exist,
    # or the draft is missing and the target real).
    nothing = gen + ["--target", str(tmp_path / "missing"), "--draft", str(tmp_path / "missing"), "--method", "sts"]
    for flags, message in ((["--rerank", "-1"], "rerank must be a whole number >= 0, got -1"),
                           (["--feedback", "2"], "feedback must be in [0, 1]"),
                           (["--draft-budget", "4"], "must exceed the 4 sink rows"),
                           (["--rerank", "0", "--head-budgets", "2"], "--head-budgets needs a --mapping with mass curves")):
        bad(capsys, nothing + flags, message)
    bad(capsys, gen + ["--target", str(tmp_path / "missing"), "--method", "sts"], "--method sts needs a --draft model")
    for cmd, out in (("recall", "r.json"), ("calibrate", "m.json")):
        bad(capsys, [cmd, "--target", str(tmp_path / "missing"), "--draft", str(tmp_path / "missing"), "--text-file",
                     str(tmp_path / "no-text.txt"), "--out", str(tmp_path / out)], "cannot read text file")
    bad(capsys, gen + ["--target", t, "--draft", str(tmp_path / "no-draft")], "no-draft does not exist")
    bad(capsys, gen + ["--target", str(tmp_path)], "not a model directory")
    bad(capsys, gen + ["--target", t, "--draft", str(tmp_path)],
        f"{tmp_path} is not a model directory (no config.json)")
    bad(capsys, gen + ["--target", t, "--draft", checkpoints["other"]], "vocabulary")
    bad(capsys, gen + ["--target", d, "--draft", t], "the draft (2 layers, hidden size 64) is larger than the target (1 layers")
    bad(capsys, ["generate", "--target", t, "--prompt-ids", ",".join(["1"] * 1100), "--method", "autoregressive"],
        "exceeds the context")
    bad(capsys, gen + ["--target", t, "--draft", d, "--gamma", "0"], "gamma")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--budget", "16", "--window", "64"], "exceed the budget")
    bad(capsys, gen + ["--target", t, "--draft", d, "--seed", str(2**70)], "seed must be a 64-bit integer")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--sparse-prefill", "--prefill-block", "0"],
        "prefill block must be >= 1")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--prefill-budget", "10"], "apply with --sparse-prefill")
    bad(capsys, gen + ["--target", t, "--method", "autoregressive", "--draft-selection", "recent"],
        "a draft selection needs a draft")
    corrupt = tmp_path / "map.json"
    corrupt.write_text("{oops")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--window", "8", "--mapping", str(corrupt)], "not valid JSON")
    from sts.models.loading import load_model

    other_pair = HeadMapping.default(load_model(d)[0].config, load_model(d)[0].config)
    other_pair.save(corrupt)
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--window", "8", "--mapping", str(corrupt)], "mapping was made for")
    bad(capsys, ["generate", "--target", t, "--prompt", "hello", "--method", "autoregressive"], "no tokenizer")
    # Bytes that are not UTF-8 on a command line reach the prompt as lone surrogates (surrogateescape).
    bad(capsys, ["generate", "--target", t, "--prompt", "caf\udcff", "--method", "autoregressive"],
        "the prompt is not valid Unicode text: a lone surrogate")
    bad(capsys, ["generate", "--target", t, "--prompt-ids", "1,x", "--method", "autoregressive"], "comma-separated")
    bad(capsys, ["generate", "--target", t, "--prompt-ids", "1,,2", "--method", "autoregressive"], "comma-separated")
    bad(capsys, gen + ["--target", t, "--draft", d, "--temperature", "1e39"], "temperature must be in [0, 10000]")
    bad(capsys, ["generate", "--target", t, "--prompt-file", str(tmp_path / "nofile"), "--method", "autoregressive"],
        "cannot read prompt file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    # A prompt file that is not UTF-8 is refused before loading (the target here does not exist).
    bad(capsys, ["generate", "--target", str(tmp_path / "missing"), "--prompt-file", str(latin1)],
        f"cannot read prompt file {latin1}: not UTF-8 text (byte 3 is 0xe9)")
    # So is an empty prompt (no text to continue), unless --chat wraps it in the template.
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad(capsys, ["generate", "--target", str(tmp_path / "missing"), "--prompt", ""], "--prompt is empty")
    bad(capsys, ["generate", "--target", str(tmp_path / "missing"), "--prompt-file", str(empty)],
        f"prompt file {empty} is empty")
    bad(capsys, ["generate", "--target", str(tmp_path / "missing"), "--prompt", "", "--chat"], "does not exist")
    bad(capsys, ["generate", "--target", t, "--prompt-ids", "1,999", "--method", "autoregressive"], "token ids")
    bad(capsys, gen + ["--target", t, "--method", "speculative"], "needs a --draft")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "streaming", "--window", "8", "--rerank", "4"], "apply to --method sts")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--window", "8", "--rerank", "0", "--head-budgets", "2"], "mass curves")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--window", "8", "--rerank", "0", "--head-budgets", "0.5"], "cap must be >= 1")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--window", "8", "--head-budgets", "2"], "plain rule (rerank 0)")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "sts", "--window", "8", "--rerank", "-1"], "whole number >= 0")
    bad(capsys, gen + ["--target", t, "--draft", d, "--method", "speculative", "--key-bits", "8"], "apply to --method sts")
    bad(capsys, ["bench"], "choose a benchmark: e2e, kernels, serve")
    if not torch.cuda.is_available():
        bad(capsys, ["bench", "e2e", "--contexts", "8192"], "needs a CUDA device")


def test_the_installed_command_exits_non_zero_without_a_traceback(checkpoints, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sts.cli", "generate", "--target", str(tmp_path / "nope"), "--prompt-ids", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().startswith("sts: error:") and "Traceback" not in proc.stderr


def test_bad_numbers_and_paths_give_one_line_errors(capsys, checkpoints, tmp_path):
    t, d = checkpoints["target"], checkpoints["draft"]
    gen = ["generate", "--target", t, "--draft", d, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    bad(capsys, gen + ["--device", "gpu0"], "device must be cpu, cuda or cuda:N, got 'gpu0'")
    bad(capsys, gen + ["--method", "speculative", "--mapping", str(tmp_path / "map.json")], "applies to --method sts")
    bad(capsys, gen + ["--method", "speculative", "--budget", "64"], "--budget applies to selection methods")
    bad(capsys, gen + ["--method", "sts", "--draft-budget", "dense", "--draft-selection", "scored"], "needs a draft budget")
    bad(capsys, gen + ["--method", "autoregressive", "--draft-budget", "64"], "a draft budget needs a draft")
    bad(capsys, gen + ["--method", "autoregressive", "--sparse-prefill"], "--sparse-prefill needs a draft")
    bad(capsys, gen + ["--method", "speculative", "--draft-selection", "scored"], "needs method sts, not speculative")
    bad(capsys, gen + ["--method", "speculative", "--draft-budget", "8", "--draft-selection", "scored"], "needs method sts")
    bad(capsys, gen + ["--method", "sts", "--window", "8", "--mapping", str(tmp_path / "missing.json")], "does not exist")
    for budget in ("nan", "inf", "0", "-1"):  # argparse's one line, naming the flag, as for every other flag
        with pytest.raises(SystemExit) as exit_:
            main(gen + ["--method", "sts", "--budget", budget])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument --budget: budget must be a finite number > 0 (rows, or a " \
            f"fraction of the context below 1), got '{budget}'" in err, err
    with pytest.raises(SystemExit) as exit_:
        main(gen + ["--method", "sts", "--draft-budget", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err  # one line, not argparse's usage block
    assert err.startswith("sts generate: error: argument --draft-budget: expected auto, dense or a row count"), err
    # An empty item in a comma list is a mistake, not a method or budget left out.
    for flag, value in (("--methods", "sts,,speculative"), ("--budgets", "512,")):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "--target", t, "--draft", d, flag, value, "--out", str(tmp_path / "ev")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {flag}: expected comma-separated" in err, err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    # Settings are checked before the models load: a missing model is not what these report.
    nowhere = ["--target", str(tmp_path / "none"), "--draft", str(tmp_path / "none")]
    ev = ["eval", *nowhere, "--out", str(tmp_path / "eval"), "--window", "8"]
    bad(capsys, ev + ["--methods", "quest/pagesize=8"], "unknown option 'pagesize' for quest (it takes page_size)")
    bad(capsys, ev + ["--methods", "sts/rerank=2/rerank=4"], "sets an option twice")
    bad(capsys, ev + ["--methods", "sts-cal", "--mapping", str(tmp_path / "missing.json")], "does not exist")
    bad(capsys, ev + ["--lengths", ""], "context length")
    bad(capsys, ev + ["--ppl-tokens", "0"], "--ppl-tokens must be >= 1")
    bad(capsys, ev + ["--methods", "sts+sp", "--prefill-budget", "0"], "prefill budget")
    bad(capsys, ["eval", *nowhere, "--out", str(a_file)],
        f"cannot use {a_file} as the output folder: {a_file} is a file")
    rc = ["recall", *nowhere, "--text-file", str(a_file), "--out", str(tmp_path / "r.json")]
    bad(capsys, rc + ["--steps", "0"], "steps must be >= 1")
    bad(capsys, rc + ["--methods", "streaming/page_size=4"], "takes no options")
    cal = ["calibrate", *nowhere, "--text-file", str(a_file), "--out", str(tmp_path / "m.json")]
    bad(capsys, cal + ["--topk", "-3"], "--topk must be >= 1")
    bad(capsys, cal + ["--skip-tokens", "-1"], "--skip-tokens must be >= 0")


@pytest.fixture(scope="module")
def text_models(tmp_path_factory, sts_cache_dir):
    """Return tiny models with SmolLM2's real tokenizer whose greedy output cycles through the tokens of
    "中文🙂" (the emoji takes two): a target, a draft, and the target with a tokenizer without a chat template."""
    tokenizer = smollm2_tokenizer(sts_cache_dir)
    cycle = tokenizer("中文🙂", add_special_tokens=False)["input_ids"]
    root = tmp_path_factory.mktemp("text")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    for name, layers, tok in (("target", 2, tokenizer), ("draft", 1, tokenizer), ("plain", 2, plain)):
        cycling_model(len(tokenizer), cycle, layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"target": str(root / "target"), "draft": str(root / "draft"), "plain": str(root / "plain"),
            "cycle": cycle, "tokenizer": tokenizer}


def cycling_model(vocab: int, cycle: list[int], layers: int, hidden: int = 32):
    """Return a tiny transformers Llama whose greedy next token after ``cycle[i]`` is ``cycle[i + 1]`` (wrapping):
    attention and MLP outputs are zeroed, so the logits read the current token's embedding alone."""
    model = hf_model(hf_config("llama", vocab=vocab, layers=layers, hidden=hidden), seed=layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, token in enumerate(cycle):
            model.model.embed_tokens.weight[token] = torch.eye(hidden)[i]
            model.lm_head.weight[cycle[(i + 1) % len(cycle)]] = 10 * torch.eye(hidden)[i]
    return model


@pytest.mark.parametrize("method", ["autoregressive", "speculative", "sts"])
def test_streamed_text_equals_the_json_text(capsys, text_models, method):
    cycle, tok = text_models["cycle"], text_models["tokenizer"]
    n = 23
    argv = ["generate", "--target", text_models["target"], "--draft", text_models["draft"], "--prompt-ids", str(cycle[0]),
            "--max-new-tokens", str(n), "--method", method, "--gamma", "2"]
    if method == "sts":
        argv += ["--budget", "8", "--sink", "1", "--window", "2"]
    record = run_json(capsys, argv)
    expected = tok.decode([cycle[(i + 1) % len(cycle)] for i in range(n)])
    assert record["text"] == expected and "🙂" in expected  # characters split over tokens, so over rounds
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert streamed == record["text"] + "\n"


def test_chat_needs_a_chat_template(capsys, text_models, tmp_path):
    from sts.cli import _prompt, _prompt_ids, build_parser

    plain = ["generate", "--target", text_models["plain"], "--prompt", "hi", "--method", "autoregressive", "--max-new-tokens", "2"]
    bad(capsys, plain + ["--chat"], "no chat template")
    run_json(capsys, plain)  # the raw prompt is fine
    # --chat with ids is refused before any model loads.
    bad(capsys, ["generate", "--target", str(tmp_path / "none"), "--prompt-ids", "1", "--chat"], "not --prompt-ids")
    tok = text_models["tokenizer"]
    args = build_parser().parse_args(["generate", "--target", "t", "--prompt", "hi", "--chat"])
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert start in _prompt_ids(args, _prompt(args), tok) and start not in tok("hi")["input_ids"]


def test_the_library_does_not_import_the_cli():
    code = "import sys, sts.eval.harness, sts.eval.recall, sts.calibrate; print('sts.cli' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_bench_help_says_what_each_benchmark_measures_and_where_its_options_are(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for bench in ("e2e", "kernels", "serve"):
        assert any(line.split()[:1] == [bench] and len(line.split()) > 3 for line in out.splitlines()), out
    assert "sts bench <benchmark> --help" in out


@pytest.mark.parametrize("bench", ["kernels", "e2e", "serve"])
def test_each_benchmarks_help_names_the_command_it_is(capsys, bench):
    with pytest.raises(SystemExit) as done:
        main(["bench", bench, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sts bench {bench} ")


def test_unusable_output_paths_fail_in_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    """--out/--png/--json-out that cannot be written (a folder no one can create files in, a folder given for a
    file), and --plot files that cannot be read, are one-line errors with exit 2: checked before the models load
    (here they do not even exist), nothing written."""
    locked = "/proc/self/out.json"  # procfs takes no new files, whoever runs the tests
    missing = str(tmp_path / "no-model")
    texts = tmp_path / "t.txt"
    texts.write_text("some text")
    bad(capsys, ["calibrate", "--target", missing, "--draft", missing, "--text-file", str(texts), "--out", locked],
        "cannot use /proc/self as the output folder")
    bad(capsys, ["recall", "--target", missing, "--draft", missing, "--text-file", str(texts), "--out", locked],
        "cannot use /proc/self as the output folder")
    bad(capsys, ["calibrate", "--target", missing, "--draft", missing, "--text-file", str(texts), "--out", str(tmp_path)],
        "is a folder: name a file")
    bad(capsys, ["calibrate", "--target", missing, "--draft", missing, "--text-file", str(texts),
                 "--out", str(texts / "map.json")], f"cannot use {texts} as the output folder: {texts} is a file, not a folder")
    # recall writes its table beside --out as .md: an --out ending in .md would be overwritten by it.
    bad(capsys, ["recall", "--target", missing, "--draft", missing, "--text-file", str(texts), "--out",
                 str(tmp_path / "r.md")], "name a .json file")
    e2e = ["bench", "e2e", "--device", "cpu", "--target-shape", "tiny-target", "--draft-shape", "tiny-draft"]
    bad(capsys, e2e + ["--out", locked], "cannot use /proc/self as the output folder")
    bad(capsys, e2e + ["--out", str(tmp_path / "r.jsonl"), "--png", str(tmp_path)], "is a folder: name a file")
    assert not (tmp_path / "r.jsonl").exists()
    records = tmp_path / "bad.jsonl"
    records.write_text('{"a": 1}\nnot json\n')
    for bench in ("e2e", "serve"):
        bad(capsys, ["bench", bench, "--plot", str(tmp_path / "none.jsonl")], "cannot read")
        bad(capsys, ["bench", bench, "--plot", str(records)], "bad.jsonl:2: not valid JSON")
    bad(capsys, ["bench", "serve", "--device", "cpu", "--quick", "--out", locked], "cannot use /proc/self as the output folder")

    bad(capsys, ["demo", "--device", "cpu", "--json-out", locked], "cannot use /proc/self as the output folder")
    import sts.demo

    def full_disk(args):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(sts.demo, "run_demo", full_disk)  # what the system refuses mid-run: still one line
    bad(capsys, ["demo", "--device", "cpu"], "x: No space left on device")


def test_a_mapping_for_another_pair_is_refused_before_loading(capsys, checkpoints, tmp_path, monkeypatch):
    """generate, eval and recall read the local checkpoints' configs and the mapping first: a mapping made for the
    draft as target fails without loading a model (here loading would fail) and writes nothing; the right mapping
    passes that check."""
    import sts.runner
    from sts.errors import STSError
    from sts.models.loading import read_config

    t, d = checkpoints["target"], checkpoints["draft"]
    wrong, right = tmp_path / "wrong.json", tmp_path / "right.json"
    HeadMapping.default(read_config(d), read_config(d)).save(wrong)
    HeadMapping.default(read_config(t), read_config(d)).save(right)

    def no_loading(*args, **kwargs):
        raise STSError("loaded")

    monkeypatch.setattr(sts.runner, "load_pair", no_loading)
    texts = tmp_path / "t.txt"
    texts.write_text("text")
    out = tmp_path / "eval"
    for argv in (["generate", "--prompt-ids", "1,2,3", "--method", "sts", "--window", "8"],
                 ["eval", "--methods", "sts-cal", "--out", str(out)],
                 ["recall", "--text-file", str(texts), "--out", str(tmp_path / "r.json")]):
        bad(capsys, argv + ["--target", t, "--draft", d, "--mapping", str(wrong)], "mapping was made for target")
        bad(capsys, argv + ["--target", t, "--draft", d, "--mapping", str(right)], "loaded")
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_prompt_ids_and_model_paths_are_checked_before_loading(capsys, checkpoints, tmp_path, monkeypatch):
    """Ids outside the target's vocabulary (from its config) and a draft directory that holds no model fail without
    loading a model (here loading would fail)."""
    import sts.runner
    from sts.errors import STSError

    def no_loading(*args, **kwargs):
        raise STSError("loaded")

    monkeypatch.setattr(sts.runner, "load", no_loading)  # one model; load_pair checks both paths first
    t, d = checkpoints["target"], checkpoints["draft"]
    gen = ["generate", "--target", t, "--max-new-tokens", "2"]
    bad(capsys, gen + ["--prompt-ids", "1,999999999"], "prompt token ids must be in [0, 96)")
    bad(capsys, gen + ["--prompt-ids", "1,2", "--draft", str(tmp_path)], "is not a model directory (no config.json)")
    bad(capsys, gen + ["--prompt-ids", "1,2", "--draft", d], "loaded")  # the checks pass: loading is next


def test_an_over_long_text_prompt_fails_before_loading(capsys, tmp_path, sts_cache_dir, monkeypatch):
    """A text prompt that with --max-new-tokens and a round's lookahead passes the context fails from the checkpoints'
    configs and the target's tokenizer alone (loading would fail here), counting tokens as the tokenizer does; the
    draft's context counts too; a prompt that fits goes on to loading."""
    import sts.runner
    from sts.errors import STSError

    def no_loading(*args, **kwargs):
        raise STSError("loaded")

    monkeypatch.setattr(sts.runner, "load", no_loading)
    tokenizer = smollm2_tokenizer(sts_cache_dir)
    for name, positions in (("target", 4096), ("draft", 1024)):
        config = hf_config("llama", vocab=len(tokenizer), layers=1, hidden=32, max_position_embeddings=positions)
        hf_model(config, seed=0).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    capsys.readouterr()  # the tokenizer's conversion and the saves report progress
    text = "the quick brown fox " * 300
    n = len(tokenizer(text)["input_ids"])
    assert 1024 < n + 8 + 5 < 4096
    gen = ["generate", "--target", str(tmp_path / "target"), "--prompt", text, "--max-new-tokens", "8"]
    bad(capsys, gen + ["--method", "autoregressive"], "loaded")  # fits the target alone
    bad(capsys, gen + ["--draft", str(tmp_path / "draft"), "--method", "speculative"],
        f"prompt of {n} tokens + 8 new tokens + 5 rows a round writes past them exceeds the context")
    gen[4] = text * 4
    n = len(tokenizer(gen[4])["input_ids"])
    bad(capsys, gen + ["--method", "autoregressive"], f"prompt of {n} tokens + 8 new tokens + 1 row")


def test_text_files_are_read_as_utf8_without_a_byte_order_mark(tmp_path):
    """A prompt file saved with a UTF-8 byte-order mark (Windows editors) gives the text, not a BOM token."""
    from sts.eval.output import read_text

    path = tmp_path / "prompt.txt"
    for data in ("\ufeffhé".encode(), "hé".encode()):
        path.write_bytes(data)
        assert read_text(path, "prompt file") == "hé"
