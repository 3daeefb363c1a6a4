"""Diagnostic: which part of ScoredDraftAttention.start slows later dense rounds (8K b1)."""
import torch
from sts.bench.synthetic import synthetic_pair
from sts.engine import Engine, EngineConfig
from sts.selection import SelectionConfig, make_policy

ctx_len = 8000
target, draft = synthetic_pair("llama3-8b", "llama3.2-1b", 0.77, max_position_embeddings=ctx_len + 1200,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
prompt = torch.randint(0, 1000, (ctx_len,)).tolist()


def run(name, start=None):
    policy = make_policy("sts", SelectionConfig(budget=512, sink=4, window=64), target, draft)
    eng = Engine(target, draft, policy, slots=1, max_len=ctx_len + 1100,
                 config=EngineConfig(draft_budget=4096, draft_selection="scored-all"))
    sd = eng.scored_draft
    if start:
        sd.start = lambda slot, n: start(sd, slot, n)
    eng.generate([prompt], 64)
    res = [eng.generate([prompt], 256, cached=True).stats for _ in range(2)]
    print(f"{name:28s}", "tok/s", [r.summary()["tokens_per_s"] for r in res], "draft ms/round",
          [round(r.draft_s * 1e3 / r.target_forwards, 3) for r in res], "verify", [round(r.verify_s * 1e3 / r.target_forwards, 3) for r in res], flush=True)
    del eng
    torch.cuda.empty_cache()


def host_built(self, slot, n):
    free = self.rows.shape[-1] - self.recent
    first = n - self.window - free
    rows = torch.arange(first, first + free)
    self.rows[:, slot, :, self.recent:] = torch.where(rows >= self.sink, rows, self.invalid).to(self.rows.device)


def arange_only(self, slot, n):
    free = self.rows.shape[-1] - self.recent
    first = n - self.window - free
    torch.arange(first, first + free, device=self.rows.device)


def fill_only(self, slot, n):
    self.rows[:, slot, :, self.recent:] = self.invalid


def where_only(self, slot, n):
    free = self.rows.shape[-1] - self.recent
    first = n - self.window - free
    rows = torch.arange(first, first + free, device=self.rows.device)
    torch.where(rows >= self.sink, rows, self.invalid)


def write_contig(self, slot, n):  # same values, written through a contiguous temporary
    free = self.rows.shape[-1] - self.recent
    first = n - self.window - free
    rows = torch.arange(first, first + free, device=self.rows.device)
    vals = torch.where(rows >= self.sink, rows, self.invalid)
    self.rows[:, slot, :, self.recent:].copy_(vals.expand(self.rows.shape[0], self.rows.shape[2], free).contiguous())


def orig_sync(self, slot, n):
    type(self).start(self, slot, n)
    torch.cuda.synchronize()


with torch.no_grad():
    for _ in range(2):
        run("original")
        run("no-op", lambda self, s, n: None)
        run("host built", host_built)
        run("arange only", arange_only)
        run("where only", where_only)
        run("fill only", fill_only)
        run("write contiguous", write_contig)
        run("original + sync", orig_sync)
