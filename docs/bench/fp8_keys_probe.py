"""Probe (CPU, real weights): would an 8-bit copy of the draft's keys rank the context as the bf16 keys do?

The select phase's score pass reads the draft's K of the whole context every round (2.1 GB at 128K, batch 1; 8.6 GB
at 32K, batch 16, on the 1B draft): its largest read after the weights. An 8-bit copy would halve those bytes. This
probe measures what the ranking would lose, on the demo draft (Qwen2.5-Coder-0.5B, dequantised from its GGUF) over
a QA prompt of the evaluation tasks: the draft prefills the prompt, its next gamma queries are recorded, and each
layer's context scores (the product's rule: each query's softmax over the context, max over the round's queries and
the layer's heads, :func:`sts.attention.scores.context_scores`) are computed from the keys as stored (bf16) and
from 8-bit versions of them:

* ``fp8``: float8 e4m3 as is;
* ``fp8-centred``: float8 e4m3 of K minus its per-channel mean over the context (q . mean is one constant per query,
  which a softmax drops, so only the rows' differences are rounded);
* ``int8-row``: int8 with one scale per row (absmax), after the same centring;
* ``fp8-centred-q8``: the centred float8 keys with the queries rounded to float8 e4m3 too (what STS's ``key_bits=8``
  score kernel multiplies on float8 tensor cores; added 2026-12-01, second run).

For each it reports, per layer and averaged, the share of the bf16 ranking's top ``k`` rows (the free rows of a
budget: the re-rank's candidates, 1776 at budget 512 and ``rerank`` 4; the scored draft's 4028; 10% of the context)
that the 8-bit ranking also puts in its top ``k``, and the bf16 score mass those rows hold (mass recall).

    python docs/bench/fp8_keys_probe.py DRAFT_DIR --tokens 8192 --out fp8-keys-probe.json
"""
import argparse
import json
import sys
from datetime import datetime, timezone

import torch

from sts.attention.backend import QueryRecorder
from sts.attention.scores import context_scores
from sts.eval.tasks import generate_qa, make_prompt, token_counter
from sts.models.loading import load_model

E4M3 = torch.float8_e4m3fn


def variants(k: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """Return the keys ``[B, Hkv, S, D]`` (float32, the first ``rows`` rows) as each 8-bit format would give them."""
    k = k[:, :, :rows].float()
    mean = k.mean(2, keepdim=True)
    centred = k - mean
    scale = centred.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    return {
        "bf16": k,
        "fp8": k.to(E4M3).float(),
        "fp8-centred": centred.to(E4M3).float() + mean,
        "int8-row": (centred / scale).round().clamp(-127, 127) * scale + mean,
        "fp8-centred-q8": centred.to(E4M3),  # float8 keys: context_scores rounds the queries to float8 too
    }


def agreement(ref: torch.Tensor, got: torch.Tensor, k: int) -> tuple[float, float]:
    """Return (top-k set overlap, mass recall) of ranking ``got`` against ``ref`` ``[N]`` (probabilities)."""
    want = torch.topk(ref, k).indices
    have = torch.topk(got, k).indices
    overlap = len(set(want.tolist()) & set(have.tolist())) / k
    return overlap, float(ref[have].sum() / ref[want].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("draft", help="the draft's HF checkpoint directory")
    p.add_argument("--tokens", type=int, default=8192, help="prompt tokens (default: %(default)s)")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--out", default="fp8-keys-probe.json")
    args = p.parse_args()
    model, tok = load_model(args.draft, torch.float32, "cpu")
    sample = generate_qa(1, args.tokens, token_counter(tok), seed=0)[0]
    ids = tok(make_prompt(sample, tok), add_special_tokens=False)["input_ids"]
    n = len(ids) - args.gamma
    model.setup_cache(1, len(ids) + 8)
    recorder = QueryRecorder(range(model.config.n_layers))
    with torch.no_grad():
        model.hidden(torch.tensor([ids[:n]]), torch.tensor([0]))
        model.hidden(torch.tensor([ids[n:]]), torch.tensor([n]), recorder)  # the round's gamma queries
    queries = recorder.take()
    budgets = {"candidates-1776": 1776, "draft-rows-4028": 4028, "ten-percent": n // 10}
    layers = []
    for layer in range(model.config.n_layers):
        k_cache = model.layers[layer].self_attn.cache.k.to(torch.bfloat16)  # as the GPU stores it
        q = queries[layer]
        scores = {name: context_scores(q, k, torch.tensor([n]))[0].amax(0) for name, k in variants(k_cache, n).items()}
        row = {"layer": layer}
        for name in ("fp8", "fp8-centred", "int8-row", "fp8-centred-q8"):
            for label, k in budgets.items():
                overlap, mass = agreement(scores["bf16"], scores[name], min(k, n))
                row[f"{name}/{label}"] = {"overlap": round(overlap, 4), "mass": round(mass, 4)}
        layers.append(row)
        print(layer, {key: val for key, val in row.items() if "1776" in key}, file=sys.stderr, flush=True)
    summary = {key: {m: round(sum(r[key][m] for r in layers) / len(layers), 4) for m in ("overlap", "mass")}
               for key in layers[0] if key != "layer"}
    worst = {key: {m: min(r[key][m] for r in layers) for m in ("overlap", "mass")} for key in layers[0] if key != "layer"}
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "draft": args.draft,
              "context": n, "gamma": args.gamma, "mean": summary, "worst_layer": worst, "layers": layers}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    for key in summary:
        print(f"{key:32s} mean overlap {summary[key]['overlap']:.3f} mass {summary[key]['mass']:.4f}   "
              f"worst layer {worst[key]['overlap']:.3f} / {worst[key]['mass']:.4f}")


if __name__ == "__main__":
    main()
