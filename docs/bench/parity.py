"""Dense-round parity: speculative vs sts (dense rounds by the cost model) at 8K, batch 1 and 4, interleaved repeats."""
import json, os
import torch
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

out = os.environ.get("OUT", "/tmp")
ctx_len = 8192
target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.9303, max_position_embeddings=ctx_len + 400,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
gen = torch.Generator().manual_seed(1)
prompt = torch.randint(0, target.config.vocab_size, (ctx_len,), generator=gen).tolist()
rec = {}
with torch.no_grad():
    for batch in (1, 4):
        prompts = [prompt[:-1] + [s] for s in range(batch)]
        engines = {}
        for name in ("speculative", "sts"):
            policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft) if name == "sts" else None
            cfg = EngineConfig(draft_budget=4096, draft_selection="scored-all") if policy else EngineConfig()
            engines[name] = Engine(target, draft, policy, slots=batch, max_len=ctx_len + 300, config=cfg)
            engines[name].generate(prompts, 32)
        for rep in range(4):
            for name, eng in engines.items():
                s = eng.generate(prompts, 256, cached=True).stats
                rec.setdefault(f"b{batch}/{name}", []).append(s.summary()["tokens_per_s"])
        print(batch, {k: v for k, v in rec.items() if k.startswith(f"b{batch}")}, flush=True)
        del engines
        torch.cuda.empty_cache()
json.dump(rec, open(f"{out}/parity-8k.json", "w"), indent=1)
