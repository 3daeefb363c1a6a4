"""Triton kernels against the PyTorch references: natively on CUDA, under the Triton interpreter on CPU.

``TRITON_INTERPRET`` must be set before triton is imported, so on CPU one subprocess (this file
run as a script) checks every case under the interpreter and prints the errors as JSON; the
parametrised tests below each assert on their case. On CUDA the same cases run in process,
with larger shapes, in bf16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from sts.attention import reference as R
from sts.attention.rerank import candidate_scores, rerank_rows
from sts.attention.scores import context_scores

CUDA = torch.cuda.is_available()
HEADS = [(4, 2), (6, 1), (8, 8)]


def _verify_cases() -> list[dict]:
    cases = []
    for b in (1, 3):
        for hq, hkv in HEADS:
            for t in (1, 5):
                for i, d in enumerate((1, 2)):  # head-dim slot: small under the interpreter, real on CUDA
                    for dense in (False, True):
                        n = len(cases)
                        cases.append(dict(b=b, hq=hq, hkv=hkv, t=t, d_slot=d, dense=dense,
                                          idx64=n // 2 % 2 == 0, tuned=n % 3 != 0))  # fmt: skip
    return cases


def _score_cases() -> list[dict]:
    cases = []
    for b in (1, 3):
        for hq, hkv in HEADS:
            for agg in ("max", "mean"):
                n = len(cases)
                cases.append(dict(b=b, hq=hq, hkv=hkv, g=(4, 5, 1)[n % 3], d_slot=1 + n % 2, agg=agg, tuned=n % 2 == 0))
    return cases


def _rerank_cases() -> list[dict]:
    cases = []
    for hq, hkv in HEADS:
        for t in (1, 5):
            for prob in (True, False):
                n = len(cases)
                # b=2: the second sequence's context fits the budget; scarce: fewer candidates than free rows.
                cases.append(dict(b=1 + (n + n // 2) % 2, hq=hq, hkv=hkv, t=t, prob=prob, d_slot=1 + n // 4 % 2,
                                  scarce=n % 3 == 2))  # fmt: skip
    # The radix path (candidates over many programs), each case again: under the interpreter forced with
    # small chunks, on CUDA by more candidates than one program holds; and under the interpreter two cases in
    # float16, whose logits the radix path stores as float16 offsets (on CUDA every case is bf16).
    radix = [dict(c, radix=True) for c in cases]
    return cases + radix + ([] if CUDA else [dict(c, half=True) for c in radix[:2]])


VERIFY = _verify_cases()
SCORES = _score_cases()
RERANK = _rerank_cases()
# Re-ranking shapes (sink, window, free rows, candidates): small under the interpreter, the
# benchmark's on CUDA (budget 512, C = 4 x free).
RERANK_SHAPE = dict(sink=4, window=64, free=444, cand=1776) if CUDA else dict(sink=4, window=8, free=60, cand=150)
# The radix path's: budget 10% of 128K on CUDA (C = 4 x free, past MAX_CANDIDATES), 3 chunks of 64 under the interpreter.
RADIX_SHAPE = dict(sink=4, window=64, free=5000, cand=20000, chunk=None) if CUDA else dict(RERANK_SHAPE, chunk=64)


def _case_id(kind: str, c: dict) -> str:
    return f"{kind}-" + "-".join(f"{k}{v}" for k, v in c.items())


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Return ||out - ref|| / ||ref|| in float64 over the finite entries (inf if the inf patterns differ)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.equal(torch.isinf(out), torch.isinf(ref)) or torch.isnan(out).any():
        return math.inf
    fin = torch.isfinite(ref)
    return float((out[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30))


def _start_positions(b: int, s: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct context lengths per sequence; the third sequence has none (start_pos = 0)."""
    sp = torch.randint(s // 4, s - t + 1, (b,), generator=gen)
    if b >= 3:
        sp[1], sp[2] = s - t, 0  # a full cache and an empty context
    return sp


def _indices(sp: torch.Tensor, hkv: int, k: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct valid rows and padding (start_pos itself, larger values, some past the cache), shuffled."""
    b = sp.shape[0]
    idx = torch.empty(b, hkv, k, dtype=torch.long)
    for i in range(b):
        n_valid = min(int(sp[i]), k - k // 4)  # at least a quarter padding
        for h in range(hkv):
            valid = torch.randperm(max(int(sp[i]), 1), generator=gen)[:n_valid]
            pad = int(sp[i]) + torch.randint(0, 2 * s, (k - n_valid,), generator=gen)
            pad[0] = sp[i]  # the first invalid value
            row = torch.cat([valid, pad])
            idx[i, h] = row[torch.randperm(k, generator=gen)]
    return idx


def _importance_ref(q, k_cache, start_pos, indices) -> torch.Tensor:
    """Return the max attention probability per selected row over the group's query rows (0 when invalid)."""
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    keys = torch.cat([R.gather_rows(k_cache, indices), R.new_rows(k_cache, start_pos, t)], dim=2).float()
    logits = q.float().reshape(b, hkv, hq // hkv * t, d) @ keys.transpose(-1, -2) / math.sqrt(d)
    probs = torch.softmax(logits.masked_fill(~R.sparse_mask(indices, start_pos, t, hq // hkv), float("-inf")), -1)
    return probs[..., : indices.shape[-1]].amax(dim=2)


def check_verify(c: dict, device: str) -> dict[str, float]:
    """Return the relative errors of the verify kernel (and its importance output) for one case."""
    from sts.attention.triton_verify import KernelConfig, sparse_verify_attention

    interp = device == "cpu"
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id("v", c).encode()))
    d = (16, 32)[c["d_slot"] - 1] if interp else (64, 128)[c["d_slot"] - 1]
    s, k = (70, 40) if interp else (1500, 300)
    dtype = torch.float32 if interp else torch.bfloat16
    sp = _start_positions(c["b"], s, c["t"], gen)
    q = torch.randn(c["b"], c["hq"], c["t"], d, generator=gen)
    kc = torch.randn(c["b"], c["hkv"], s, d, generator=gen)
    vc = torch.randn(c["b"], c["hkv"], s, d, generator=gen)
    q, kc, vc = (x.to(device, dtype) for x in (q, kc, vc))
    sp = sp.to(device)
    cfg = KernelConfig(block_n=16 if interp else 64, num_splits=4) if c["tuned"] else None
    # The default merges the slices in the split kernel's last program per (sequence, KV head), by arrival
    # counters that every launch leaves at zero; the second-kernel merge is checked beside it.
    second_kernel = dataclasses.replace(cfg or KernelConfig(), fused_merge=False)
    if c["dense"]:
        out = sparse_verify_attention(q, kc, vc, sp, config=cfg)
        again = sparse_verify_attention(q, kc, vc, sp, config=cfg)
        ref = R.dense_attention(q.double(), kc.double(), vc.double(), sp)
        return {"out": _rel_err(out, ref), "again": _rel_err(again, out), "counters_left": _counters_left(q.device),
                "second_kernel_merge": _rel_err(sparse_verify_attention(q, kc, vc, sp, config=second_kernel), ref)}
    idx = _indices(sp.cpu(), c["hkv"], k, s, gen).to(device, torch.int64 if c["idx64"] else torch.int32)
    out, imp = sparse_verify_attention(q, kc, vc, sp, idx, return_importance=True, config=cfg)  # second kernel
    plain = sparse_verify_attention(q, kc, vc, sp, idx, config=cfg)
    ref = R.sparse_attention(q.double(), kc.double(), vc.double(), sp, idx)
    return {
        "out": _rel_err(out, ref),
        "plain_vs_importance_path": _rel_err(plain, out),
        "counters_left": _counters_left(q.device),
        "importance": _rel_err(imp, _importance_ref(q.double(), kc.double(), sp, idx)),
    }


def _counters_left(device: torch.device) -> float:
    """Return how many of the fused merge's arrival counters on ``device`` a launch left non-zero (0 expected)."""
    from sts.attention.triton_verify import _COUNTERS

    return float(sum(int(pool.count_nonzero()) for pool in _COUNTERS.get(device, [])))


def check_scores(c: dict, device: str) -> dict[str, float]:
    """Return the relative error of the score kernel, per query head and (``max_heads``) as their max, and whether the
    columns past max(start_pos) are -inf."""
    from sts.attention.triton_scores import context_scores_triton
    from sts.attention.triton_verify import KernelConfig

    interp = device == "cpu"
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id("s", c).encode()))
    d = (16, 32)[c["d_slot"] - 1] if interp else (64, 128)[c["d_slot"] - 1]
    s = 90 if interp else 3000
    dtype = torch.float32 if interp else torch.bfloat16
    sp = _start_positions(c["b"], s - 3, 1, gen).to(device)  # leave cache rows past every start_pos
    q = torch.randn(c["b"], c["hq"], c["g"], d, generator=gen).to(device, dtype)
    kc = torch.randn(c["b"], c["hkv"], s, d, generator=gen).to(device, dtype)
    cfg = KernelConfig(block_n=16 if interp else 64, num_splits=4) if c["tuned"] else None
    out = context_scores_triton(q, kc, sp, c["agg"], config=cfg)
    ref = context_scores(q.double(), kc.double(), sp, c["agg"])
    top = context_scores_triton(q, kc, sp, c["agg"], max_heads=True, config=cfg)
    # 8-bit keys (STS's key_bits=8): the kernel rounds the queries to float8 too; the reference does the same (in
    # float32). Under the interpreter the queries are float8 values already (triton 3.6's interpreter
    # rounds some values to float8 wrongly, e.g. 0.488 -> 0.25); on CUDA they are rounded by the kernel.
    k8 = kc.float().to(torch.float8_e4m3fn)
    q8 = q.float().to(torch.float8_e4m3fn).to(dtype) if interp else q
    out8 = context_scores_triton(q8, k8, sp, c["agg"], config=cfg)
    n = ref.shape[-1]
    return {"scores": _rel_err(out[..., :n], ref), "tail_not_inf": float(not torch.isneginf(out[..., n:]).all()),
            "keys8": _rel_err(out8[..., :n], context_scores(q8, k8, sp, c["agg"])),
            "max_heads": _rel_err(top[..., :n], ref.amax(1)),
            "max_heads_tail_not_inf": float(top.shape != (c["b"], s) or not torch.isneginf(top[..., n:]).all())}


def _candidates(sp: torch.Tensor, hkv: int, n: int, sink: int, window: int, gen: torch.Generator):
    """Return (cand, usable) ``[B, Hkv, n]``: distinct free rows of each context, about a fifth of them
    unusable, padded with unusable rows where the context has fewer free rows than ``n``."""
    b = sp.shape[0]
    cand = torch.zeros(b, hkv, n, dtype=torch.long)
    usable = torch.rand(b, hkv, n, generator=gen) > 0.2
    for i in range(b):
        n_free = max(int(sp[i]) - sink - window, 0)
        for h in range(hkv):
            rows = sink + torch.randperm(n_free, generator=gen)[:n]
            cand[i, h, : len(rows)] = rows
            usable[i, h, len(rows) :] = False
    return cand, usable


def rerank_errors(out, q, k_cache, cand, usable, sp, sink: int, window: int, budget: int, prob: bool) -> dict[str, float]:
    """Return how far the kernel's rows ``out`` are from the reference's, compared as sets per (sequence, KV head).

    ``fixed``: wrong sink/window slots, or wrong rows for a context that fits the budget;
    ``invalid``: difference in the number of unfilled (``S``) slots; ``foreign``: chosen rows that
    are not usable candidates, or repeated; ``missing``: the largest share of the reference's
    chosen rows the kernel left out; ``score_loss``: the largest shortfall of the kernel's chosen
    rows' summed reference score (for max logits: above the lowest usable one) against the
    reference's chosen rows'.
    """
    ref = rerank_rows(q, k_cache, cand, usable, sp, sink, window, budget, prob).cpu()
    if out.shape != ref.shape:
        return {"shape": math.inf}
    out, s, forced = out.cpu(), k_cache.shape[2], sink + window
    scores = candidate_scores(q.double(), R.gather_rows(k_cache.double(), cand), usable, prob).cpu()
    err = dict(fixed=float((out[..., :forced] != ref[..., :forced]).sum()), invalid=0.0, foreign=0.0, missing=0.0, score_loss=0.0)
    for b in range(out.shape[0]):
        if int(sp[b]) <= budget:
            err["fixed"] += float((out[b] != ref[b]).sum())
            continue
        for h in range(out.shape[1]):
            ok = usable[b, h].cpu()
            score = dict(zip(cand[b, h].cpu()[ok].tolist(), scores[b, h][ok].tolist()))
            floor = 0.0 if prob else min(score.values(), default=0.0)
            got, want = (r[b, h, forced:] for r in (out, ref))
            picked, best = got[got != s].tolist(), want[want != s].tolist()
            err["invalid"] += abs(len(picked) - len(best))
            err["foreign"] += sum(r not in score for r in picked) + len(picked) - len(set(picked))
            if best:
                err["missing"] = max(err["missing"], 1 - len(set(picked) & set(best)) / len(best))
                total = sum(score[r] - floor for r in best)
                err["score_loss"] = max(err["score_loss"], 1 - sum(score.get(r, floor) - floor for r in picked) / total)
    return err


def check_rerank(c: dict, device: str) -> dict[str, float]:
    """Return the errors of the re-ranking kernel against the reference for one case."""
    from sts.attention.triton_rerank import rerank_rows_triton

    interp = device == "cpu"
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id("r", c).encode()))
    d = (16, 32)[c["d_slot"] - 1] if interp else (64, 128)[c["d_slot"] - 1]
    shape = RADIX_SHAPE if c.get("radix") else RERANK_SHAPE
    s = 12 * shape["cand"]
    sink, window, budget = shape["sink"], shape["window"], shape["sink"] + shape["window"] + shape["free"]
    n_cand = shape["free"] * 2 // 3 if c["scarce"] else shape["cand"]
    dtype = torch.float16 if c.get("half") else torch.float32 if interp else torch.bfloat16
    sp = torch.randint(s // 2, s - c["t"], (c["b"],), generator=gen)
    sp[1:] = budget - torch.arange(sp.shape[0] - 1)  # contexts that fit the budget
    q = torch.randn(c["b"], c["hq"], c["t"], d, generator=gen).to(device, dtype)
    kc = torch.randn(c["b"], c["hkv"], s, d, generator=gen).to(device, dtype)
    cand, usable = (x.to(device) for x in _candidates(sp, c["hkv"], n_cand, sink, window, gen))
    sp = sp.to(device)
    out = rerank_rows_triton(q, kc, cand, usable, sp, sink, window, budget, c["prob"], chunk=shape.get("chunk"))
    return rerank_errors(out, q.float(), kc.float(), cand, usable, sp, sink, window, budget, c["prob"])


def check_rerank_budgets(device: str, radix: bool = False) -> dict[str, float]:
    """Return how far the kernel with per-sequence budgets is from the reference run on each sequence alone at its own
    budget, as sets per (sequence, KV head): ``missing``, the largest share of the solo rows left out; ``size``, the
    difference in rows read; ``past``, rows read past a sequence's first ``budgets[b]`` slots (``radix``: its
    radix path)."""
    from sts.attention.triton_rerank import rerank_rows_triton

    interp = device == "cpu"
    gen = torch.Generator().manual_seed(11)
    shape = RADIX_SHAPE if radix else RERANK_SHAPE
    sink, window, free = shape["sink"], shape["window"], shape["free"]
    forced, s, d = sink + window, 12 * shape["cand"], 16 if interp else 64
    # Own budgets: the round's, a third, none free, and a half twice: once with a context between it and the round's
    # (it must rank, though the round's would read everything), once with a context that fits it.
    budgets = torch.tensor([forced + free, forced + free // 3, forced, forced + free // 2, forced + free // 2])
    sp = torch.tensor([s - 10, s // 2, s // 3, forced + free // 2 + 5, forced + free // 2 - 3])
    q = torch.randn(5, 4, 2, d, generator=gen).to(device, torch.float32 if interp else torch.bfloat16)
    kc = torch.randn(5, 2, s, d, generator=gen).to(device, q.dtype)
    cand, usable = (x.to(device) for x in _candidates(sp, 2, shape["cand"], sink, window, gen))
    sp, budgets = sp.to(device), budgets.to(device)
    out = rerank_rows_triton(q, kc, cand, usable, sp, sink, window, forced + free, True, budgets,
                             chunk=shape.get("chunk")).cpu()
    err = dict(missing=0.0, size=0.0, past=0.0)
    for b in range(5):
        ctx, own = int(sp[b]), int(budgets[b])
        solo = rerank_rows(q[b : b + 1].float(), kc[b : b + 1].float(), cand[b : b + 1], usable[b : b + 1], sp[b : b + 1],
                           sink, window, own, True).cpu()
        for h in range(2):
            got, want = ({int(r) for r in rows if r < ctx} for rows in (out[b, h], solo[0, h]))
            err["missing"] = max(err["missing"], 1 - len(got & want) / max(len(want), 1))
            err["size"] += abs(len(got) - len(want))
            err["past"] += float((out[b, h, own:] < ctx).sum())
    return err


def check_rerank_ties(device: str) -> dict[str, float]:
    """Return, for the one-program and the radix path, how many rows differ from the brute-force choice when 40
    candidates share the best key (exact ties) and 25 free slots: the first 25 of them by candidate position.

    The radix path with 16-bit inputs stores each logit as a float16 offset below its tile's max, so equal logits in
    different tiles may round apart: there the choice must be 25 of the 40 tied rows, not the first 25."""
    from sts.attention.triton_rerank import rerank_rows_triton

    gen = torch.Generator().manual_seed(5)
    d, s, n_cand, sink, window, free = 32, 400, 150, 2, 4, 25
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    # Multiples of 1/4 and 1/16: every product and sum is exact in float32 and bf16, so the 40 tied logits are equal
    # bit for bit whatever order a BLAS or the matrix units add in (random floats tied only on some CPUs).
    q = torch.round(torch.randn(1, 4, 2, d, generator=gen) * 4) / 4
    kc = torch.round(torch.randn(1, 1, s, d, generator=gen) * 1.6) / 16
    sp = torch.tensor([s - 2])
    cand, _ = _candidates(sp, 1, n_cand, sink, window, gen)
    tied = torch.randperm(n_cand, generator=gen)[:40].sort().values
    kc[0, 0, cand[0, 0, tied]] = torch.round(q[0].mean((0, 1)) * 16) / 4  # the same best key in 40 rows
    want = set(cand[0, 0, tied[:free]].tolist())
    usable = torch.ones(1, 1, n_cand, dtype=torch.bool)
    args = [x.to(device) for x in (q.to(dtype), kc.to(dtype), cand, usable, sp)]
    errs = {}
    for name, chunk in (("single", None), ("radix", 64)):
        out = rerank_rows_triton(*args, sink, window, sink + window + free, True, chunk=chunk).cpu()
        got = set(out[0, 0, sink + window :].tolist())
        if name == "radix" and dtype != torch.float32:
            errs[name] = float(len(got - set(cand[0, 0, tied].tolist())) + abs(len(got) - free))
        else:
            errs[name] = float(len(want ^ got))
    return errs


def check_dispatch(device: str) -> dict[str, float]:
    """Return the errors of the dispatch functions against the references (they must pick Triton here)."""
    from sts.attention import dispatch

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 3, 32, generator=gen).to(device)
    kc, vc = (torch.randn(2, 2, 50, 32, generator=gen).to(device) for _ in range(2))
    sp = torch.tensor([20, 47], device=device)
    idx = _indices(sp.cpu(), 2, 16, 50, gen).to(device)
    scores = dispatch.score_context(q, kc, sp)
    cand, usable = (x.to(device) for x in _candidates(sp.cpu(), 2, 20, 2, 4, gen))
    rows = dispatch.rerank_rows(q, kc, cand, usable, sp, 2, 4, 14, True)
    return {
        "uses_triton": float(not dispatch.use_triton(q)),
        "dense": _rel_err(dispatch.verify_attention(q, kc, vc, sp), R.dense_attention(q, kc, vc, sp)),
        "sparse": _rel_err(dispatch.verify_attention(q, kc, vc, sp, idx), R.sparse_attention(q, kc, vc, sp, idx)),
        "scores": _rel_err(scores[..., :47], context_scores(q, kc, sp)) + float(scores.shape[-1] != 50),
        "rerank": sum(rerank_errors(rows, q, kc, cand, usable, sp, 2, 4, 14, True).values()),
    }


def _run_all(device: str) -> dict[str, dict[str, float] | str]:
    results: dict[str, dict[str, float] | str] = {}
    jobs = [(_case_id("verify", c), check_verify, c) for c in VERIFY]
    jobs += [(_case_id("scores", c), check_scores, c) for c in SCORES]
    jobs += [(_case_id("rerank", c), check_rerank, c) for c in RERANK]
    jobs.append(("rerank_budgets", lambda _, device: check_rerank_budgets(device), None))
    jobs.append(("rerank_budgets_radix", lambda _, device: check_rerank_budgets(device, radix=True), None))
    jobs.append(("rerank_ties", lambda _, device: check_rerank_ties(device), None))
    jobs.append(("dispatch", lambda _, device: check_dispatch(device), None))
    for name, fn, c in jobs:
        try:
            results[name] = fn(c, device)
        except Exception as e:  # reported per case by the test that owns it
            results[name] = f"{type(e).__name__}: {e}"
    return results


def _patch_interpreter() -> None:
    """Let triton 3.6's interpreter take loop bounds from program ids under numpy >= 2.4 (triton#9171)."""
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


@pytest.fixture(scope="module")
def results() -> dict:
    if CUDA:
        return _run_all("cuda")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# bf16 operands (CUDA) against a float64 reference; float32 under the interpreter.
VERIFY_TOL = 2e-2 if CUDA else 1e-5
SCORES_TOL = 1e-3 if CUDA else 1e-5


def _errors(results: dict, name: str) -> dict[str, float]:
    res = results[name]
    assert isinstance(res, dict), res
    return res


@pytest.mark.parametrize("case", VERIFY, ids=[_case_id("verify", c) for c in VERIFY])
def test_verify_matches_reference(results, case):
    for what, err in _errors(results, _case_id("verify", case)).items():
        assert err < VERIFY_TOL, f"{what}: relative error {err}"


@pytest.mark.parametrize("case", SCORES, ids=[_case_id("scores", c) for c in SCORES])
def test_scores_match_reference(results, case):
    errs = _errors(results, _case_id("scores", case))
    assert errs["tail_not_inf"] == 0.0, "columns past max(start_pos) must be -inf"
    assert errs["scores"] < SCORES_TOL, f"relative error {errs['scores']}"
    assert errs["keys8"] < SCORES_TOL, f"8-bit keys: relative error {errs['keys8']}"
    assert errs["max_heads_tail_not_inf"] == 0.0, "max over heads: [B, S], -inf past max(start_pos)"
    assert errs["max_heads"] < SCORES_TOL, f"max over heads: relative error {errs['max_heads']}"


# (missing, score loss) by whether the inputs are 16-bit (bf16 on CUDA): near-ties may swap a few rows, at no real
# loss of score; float32 under the interpreter: exact.
RERANK_TOL = {True: (0.02, 1e-3), False: (0.0, 1e-6)}


def assert_rerank_close(errs: dict[str, float], half: bool = CUDA) -> None:
    """Assert that re-ranked rows match the reference (exact slots, near-equal chosen sets; ``half``: 16-bit inputs'
    tolerance)."""
    for what in ("shape", "fixed", "invalid", "foreign"):
        assert errs.get(what, 0.0) == 0.0, f"{what}: {errs}"
    missing_tol, score_tol = RERANK_TOL[half]
    assert errs["missing"] <= missing_tol, f"chosen sets differ: {errs}"
    assert errs["score_loss"] <= score_tol, f"chosen rows score lower: {errs}"


@pytest.mark.parametrize("case", RERANK, ids=[_case_id("rerank", c) for c in RERANK])
def test_rerank_matches_reference(results, case):
    assert_rerank_close(_errors(results, _case_id("rerank", case)), half=CUDA or case.get("half", False))


@pytest.mark.parametrize("job", ["rerank_budgets", "rerank_budgets_radix"])
def test_rerank_with_per_sequence_budgets_reads_each_sequences_solo_rows(results, job):
    errs = _errors(results, job)
    assert errs["size"] == 0.0 and errs["past"] == 0.0, errs
    assert errs["missing"] <= RERANK_TOL[CUDA][0], errs


def test_rerank_breaks_exact_ties_by_candidate_position_on_both_paths(results):
    assert _errors(results, "rerank_ties") == {"single": 0.0, "radix": 0.0}


def test_dispatch_picks_triton_and_matches(results):
    errs = _errors(results, "dispatch")
    assert errs.pop("uses_triton") == 0.0, "dispatch did not choose the Triton path"
    for what, err in errs.items():
        assert err < VERIFY_TOL, f"{what}: relative error {err}"


def test_dispatch_falls_back_to_reference_on_cpu():
    if CUDA or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("only meaningful on CPU without the interpreter")
    from sts.attention import dispatch

    q, kc, vc = torch.randn(1, 2, 2, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    sp = torch.tensor([6])
    idx = torch.tensor([[[1, 4, 9]]])
    assert not dispatch.use_triton(q)
    assert torch.equal(dispatch.verify_attention(q, kc, vc, sp, idx), R.sparse_attention(q, kc, vc, sp, idx))
    assert torch.equal(dispatch.verify_attention(q, kc, vc, sp), R.dense_attention(q, kc, vc, sp))
    scores = dispatch.score_context(q, kc, sp)
    assert scores.shape == (1, 2, 12) and torch.isneginf(scores[..., 6:]).all()
    assert torch.equal(scores[..., :6], context_scores(q, kc, sp))
    cand, usable = torch.tensor([[[3, 1, 2]]]), torch.tensor([[[True, False, True]]])
    ref = rerank_rows(q, kc, cand, usable, sp, 1, 1, 3, True)
    assert torch.equal(dispatch.rerank_rows(q, kc, cand, usable, sp, 1, 1, 3, True), ref)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_verify_scores_and_rerank_replay_in_cuda_graph():
    """Captured once, replayed after start_pos, indices and candidates change in place: still matches the references."""
    from sts.attention.triton_rerank import rerank_rows_triton
    from sts.attention.triton_scores import context_scores_triton
    from sts.attention.triton_verify import sparse_verify_attention

    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, t, d, s, k = 2, 8, 2, 5, 128, 4096, 256
    q = torch.randn(b, hq, t, d, generator=gen).cuda().bfloat16()
    kc, vc = (torch.randn(b, hkv, s, d, generator=gen).cuda().bfloat16() for _ in range(2))
    sp = torch.tensor([1000, 3000], device="cuda")
    idx = _indices(sp.cpu(), hkv, k, s, gen).cuda()
    cand, usable = (x.cuda() for x in _candidates(sp.cpu(), hkv, 700, 4, 64, gen))
    sparse_verify_attention(q, kc, vc, sp, idx)  # compile outside the capture
    context_scores_triton(q[:, :, :4], kc, sp)
    rerank_rows_triton(q, kc, cand, usable, sp, 4, 64, 512, True)
    rerank_rows_triton(q, kc, cand, usable, sp, 4, 64, 512, True, chunk=256)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_verify_attention(q, kc, vc, sp, idx)
        dense = sparse_verify_attention(q, kc, vc, sp)
        scores = context_scores_triton(q[:, :, :4], kc, sp)
        rows = rerank_rows_triton(q, kc, cand, usable, sp, 4, 64, 512, True)
        radix = rerank_rows_triton(q, kc, cand, usable, sp, 4, 64, 512, True, chunk=256)
    sp.copy_(torch.tensor([2500, 500]))  # the second context now fits the budget
    idx.copy_(_indices(sp.cpu(), hkv, k, s, gen))
    for x, new in zip((cand, usable), _candidates(sp.cpu(), hkv, 700, 4, 64, gen)):
        x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(out, R.sparse_attention(q.double(), kc.double(), vc.double(), sp, idx)) < VERIFY_TOL
    assert _rel_err(dense, R.dense_attention(q.double(), kc.double(), vc.double(), sp)) < VERIFY_TOL
    ref = context_scores(q[:, :, :4].double(), kc.double(), sp)
    assert _rel_err(scores[..., :2500], ref) < SCORES_TOL
    for got in (rows, radix):
        assert_rerank_close(rerank_errors(got, q.float(), kc.float(), cand, usable, sp, 4, 64, 512, True))


if __name__ == "__main__":
    _patch_interpreter()
    print(json.dumps(_run_all("cpu")))


def test_kernels_read_only_constexpr_globals():
    """The compiler refuses a kernel that reads a plain module global (an int, a float, a tuple); the interpreter
    accepts it, so the CPU tests would not see it: every name a jitted function reads from its module is a
    ``tl.constexpr``, another jitted function, a module or a class (a dtype and the like)."""
    import ast
    import importlib
    import inspect
    import pkgutil
    import textwrap
    import types

    triton = pytest.importorskip("triton")
    import sts.attention

    bad = []
    for info in pkgutil.iter_modules(sts.attention.__path__):
        if not info.name.startswith("triton_"):
            continue
        module = importlib.import_module(f"sts.attention.{info.name}")
        for name, fn in vars(module).items():
            if not isinstance(fn, triton.runtime.JITFunction) or fn.fn.__module__ != module.__name__:
                continue
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
            local = set(inspect.signature(fn.fn).parameters) | {
                node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in fn.fn.__globals__ \
                        and node.id not in local:
                    value = fn.fn.__globals__[node.id]
                    ok = (triton.language.constexpr, triton.runtime.JITFunction, types.ModuleType, type)
                    if not isinstance(value, ok) and not callable(value):
                        bad.append(f"{info.name}.{name} reads {node.id} = {value!r}")
    assert not bad, bad
