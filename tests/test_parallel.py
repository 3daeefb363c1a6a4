"""Tensor parallelism on the CPU (issue 15): 2 gloo processes against the single-process model.

The two ranks are spawned once (``sts.parallel.run_ranks``) and run every case; each writes its
outputs to a file, and the tests compare them with the whole model run in this process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import hf_config, hf_model, ours, perturbed
from sts.cli import main
from sts.errors import STSError
from sts.models.loading import load_model
from sts.models.transformer import Transformer
from sts.parallel import load_sharded, run_ranks, shard_model
from sts.sampling import SamplingConfig
from sts.selection import SelectionConfig, make_policy
from sts.selection.mapping import HeadMapping
from sts.speculative import speculative_generate

WORLD = 2
#: Long enough that a budget of 16 rows reads under half of the context.
PROMPTS = [list(range(3, 43)), list(range(50, 80))]
SELECTION = SelectionConfig(budget=16, sink=2, window=4)
#: STS runs: (name, policy options, whether to use the per-head mapping file).
STS_RUNS = (("sts", {}, False), ("sts-plain", {"rerank": 0}, False), ("sts-mapped", {"rerank": 0}, True),
            ("sts-feedback", {"feedback": 0.5}, True))


def _logits(model: Transformer) -> torch.Tensor:
    """Return the logits of a 12-token prefill of two sequences, then of 3 tokens each at different positions."""
    model.setup_cache(2, 64)
    tokens = torch.arange(24).view(2, 12) % model.config.vocab_size
    first = model(tokens, torch.tensor([0, 0]))
    later = model(tokens[:, :3] + 5, torch.tensor([12, 7]))
    return torch.cat([first, later], dim=1)


def _outputs(logit_models: dict[str, Transformer], target: Transformer, draft: Transformer, mapping: str) -> dict:
    """Return every case's output: logits of each model, then greedy, STS and sampled decoding of the pair."""
    out: dict = {name: _logits(model) for name, model in logit_models.items()}
    out["speculative"] = speculative_generate(target, draft, PROMPTS, 12, gamma=3).tokens
    for name, options, mapped in STS_RUNS:
        policy = make_policy("sts", SELECTION, target, draft, mapping if mapped else None, **options)
        out[name] = speculative_generate(target, draft, PROMPTS, 12, gamma=3, policy=policy, verify="sparse").tokens
    sampling = SamplingConfig(temperature=1.0)
    out["sampled"] = speculative_generate(target, draft, PROMPTS, 12, gamma=3, sampling=sampling, seed=3).tokens
    return out


def _rank(rank: int, world: int, cases: dict, out_dir: str) -> None:
    """One rank: shard every model, run every case, and load the checkpoint sharded."""
    parts = {name: shard_model(model, rank, world) for name, model in cases["logits"].items()}
    out = _outputs(parts, parts["llama"], cases["draft"], cases["mapping"])
    out["loaded"] = _logits(load_sharded(cases["checkpoint"], rank, world)[0])
    out["local_kv_heads"] = parts["llama"].layers[0].self_attn.cache.k.shape[1]
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def _per_head_mapping(target: Transformer, draft: Transformer) -> HeadMapping:
    """Return a mapping that sends each target KV head to its own draft head (so a wrong slice changes the rows)."""
    n = draft.config.n_heads
    sources = tuple(tuple(((layer % draft.config.n_layers, (3 * h + layer) % n, 1.0),) for h in range(target.config.n_kv_heads))
                    for layer in range(target.config.n_layers))
    curve = tuple(tuple((0.5, 0.75) for _ in layer) for layer in sources)
    return HeadMapping(sources, "max", target.config.identity(), draft.config.identity(), mass_curve=curve)


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Return (whole-model outputs, [rank 0 outputs, rank 1 outputs], the llama model's KV heads)."""
    tmp = tmp_path_factory.mktemp("tp")
    # Llama with q/k/v/o and MLP biases (row-parallel biases are added once), 2 KV heads per rank;
    # Qwen2 with q/k/v biases and tied embeddings, 1 KV head per rank.
    hf_llama = hf_model(hf_config("llama", layers=3, heads=8, kv_heads=4, attention_bias=True, mlp_bias=True), seed=0)
    hf_llama.save_pretrained(tmp / "llama")
    models = {"llama": ours(hf_llama), "qwen2": ours(hf_model(hf_config("qwen2"), seed=1))}
    draft = perturbed(models["llama"], 0.15, seed=1)
    mapping = tmp / "mapping.json"
    _per_head_mapping(models["llama"], draft).save(mapping)
    cases = {"logits": models, "draft": draft, "mapping": str(mapping), "checkpoint": str(tmp / "llama")}
    run_ranks(_rank, WORLD, (cases, str(tmp)))
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return _outputs(models, models["llama"], draft, str(mapping)), ranks, models["llama"].config.n_kv_heads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sharded_logits_equal_the_whole_model(tp_run, family):
    whole, ranks, _ = tp_run
    for out in ranks:
        torch.testing.assert_close(out[family], whole[family], rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0][family], ranks[1][family])  # the all-reduce leaves one sum on every rank


