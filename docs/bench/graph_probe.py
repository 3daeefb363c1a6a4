"""Diagnostic: dense rounds of sts vs speculative at 8K b1 (synthetic 8B/1B): per-graph replay times, memcpy nodes
in the captured graphs (DOT), in both creation orders."""
import os, re, sys, collections, json
import torch
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

out = os.environ.get("OUT", "/tmp")
ctx_len = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
made = []
Base = torch.cuda.CUDAGraph


class Debug(Base):
    def __init__(self, *a, **k):
        k["keep_graph"] = True
        super().__init__(*a, **k)
        self.enable_debug_mode()
        made.append(self)


torch.cuda.CUDAGraph = Debug
target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.77, max_position_embeddings=ctx_len + 1200,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
prompt = torch.randint(0, 1000, (ctx_len,)).tolist()
max_len = ctx_len + 1100
report = {}


def build(name):
    policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft) if name.startswith("sts") else None
    kw = {}
    if name == "sts":
        kw = dict(draft_budget=4096, draft_selection="scored-all")
    elif name == "sts-recent":
        kw = dict(draft_budget=None, draft_selection="recent")
    return Engine(target, draft, policy, slots=1, max_len=max_len, config=EngineConfig(**kw))


def replay_ms(graphs, eng, n=40):
    saved = [t.clone() for t in (eng.ctx, eng.last, eng.prev)]
    res = []
    for g in graphs:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            g.replay()
        a.record()
        for _ in range(n):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        res.append(round(a.elapsed_time(b) / n, 4))
        for s, t in zip(saved, (eng.ctx, eng.last, eng.prev)):
            t.copy_(s)
    return res


with torch.no_grad():
    for order in (("spec", "sts", "sts-recent"), ("sts", "spec")):
        for name in order:
            first = len(made)
            eng = build(name)
            eng.generate([prompt], 64)
            eng.generate([prompt], 64, cached=True)
            tps = []
            for _ in range(3):
                r = eng.generate([prompt], 256, cached=True)
                tps.append(round(r.stats.summary()["tokens_per_s"], 1))
            ours = made[first:]
            graphs = eng._graphs[(0, "greedy")]
            times = replay_ms(graphs, eng)
            kinds_all = []
            for i, g in enumerate(graphs):
                path = f"/tmp/graph-{name}-{i}.dot"
                g.debug_dump(path)
                text = open(path).read()
                kinds = collections.Counter(re.findall(r"\b(MEMCPY|MEMSET|KERNEL|HOST|EVENT_RECORD|EVENT_WAIT|MEM_ALLOC|MEM_FREE|EMPTY)\b", text))
                kinds_all.append(dict(kinds))
                if name in ("spec", "sts") and order[0] == "spec":
                    os.system(f"cp {path} {out}/")
                    if i == 0:
                        print(text[:1500], flush=True)
                mem = [m.group(0)[:400] for m in re.finditer(r"MEMCPY[^\n]*", text)][:10]
                print(order[0], name, "graph", i, dict(kinds), "edges", text.count("->"), flush=True)
                for m in mem:
                    print("     ", m, flush=True)
            print(order[0], name, "tok/s", tps, "replay ms", times, "graphs made", len(ours), flush=True)
            report[f"{order[0]}-first/{name}"] = {"tokens_per_s": tps, "replay_ms": times, "nodes": kinds_all}
            del eng
            torch.cuda.empty_cache()
json.dump(report, open(f"{out}/densediag-{ctx_len}.json", "w"), indent=1)
