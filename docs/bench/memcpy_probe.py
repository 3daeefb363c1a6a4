"""Diagnostic: where the D2D memcpys of a dense STS round come from (eager, CUDA, Python stacks)."""
import collections, torch
from torch.profiler import ProfilerActivity, profile
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.77, max_position_embeddings=4200, dtype=torch.bfloat16, device=torch.device("cuda"))
prompt = torch.randint(0, 1000, (4000,)).tolist()
with torch.no_grad():
    for name in ("spec", "sts"):
        policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft) if name == "sts" else None
        cfg = EngineConfig(draft_budget=4096 if policy else None, draft_selection="scored-all" if policy else "recent", cuda_graphs=False)
        eng = Engine(target, draft, policy, slots=1, max_len=4200, config=cfg)
        eng.generate([prompt], 8)
        eng.prefill(0, prompt)
        eng.round_budget, eng.round_mode = 0, "greedy"
        for phase in eng._phases(0):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                phase()
                torch.cuda.synchronize()
            c = collections.Counter()
            for e in prof.events():
                if e.name in ("cudaMemcpyAsync", "cudaMemsetAsync"):
                    stack = [s for s in (e.stack or []) if "sts" in s][:3]
                    c[(e.name, " | ".join(stack))] += 1
            print(name, phase.__name__, flush=True)
            for k, v in c.items():
                print("   ", v, k, flush=True)