def test_each_rank_caches_only_its_kv_heads(tp_run):
    _, ranks, kv_heads = tp_run
    assert [out["local_kv_heads"] for out in ranks] == [kv_heads // WORLD] * WORLD


@pytest.mark.parametrize("case", ["speculative", *(name for name, _, _ in STS_RUNS), "sampled"])
def test_decoding_on_two_ranks_equals_one_process(tp_run, case):
    whole, ranks, _ = tp_run
    assert all(len(tokens) == 12 for tokens in whole[case])
    for out in ranks:
        assert out[case] == whole[case], case


def test_load_sharded_reads_the_parts_shard_model_cuts(tp_run):
    whole, ranks, _ = tp_run
    for out in ranks:
        assert torch.equal(out["loaded"], out["llama"])
        torch.testing.assert_close(out["loaded"], whole["llama"], rtol=1e-5, atol=1e-5)


def _weights(model: Transformer) -> dict[str, torch.Tensor]:
    """Return a model's parameters and buffers by name (the row-parallel biases are buffers)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("kind", ["safetensors", "indexed-shards", "gguf"])
def test_load_sharded_holds_what_shard_model_keeps(tmp_path, kind):
    """Every checkpoint kind: the loaded part of each rank equals the whole model cut by shard_model."""
    from test_loading import write_gguf

    hf = hf_model(hf_config("qwen2" if kind == "gguf" else "llama", heads=8, kv_heads=4, attention_bias=True), seed=2)
    if kind == "gguf":
        source = str(write_gguf(hf, tmp_path / "m.gguf", "qwen2", tokenizer=None))
    else:
        hf.save_pretrained(tmp_path, max_shard_size="40KB" if kind == "indexed-shards" else "1GB")
        assert (tmp_path / "model.safetensors.index.json").is_file() == (kind == "indexed-shards")
        source = str(tmp_path)
    for rank in range(WORLD):
        expected = _weights(shard_model(load_model(source)[0], rank, WORLD))
        loaded = _weights(load_sharded(source, rank, WORLD)[0])
        assert loaded.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(loaded[name], value), name


def test_indivisible_kv_heads_or_width_are_refused(tmp_path):
    model = ours(hf_model(hf_config("qwen2"), seed=0))  # 2 KV heads
    with pytest.raises(STSError, match="2 KV heads, not divisible by 3"):
        shard_model(model, 0, 3)
    with torch.device("meta"):
        odd = Transformer(dataclasses.replace(model.config, intermediate_size=97))
    with pytest.raises(STSError, match="intermediate size"):
        shard_model(odd, 1, 2)
    hf_model(hf_config("qwen2"), seed=0).save_pretrained(tmp_path)
    with pytest.raises(STSError, match="not divisible by 4"):
        load_sharded(str(tmp_path), 0, 4)
    with pytest.raises(STSError, match="rank 2 of 2"):
        shard_model(model, 2, 2)


def test_mapping_shard_keeps_each_ranks_kv_heads():
    target = ours(hf_model(hf_config("llama", heads=8, kv_heads=4), seed=0))
    mapping = _per_head_mapping(target, target)
    parts = [mapping.shard(r, 2) for r in range(2)]
    for layer in range(target.config.n_layers):
        assert parts[0].sources[layer] + parts[1].sources[layer] == mapping.sources[layer]
        assert parts[1].mass_curve[layer] == mapping.mass_curve[layer][2:]
    assert parts[1].target["n_kv_heads"] == 2 and parts[1].target["n_heads"] == 4
    assert mapping.shard(0, 1) is mapping
    with pytest.raises(STSError, match="do not split evenly over 3"):
        mapping.shard(0, 3)


def _generate_json(capfd, argv: list[str]) -> dict:
    """Return the JSON record ``sts generate --json`` prints (exit status 0)."""
    assert main(["generate", *argv, "--json"]) == 0
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, lines  # rank 1 prints nothing
    return json.loads(lines[0])


def test_an_indivisible_split_is_refused_before_any_rank_starts(tmp_path, monkeypatch):
    """`sts generate` and `LLM(tensor_parallel=N)` read a local checkpoint's config and refuse a split that does not
    divide before spawning anything (the ranks would refuse it too, seconds later)."""
    import sts.parallel
    import sts.serve.parallel
    from sts.api import LLM
    from sts.cli import build_parser

    def no_spawn(*args, **kwargs):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(sts.parallel, "run_ranks", no_spawn)
    monkeypatch.setattr(sts.serve.parallel, "start_workers", no_spawn)
    hf_model(hf_config("qwen2"), seed=0).save_pretrained(tmp_path / "target")  # 2 KV heads
    argv = ["generate", "--target", str(tmp_path / "target"), "--method", "autoregressive", "--prompt-ids", "1,2",
            "--tensor-parallel", "3"]
    args = build_parser().parse_args(argv)
    args.argv, args.device = argv, "cpu"  # as main() leaves them
    with pytest.raises(STSError, match="--tensor-parallel 3: .* has 2 KV heads, not divisible by 3"):
        sts.parallel.launch_generate(lambda *a, **k: 0, args)
    with pytest.raises(STSError, match="not divisible by 3"):
        LLM(str(tmp_path / "target"), method="autoregressive", tensor_parallel=3)
    sts.parallel.check_split("someone/hub-model", 3)  # not local: left to the ranks, which download it
    sts.parallel.check_split(tmp_path / "target", 2)  # divides


def test_cli_tensor_parallel_equals_one_process(tmp_path, capfd):
    hf_model(hf_config("llama", heads=8, kv_heads=4), seed=0).save_pretrained(tmp_path / "target")
    hf_model(hf_config("llama", heads=8, kv_heads=4), seed=0).save_pretrained(tmp_path / "draft")
    argv = ["--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--prompt-ids",
            ",".join(map(str, PROMPTS[0])), "--method", "sts", "--budget", "16", "--sink", "2", "--window", "4",
            "--max-new-tokens", "8", "--verify", "sparse"]
    one = _generate_json(capfd, argv)
    two = _generate_json(capfd, [*argv, "--tensor-parallel", "2"])
    assert two["tokens"] == one["tokens"] and len(one["tokens"]) == 8
    assert main(["generate", *argv, "--tensor-parallel", "3"]) == 2
    err = capfd.readouterr().err.strip()
    # One line, and not said to be a weights file that cannot be read (it was wrapped as one), nor torch's warnings.
    assert err.startswith("sts: error: --tensor-parallel 3:") and "4 KV heads, not divisible by 3" in err, err
    assert len(err.splitlines()) == 1, err
