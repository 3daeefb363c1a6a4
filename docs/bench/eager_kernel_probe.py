"""Diagnostic: which eager kernels before the rounds slow later graph replays (8K b1, dense rounds of sts)."""
import torch
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

ctx_len = 8000
target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.77, max_position_embeddings=ctx_len + 1200,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
prompt = torch.randint(0, 1000, (ctx_len,)).tolist()
dev = torch.device("cuda")


def run(name, extra=None):
    policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft)
    eng = Engine(target, draft, policy, slots=1, max_len=ctx_len + 1100,
                 config=EngineConfig(draft_budget=4096, draft_selection="scored-all"))
    sd = eng.scored_draft
    orig = sd.start
    def start(slot, n):
        orig(slot, n)
        if extra:
            extra()
    sd.start = start
    eng.generate([prompt], 64)
    res = [eng.generate([prompt], 256, cached=True).stats for _ in range(2)]
    print(f"{name:34s}", "tok/s", [r.summary()["tokens_per_s"] for r in res], "draft ms/round",
          [round(r.draft_s * 1e3 / r.target_forwards, 3) for r in res], flush=True)
    del eng
    torch.cuda.empty_cache()


x = torch.arange(4096, device=dev)
y = torch.randn(4096, device=dev)
with torch.no_grad():
    for _ in range(2):
        run("fixed start()")
        run("+ int64 compare with scalar", lambda: x >= 4)
        run("+ int64 where(scalar)", lambda: torch.where(x >= 4, x, 7))
        run("+ int64 where(tensor)", lambda: torch.where(x >= 4, x, x))
        run("+ float compare", lambda: y >= 0.5)
        run("+ int64 add scalar", lambda: x + 4)
        run("+ compare then float mul", lambda: ((x >= 4), y * 2))
