"""Diagnostic: kernel timeline per graph launch of the product's rounds (synthetic 8B/1B pair), 128K b1."""
import json, os, sys, collections
import torch
from torch.profiler import ProfilerActivity, profile
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

out = os.environ["OUT"]
context = int(sys.argv[1]); batch = int(sys.argv[2]); methods = sys.argv[3].split(",")
new = 32
target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.77, max_position_embeddings=context + 96,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
summary = {}
with torch.no_grad():
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, target.config.vocab_size, (context,), generator=gen).tolist()
    max_len = context + new + 16
    reader = Engine(target, draft, slots=batch, max_len=max_len)
    reader.prefill(0, prompt)
    for b in range(1, batch):
        reader.prefill(b, prompt, copy_from=0)
    del reader
    for m in methods:
        gamma = 6 if m.endswith("g6") else 4
        sts = m.startswith("sts")
        options = {"key_bits": 8} if "k8" in m else {}  # e.g. sts-k8: STS's 8-bit draft keys
        policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft, **options) if sts else None
        sel = "scored" if "scoredonly" in m else "scored-all"
        cfg = EngineConfig(gamma=gamma, draft_budget=4096 if sts else None, draft_selection=sel if sts else "recent", verify="auto" if "auto" in m else ("sparse" if sts else "auto"))
        eng = Engine(target, draft if m != "autoregressive" else None, policy, slots=batch, max_len=max_len, config=cfg)
        prompts = [prompt[:-1] + [s] for s in range(batch)]
        eng.generate(prompts, new, cached=True); eng.generate(prompts, new, cached=True)
        torch.cuda.synchronize()
        res = eng.generate(prompts, new, cached=True)
        wall = 1e3 * (res.stats.time_s - res.stats.prefill_s) / max(res.stats.target_forwards, 1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            res = eng.generate(prompts, new, cached=True)
            torch.cuda.synchronize()
        path = f"{out}/trace.json"
        prof.export_chrome_trace(path)
        ev = json.load(open(path))["traceEvents"]
        os.remove(path)
        kern = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        glaunch = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"}
        groups = collections.OrderedDict()
        for k in sorted(kern, key=lambda e: e["ts"]):
            c = k["args"].get("correlation")
            if c in glaunch:
                groups.setdefault(c, []).append(k)
        rows = []
        for corr, ks in groups.items():
            span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
            busy = sum(k["dur"] for k in ks)
            top = collections.Counter(); cnt = collections.Counter()
            for k in ks:
                key = (k["cat"] + ":" + k["name"])[:110]
                top[key] += k["dur"]; cnt[key] += 1
            rows.append({"start": round(ks[0]["ts"], 1), "kernels": len(ks), "span_us": round(span, 1), "busy_us": round(busy, 1),
                         "top": [(n, cnt[n], round(v, 1)) for n, v in top.most_common(40)]})
        launches = sorted(glaunch.values(), key=lambda e: e["ts"])
        firsts = [ks[0]["ts"] for ks in groups.values()]; lasts = [ks[-1]["ts"] + ks[-1]["dur"] for ks in groups.values()]
        gaps = [round(firsts[i + 1] - lasts[i], 1) for i in range(len(firsts) - 1)]
        print("   gaps between graphs (us):", gaps[3:12], flush=True)
        summary[m] = {"gaps": gaps, "rounds": res.stats.target_forwards, "accepted": res.stats.accepted_per_round if hasattr(res.stats, "accepted_per_round") else None,
                      "wall_ms_per_round_unprofiled": wall, "graphs": rows[3:9]}
        print(m, context, batch, res.stats.target_forwards, round(wall, 3), len(rows), "graph launches", flush=True)
        for r in rows[3:5]:
            print("   ", {k: v for k, v in r.items() if k != "top"}, flush=True)
            print("      mem:", [t for t in r["top"] if not t[0].startswith("kernel")], flush=True)
            ks = sorted([k for k in groups[list(groups)[3 + rows[3:5].index(r)]]], key=lambda e: e["ts"])
            idle = sorted(((ks[i + 1]["ts"] - ks[i]["ts"] - ks[i]["dur"], ks[i]["name"][:60], ks[i + 1]["name"][:60]) for i in range(len(ks) - 1)), reverse=True)[:8]
            print("      largest idle:", [(round(a, 1), b, c) for a, b, c in idle], flush=True)
        del eng
        torch.cuda.empty_cache()
json.dump(summary, open(f"{out}/timeline-{context}-{batch}.json", "w"), indent=1)
