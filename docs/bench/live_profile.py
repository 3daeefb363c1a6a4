"""Diagnostic: live-loop kernel timeline of dense rounds, sts (scored-all) vs sts-sparse-recent at 8K b1; per-position gap diff."""
import os, json, collections
import torch
from torch.profiler import ProfilerActivity, profile
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

out = os.environ["OUT"]
ctx_len = 8000
target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.77, max_position_embeddings=ctx_len + 1200,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
prompt = torch.randint(0, 1000, (ctx_len,)).tolist()
rounds = {}
with torch.no_grad():
    for name in ("sts", "recent", "sts-noscored", "sts", "recent"):
        policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft)
        kw = dict(draft_budget=4096, draft_selection="scored-all") if name.startswith("sts") else dict(draft_budget=4096)
        eng = Engine(target, draft, policy, slots=1, max_len=ctx_len + 1100, config=EngineConfig(**kw))
        if name == "sts-noscored":
            eng.scored_draft = None
        eng.generate([prompt], 64)
        res = [eng.generate([prompt], 256, cached=True).stats for _ in range(2)]
        print(name, "tok/s", [r.summary()["tokens_per_s"] for r in res], "draft ms/round", [round(r.draft_s * 1e3 / r.target_forwards, 3) for r in res],
              "verify", [round(r.verify_s * 1e3 / r.target_forwards, 3) for r in res], flush=True)
        if name in rounds:
            continue
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.generate([prompt], 64, cached=True)
            torch.cuda.synchronize()
        path = f"/tmp/trace-{name}.json"
        prof.export_chrome_trace(path)
        ev = json.load(open(path))["traceEvents"]
        kern = sorted([e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")], key=lambda e: e["ts"])
        glaunch = {e["args"]["correlation"] for e in ev if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"}
        groups = collections.OrderedDict()
        for k in kern:
            c = k["args"].get("correlation")
            if c in glaunch:
                groups.setdefault(c, []).append(k)
        gl = list(groups.values())
        rounds[name] = [[(k["name"][:50], round(k["dur"], 2), round((ks[i + 1]["ts"] - k["ts"] - k["dur"]) if i + 1 < len(ks) else 0, 2)) for i, k in enumerate(ks)] for ks in gl[4:8]]
        del eng
        torch.cuda.empty_cache()
a, b = rounds["sts"], rounds["recent"]
for gi in range(min(len(a), len(b))):
    ga, gb = a[gi], b[gi]
    print("graph", gi, len(ga), len(gb), "busy", round(sum(x[1] for x in ga), 1), round(sum(x[1] for x in gb), 1),
          "idle", round(sum(x[2] for x in ga), 1), round(sum(x[2] for x in gb), 1), flush=True)
    if len(ga) == len(gb):
        diffs = sorted(((ga[i][2] - gb[i][2], i, ga[i][0], ga[i + 1][0] if i + 1 < len(ga) else "") for i in range(len(ga))), reverse=True)
        print("   top gap increases:", [(round(d, 2), i, n1, n2) for d, i, n1, n2 in diffs[:10]], flush=True)
        hist = collections.Counter(round(ga[i][2] - gb[i][2]) for i in range(len(ga)))
        print("   gap diff histogram (us):", sorted(hist.items())[:30], flush=True)
json.dump(rounds, open(f"{out}/densediag3.json", "w"))
